"""embed-text speed: the length-sorted, truncated causal path vs plain open_clip encode_text, same captions.

    .venv/bin/python benchmarks/bench_embed_text.py [--texts 256] [--batch-sizes 256 32] [--repeats 2] [--threads N]
        [--local]     # also the extra pass of `embed-text --local` (word-token features) and its bytes per caption

Random weights (ARCH:random): the same cost as the pretrained towers, no meaning as accuracy.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import numpy as np
import torch

from ovml.pipeline.clip import _normalise, load_clip

SUBJECTS = ["a golden retriever", "two children", "an old fisherman", "a red bicycle", "a tabby cat",
            "a woman in a yellow raincoat", "a delivery truck", "three surfers", "a street vendor", "a horse"]
ACTIONS = ["rests", "waits", "runs", "stands", "plays", "is parked", "sits quietly", "wanders"]
PLACES = ["on a crowded beach", "beside a mountain lake", "in a busy city street", "under a wooden bridge",
          "near a farmers market", "in a snowy park", "outside a small cafe", "along a dusty road"]
DETAILS = ["while gulls circle overhead", "next to a stack of colorful umbrellas", "as the sun sets behind them",
           "with a backpack and a water bottle", "under heavy grey clouds", "beside a bench and a trash can",
           "while traffic lights glow in the rain", "surrounded by tall pine trees"]


def llm_style_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 10-25 words, shaped like the ones SmolLM2 writes for generate-text."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}".split()
        while len(words) < rng.randint(10, 25):
            words += rng.choice(DETAILS).split()
        captions.append(" ".join(words[:25]) + ".")
    return captions


def plain_encode_text(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """What the wrapper did before: open_clip's encode_text on every batch padded to the full context."""
    with torch.inference_mode():
        return np.concatenate([_normalise(encoder.model.encode_text(encoder.tokenizer(texts[i:i + batch_size])))
                               for i in range(0, len(texts), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 32],
                        help="ovml batch sizes; the first is also plain encode_text's")
    parser.add_argument("--repeats", type=int, default=2, help="best of N, interleaved, against other load")
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--threads", type=int, help="torch threads; 1 steadies the numbers on a busy machine")
    parser.add_argument("--local", action="store_true", help="also time the word-token features of --local")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    captions = llm_style_captions(args.texts)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at start")
    print(f"{len(captions)} captions, {np.mean([len(c.split()) for c in captions]):.1f} words on average")
    header = " | ".join(f"ovml, batch {b} | ratio" for b in args.batch_sizes)
    print(f"| text tower | tokens (mean / max) | plain encode_text, batch {args.batch_sizes[0]} | {header} "
          "| max abs diff |")
    print("|---" * (4 + 2 * len(args.batch_sizes)) + "|")
    for arch in args.archs:
        encoder = load_clip(f"{arch}:random", device="cpu")
        lengths = encoder.tokenize(captions)[0].argmax(dim=-1) + 1
        encoder.encode_text(captions[:8])  # warm-up
        runs = {"plain": lambda e=encoder: plain_encode_text(e, captions, args.batch_sizes[0])}
        runs.update({b: lambda e=encoder, b=b: e.encode_text(captions, b) for b in args.batch_sizes})
        seconds = dict.fromkeys(runs, float("inf"))
        outputs = {}
        for _ in range(args.repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                outputs[key] = run()
                seconds[key] = min(seconds[key], time.perf_counter() - start)
        rate = {key: len(captions) / s for key, s in seconds.items()}
        cells = " | ".join(f"{rate[b]:.1f} texts/s | {rate[b] / rate['plain']:.1f}x" for b in args.batch_sizes)
        diff = max(np.abs(outputs[b] - outputs["plain"]).max() for b in args.batch_sizes)
        print(f"| {arch} | {lengths.float().mean():.1f} / {int(lengths.max())} | {rate['plain']:.1f} texts/s "
              f"| {cells} | {diff:.1e} |", flush=True)
        if args.local:
            tokens = encoder.tokenize(captions)[0]
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                words = encoder.encode_token_features(tokens, args.batch_sizes[0])
                best = min(best, time.perf_counter() - start)
            print(f"  {arch} --local token features, batch {args.batch_sizes[0]}: {len(captions) / best:.1f} texts/s "
                  f"(a second pass, beside the pooled one); {np.mean([w.nbytes for w in words]):,.0f} bytes per "
                  f"caption (float16, {np.mean([len(w) for w in words]):.1f} word tokens)", flush=True)


if __name__ == "__main__":
    main()
