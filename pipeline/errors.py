"""User-facing errors: the CLI prints the message as one line and exits with the code, no traceback."""

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
