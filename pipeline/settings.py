"""The allowed range of every numeric setting and the accepted devices, written once, checked in one place.

A setting is known by its field name, which means the same thing in every stage that has it (batch_size, seed,
lr, top_k, ...), so the table below covers every stage's config. `check_settings` runs in `build_config` (so the
CLI and `ovml run`, which builds every stage's config first, refuse a bad value before anything is read, locked
or archived) and again at each stage's entry, for callers of the Python API. Constraints between two settings
(--min-labels <= --max-labels, --shard-index < --num-shards) stay with their stage. A numeric config field
missing from RANGES is a test failure (tests/test_settings.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ovml.pipeline.errors import OvmlError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside the range
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self) -> str:
        if self.high is None:
            return f"> {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, low_open=True)


ANY_FINITE = Range()
SEED = Range(0, 2**32 - 1)  # numpy's and torch's generators both take it

RANGES: dict[str, Range] = {
    # shared by several stages
    "seed": SEED, "batch_size": at_least(1), "ray_actors": at_least(1), "lr": above(0), "weight_decay": at_least(0),
    "mosaic": Range(1, 16),  # K x K grids of 28-pixel items; 16 x 16 is already a 448-pixel picture
    # generate-text
    "per_label": at_least(1), "min_labels": at_least(1), "max_labels": at_least(1), "concurrency": at_least(1),
    "temperature": Range(0, 2),  # the OpenAI API's range; llama.cpp and vLLM accept it too
    "top_p": Range(0, 1, low_open=True), "max_tokens": at_least(1), "num_shards": at_least(1),
    "shard_index": at_least(0), "part_size": at_least(1), "max_rounds": at_least(1),
    # embed-images
    "limit": at_least(1), "workers": at_least(0),
    # train-adapter
    "noise": at_least(0), "hidden": at_least(1), "dropout": Range(0, 1, high_open=True), "alpha": ANY_FINITE,
    "scale": above(0), "epochs": at_least(1), "warmup_epochs": at_least(0), "val_fraction": Range(0, 1, high_open=True),
    "patience": at_least(1),  # epochs without a gain before stopping: 1 stops at the first one
    "local_top_k": at_least(1),
    # eval
    "local_weight": Range(0, 1),
    # predict, search
    "top_k": at_least(1), "top": at_least(1), "nprobe": at_least(1),
    # train-testbed
    "single_fraction": Range(0, 1), "blank_fraction": Range(0, 1, high_open=True), "train_images": at_least(1),
    "steps": at_least(1), "warmup_steps": at_least(0), "threads": at_least(1),
}

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICES = "cpu, cuda, cuda:N or auto"


def check_device_name(device: str, name: str = "--device") -> str:
    """A device torch can be asked for; anything else (tpu, gpu, a typo) is one line before any model loads."""
    if not DEVICE.fullmatch(device):
        raise OvmlError(f"{name} must be one of {DEVICES}, got '{device}'")
    return device


def check_settings(cfg: Any, origin: dict[str, str] | None = None) -> None:
    """Every numeric field of a stage config within its range (finite, for floats), and the device a known one.

    `origin` maps a field to where its value came from when that was a config file ("[train_adapter] of x.toml"),
    so the message points there; otherwise it names the flag."""
    origin = origin or {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"'{f.name}' in {origin[f.name]}" if f.name in origin else f"--{f.name.replace('_', '-')}"
        if f.name == "device" and isinstance(value, str):
            check_device_name(value, name)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or f.name not in RANGES:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise OvmlError(f"{name} must be a finite number, got {value}")
        if not RANGES[f.name].holds(value):
            raise OvmlError(f"{name} must be {RANGES[f.name].describe()}, got {value}")
