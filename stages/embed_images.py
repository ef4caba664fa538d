"""embed-images: CLIP image embeddings of a dataset -> images/<dataset>/ (FAISS index + items)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import NotImplementedYet
from pipeline.rundir import StageOutcome

DATASETS = Literal["nuswide", "openimages", "coco2014", "voc2007", "fashion-mnist", "folder"]


@dataclass
class EmbedImagesConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    dataset: DATASETS = "folder"
    root: str = ""
    limit: int | None = None
    mosaic: int = 2
    batch_size: int = 64
    workers: int = 2
    force: bool = False


def embed_images(cfg: EmbedImagesConfig) -> StageOutcome:
    raise NotImplementedYet("embed-images")
