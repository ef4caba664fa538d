"""embed-text: CLIP text embeddings of captions (text_emb/) and of label prompt pools (labels/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import NotImplementedYet
from pipeline.rundir import StageOutcome


@dataclass
class EmbedTextConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    batch_size: int = 256
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    store_dtype: Literal["float32", "float16"] = "float32"
    templates: Literal["pool", "single"] = "pool"
    force: bool = False


def embed_text(cfg: EmbedTextConfig) -> StageOutcome:
    raise NotImplementedYet("embed-text")
