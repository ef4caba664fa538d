"""Log files: tracebacks go here, never to the terminal, which gets one line saying where the log is."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
import traceback
from pathlib import Path


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def open_log(run_dir: Path) -> logging.Logger:
    """A fresh log file per run: runs/<name>/logs/<UTC timestamp>.log."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    logger = logging.getLogger(f"ovml.run.{stamp}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(logs / f"{stamp}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


def write_traceback(run_dir: Path | None) -> Path:
    """The current exception's traceback in <run_dir>/logs/, or in the temp dir when that cannot be written
    (a full disk or a read-only run directory is often why there is a traceback to write)."""
    text = traceback.format_exc()
    for folder in ([Path(run_dir) / "logs"] if run_dir else []) + [Path(tempfile.gettempdir())]:
        path = folder / f"ovml-error-{_stamp()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            with contextlib.suppress(OSError):  # the empty file a full disk may leave (none on read-only)
                path.unlink(missing_ok=True)
    return Path("(nowhere: no writable folder)")
