"""Shared fixtures. Everything a test needs is built by the test session itself, offline."""

from __future__ import annotations

import pytest

from ovml.pipeline.clip import TINY_ARCH, save_random_checkpoint


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A CLIP spec for the tiny test architecture with random weights saved to a local checkpoint."""
    path = tmp_path_factory.mktemp("clip") / "tiny-random.safetensors"
    save_random_checkpoint(TINY_ARCH, path, seed=0)
    return f"{TINY_ARCH}:{path}"
