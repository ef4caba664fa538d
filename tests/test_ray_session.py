"""A command that finds no running Ray starts its own and, when it ends, leaves no Ray process behind.

A module of its own: tests/test_ray_engine.py keeps one Ray up for all its tests, which stages then join.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ovml.pipeline.engine import ray_session

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'ovml[ray]')")


def ray_processes() -> set[int]:
    """Running processes of Ray: its daemons (gcs_server, raylet, monitors) and workers ("ray::...")."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:  # ended while we looked
            continue
        if b"/site-packages/ray/" in command or command.startswith(b"ray::"):
            found.add(int(proc.name))
    return found


def test_a_ray_the_stage_started_is_shut_down_with_all_its_processes():
    before = ray_processes()
    with ray_session("auto"):
        assert ray.is_initialized()
        assert ray_processes() - before, "Ray started no process of its own"
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before
