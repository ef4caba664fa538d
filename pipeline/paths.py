"""Paths the user names, checked for the kind of file they are before anything reads or writes them.

One rule for every input file (labels, config, model, checkpoint, image, tag file): it must be a regular file
(after symlinks). A directory, a FIFO (reading it would block forever) or a device such as /dev/null is named
as what it is, not as "does not exist". One rule for every run directory: a folder, or a path where one can
be made, with no file in the way.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ovml.pipeline.errors import OvmlError

_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
          (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"), (stat.S_ISSOCK, "is a socket"))


def not_a_file(path: str | os.PathLike) -> str | None:
    """None for a regular file; else what the path is instead, in words ("does not exist", "is a directory")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a folder on its path is a file)"
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((words for test, words in _KINDS if test(mode)), "is not a regular file")
    return f"{kind}, not a file"


def input_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`path` when it is a regular file, else one line: "{what} {path} is a directory, not a file; {fix}"."""
    problem = not_a_file(path)
    if problem is not None:
        raise OvmlError(f"{what} {path} {problem}; {fix}")
    return Path(path)


def check_run_dir(path: str | os.PathLike) -> Path:
    """A run directory that is a folder or can be made: not a file, not under one."""
    path = Path(path)
    for existing in (p for p in (path, *path.parents) if os.path.lexists(p)):
        if existing.is_dir():
            return path
        problem = not_a_file(existing) or "is a file"
        where = "" if existing == path else f" is under {existing}, which"
        raise OvmlError(f"--run-dir {path}{where} {problem.removesuffix(', not a file')}, not a directory; "
                        "pass a directory (it is made when missing)")
    return path
