"""Kept captions per second from SmolLM2-135M on this CPU: the batched llama-cpp backend against the one-prompt-at-a-
time backend it replaced (kept below, only here), beside 0, 1 or 2 busy-loop processes, and the openai backend
against a local `python -m llama_cpp.server` with several requests in flight.

    .venv/bin/python benchmarks/bench_generate_text.py --prompts 60 600 --hogs 0 1 2 --threads 1 2
    .venv/bin/python benchmarks/bench_generate_text.py --prompts 60 --only-openai --concurrency 1 4

Which llama.cpp build runs (generic AVX2, or with the CPU's AVX512: see the Makefile) is printed in every row; to
compare builds, run this once per build with the other build's llama-cpp-python first on PYTHONPATH.

Prompts are made as generate-text makes them (its prompts file, 1-4 labels drawn from a fixed list, one seed
each) and the answers go through its verification and de-duplication, so "kept" is what the stage would keep.
Times cover decoding only (model load is printed apart); every configuration answers the same prompts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import llama_cpp
import numpy as np

from ovml.pipeline.caption_pool import dedup_key
from ovml.pipeline.caption_prompts import CaptionPrompts, PlannedPrompt
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import ChatRequest, LlamaCppBackend, OpenAIBackend, Sampling, default_gguf, shipped_gguf
from ovml.pipeline.vocabulary import MentionMatcher, parse_vocabulary
from ovml.stages.generate_text import MAX_WORDS, _verify

LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle", "person", "beach", "bus", "bird",
          "table", "cup", "umbrella", "train", "flower", "bench", "kite", "sheep", "truck", "clock", "book",
          "bottle", "laptop", "pizza", "airplane", "cow", "mountain", "bridge"]
BUILD = "avx512" if b"AVX512 = 1" in llama_cpp.llama_print_system_info() else "generic"
SAMPLING = Sampling(temperature=0.8, top_p=0.95, max_tokens=96, max_words=MAX_WORDS)  # generate-text's


class OneAtATimeBackend(LlamaCppBackend):
    """The llama-cpp backend before batching (commit 850ab03): each prompt alone through create_completion,
    from the shared prefix evaluated once in llama-cpp-python's own context, 2 threads. Kept for comparison."""

    def __init__(self, sampling: Sampling, threads: int = 2):
        from llama_cpp import Llama

        super().__init__(None, sampling, threads=1)
        self._single = Llama(model_path=str(shipped_gguf()), n_ctx=1024, n_threads=threads, verbose=False)
        self._in_cache: list[int] | None = None

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        for request in requests:
            tokens, prefix = self._prepared(request)
            if prefix != self._in_cache:
                self._single.reset()
                self._single.eval(prefix)
                self._in_cache = prefix
            self._single.n_tokens = len(prefix)
            answer = self._single.create_completion(
                tokens, seed=request.seed, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens, stop=['"', "\n"])["choices"][0]
            text = answer["text"].rstrip("\\")
            yield json.dumps({"caption": text}) if answer["finish_reason"] == "stop" else self.PREFILL + text


def plan(n: int, seed: int = 0) -> list[PlannedPrompt]:
    prompts = CaptionPrompts.load()
    rng = np.random.default_rng(seed)
    ids = list(prompts.variants)
    return [PlannedPrompt(tuple(rng.choice(LABELS, size=int(rng.integers(1, 5)), replace=False)),
                          ids[int(rng.integers(len(ids)))], int(rng.integers(2**31))) for _ in range(n)]


