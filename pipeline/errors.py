"""User-facing errors: the CLI prints the message as one line and exits with the code, no traceback."""

import errno

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL from sysexits.h: cron may simply try again later


class OvmlError(Exception):
    """A problem the user can fix (bad input, missing file, bad config): message says what and how."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RunDirLocked(OvmlError):
    exit_code = EXIT_LOCKED


ENVIRONMENT_FIXES = {  # OS errors a user meets in normal operation, and what to do about each
    errno.ENOSPC: "free disk space, then run the same command again to resume",
    errno.EDQUOT: "free space within your disk quota, then run the same command again to resume",
    errno.EROFS: "the filesystem is read-only: pass a writable --run-dir",
    errno.EACCES: "make it writable for this user or pass another --run-dir",
    errno.EPERM: "make it writable for this user or pass another --run-dir",
    errno.ENOTDIR: "a folder on this path is a file: move the file or pass another path",
    errno.EISDIR: "a directory is where a file should be: move it or pass another path",
}


def environment_error(e: OSError) -> OvmlError | None:
    """The one-line error for a full disk or a read-only/foreign run directory; None for any other OSError."""
    fix = ENVIRONMENT_FIXES.get(e.errno)
    if fix is None:
        return None
    return OvmlError(f"{e.filename or 'a file'}: {e.strerror}; {fix}")
