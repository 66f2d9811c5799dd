"""How a stage runs from the command line: its options, the project lock, and one clear line on failure.

Every entry point (each stage run alone, ``model_testing.py --restore``) takes
the same lock as ``pipeline.sh``, so nothing writes under a live run; a stage
started by ``pipeline.sh`` inherits the pipeline's lock instead (the pipeline
passes its locked file descriptor down and names it in ``PIPELINE_LOCK_FD``).
Only the standard library is imported here, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from station_forecast import manifest, runtime, stopping
from station_forecast.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    Busy,
    PipelineError,
    UnfitEnvironment,
    cannot_write,
)
from station_forecast.params import DEFAULT_PARAMS, STAGES, load_params
from station_forecast.runtime import INHERITED_LOCK
from station_forecast.stopping import STOP_SIGNALS, Terminated, signal_of
from station_forecast.storage import (
    ROOT,
    Paths,
    check_project_layout,
    forget_reads,
    is_utf8,
    pid_alive,
    write_bytes,
)

log = logging.getLogger("pipeline")
MAX_MESSAGE = 500  # characters of one error line; a binary or one-line 5 MB file must not flood the terminal
PIPELINE_PID = "PIPELINE_PID"  # the pipeline.sh process that started this stage
GO = "go"  # the line that starts a stage waiting with --wait-for-go


def stage_parser(docstring: str | None) -> argparse.ArgumentParser:
    """A stage script's options, described by the first line of its ``docstring`` (None where Python runs with
    docstrings stripped, ``-OO`` or ``PYTHONOPTIMIZE=2``)."""
    parser = argparse.ArgumentParser(description=(docstring or "").partition("\n")[0] or None)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="parameters file (default: params.toml beside this script)")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="project folder holding data/ and models/ (default: this script's folder)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--wait-for-go", action="store_true",
                        help=f"import what the stage needs, then wait for a line on stdin: {GO!r} runs the stage, "
                             "anything else or the end of input ends it at once (pipeline.sh starts each stage "
                             "this way while the one before it works)")
    return parser


def one_line(text: str) -> str:
    """``text`` as one printable line of at most MAX_MESSAGE characters."""
    flat = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return flat if len(flat) <= MAX_MESSAGE else flat[:MAX_MESSAGE - 20] + f"… ({len(flat):,} characters)"


@contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project's lock for the duration, or raise Busy naming the run that holds it.

    A descriptor inherited from pipeline.sh counts only if it really is the
    locked lock file of this project. The lock file is opened without following
    a link and without blocking, so a link or a FIFO planted in its place is
    refused rather than written through or waited on.
    """
    import fcntl

    paths = Paths(root)
    inherited = os.environ.get(INHERITED_LOCK, "")
    if inherited.isdigit() and _is_lock_file(int(inherited), paths.lock):
        yield
        return
    paths.logs.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(paths.lock, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        raise PipelineError(f"{paths.lock}: cannot open the project's lock ({exc.strerror}); if it is a link or "
                            f"not a regular file, remove it (rm -r {paths.lock})") from None
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PipelineError(f"{paths.lock}: not a regular file; remove it (rm -r {paths.lock})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(busy_message(paths)) from None
        write_bytes(paths.pid_file, f"{os.getpid()}\n".encode())  # a new file renamed in: never through a link
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def busy_message(paths: Paths) -> str:
    """Who holds the lock, as far as the pid file tells; a stage of a run whose pipeline has ended (killed
    outright) may still be stopping."""
    text = ""
    if paths.pid_file.is_file() and not paths.pid_file.is_symlink():
        text = paths.pid_file.read_text(errors="replace")[:20]
    holder = "".join(c for c in text if c.isascii() and c.isdigit())
    ended = " (that process has ended; a stage it started is still stopping)" \
        if holder and not pid_alive(int(holder)) else ""
    return f"another run (pid {holder or 'unknown'}) is using {paths.root}{ended}; retry when it has finished"


def _is_lock_file(fd: int, lock_path: Path) -> bool:
    import fcntl

    try:
        same = os.path.samestat(os.fstat(fd), lock_path.stat())
        if same:  # a descriptor of the same open file that holds the lock can take it again at once
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return same
    except OSError:
        return False


def _stop_with_the_pipeline() -> None:
    """Under pipeline.sh, have the kernel send SIGTERM to this stage when the pipeline's process ends, even
    by SIGKILL: the stage then stops cleanly and frees the lock instead of running on, orphaned, holding it."""
    parent = os.environ.get(PIPELINE_PID, "")
    if INHERITED_LOCK not in os.environ or not (parent.isascii() and parent.isdigit()):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the pipeline ended before the request took effect
        raise Terminated(signal.SIGTERM)


def project_root(root: Path) -> Path:
    """``--root`` as an existing folder, resolved; PipelineError for anything else (it is never created)."""
    try:
        resolved = root.resolve(strict=True)
    except FileNotFoundError:
        raise PipelineError(f"--root {root}: folder not found") from None
    except (OSError, RuntimeError) as exc:  # a link loop
        raise PipelineError(f"--root {root}: cannot be resolved ({getattr(exc, 'strerror', None) or exc})") from None
    if not resolved.is_dir():
        raise PipelineError(f"--root {root}: not a folder")
    return resolved


def run(stage: str, main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
        argv: list[str] | None = None, imports: list[str] | tuple[str, ...] = ()) -> int:
    """Run a stage's ``main`` under the project lock; every failure becomes one line on stderr and an exit code.

    With ``--debug`` the traceback is printed too, and the exit code stays the same. With
    ``--wait-for-go``, the modules in ``imports`` are loaded first and the stage runs only once told
    to (``wait_for_go``); stopped before that, it ends without a word.
    """
    # A terminal in the C locale without Python's UTF-8 mode writes ASCII: a "°C" in the report's table would stop
    # the stage after its work is done. Such characters are written as escapes instead.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parser.parse_args(argv)
    manifest.note_code(stage)  # its modules are loaded: what it runs is what they were as it started
    forget_reads()
    # OpenBLAS's idle threads spin for about 2^28 cycles after each call before they sleep: on two cores
    # that doubled the CPU time of stage 2's many short matrix products, taken from the stage's own
    # threads. 2^4 lets them sleep at once. Read when numpy first loads, which here is later (lazily);
    # a value the user set wins. The number of threads, and so every result, stays as it was.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    # numpy asks the kernel for huge pages for every array of 4 MB and more. On virtual machines and on
    # servers whose memory is fragmented, the kernel compacts memory or the host faults the huge page in
    # before the first touch returns: there a fresh gigabyte took 2.5-7 s instead of 0.5 s, and stage 3
    # at 1,000 stations spent most of its time in the kernel. Small pages cost a little where huge pages
    # come free and never stall. Read when numpy loads; a value the user set wins; results are the same.
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    runtime.keep_freed_memory()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Formatter(stage))
    # A background job of a non-interactive shell starts with SIGINT ignored; Ctrl-C must stop it all the same.
    with stopping.handled():
        return _run_stopping_on_a_signal(stage, main, args, imports)


def _run_stopping_on_a_signal(stage: str, main: Callable[[argparse.Namespace], None], args: argparse.Namespace,
                              imports: list[str] | tuple[str, ...]) -> int:
    failed_import = None
    if getattr(args, "wait_for_go", False):
        try:
            _stop_with_the_pipeline()
            failed_import = load_ahead(imports)
            stopping.check()  # a stop whose exception an import's clean-up dropped
            if not wait_for_go():
                return EXIT_OK
        except (KeyboardInterrupt, Terminated) as exc:
            if not told_to_go():  # a stage started ahead that was never to run ends without a word
                return 128 + signal_of(exc)
            return _stopped(args, stage, signal_of(exc))
    try:
        check_environment()
        if failed_import is not None:  # reported in the stage's turn, as it would have been without waiting
            raise failed_import
        _stop_with_the_pipeline()
        runtime.chosen_threads()  # a bad setting is refused before any work, not when a stage first asks
        args.root = project_root(args.root)
        check_project_layout(Paths(args.root))
        stopping.check()
        with project_lock(args.root):
            main(args)
    except (KeyboardInterrupt, Terminated) as exc:
        return _stopped(args, stage, signal_of(exc))
    except Exception as exc:
        if stopping.received:  # what the stop broke on its way out (an import it cut short leaves an ImportError)
            return _stopped(args, stage, stopping.received[0])
        if isinstance(exc, OSError):  # a full or read-only disk met outside the writers that name their file
            exc = cannot_write(exc) or exc
        if isinstance(exc, PermissionError):  # a file or folder this user may not read (the station files' folder)
            return _fail(args, f"{stage}: error: {exc.filename or 'a file or folder'}: no permission "
                               f"({exc.strerror}): check the owner and mode of it and of its folders (ls -ld), "
                               "then rerun", EXIT_BAD_INPUT)
        if isinstance(exc, MemoryError):
            return _fail(args, f"{stage}: error: out of memory ({one_line(str(exc)) or 'an allocation failed'});"
                               " run fewer stations or years, or on a machine with more memory "
                               "(docs/scale_plan.md)", EXIT_INTERNAL)
        if isinstance(exc, PipelineError):
            return _fail(args, f"{stage}: error: {one_line(str(exc))}", exc.exit_code)
        shadowing = isinstance(exc, ImportError) and imported_from_pythonpath(exc)
        if shadowing:
            return _fail(args, f"{stage}: error: {one_line(f'{type(exc).__name__}: {exc}')[:200]} in {shadowing}, "
                               f"which PYTHONPATH={os.environ['PYTHONPATH']} puts before this Python's own packages: "
                               "unset PYTHONPATH, or run ./pipeline.sh, which ignores it with its .venv",
                         EXIT_INTERNAL)
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in manifest.LIBRARIES.values():
            return _fail(args, f"{stage}: error: {exc.name} is not installed for {sys.executable}: run the stages "
                               "with .venv/bin/python (./pipeline.sh --setup-only makes it), or pip install -r "
                               "requirements.txt into this Python", EXIT_INTERNAL)
        # The one place that turns bugs into a clear line.
        return _fail(args, f"{stage}: internal error: {one_line(f'{type(exc).__name__}: {exc}')} "
                           "(rerun with --debug for the traceback)", EXIT_INTERNAL)
    if stopping.received:  # its exception was dropped (stopping.py) and nothing was left to commit after it
        log.info("a stop signal (%s) came after the stage's last output was written; the stage finished",
                 STOP_SIGNALS[stopping.received[0]])
    return EXIT_OK


def imported_from_pythonpath(exc: BaseException) -> str:
    """The file under a ``PYTHONPATH`` folder that a failed import ran through (another copy of numpy or pandas
    than this Python's, put first by a PYTHONPATH set for other work), or ""."""
    folders = [os.path.realpath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    frame = exc.__traceback__
    while frame is not None:
        name = os.path.realpath(frame.tb_frame.f_code.co_filename)
        if any(name.startswith(folder + os.sep) for folder in folders):
            return name
        frame = frame.tb_next
    return ""


def check_environment() -> None:
    """Refuse a Python environment in a folder whose path is not UTF-8 (a folder above it named in another
    encoding): ctypes decodes the loader's messages, which name the library's path, as UTF-8, so threadpoolctl
    (loaded with scikit-learn) stops stage 3 with a UnicodeDecodeError. The project itself may be there."""
    if not is_utf8(sys.prefix):
        raise UnfitEnvironment(f"the Python environment's folder {os.fsencode(sys.prefix)!r} is not UTF-8 (a folder "
                               "above it is named in another encoding), and scikit-learn's threadpoolctl fails to "
                               "load its libraries there: rename that folder, or keep the project there and run "
                               "with PYTHON set to a Python installed elsewhere")


def _stopped(args: argparse.Namespace, stage: str, signum: int) -> int:
    return _fail(args, f"{stage}: stopped ({STOP_SIGNALS[signum]}); files it already replaced are complete, and "
                       "the manifest still describes the previous run until it finishes", 128 + signum)


def load_ahead(modules: list[str] | tuple[str, ...]) -> Exception | None:
    """Import ``modules`` now (those the stage imports on first use then find them loaded); the error that
    stopped an import, to be raised when the stage runs, or None."""
    try:
        for name in modules:
            importlib.import_module(name)
    except Terminated:
        raise
    except Exception as exc:  # raised in the stage's turn, where it becomes the usual one line
        return exc
    return None


def wait_for_go() -> bool:
    """Block until a line arrives on stdin; whether it says ``GO``."""
    return sys.stdin.readline().strip() == GO


def told_to_go() -> bool:
    """Whether ``GO`` is waiting on stdin, unread (a stage stopped while it still imported had been told
    to run, and reports its stop)."""
    import select

    try:
        return bool(select.select([sys.stdin], [], [], 0)[0]) and wait_for_go()
    except (OSError, ValueError):
        return False


def exit_now(code: int) -> NoReturn:
    """End a stage's process with ``code`` once ``run`` has returned, skipping the interpreter's teardown.

    Finalising the modules of numpy, pandas, scikit-learn and matplotlib takes
    0.2-0.6 s a process, as long as the default run's stages take for their own
    work; by the time ``run`` returns, every output is written, synced to disk and
    recorded, the lock is released and every pool or cluster is closed, so there
    is nothing left for the teardown to do. Under a tracer or profiler
    (coverage, cProfile), which report at exit, the process exits normally.
    """
    if sys.gettrace() is not None or sys.getprofile() is not None:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what was not read is lost either way
            pass
    os._exit(code)


def _fail(args: argparse.Namespace, line: str, code: int) -> int:
    if args.debug:
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


class _Formatter(logging.Formatter):
    """``HH:MM:SS stage: message``, with ``warning:`` before a warning's message."""

    def __init__(self, stage: str) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        marker = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, self.datefmt)} {self.stage}: {marker}{record.getMessage()}"


