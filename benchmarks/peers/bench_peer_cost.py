"""Cost as labels grow: the adapter vs TaI-DPT on the same captions for the same epochs (issue 24).

    .venv/bin/python benchmarks/peers/bench_peer_cost.py                        # testbed text tower (random weights)
    .venv/bin/python benchmarks/peers/bench_peer_cost.py --clip ViT-B-16:random --label-chunk 128 \\
        --measure-up-to 100 --embed-up-to 30                                 # ViT-B-16's text tower

Per label count (synthetic labels "label 123" and synthetic caption features; random weights measure cost, never
accuracy), each measurement in a fresh process (its CPU time and peak RSS, benchmarks/peak_rss.py):
- **adapter**: train-adapter, the real stage, on `--captions` captions for `--epochs` epochs, batch 512 (its
  default; validation each epoch included); and, end to end, the label embeddings it trains against: the labels
  through the text tower once, with the prompt pool (85 templates, the default) or one template;
- **TaI-DPT**: benchmarks/peers/taidpt.py's training step on the same number of captions (pooled embedding +
  12 word tokens each), batch 512 (the paper's), for the same epochs: every step pushes 2 x labels prompts
  through the tower and back. Steps are timed after one warm-up step until `--step-budget` seconds have gone
  (at least 2); the run is extrapolated linearly from the mean step when that is fewer than all its steps.
  Above `--label-chunk` labels the prompts go through in chunks (bounded memory, one more forward pass).
Times are **CPU seconds** of one thread (`--threads 1`, time.process_time), which on shared cores is what the work
would take on an idle one; wall time there counts other people's jobs (and /work/tools/quiet's pauses).
Label counts above `--measure-up-to` are not run (label embeddings: above `--embed-up-to`): their prompt-bound
times are extrapolated linearly in the labels from the largest measured count, and their memory is left blank.
The caption embedding (one tower pass per caption, the same for both methods) is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import taidpt  # noqa: E402
from bench_train_adapter import synthetic_run  # noqa: E402
from peak_rss import measure  # noqa: E402

from ovml.pipeline.clip import load_clip  # noqa: E402
from ovml.pipeline.label_embeddings import label_embeddings  # noqa: E402
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter  # noqa: E402

BATCH = 512
WORDS = 12  # word tokens per synthetic caption


def names(labels: int) -> list[str]:
    return [f"label {i}" for i in range(labels)]


def adapter_job(clip: str, run_dir: str, epochs: int, threads: int) -> float:
    torch.set_num_threads(threads)
    cfg = TrainAdapterConfig(run_dir=Path(run_dir), clip=clip, device="cpu", epochs=epochs, patience=epochs,
                             batch_size=BATCH)
    cpu = time.process_time()
    train_adapter(cfg)
    return time.process_time() - cpu


def label_embedding_job(clip: str, labels: int, templates: str, threads: int) -> float:
    torch.set_num_threads(threads)
    encoder = load_clip(clip, "cpu")
    cpu = time.process_time()
    label_embeddings(encoder, names(labels), templates)
    return time.process_time() - cpu


def taidpt_job(clip: str, labels: int, captions: int, epochs: int, budget: float, chunk: int, threads: int) -> dict:
    """Seconds per step of TaI-DPT at this many labels, and the whole run's (measured or extrapolated)."""
    torch.set_num_threads(threads)
    encoder = load_clip(clip, "cpu")
    learner = taidpt.PromptLearner(encoder)
    tokens, positions = learner.tokens(names(labels))
    optimizer = torch.optim.SGD(learner.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    d = encoder.dim
    total = epochs * math.ceil(captions / BATCH)
    times = []
    while len(times) < total + 1 and (len(times) < 3 or sum(times[1:]) < budget):
        pooled = torch.nn.functional.normalize(torch.randn(BATCH, d, generator=generator), dim=-1)
        words = torch.nn.functional.normalize(torch.randn(BATCH, WORDS, d, generator=generator), dim=-1)
        targets = torch.zeros(BATCH, labels, dtype=torch.bool)
        targets[torch.arange(BATCH)[:, None], torch.randint(labels, (BATCH, 3), generator=generator)] = True
        cpu = time.process_time()
        taidpt.step(learner, optimizer, tokens, positions, pooled, words, torch.ones(BATCH, WORDS, dtype=torch.bool),
                    targets, label_chunk=chunk)
        times.append(time.process_time() - cpu)
    timed = times[1:]  # the first step warms up allocators and kernels
    return {"steps": total, "steps_timed": len(timed), "step_seconds": float(np.mean(timed)),
            "seconds": float(sum(times)) if len(times) > total else float(np.mean(timed)) * total,
            "extrapolated": len(times) <= total, "prompt_tokens": int(positions.max()) + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="ovml-testbed:random")
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 100, 1000, 7586])
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--step-budget", type=float, default=60.0, help="seconds of TaI-DPT steps timed per size")
    parser.add_argument("--label-chunk", type=int, default=1000)
    parser.add_argument("--measure-up-to", type=int, default=7586)
    parser.add_argument("--embed-up-to", type=int, default=1000,
                        help="label embeddings are timed up to this many labels, extrapolated linearly above")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per measurement (on shared cores, 2 threads mostly wait on each other)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/peer_cost.json"))
    args = parser.parse_args()
    print(f"torch threads per measurement: {args.threads}", flush=True)
    dim = load_clip(args.clip, "cpu").dim
    rows = []
    for labels in sorted(args.labels):
        if labels > args.measure_up_to:
            rows.append(extrapolated(rows, labels))
            continue
        row = {"labels": labels}
        with tempfile.TemporaryDirectory() as tmp:
            run = synthetic_run(Path(tmp), args.captions, labels, dim=dim)
            row["adapter_seconds"], _, peak = measure(adapter_job, args.clip, str(run), args.epochs, args.threads)
            row["adapter_peak_gib"] = peak / 2**30
        for templates in ("pool", "single"):
            if labels <= args.embed_up_to:
                row[f"labels_{templates}_seconds"], _, peak = measure(label_embedding_job, args.clip, labels,
                                                                        templates, args.threads)
                row[f"labels_{templates}_peak_gib"] = peak / 2**30
            else:  # linear in the prompts, so in the labels
                measured = max((r for r in rows if f"labels_{templates}_peak_gib" in r), key=lambda r: r["labels"])
                scale = labels / measured["labels"]
                row[f"labels_{templates}_seconds"] = measured[f"labels_{templates}_seconds"] * scale
                row["labels_extrapolated_from"] = measured["labels"]
        result, _, peak = measure(taidpt_job, args.clip, labels, args.captions, args.epochs, args.step_budget,
                                  args.label_chunk, args.threads)
        row.update({f"taidpt_{k}": v for k, v in result.items()}, taidpt_peak_gib=peak / 2**30)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"clip": args.clip, "captions": args.captions, "epochs": args.epochs,
                                    "batch": BATCH, "label_chunk": args.label_chunk, "threads": args.threads,
                                    "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


