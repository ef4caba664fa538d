"""Shared fixtures. Everything a test needs is built by the test session itself, offline."""

from __future__ import annotations

import signal

import pytest
import torch

from ovml.pipeline.clip import TINY_ARCH, save_random_checkpoint


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A CLIP spec for the tiny test architecture with random weights saved to a local checkpoint."""
    path = tmp_path_factory.mktemp("clip") / "tiny-random.safetensors"
    save_random_checkpoint(TINY_ARCH, path, seed=0)
    return f"{TINY_ARCH}:{path}"


@pytest.fixture
def ctrl_c_raises():
    """A process started in the background by a shell without job control (cron, `cmd &`) inherits SIGINT as
    ignored, and Python then never raises KeyboardInterrupt: a test that sends one would block forever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def one_thread():
    """Tiny models: a second torch thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