def up_to_date(argv: list[str] | None = None) -> int:
    """``python -m station_forecast.cli STAGE --params P [--root R]``: exit 0 when the stage need not run
    again, else 1; prints the reason either way. pipeline.sh asks this before every stage (unless --force).

    ``python -m station_forecast.cli layout [--root R]``: exit 0 when the project's own folders can be
    written safely, else 2 with the reason; pipeline.sh asks this before it takes the lock."""
    parser = argparse.ArgumentParser(description="Whether a stage's record in the manifest still holds.")
    parser.add_argument("stage", choices=[*STAGES, "layout"])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    if args.stage == "layout":
        try:
            check_project_layout(Paths(project_root(args.root)))
        except PipelineError as exc:
            print(f"pipeline: error: {one_line(str(exc))}", file=sys.stderr)
            return exc.exit_code
        return EXIT_OK
    try:
        reason = manifest.why_stale(Paths(args.root), args.stage, load_params(args.params))
    except PipelineError as exc:  # the stage itself will report it properly
        reason = one_line(str(exc))
    except Exception as exc:  # never a traceback in the log: the stage runs and reports what it finds
        reason = one_line(f"its record could not be checked: {type(exc).__name__}")
    print(f"{args.stage}: up to date" if reason is None else f"{args.stage}: runs ({reason})")
    return 0 if reason is None else 1


if __name__ == "__main__":
    try:
        raise SystemExit(up_to_date())
    except KeyboardInterrupt:  # die of Ctrl-C, not of an exception: the shell that asked then stops too
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
