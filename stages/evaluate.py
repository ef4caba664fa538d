"""eval: adapter vs zero-shot CLIP on a cached dataset, with the published protocols -> eval/<dataset>/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import NotImplementedYet
from pipeline.rundir import StageOutcome


@dataclass
class EvalConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    dataset: str = "folder"
    force: bool = False


def evaluate(cfg: EvalConfig) -> StageOutcome:
    raise NotImplementedYet("eval")
