"""Time of the eval metrics at NUS-WIDE GZSL scale: mAP, F1@3 and F1@5 on 100,000 images x 1,006 labels.

    .venv/bin/python benchmarks/bench_metrics.py [--images N] [--labels L] [--positives-per-image P]

Random float32 scores and sparse random positives (P per image on average): the metrics' cost depends
on the shape and the positive count only, not on the values.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ovml.pipeline.metrics import average_precision, f1_at_k, mean_average_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1006)
    parser.add_argument("--positives-per-image", type=float, default=3.0)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    scores = rng.random((args.images, args.labels), dtype=np.float32)
    positives = rng.random((args.images, args.labels)) < args.positives_per_image / args.labels
    print(f"{args.images:,} images x {args.labels:,} labels, {int(positives.sum()):,} positives, "
          f"{os.cpu_count()} cores")

    timings = {}
    started = time.perf_counter()
    mean_average_precision(average_precision(scores, positives))
    timings["mAP"] = time.perf_counter() - started
    for k in (3, 5):
        started = time.perf_counter()
        f1_at_k(scores, positives, k)
        timings[f"F1@{k}"] = time.perf_counter() - started
    for name, seconds in timings.items():
        print(f"{name:>6}: {seconds:6.2f} s")
    print(f" total: {sum(timings.values()):6.2f} s")


if __name__ == "__main__":
    main()
