"""The project's own folder, and the one check every input file passes before it is opened.

The lowest layer with ``errors``: the parameters and storage both read files, so what makes a file
safe to read lives here, below both. Standard library only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from station_forecast.errors import PipelineError

PROJECT = Path(__file__).resolve().parent.parent  # the folder of the stage scripts, params.toml and stages.txt
MAX_INPUT_BYTES = 1 << 30  # a station file larger than 1 GiB is refused rather than read


def check_regular_file(path: Path, limit: int | None = MAX_INPUT_BYTES) -> int:
    """The size of ``path``, or PipelineError unless it is a regular file of at most ``limit`` bytes (any size
    for ``None``).

    Checked before opening, so a FIFO (which would block), a device such as
    /dev/zero (which never ends), a folder or a symlink loop named like a data
    file gets a clear message instead.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():  # a link left behind when what it named was moved or deleted
            raise PipelineError(f"{path}: a link to {os.readlink(path)}, which is not there; remove the link or "
                                "restore its file") from None
        raise PipelineError(f"{path}: file not found") from None
    except OSError as exc:  # a symlink loop, a permission problem
        raise PipelineError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) \
            else "a device or socket"
        raise PipelineError(f"{path}: not a regular file ({kind})")
    if limit is not None and info.st_size > limit:
        raise PipelineError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} a data file may have")
    return info.st_size


# What a copy of the project needs to run the pipeline, beside the stage scripts and the package.
RUNNABLE_FILES = ["pipeline.sh", "params.toml", "requirements.txt", "stages.txt"]


def copy_runnable(target: Path) -> None:
    """Copy what runs the pipeline (the stage scripts, this package and ``RUNNABLE_FILES``) into the folder
    ``target``: a working copy whose data, models and reports are its own."""
    import shutil

    for path in [*PROJECT.glob("*.py"), *(PROJECT / name for name in RUNNABLE_FILES)]:
        shutil.copy2(path, target / path.name)
    package = Path(__file__).resolve().parent
    shutil.copytree(package, target / package.name, ignore=shutil.ignore_patterns("__pycache__"))
