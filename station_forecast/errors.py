"""Errors a user can act on, and the exit codes every entry point returns (docs/troubleshooting.md)."""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected environment problem
EXIT_BAD_INPUT = 2  # bad data, parameters, arguments or artifacts: the user can fix it
EXIT_GATE = 3  # the model was built but failed the quality gate
EXIT_BUSY = 4  # another run holds the project's lock
# 128 + N: stopped by signal N (129 SIGHUP, 130 SIGINT or Ctrl-C, 143 SIGTERM), cleanly; 137 (SIGKILL) is the
# one such stop a process cannot clean up after, e.g. the kernel's out-of-memory killer.


class PipelineError(Exception):
    """A problem the user can fix: bad input, parameters or artifacts (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(PipelineError):
    """The new model did not beat the baseline it must beat (exit 3)."""

    exit_code = EXIT_GATE


class Busy(PipelineError):
    """Another run holds the project's lock (exit 4)."""

    exit_code = EXIT_BUSY


class UnfitEnvironment(PipelineError):
    """The Python environment cannot run the stages as it is installed (exit 1): the machine, not the input."""

    exit_code = EXIT_INTERNAL


class CannotWrite(PipelineError):
    """The machine cannot take a stage's writes: a full, over-quota or read-only disk (exit 1). Every write
    goes to a temporary file first, so the artifacts of the last good run are intact."""

    exit_code = EXIT_INTERNAL


# errno -> what to do about it
DISK_PROBLEMS = {
    errno.ENOSPC: "free space on that disk (or move the project to one with room), then rerun",
    errno.EDQUOT: "your disk quota is used up: free some, then rerun",
    errno.EROFS: "the disk is mounted read-only: remount it read-write or move the project, then rerun",
}
# Met by reads too, so taken for a write's only where the writer names its file.
PERMISSION_PROBLEMS = {errno.EACCES, errno.EPERM}


def cannot_write(error: OSError, where: object = None) -> CannotWrite | None:
    """A ``CannotWrite`` naming ``where`` (else the file the error names) for an error of the disk itself, or
    of permissions where ``where`` is given (a writer's own file); None for any other error."""
    advice = DISK_PROBLEMS.get(error.errno)
    if advice is None and where and error.errno in PERMISSION_PROBLEMS:
        advice = "no permission to write there: check the folder's owner and mode, then rerun"
    if advice is None:
        return None
    place = where or error.filename or "a file"
    return CannotWrite(f"{place}: cannot write ({error.strerror}); {advice}; the last good run's artifacts are "
                       "intact")