def measure(name: str, backend, planned: list[PlannedPrompt], heads: bool = True, **fields) -> dict:
    prompts = CaptionPrompts.load()
    matcher = MentionMatcher(parse_vocabulary("\n".join(LABELS)))
    requests = [ChatRequest(prompts.messages(p.prompt_id, p.labels), p.seed, prompts.head(p.prompt_id) if heads else "")
                for p in planned]
    seen: set[str] = set()
    kept = 0
    start = time.perf_counter()
    for prompt, raw in zip(planned, backend.complete(requests), strict=True):
        reason, text, _ = _verify(raw, prompt, matcher, seen)
        if reason is None:
            seen.add(dedup_key(text))
            kept += 1
    seconds = time.perf_counter() - start
    row = {"path": name, "build": BUILD, **fields, "prompts": len(planned), "kept": kept,
           "keep_rate": kept / len(planned), "seconds": seconds, "kept_per_s": kept / seconds}
    print(json.dumps(row), flush=True)
    return row


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.terminate()
        p.wait()


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()),
                               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=1) as response:
                if response.status == 200:
                    return server, base_url
        except OSError:
            time.sleep(0.1)
    server.terminate()
    raise SystemExit("llama_cpp.server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[60])
    parser.add_argument("--hogs", type=int, nargs="+", default=[0], help="busy-loop processes beside the run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="threads of the batched backend")
    parser.add_argument("--old-up-to", type=int, default=60, help="run the one-at-a-time backend (2 threads) "
                        "only for prompt counts up to this")
    parser.add_argument("--only-openai", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="openai requests in flight")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=[None], help="GGUF files of the batched backend (default: "
                        "generate-text's, SmolLM2 in Q8_0)")
    parser.add_argument("--sequences", type=int, nargs="+", default=[LlamaCppBackend.SEQUENCES],
                        help="prompts the batched backend decodes together")
    parser.add_argument("--repeat-penalties", type=float, nargs="+", default=[LlamaCppBackend.REPEAT_PENALTY],
                        help="the batched backend's repeat penalty (1.0: none, as before it had one)")
    parser.add_argument("--heads", nargs="+", choices=["yes", "no"], default=["yes"],
                        help="send each variant's head (its words before the labels, evaluated once) or not")
    args = parser.parse_args()
    if min(args.repeat_penalties) <= 0:
        parser.error("--repeat-penalties must be > 0 (1.0: none)")
    rows = []
    for hogs in args.hogs:
        processes = start_hogs(hogs)
        try:
            for n in args.prompts:
                planned = plan(n)
                if args.only_openai:
                    server, base_url = start_server(args.server_threads)
                    try:
                        for c in args.concurrency:
                            backend = OpenAIBackend(base_url, None, SAMPLING, concurrency=c)
                            rows.append(measure("openai", backend, planned, threads=args.server_threads,
                                                concurrency=c, hogs=hogs))
                    finally:
                        stop([server])
                    continue
                if n <= args.old_up_to:
                    rows.append(measure("one at a time", OneAtATimeBackend(SAMPLING), planned, False, threads=2,
                                        hogs=hogs))
                for model, heads, threads, sequences, penalty in itertools.product(
                        args.models, args.heads, args.threads, args.sequences, args.repeat_penalties):
                    loaded = time.perf_counter()
                    backend = type("Batched", (LlamaCppBackend,), {"SEQUENCES": sequences, "REPEAT_PENALTY": penalty})(
                        model, SAMPLING, threads)
                    print(f"model load {time.perf_counter() - loaded:.2f} s", file=sys.stderr)
                    rows.append(measure(f"batched {backend.model}, {sequences} sequences" +
                                        (", heads" if heads == "yes" else "") + f", repeat penalty {penalty}",
                                        backend, planned, heads == "yes", threads=threads, hogs=hogs))
                    del backend
        except OvmlError as e:
            raise SystemExit(str(e)) from None
        finally:
            stop(processes)
    print("| path | llama.cpp build | threads | busy loops beside | prompts | kept | keep rate | seconds "
          "| kept captions/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["path"] + (f" (concurrency {r['concurrency']})" if "concurrency" in r else "")
        print(f"| {label} | {r['build']} | {r['threads']} | {r['hogs']} | {r['prompts']} | {r['kept']} "
              f"| {r['keep_rate']:.1%} | {r['seconds']:.1f} | {r['kept_per_s']:.2f} |")


if __name__ == "__main__":
    main()
