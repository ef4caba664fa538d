"""generate-text with the real SmolLM2-135M: in process through llama-cpp, and over HTTP from a real
`python -m llama_cpp.server`. Vocabularies stay small: the machine has two cores."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ovml.pipeline.llm import ChatRequest, LlamaCppBackend, Sampling, default_gguf
from ovml.pipeline.vocabulary import MentionMatcher, parse_vocabulary
from ovml.stages.generate_text import CaptionPrompts, GenerateTextConfig, generate_text

pytestmark = pytest.mark.slow

LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle"]


def write_labels(tmp_path: Path, labels: list[str]) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(labels) + "\n", encoding="utf-8")
    return path


def read_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(sorted((run_dir / "captions").glob("part-*.parquet"))).to_pylist()


def part_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "captions").glob("part-*.parquet"))}


def assert_verified_and_counted(run_dir: Path, labels: list[str], per_label: int, summary: dict) -> list[dict]:
    rows = read_rows(run_dir)
    matcher = MentionMatcher(parse_vocabulary("\n".join(labels)))
    for row in rows:
        assert row["labels"] == matcher.mentions(row["text"])
        assert set(row["labels"]) & set(row["requested"])
    per_label_kept = Counter(label for row in rows for label in row["labels"])
    assert min(per_label_kept[label] for label in labels) >= per_label
    assert summary["kept"] == len(rows) == len({row["caption_id"] for row in rows})
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["requested"]
    return rows


def test_smollm2_writes_verified_captions_for_every_label(tmp_path):
    cfg = GenerateTextConfig(run_dir=tmp_path / "run", labels=str(write_labels(tmp_path, LABELS)), per_label=2,
                             max_labels=3, max_tokens=48, part_size=8)
    outcome = generate_text(cfg)
    rows = assert_verified_and_counted(tmp_path / "run", LABELS, 2, outcome.summary)
    assert {(row["backend"], row["model"]) for row in rows} == {("llama-cpp", default_gguf().name)}


def test_an_answer_depends_only_on_its_prompt_and_seed_not_on_the_prompts_answered_before():
    """Ray actors and resumed runs answer the same prompts in other orders. With llama-cpp-python's reuse of
    the longest prefix shared with the previous prompt, 1 of these 32 answers changed with the order."""
    prompts = CaptionPrompts.load()
    variants = list(prompts.variants)
    label_sets = [("car", "cat"), ("dog", "tree"), ("cat",), ("car", "dog", "tree"), ("tree", "cat"), ("dog",),
                  ("car",), ("cat", "dog")]
    requests = [ChatRequest(prompts.messages(variants[i % len(variants)], labels), 1000 + i)
                for i, labels in enumerate(label_sets)]
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=96)
    alone = [next(LlamaCppBackend(None, sampling).complete([request])) for request in requests]
    backend = LlamaCppBackend(None, sampling)
    for shuffle_seed in range(4):
        order = list(range(len(requests)))
        random.Random(shuffle_seed).shuffle(order)
        answers = {i: next(backend.complete([requests[i]])) for i in order}
        assert [answers[i] for i in range(len(requests))] == alone


def test_an_answer_past_the_word_limit_stops_there_and_a_shorter_one_is_unchanged():
    """generate-text drops a caption of more than MAX_WORDS words, so decoding stops one word past the limit:
    the stopped answer must be the full answer's beginning, and every answer within the limit the same text."""
    from ovml.pipeline.llm import parse_caption

    prompts = CaptionPrompts.load()
    variants = list(prompts.variants)
    label_sets = [("dog",), ("car", "cat"), ("tree", "boat", "horse"), ("chair",), ("bicycle", "dog"), ("cat",)]
    requests = [ChatRequest(prompts.messages(variants[i % len(variants)], labels), 3000 + i)
                for i, labels in enumerate(label_sets)]
    full = [parse_caption(a) or "" for a in LlamaCppBackend(None, Sampling(
        temperature=0.8, top_p=0.95, max_tokens=48)).complete(requests)]
    limit = min(len(text.split()) for text in full if text)  # the shortest answer: the others run past it
    stopped = [parse_caption(a) or "" for a in LlamaCppBackend(None, Sampling(
        temperature=0.8, top_p=0.95, max_tokens=48, max_words=limit)).complete(requests)]
    assert any(len(text.split()) > limit for text in full)
    for whole, cut in zip(full, stopped, strict=True):
        if not whole:  # cut off at max_tokens in full: the word stop may end it earlier, as it should
            continue
        if len(whole.split()) <= limit:
            assert cut == whole
        else:
            assert len(cut.split()) == limit + 1 and whole.split()[:limit] == cut.split()[:limit]


