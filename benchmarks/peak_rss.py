"""Run one call in a fresh process and report its wall time and peak resident memory (ru_maxrss).

A fresh process per measurement, so the synthetic data a benchmark builds beforehand never counts, and every
measurement starts from the same empty interpreter (imports included, as a user's `ovml` command would).
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _timed(fn: Callable[..., Any], args: tuple) -> tuple[Any, float, int]:
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started, own_peak_rss()


def own_peak_rss() -> int:
    """This process's own peak RSS in bytes: VmHWM, which exec resets. ru_maxrss is not it: Linux carries it across
    exec, so a spawned child reports its parent's peak when that was higher (a benchmark that built 6 GB of
    synthetic data before measuring saw 6 GB in every child; measured before 2026-12-07 19:00, see
    docs/benchmarks.md)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """(fn(*args), seconds, peak RSS in bytes) of fn run in a new spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_timed, fn, args).result()
