"""generate-text: an LLM writes captions that mention several labels -> captions/part-*.parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import NotImplementedYet
from pipeline.rundir import StageOutcome


@dataclass
class GenerateTextConfig:
    run_dir: Path = Path("runs/default")
    labels: str = ""
    per_label: int = 20
    min_labels: int = 1
    max_labels: int = 4
    sampling: Literal["uniform", "similar", "cooccurrence"] = "uniform"
    cooccurrence: str | None = None
    backend: Literal["llama-cpp", "openai", "vllm"] = "llama-cpp"
    model: str | None = None
    base_url: str | None = None
    concurrency: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 96
    seed: int = 0
    num_shards: int = 1
    shard_index: int = 0
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    force: bool = False


def generate_text(cfg: GenerateTextConfig) -> StageOutcome:
    raise NotImplementedYet("generate-text")
