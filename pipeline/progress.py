"""One progress bar for every stage: on stderr (so `--json` keeps stdout machine-readable), with a rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed or 0
        return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(rate: str | ProgressColumn) -> Iterator[Progress]:
    """`rate` is a unit ("texts") for the usual items/s column, or a column of the stage's own. A stage that
    fails takes its bar away with it, so what is left on the terminal is the failure's one line."""
    rate_column = RateColumn(rate) if isinstance(rate, str) else rate
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate_column,
                        TimeElapsedColumn(), console=Console(stderr=True))
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            raise