def test_an_answer_does_not_depend_on_the_prompts_decoded_beside_it_nor_on_threads():
    """The backend decodes up to SEQUENCES prompts together; which ones share a batch changes with part sizes,
    Ray batches and resumes. Each prompt alone (one sequence, 2 threads) must give the text it gives inside a
    full batch, and inside a batch of other size and order where prompts join as others finish (1 thread)."""
    prompts = CaptionPrompts.load()
    variants = list(prompts.variants)
    label_sets = [("dog",), ("car", "cat"), ("tree", "boat", "horse"), ("chair",), ("bicycle", "dog"), ("cat",)]
    requests = [ChatRequest(prompts.messages(variants[i % len(variants)], labels), 2000 + i,
                            prompts.head(variants[i % len(variants)])) for i, labels in enumerate(label_sets)]
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=24)
    two_threads = LlamaCppBackend(None, sampling, threads=2)
    alone = [next(two_threads.complete([request])) for request in requests]
    together = list(two_threads.complete(requests))
    one_thread = LlamaCppBackend(None, sampling, threads=1)
    one_thread.SEQUENCES = 2  # four prompts join mid-way, beside other ones, in another order
    one_thread.PREFIXES = 2  # five heads through two prefix sequences: each evaluated again after eviction
    reordered = list(one_thread.complete(requests[::-1]))[::-1]
    assert len(set(alone)) == len(requests)
    assert together == alone
    assert reordered == alone


def test_killed_run_resumes_to_the_same_captions_as_an_uninterrupted_run(tmp_path):
    labels = write_labels(tmp_path, LABELS[:4])
    common = ["--labels", str(labels), "--per-label", "1", "--max-labels", "2", "--max-tokens", "48",
              "--part-size", "1"]
    generate_text(GenerateTextConfig(run_dir=tmp_path / "straight", labels=str(labels), per_label=1,
                                     max_labels=2, max_tokens=48, part_size=1))
    expected = part_bytes(tmp_path / "straight")
    assert len(expected) >= 2
    killed = subprocess.Popen([sys.executable, "-m", "ovml.cli", "generate-text", "--run-dir", str(tmp_path / "killed"),
                               *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / "killed" / ".staging"  # parts land here until the whole pool is complete
    while not list(staging.rglob("part-00000.parquet")) and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "generate-text finished before it could be killed"
    survived = list(staging.rglob("part-*.parquet"))
    assert 1 <= len(survived) < len(expected) and part_bytes(tmp_path / "killed") == {}
    outcome = generate_text(GenerateTextConfig(run_dir=tmp_path / "killed", labels=str(labels), per_label=1,
                                               max_labels=2, max_tokens=48, part_size=1))
    assert outcome.reason.startswith("resuming an interrupted run")
    assert part_bytes(tmp_path / "killed") == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def llama_server():
    """A real OpenAI-compatible llama.cpp server with the SmolLM2 GGUF, on a free local port."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()),
                               "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "llama_cpp.server exited during start-up"
            assert time.monotonic() < deadline, "llama_cpp.server did not become ready within 60 s"
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield base_url
    finally:
        server.terminate()
        server.wait(timeout=30)


LLAMA_SERVER_DIALECT = "json_object"  # llama-cpp-python 0.3.x answers json_schema with HTTP 500


def test_openai_backend_generates_through_a_real_llama_cpp_server(tmp_path, llama_server):
    labels = LABELS[:4]
    cfg = GenerateTextConfig(run_dir=tmp_path / "run", labels=str(write_labels(tmp_path, labels)), per_label=1,
                             max_labels=2, max_tokens=48, backend="openai", base_url=llama_server, concurrency=2)
    outcome = generate_text(cfg)
    rows = assert_verified_and_counted(tmp_path / "run", labels, 1, outcome.summary)
    assert {row["backend"] for row in rows} == {"openai"}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    summary = manifest["stages"]["generate_text"]["summary"]
    assert summary["kept"] == len(rows)
    print("structured output dialect llama_cpp.server took:", summary["structured_output"])
    assert summary["structured_output"] == LLAMA_SERVER_DIALECT
