"""Kept captions per second from SmolLM2-135M: in-process llama-cpp, and the openai backend against a local
`python -m llama_cpp.server` with the same GGUF. Wall time covers the whole stage (model load included).

    .venv/bin/python benchmarks/bench_generate_text.py [--labels 20] [--per-label 3] [--only-openai]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ovml.pipeline.llm import default_gguf
from ovml.stages.generate_text import GenerateTextConfig, generate_text

LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle", "person", "beach", "bus", "bird",
          "table", "cup", "umbrella", "train", "flower", "bench", "kite", "sheep", "truck", "clock", "book",
          "bottle", "laptop", "pizza", "airplane", "cow", "mountain", "bridge"]


def run(name: str, workdir: Path, labels: Path, per_label: int, **backend) -> dict:
    cfg = GenerateTextConfig(run_dir=workdir / name, labels=str(labels), per_label=per_label, **backend)
    start = time.perf_counter()
    summary = generate_text(cfg).summary
    seconds = time.perf_counter() - start
    return {"backend": name, "requested": summary["requested"], "kept": summary["kept"], "seconds": seconds,
            "kept_per_s": summary["kept"] / seconds, "prompts_per_s": summary["requested"] / seconds}


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
    parser.add_argument("--labels", type=int, default=20, help="vocabulary size (first N of a fixed list)")
    parser.add_argument("--per-label", type=int, default=3)
    parser.add_argument("--only-openai", action="store_true", help="skip the in-process llama-cpp run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        labels = workdir / "labels.txt"
        labels.write_text("\n".join(LABELS[:args.labels]) + "\n", encoding="utf-8")
        results = [] if args.only_openai else [run("llama-cpp", workdir, labels, args.per_label)]
        server, base_url = start_server(threads=2)
        try:
            results.append(run("openai", workdir, labels, args.per_label, backend="openai", base_url=base_url,
                               concurrency=2))
        finally:
            server.terminate()
            server.wait()
    print(f"| backend | prompts | kept | seconds | kept captions/s | prompts/s |  ({args.labels} labels x "
          f"{args.per_label})")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['requested']} | {r['kept']} | {r['seconds']:.1f} | {r['kept_per_s']:.2f} "
              f"| {r['prompts_per_s']:.2f} |")


if __name__ == "__main__":
    main()
