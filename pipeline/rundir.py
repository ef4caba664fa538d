"""The run directory: manifest.json, the lock, and the one rule that decides whether a stage must run.

A stage's fingerprint is the hash of its params and of the bytes of its input files. A stage is up to
date when the manifest says it finished with the same fingerprint and its recorded outputs still hash
the same. Before a stage runs, its record turns to "running" with the new fingerprint; if the process
dies, the next attempt with the same fingerprint resumes (completed shards are kept), and an attempt
with another fingerprint clears the stale outputs first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError, RunDirLocked

MANIFEST = "manifest.json"
LOCK = ".lock"


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" or "skipped"
    reason: str
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ovml", "torch", "open_clip_torch", "numpy", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def manifest(self) -> dict[str, Any]:
        file = self.path / MANIFEST
        if not file.exists():
            return {"stages": {}}
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise OvmlError(f"{file} is not valid JSON; delete it to rebuild the run from scratch") from None

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def _put_record(self, stage: str, record: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = record
        manifest["updated"] = _now()
        atomic.write_json(self.path / MANIFEST, manifest)

    def require(self, rel: str, produced_by: str) -> Path:
        """An upstream artifact, or a one-line error naming the stage that makes it."""
        path = self.path / rel
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            raise OvmlError(
                f"{path} is missing; run `ovml {produced_by.replace('_', '-')} --run-dir {self.path}` first"
            )
        return path


def files_under(root: Path, rels: list[str]) -> list[Path]:
    """Every regular, non-hidden file under the given paths (files or folders), sorted."""
    found: list[Path] = []
    for rel in rels:
        p = root / rel
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
    return sorted(found)


def hash_files(root: Path, paths: list[Path]) -> dict[str, str]:
    return {str(p.relative_to(root)) if p.is_relative_to(root) else str(p): atomic.sha256_file(p) for p in paths}


def fingerprint(params: dict[str, Any], input_hashes: dict[str, str]) -> str:
    blob = json.dumps({"params": params, "inputs": input_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _why_run(record: dict[str, Any] | None, params, input_hashes, fp: str, root: Path) -> str | None:
    """None when the stage is up to date, else a short human reason."""
    if record is None:
        return "never ran"
    if record.get("status") == "running":
        return "resuming an interrupted run" if record.get("fingerprint") == fp else "last run was interrupted"
    if record.get("fingerprint") != fp:
        changed = sorted(k for k in set(params) | set(record.get("params", {}))
                         if params.get(k) != record.get("params", {}).get(k))
        if changed:
            return "params changed: " + ", ".join(
                f"{k} {record.get('params', {}).get(k)!r} -> {params.get(k)!r}" for k in changed)
        old_inputs = record.get("inputs", {})
        changed = sorted(k for k in set(input_hashes) | set(old_inputs) if input_hashes.get(k) != old_inputs.get(k))
        return "inputs changed: " + ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    for rel, digest in record.get("outputs", {}).items():
        path = root / rel
        if not path.exists() or atomic.sha256_file(path) != digest:
            return f"output missing or modified: {rel}"
    return None


def run_stage(
    run_dir: RunDir,
    stage: str,
    *,
    params: dict[str, Any],
    inputs: list[Path],
    outputs: list[str],
    body: Callable[[bool], dict[str, Any]],
    force: bool = False,
    models: dict[str, str] | None = None,
) -> StageOutcome:
    """Run `body(resume)` unless the stage is up to date; record it in the manifest either way.

    `outputs` are paths relative to the run dir (files or folders) that this stage alone writes.
    `body` gets resume=True when an interrupted attempt with the same fingerprint left shards to keep.
    """
    with lock_run_dir(run_dir.path, f"ovml {stage.replace('_', '-')}"):
        root = run_dir.path
        input_hashes = hash_files(root, inputs)
        fp = fingerprint(params, input_hashes)
        record = run_dir.stage_record(stage)
        reason = "forced with --force" if force else _why_run(record, params, input_hashes, fp, root)
        if reason is None:
            return StageOutcome(stage, "skipped", "up to date", 0.0, record.get("summary", {}))
        resume = not force and record is not None and record.get("status") == "running" \
            and record.get("fingerprint") == fp
        for rel in outputs:
            target = root / rel
            atomic.remove_stale_temps(target if target.is_dir() else target.parent)
            if not resume:
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        started = _now()
        t0 = time.perf_counter()
        run_dir._put_record(stage, {"status": "running", "fingerprint": fp, "params": params,
                                    "inputs": input_hashes, "started": started})
        summary = body(resume)
        seconds = time.perf_counter() - t0
        run_dir._put_record(stage, {
            "status": "finished",
            "fingerprint": fp,
            "params": params,
            "inputs": input_hashes,
            "outputs": hash_files(root, files_under(root, outputs)),
            "started": started,
            "finished": _now(),
            "seconds": round(seconds, 3),
            "versions": versions(),
            "models": models or {},
            "summary": summary,
        })
        return StageOutcome(stage, "ran", reason, seconds, summary)


_held: dict[Path, tuple[int, int]] = {}  # resolved run dir -> (fd, depth): re-entrant within one process


@contextlib.contextmanager
def lock_run_dir(path: Path, holder: str) -> Iterator[None]:
    """Exclusive flock on <run_dir>/.lock; a second process gets RunDirLocked (exit 75) at once."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _held[key] = (fd, _held[key][1] - 1)
        return
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirLocked(f"run directory {path} is locked by {who}; wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({holder}, since {_now()})".encode(), 0)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        del _held[key]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

