"""train-adapter: a residual MLP trained on noise-perturbed caption embeddings -> adapter/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import NotImplementedYet
from pipeline.rundir import StageOutcome


@dataclass
class TrainAdapterConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    noise: float = 0.04
    renorm: bool = False
    head: Literal["cosine", "magnitude"] = "cosine"
    loss: Literal["asl", "bce", "rank"] = "asl"
    hidden: int = 1024
    dropout: float = 0.1
    alpha: float = 0.5
    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    force: bool = False


def train_adapter(cfg: TrainAdapterConfig) -> StageOutcome:
    raise NotImplementedYet("train-adapter")
