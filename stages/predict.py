"""predict: open-vocabulary labels for images, with the trained adapter or zero-shot CLIP."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import NotImplementedYet


@dataclass
class PredictConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    images: list[str] = field(default_factory=list)
    labels: str | None = None
    labels_file: str | None = None
    top_k: int = 5
    zero_shot: bool = False


def predict(cfg: PredictConfig) -> list[dict]:
    raise NotImplementedYet("predict")
