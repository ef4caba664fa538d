"""Where train-adapter --images spends its memory: RSS sampled every 50 ms, peak per step of the stage.

    .venv/bin/python benchmarks/train_adapter_memory_phases.py --images 1000000    # docs/benchmarks.md, issue 23

The same synthetic run as `bench_train_adapter.py --captions 1000 --images N --labels 7586`, trained in this
process (one epoch) with its steps wrapped so that each sample is booked to the step running then. A diagnostic:
the stage's own peak (a fresh process, VmHWM) is bench_train_adapter.py's number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_adapter import synthetic_images, synthetic_run  # noqa: E402

import ovml.stages.train_adapter as stage  # noqa: E402
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter  # noqa: E402

STEPS = ["read_labelled_images", "_with_images", "_fit", "_validation_map"]  # of ovml.stages.train_adapter


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=7586)
    args = parser.parse_args()
    running, peaks = ["setup"], {}

    def sample() -> None:
        while True:
            peaks[running[-1]] = max(peaks.get(running[-1], 0.0), rss_gib())
            time.sleep(0.05)

    def booked(name: str, step):
        def call(*a, **k):
            running.append(name)
            try:
                return step(*a, **k)
            finally:
                running.pop()
        return call

    for name in STEPS:
        setattr(stage, name, booked(name, getattr(stage, name)))
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp), 1000, args.labels)
        synthetic_images(run, args.images, args.labels)
        running[-1] = "train-adapter, between the steps below"
        threading.Thread(target=sample, daemon=True).start()
        train_adapter(TrainAdapterConfig(run_dir=run, clip="ViT-B-16:random", device="cpu", epochs=1, patience=1,
                                         images="synthetic"))
    for name, peak in peaks.items():
        print(f"| {name} | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