def extrapolated(rows: list[dict], labels: int) -> dict:
    """A size not run: TaI-DPT's steps and the label embeddings are linear in the prompts, so in the labels (scaled
    from the largest measured size); the adapter's time is affine in the labels (its [batch x labels] logits and
    loss), so it is continued along the line through the two largest measured sizes."""
    small, row = rows[-2], rows[-1]
    slope = (row["adapter_seconds"] - small["adapter_seconds"]) / (row["labels"] - small["labels"])
    ratio = labels / row["labels"]
    out = {"labels": labels, "extrapolated_from": row["labels"], "taidpt_extrapolated": True,
           "adapter_seconds": row["adapter_seconds"] + slope * (labels - row["labels"]),
           "taidpt_steps": row["taidpt_steps"]}
    for key in ("labels_pool_seconds", "labels_single_seconds", "taidpt_step_seconds", "taidpt_seconds"):
        out[key] = row[key] * ratio
    return out


def markdown(rows: list[dict]) -> str:
    def gib(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "not run"

    lines = ["| labels | adapter train CPU s | + labels, pool (85 templates) | + labels, 1 template | adapter peak GiB "
             "| TaI-DPT CPU s/step | TaI-DPT train CPU s | TaI-DPT peak GiB | ratio train "
             "| ratio end to end (pool / single) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pool = r["adapter_seconds"] + r["labels_pool_seconds"]
        single = r["adapter_seconds"] + r["labels_single_seconds"]
        mark = " (extrapolated)" if r.get("taidpt_extrapolated") else ""
        lines.append(f"| {r['labels']:,} | {r['adapter_seconds']:.1f} | {pool:.1f} | {single:.1f} | "
                     f"{gib(r, 'adapter_peak_gib')} | {r['taidpt_step_seconds']:.2f} | "
                     f"{r['taidpt_seconds']:,.0f}{mark} "
                     f"| {gib(r, 'taidpt_peak_gib')} | {r['taidpt_seconds'] / r['adapter_seconds']:,.0f}x | "
                     f"{r['taidpt_seconds'] / pool:,.0f}x / {r['taidpt_seconds'] / single:,.0f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
