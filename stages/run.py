"""run: every stage in order from one config, skipping what is up to date; safe under cron."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import NotImplementedYet


@dataclass
class RunConfig:
    run_dir: Path = Path("runs/default")
    json: bool = False


def run(cfg: RunConfig, config_path: Path | None) -> dict:
    raise NotImplementedYet("run")
