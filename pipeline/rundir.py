"""The run directory: manifest.json, the lock, and the one rule that decides whether a stage must run.

A stage's fingerprint is the hash of its params and of the bytes of its input files. A stage is up to
date when the manifest says it finished with the same fingerprint and its recorded outputs still hash
the same. Inputs are checked against the sha256 their producer recorded before anything else happens.

Finished outputs are never deleted before their replacement is complete: a stage builds its outputs in
.staging/<stage>/out/ (the same relative paths), which is also where a killed attempt with the same
attempt key resumes from. On success the staged outputs are committed: commit.json (the new manifest
record) is written, each staged output is swapped with the old one in one renameat2(RENAME_EXCHANGE) call
(two renames where the filesystem cannot exchange, leaving a window of microseconds in which the path is
missing), then the manifest record is written and the old outputs deleted. A commit killed half-way is
finished by the next run_stage call of that stage (commit.json and the staged inodes say what is done).
Until then the previous outputs and their manifest record stay in place and usable.

An attempt keyed by the fingerprint is the same work forced or not. A stage that keys its attempts itself
(generate-text: by recipe and shard, so a top-up resumes whatever --per-label says) gets a forced attempt's key
marked: that staging was built from nothing, so it is never resumed (nor taken for a plain attempt's), and the
next run of the stage drops it, even one that finds the stage up to date.
Readers that take no lock (predict, search) may meet a commit between its swap and its manifest write: a
mismatch is checked again once that commit is done (verified_hashes), and what they load is checked to be the
very files they verified (verified_load), so they see the old outputs or the new ones, never a mix.
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
from ovml.pipeline.artifacts import CAPTIONS
from ovml.pipeline.errors import OvmlError, RunDirLocked
from ovml.pipeline.paths import check_run_dir
from ovml.pipeline.settings import DEFAULT_CLIP

MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING = ".staging"
FORCED = "forced "  # prefix of a forced attempt's stage-given key: such staging is never resumed
COMMIT_WAIT = 5.0  # seconds a lock-free reader waits for a commit in progress before calling a mismatch damage


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
        self.path = check_run_dir(path)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def manifest(self) -> dict[str, Any]:
        file = self.path / MANIFEST
        if not file.exists():
            return {"stages": {}}
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise OvmlError(f"{file} is damaged (not an ovml manifest); delete it to rebuild the run from scratch")
        for stage, record in manifest["stages"].items():
            if not _is_record(record):
                raise OvmlError(f"{file} is damaged (its record of {stage} is not an ovml stage record); remove "
                                f"that record and run `ovml {stage_command(stage)}` again, or delete the file to "
                                "rebuild the run from scratch")
        return manifest

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def recorded_clip(self) -> str | None:
        """The CLIP model the run directory's embeddings were made with: recorded by the first stage that
        used one (run directories from before that rule: the model of any finished stage that used one)."""
        manifest = self.manifest()
        if isinstance(manifest.get("clip"), str):
            return manifest["clip"]
        used = sorted({record["params"]["clip"] for record in manifest["stages"].values()
                       if isinstance(record, dict) and isinstance(record.get("params"), dict)
                       and isinstance(record["params"].get("clip"), str)})
        return used[0] if len(used) == 1 else None

    def clip(self, requested: str | None) -> str:
        """The CLIP model a command works with: the run directory's own unless --clip names it, in which
        case it must be the same one (embeddings of two models cannot be mixed); the default in a new one."""
        recorded = self.recorded_clip()
        if requested is None:
            return recorded or DEFAULT_CLIP
        check_same_clip(recorded, requested, self.path)
        return recorded or requested  # one spelling per run directory: its fingerprints stay the same

    def _put_record(self, stage: str, record: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = record
        clip = (record.get("models") or {}).get("clip")
        if clip and "clip" not in manifest:
            manifest["clip"] = clip
        manifest["updated"] = _now()
        atomic.write_json(self.path / MANIFEST, manifest)

    def verified_hashes(self, paths: list[Path]) -> dict[str, str]:
        """sha256 of each file, checked against the hash its producer recorded (files no stage recorded,
        e.g. a labels file outside the run dir, are only hashed); one line naming the remaking command.
        A mismatch met while another process commits (new files, old manifest) is checked again after it."""
        deadline = time.monotonic() + COMMIT_WAIT
        while True:
            manifest = self.manifest()
            recorded = {rel: (stage, digest) for stage, record in manifest["stages"].items()
                        if record.get("status") == "finished" for rel, digest in record.get("outputs", {}).items()}
            try:
                hashes = hash_files(self.path, paths)
            except FileNotFoundError:  # between the two renames of a commit where the filesystem cannot exchange
                if self._committing(manifest, deadline):
                    continue
                raise
            wrong = [(rel, recorded[rel][0]) for rel, digest in hashes.items()
                     if recorded.get(rel, (None, digest))[1] != digest]
            if not wrong:
                return hashes
            if self._committing(manifest, deadline):
                continue
            rel, stage = wrong[0]
            command = f"ovml {stage_command(stage)}"
            if (Staging(self.path, stage).dir / "commit.json").exists():
                raise OvmlError(f"{self.path / rel} comes from a commit of `{command} --run-dir {self.path}` that "
                                f"was interrupted; run that command again to complete it")
            raise OvmlError(f"{self.path / rel} is not the file `{command}` wrote (its sha256 differs from "
                            f"manifest.json: damaged or edited); {self._repair(stage, rel)}")

    def _committing(self, manifest_read: dict[str, Any], deadline: float) -> bool:
        """Whether another process may be committing (or has just committed) a stage, so that a mismatch with
        `manifest_read` is worth checking again; waits a moment first. Never while this process holds the lock."""
        if self.path.resolve() in _held or time.monotonic() > deadline:
            return False
        staging = self.path / STAGING
        pending = staging.is_dir() and any((d / "commit.json").exists() for d in staging.iterdir())
        if pending:
            time.sleep(0.02)
        return pending or self.manifest() != manifest_read

    def verified_load(self, paths: list[Path], load: Callable[[], Any]) -> tuple[Any, dict[str, str]]:
        """(`load()`, sha256 of each file) for readers that take no lock: the files are verified against the
        manifest, and loaded again when a commit swapped any of them in between, so what is loaded is what was
        verified (the old outputs or the new ones, never a mix)."""
        while True:
            before = _identities(paths)
            hashes = self.verified_hashes(paths)
            try:
                loaded = load()
            except OvmlError:  # e.g. a config of the old adapter beside the weights of the new one
                if _identities(paths) == before:
                    raise
                continue
            if _identities(paths) == before:
                return loaded, hashes

    def _repair(self, stage: str, rel: str) -> str:
        """What remakes one damaged output and nothing else. --force on generate-text would discard the whole
        caption pool; without it, generate-text keeps every intact part and writes only what is missing."""
        if stage == "generate_text":
            move = f"move it out of {CAPTIONS}/, then " if rel.startswith(f"{CAPTIONS}/part-") else ""
            return (f"{move}run the same `ovml generate-text --run-dir {self.path}` command again: it keeps the "
                    "intact captions and writes only the missing ones (never --force, which discards the pool)")
        return f"remake it with `ovml {stage_command(stage)} --force --run-dir {self.path}`"

    def require(self, rel: str, produced_by: str) -> Path:
        """An upstream artifact, or a one-line error naming the stage that makes it."""
        path = self.path / rel
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            raise OvmlError(
                f"{path} is missing; run `ovml {produced_by.replace('_', '-')} --run-dir {self.path}` first"
            )
        return path


def same_clip(a: str, b: str) -> bool:
    """Two specs of one model: equal, or one architecture with one checkpoint file named by two paths
    (relative and absolute, or through a symlink)."""
    if a == b:
        return True
    (arch_a, _, file_a), (arch_b, _, file_b) = a.partition(":"), b.partition(":")
    try:
        return arch_a == arch_b and os.path.samefile(file_a, file_b)
    except (OSError, ValueError):  # a tag, not a file (ViT-B-16:openai), or a file gone
        return False


def check_same_clip(made_with: str | None, clip: str, what: Path) -> None:
    """The one check that an artifact (a run directory, an adapter, an image cache) belongs to `clip`."""
    if made_with is not None and not same_clip(made_with, clip):
        raise OvmlError(f"{what} was made with CLIP '{made_with}', not '{clip}'; leave out --clip to use "
                        f"'{made_with}', or use another --run-dir for '{clip}'")


RECORD_FIELDS = {"status": str, "fingerprint": str, "params": dict, "inputs": dict, "outputs": dict,
                 "summary": dict}  # what is read from a stage record, and of what type


def _is_record(record: Any) -> bool:
    """A stage record of the shape run_stage writes: readers can use it without checking each field again."""
    return (isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in RECORD_FIELDS.items()
                                             if k in record)
            and all(isinstance(v, str) for field in ("inputs", "outputs") for v in record.get(field, {}).values()))


def _identities(paths: list[Path]) -> list[tuple[int, int, int] | None]:
    """(inode, size, mtime) per path: a commit's swap gives a path another inode."""
    out = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return out


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
    if record.get("status") != "finished":
        return "last run did not finish"
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


