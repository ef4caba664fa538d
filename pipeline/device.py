"""Which torch device a stage runs on: here, not in pipeline/clip.py, so train-adapter does not import open_clip
(200 MB of resident memory for a stage that never touches CLIP)."""

from __future__ import annotations

import torch

from ovml.pipeline.errors import OvmlError


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OvmlError(f"--device {device} needs a CUDA GPU and none is available here; use --device cpu or auto")
    return device
