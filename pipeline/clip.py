"""The one place that turns a CLIP spec into an encoder.

A spec is `ARCH:PRETRAINED`: `ViT-B-16:openai` (a tag open_clip downloads and caches),
`ViT-B-16:/path/to/checkpoint.safetensors` (a local file), or `ARCH:random` (seeded random weights:
same cost as the real model, meaningless as accuracy; for tests, benchmarks and the offline demo).
`ovml-tiny` is a small architecture registered here for tests and the demo.
"""

from __future__ import annotations

import functools
import logging
import socket
import urllib.parse
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import open_clip
import torch

from pipeline.errors import OvmlError

RANDOM = "random"
RANDOM_SEED = 0
TINY_ARCH = "ovml-tiny"

open_clip.add_model_config(Path(str(files("pipeline").joinpath("clip_configs"))))


@dataclass(frozen=True)
class ClipSpec:
    arch: str
    pretrained: str

    @classmethod
    def parse(cls, spec: str) -> ClipSpec:
        arch, sep, pretrained = spec.partition(":")
        if not sep or not arch or not pretrained:
            raise OvmlError(
                f"CLIP spec '{spec}' must look like ARCH:PRETRAINED, e.g. ViT-B-16:openai or "
                "ViT-B-16:/path/to/checkpoint.safetensors"
            )
        return cls(arch, pretrained)

    @property
    def is_path(self) -> bool:
        return "/" in self.pretrained or self.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))

    def __str__(self) -> str:
        return f"{self.arch}:{self.pretrained}"


def checkpoint_is_random(path: str | Path) -> bool:
    """Checkpoints written by `save_random_checkpoint` say so in their safetensors metadata."""
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("ovml_random_weights") == "true"


def save_random_checkpoint(arch: str, path: str | Path, seed: int = RANDOM_SEED) -> Path:
    """Write a seeded random open_clip checkpoint (safetensors, flagged as random in its metadata)."""
    from safetensors.torch import save_file

    from pipeline import atomic

    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"ovml_random_weights": "true", "arch": arch, "seed": str(seed)})
    return path


class ClipEncoder:
    """Batched CLIP text and image encoders returning L2-normalised float32 numpy arrays."""

    def __init__(self, spec: ClipSpec, model: torch.nn.Module, preprocess, tokenizer, device: str,
                 random_weights: bool):
        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.random_weights = random_weights
        self.dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
        if self.dim is None:
            with torch.inference_mode():
                self.dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
                out[start:start + len(tokens)] = _normalise(self.model.encode_text(tokens))
        return out

    def encode_image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        """`pixels` is a batch already passed through `self.preprocess`."""
        with torch.inference_mode():
            return _normalise(self.model.encode_image(pixels.to(self.device)))

    def describe(self) -> dict:
        return {"clip": str(self.spec), "dim": self.dim, "random_weights": self.random_weights}


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy().astype(np.float32, copy=False)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=2)
def load_clip(spec: str, device: str = "auto") -> ClipEncoder:
    parsed = ClipSpec.parse(spec)
    device = pick_device(device)
    if parsed.arch not in open_clip.list_models():
        raise OvmlError(
            f"unknown CLIP architecture '{parsed.arch}' in '{spec}'; see `python -c \"import open_clip; "
            "print(open_clip.list_models())\"` for the names open_clip knows"
        )
    random_weights = parsed.pretrained == RANDOM
    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        pretrained = None
    elif parsed.is_path:
        if not Path(parsed.pretrained).is_file():
            raise OvmlError(f"CLIP checkpoint {parsed.pretrained} does not exist; check the path in '{spec}'")
        pretrained = parsed.pretrained
        random_weights = checkpoint_is_random(pretrained)
    else:
        if not open_clip.get_pretrained_cfg(parsed.arch, parsed.pretrained):
            tags = ", ".join(t for a, t in open_clip.list_pretrained() if a == parsed.arch) or "none"
            raise OvmlError(
                f"'{parsed.pretrained}' is not a pretrained tag of {parsed.arch} (known: {tags}); "
                f"or pass a local checkpoint as {parsed.arch}:/path/to/checkpoint"
            )
        pretrained = parsed.pretrained
    try:
        model, _, preprocess = _create(parsed.arch, pretrained, device)
    except OvmlError:
        raise
    except Exception as e:  # noqa: BLE001 - any download/load failure becomes the one-line error below
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if parsed.is_path:
            raise OvmlError(f"cannot load CLIP checkpoint {parsed.pretrained} as {parsed.arch}: {first}") from None
        raise OvmlError(
            f"CLIP weights for '{spec}' are not available ({type(e).__name__}); on a machine without the "
            f"model hub pass a local checkpoint instead: --clip {parsed.arch}:/path/to/open_clip_model.safetensors"
        ) from None
    return ClipEncoder(parsed, model, preprocess, open_clip.get_tokenizer(parsed.arch), device, random_weights)


def _create(arch: str, pretrained: str | None, device: str):
    """open_clip's loader, quiet, and cache-only when the hub cannot be reached (instead of ~45 s of retries)."""
    if pretrained and not Path(pretrained).is_file() and not _hub_reachable():
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)
    try:
        return open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device, weights_only=True)
    finally:
        logging.disable(logging.NOTSET)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
