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
    return result, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """(fn(*args), seconds, peak RSS in bytes) of fn run in a new spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_timed, fn, args).result()