def stage_command(stage: str) -> str:
    """The command that (re)makes a stage's outputs: "embed_images/coco2014" -> "embed-images --dataset coco2014"."""
    name, _, dataset = stage.partition("/")
    return name.replace("_", "-") + (f" --dataset {dataset}" if dataset else "")


class Staging:
    """.staging/<stage>/: attempt.json (what is being built), out/ (the outputs being built), commit.json."""

    def __init__(self, root: Path, stage: str):
        self.root = root
        self.dir = root / STAGING / stage.replace("/", "-")
        self.out = self.dir / "out"

    def attempt(self) -> str | None:
        file = self.dir / "attempt.json"
        try:
            return json.loads(file.read_text(encoding="utf-8"))["attempt"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def start(self, attempt: str) -> None:
        """A fresh staging area; what an attempt with another key left unfinished is dropped."""
        self.drop()
        self.out.mkdir(parents=True)
        atomic.write_json(self.dir / "attempt.json", {"attempt": attempt})

    def drop(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def commit(self, run_dir: RunDir, stage: str, outputs: list[str], record: dict[str, Any]) -> None:
        inodes = {rel: (self.out / rel).stat().st_ino if (self.out / rel).exists() else None for rel in outputs}
        atomic.write_json(self.dir / "commit.json", {"record": record, "inodes": inodes})
        self.finish_commit(run_dir, stage)

    def finish_commit(self, run_dir: RunDir, stage: str) -> bool:
        """Swap in each staged output not swapped yet, record the stage, drop the old outputs; idempotent.
        True when there was a commit to finish."""
        file = self.dir / "commit.json"
        if not file.exists():
            return False
        try:
            commit = json.loads(file.read_text(encoding="utf-8"))
            valid = _is_record(commit["record"]) and all(
                isinstance(rel, str) and (inode is None or isinstance(inode, int))
                for rel, inode in commit["inodes"].items())
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:  # written atomically, so damaged after the fact: what was swapped in cannot be told
            raise OvmlError(f"{file} is damaged, so the interrupted commit of {stage_command(stage)} cannot be "
                            f"finished; delete {self.dir} and run `ovml {stage_command(stage)}` again (it remakes what "
                            "does not match the manifest)")
        for rel, inode in commit["inodes"].items():
            self._swap(rel, inode)
        run_dir._put_record(stage, commit["record"])
        shutil.rmtree(self.dir)
        return True

    def _swap(self, rel: str, inode: int | None) -> None:
        target, staged = self.root / rel, self.out / rel
        if target.exists() and target.stat().st_ino == inode:
            return  # swapped before a kill
        if inode is None:  # the new attempt made no such output: the old one goes
            if target.exists():
                self._set_aside(target, rel)
            return
        if not staged.exists():  # neither swapped in nor staged (removed by hand): keep what is there
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not atomic.exchange(staged, target):
            self._set_aside(target, rel)
        if not target.exists() or target.stat().st_ino != inode:
            os.replace(staged, target)
        atomic.fsync_dir(target.parent)

    def _set_aside(self, target: Path, rel: str) -> None:
        old = self.dir / "old" / rel
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(target, old)


def run_stage(
    run_dir: RunDir,
    stage: str,
    *,
    params: dict[str, Any],
    inputs: list[Path],
    outputs: list[str],
    body: Callable[[Path, bool], dict[str, Any]],
    force: bool = False,
    models: dict[str, str] | None = None,
    attempt: str | None = None,
) -> StageOutcome:
    """Run `body(out, resume)` unless the stage is up to date; record it in the manifest when it finishes.

    `outputs` are paths relative to the run dir (files or folders) that this stage alone writes; the body
    writes them under `out` (same relative paths) and they replace the old ones only once it returns.
    `resume` is True when a killed attempt with the same `attempt` key (default: the fingerprint) left
    work in `out` to keep; a forced run starts from nothing, and what a killed forced attempt with a stage-given
    key staged is dropped by the next run of the stage (it built from nothing too: no plain run may take it).
    Paths in the summary that point into `out` are reported where the outputs end up.
    """
    with lock_run_dir(run_dir.path, f"ovml {stage.replace('_', '-')}"):
        root = run_dir.path
        staging = Staging(root, stage)
        completed = staging.finish_commit(run_dir, stage)
        if (staging.attempt() or "").startswith(FORCED):
            staging.drop()
        input_hashes = run_dir.verified_hashes(inputs)
        fp = fingerprint(params, input_hashes)
        record = run_dir.stage_record(stage)
        reason = "forced with --force" if force else _why_run(record, params, input_hashes, fp, root)
        if reason is None and completed:
            return StageOutcome(stage, "ran", "completed the interrupted commit of an earlier run", 0.0,
                                record.get("summary", {}))
        if reason is None:
            return StageOutcome(stage, "skipped", "up to date", 0.0, record.get("summary", {}))
        key = (FORCED if force and attempt else "") + (attempt or fp)
        resume = not force and staging.attempt() == key
        if resume:
            reason = f"resuming an interrupted run ({reason})"
            atomic.remove_stale_temps(staging.out)
        else:
            staging.start(key)
        started = _now()
        t0 = time.perf_counter()
        summary = _committed_paths(body(staging.out, resume), str(staging.out), str(root))
        seconds = time.perf_counter() - t0
        staging.commit(run_dir, stage, outputs, {
            "status": "finished",
            "fingerprint": fp,
            "params": params,
            "inputs": input_hashes,
            "outputs": hash_files(staging.out, files_under(staging.out, outputs)),
            "started": started,
            "finished": _now(),
            "seconds": round(seconds, 3),
            "versions": versions(),
            "models": models or {},
            "summary": summary,
        })
        return StageOutcome(stage, "ran", reason, seconds, summary)


def _committed_paths(value: Any, staged: str, root: str) -> Any:
    """`value` with every path under the staging folder `staged` rewritten to its committed place under `root`."""
    if isinstance(value, dict):
        return {k: _committed_paths(v, staged, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_committed_paths(v, staged, root) for v in value]
    if isinstance(value, str) and (value == staged or value.startswith(staged + os.sep)):
        return root + value[len(staged):]
    return value


_held: dict[Path, tuple[int, int]] = {}  # resolved run dir -> (fd, depth): re-entrant within one process


@contextlib.contextmanager
def lock_run_dir(path: Path, holder: str) -> Iterator[None]:
    """Exclusive flock on <run_dir>/.lock; a second process gets RunDirLocked (exit 75) at once."""
    path = check_run_dir(path)
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
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({holder}, since {_now()})".encode(), 0)
    except OSError as e:  # a full disk: name the file, release the lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise OSError(e.errno, e.strerror, str(path / LOCK)) from None
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        del _held[key]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

