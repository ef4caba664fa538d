"""Atomic writes: a reader (or a re-run after kill -9) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ovml.pipeline.errors import OvmlError

if TYPE_CHECKING:  # pyarrow is imported where it is used: `ovml run` takes its lock before paying for it
    import pyarrow as pa


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact gets what open() would give it
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file; the user needs to know which
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike, remake: str, columns: list[str] | None = None) -> pa.Table:
    """The table, or a one-line error naming the damaged file and `remake`, the command that rebuilds it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the disk or the permissions, not the file's content
        raise OvmlError(f"{path} is damaged or not a parquet file ({str(e)[:120]}); remake it with "
                        f"`{remake}`") from None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`target` as a second name of a finished artifact (artifacts are replaced, never edited in place, so
    the two names cannot drift apart); a copy where hard links are refused. Nothing when target exists."""
    source, target = Path(source), Path(target)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        write_bytes(target, source.read_bytes())


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE), so a reader of either name sees
    the old entry or the new one, never none. False where the C library or the filesystem cannot do it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this kernel or filesystem cannot exchange
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temp files a killed writer left behind; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = list(directory.rglob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
