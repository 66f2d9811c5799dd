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
from types import ModuleType
from typing import NoReturn

from errors import EXIT_INTERNAL, EXIT_OK, Busy, PipelineError
from params import DEFAULT_PARAMS, STAGES
from storage import ROOT, Paths, check_project_layout, pid_alive, write_bytes

log = logging.getLogger("pipeline")
MAX_MESSAGE = 500  # characters of one error line; a binary or one-line 5 MB file must not flood the terminal
INHERITED_LOCK = "PIPELINE_LOCK_FD"
PIPELINE_PID = "PIPELINE_PID"  # the pipeline.sh process that started this stage
GO = "go"  # the line that starts a stage waiting with --wait-for-go
MAX_THREADS = 1024
# Signals that stop a stage cleanly, each ending it with 128 + the signal's number, as a shell reports it.
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived: stop like Ctrl-C, cleaning up temporary files on the way out."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(STOP_SIGNALS.get(signum, "terminated"))
        self.signum = signum


def work_threads(chunks: int) -> int:
    """Threads for a stage's ``chunks`` pieces of independent work: one for a single piece (no need to look
    at the machine), else ``thread_budget``'s count, logged with why."""
    if chunks <= 1:
        return 1
    threads, why = thread_budget()
    log.info("working on %d thread(s) (%s)", threads, why)
    return threads


def thread_budget(spinning: bool = False) -> tuple[int, str]:
    """How many threads a stage's numerical libraries should use, and why.

    ``PIPELINE_THREADS`` decides when set. Otherwise: the CPUs this process may
    run on (its affinity, not the machine's count), less those other processes
    kept busy over the last tenth of a second, and at least one. On a shared
    server, threads beyond the idle CPUs do not add speed: OpenMP's threads
    (``spinning``) spin while they wait for each other (gradient boosting took
    5.2 s instead of 2.0 s next to one busy process with two threads; 2.0 s with
    one). Under pipeline.sh, the stage it started ahead of this one imports for
    a second or two and then waits for its turn: it counts as busy only for
    threads that spin, which it would slow down; threads that block share the
    CPU with it for those seconds and then have it to themselves.
    """
    import time

    chosen = chosen_threads()
    if chosen is not None:
        return chosen, "PIPELINE_THREADS"
    cpus = usable_cpus()
    try:
        ahead_first = {} if spinning else _siblings_jiffies()
        first, own_first = _busy_jiffies(), os.times()
        time.sleep(0.1)
        second, own_second = _busy_jiffies(), os.times()
        ahead_second = {} if spinning else _siblings_jiffies()
    except OSError:  # no /proc/stat: trust the affinity
        return cpus, f"{cpus} CPUs"
    ticks = os.sysconf("SC_CLK_TCK")
    own = (own_second.user + own_second.system - own_first.user - own_first.system) * ticks
    own += sum(ahead_second.get(pid, jiffies) - jiffies for pid, jiffies in ahead_first.items())
    busy = max(0.0, (second - first - own) / (0.1 * ticks))
    threads = max(1, cpus - round(busy))
    return threads, f"{cpus} CPUs, {busy:.1f} busy with other work"


def chosen_threads() -> int | None:
    """``PIPELINE_THREADS`` as a number of threads, None when unset; PipelineError for anything else."""
    chosen = os.environ.get("PIPELINE_THREADS", "")
    if not chosen:
        return None
    if not (chosen.isascii() and chosen.isdigit() and 1 <= int(chosen) <= MAX_THREADS):
        raise PipelineError(f"PIPELINE_THREADS={chosen[:20]!r} must be a whole number from 1 to {MAX_THREADS} "
                            "(or unset, to use the idle CPUs)")
    return int(chosen)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _siblings_jiffies(parent: int | None = None) -> dict[int, int]:
    """Under pipeline.sh (which passes its lock on), the clock ticks each other child of it (``parent``)
    has run so far: the stage started ahead of this one, and the tee processes copying the output."""
    if INHERITED_LOCK not in os.environ:
        return {}
    parent, ticks = parent or os.getppid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[1]) == parent and int(stat.parent.name) != os.getpid():
            ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])  # its user and system time
    return ticks


def _busy_jiffies() -> float:
    """Clock ticks all CPUs have spent busy since boot (the first line of /proc/stat)."""
    ticks = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return sum(ticks[:8]) - idle - iowait  # user, nice, system, irq, softirq and steal


# The largest stage's peak per station-step of the days x stations table, measured with benchmark.py (stage 3
# at 1,000 and 10,000 stations x 10 years: 1.8 GB per 3.65 M station-days), rounded up.
PEAK_BYTES_PER_STATION_STEP = 520


def check_memory(station_steps: int, what: str) -> None:
    """Refuse, before any work, a network whose largest stage would need more memory than this machine has
    free (a MemoryError or the kernel's out-of-memory killer would otherwise end it part-way)."""
    needed = station_steps * PEAK_BYTES_PER_STATION_STEP
    free = available_memory()
    if free is not None and needed > free:
        raise PipelineError(f"{what} is {station_steps:,} station-steps: about {needed / 2**30:.1f} GiB for the "
                            f"largest stage, and {free / 2**30:.1f} GiB is free here; run fewer stations or years, "
                            "or on a machine with more memory")


def available_memory() -> int | None:
    """Bytes this process could still allocate: the system's available memory, or its control group's limit
    less what the group uses, whichever is lower; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def release_memory(collect: bool = True) -> None:
    """Hand memory freed so far back to the system, between the phases of a large stage.

    glibc keeps freed blocks below its mmap threshold for reuse, so without this
    a stage's resident size stays at the high-water mark of its last phase and
    the next phase's peak adds to it (stage 2 at 1,000 stations: 2.4 GB peak
    without, 2.2 GB with). ``collect=False`` skips the garbage collector's pass
    (for freed arrays, which need none). Does nothing where there is no glibc.
    """
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Progress:
    """Logs ``what: done of total, elapsed, about N s left`` at most every ``interval`` seconds, and nothing
    for work that finishes within the first interval."""

    def __init__(self, what: str, total: int, interval: float = 5.0,
                 clock: Callable[[], float] | None = None, quiet: bool = False) -> None:
        import time

        self.what, self.total, self.interval = what, total, float("inf") if quiet else interval
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()
        self.done = 0

    def step(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done)
            log.info("%s: %d of %d, %.0f s so far, about %.0f s left", self.what, self.done, self.total,
                     elapsed, left)


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module that is really imported on first use (importlib's LazyLoader).

    The stages import numpy and pandas this way, so ``--help`` and an argument
    error answer before the 0.3 s those imports take.
    """
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
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


def _on_stop_signal(signum: int, frame: object) -> None:
    """Stop once: a second signal (Ctrl-C reaches the stage and pipeline.sh passes it on too) must not cut
    the clean-up of the first short."""
    for other in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: a signal already pending would
        signal.signal(other, _already_stopping)  # then raise "ignored due to race condition"
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _already_stopping(signum: int, frame: object) -> None:
    """A stop signal after the first: the stage is already stopping."""


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
    args = parser.parse_args(argv)
    # OpenBLAS's idle threads spin for about 2^28 cycles after each call before they sleep: on two cores
    # that doubled the CPU time of stage 2's many short matrix products, taken from the stage's own
    # threads. 2^4 lets them sleep at once. Read when numpy first loads, which here is later (lazily);
    # a value the user set wins. The number of threads, and so every result, stays as it was.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Formatter(stage))
    # A background job of a non-interactive shell starts with SIGINT ignored; Ctrl-C must stop it all the same.
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    try:
        failed_import = None
        if getattr(args, "wait_for_go", False):
            try:
                _stop_with_the_pipeline()
                failed_import = load_ahead(imports)
                if not wait_for_go():
                    return EXIT_OK
            except (KeyboardInterrupt, Terminated) as exc:
                if not told_to_go():  # a stage started ahead that was never to run ends without a word
                    return 128 + _signal_of(exc)
                return _stopped(args, stage, exc)
        try:
            if failed_import is not None:  # reported in the stage's turn, as it would have been without waiting
                raise failed_import
            _stop_with_the_pipeline()
            chosen_threads()  # a bad setting is refused before any work, not when a stage first asks
            args.root = project_root(args.root)
            check_project_layout(Paths(args.root))
            with project_lock(args.root):
                main(args)
        except PipelineError as exc:
            return _fail(args, f"{stage}: error: {one_line(str(exc))}", exc.exit_code)
        except (KeyboardInterrupt, Terminated) as exc:
            return _stopped(args, stage, exc)
        except Exception as exc:  # the one place that turns bugs into a clear line
            return _fail(args, f"{stage}: internal error: {one_line(f'{type(exc).__name__}: {exc}')} "
                               "(rerun with --debug for the traceback)", EXIT_INTERNAL)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _signal_of(stop: BaseException) -> int:
    return stop.signum if isinstance(stop, Terminated) else signal.SIGINT


def _stopped(args: argparse.Namespace, stage: str, stop: BaseException) -> int:
    signum = _signal_of(stop)
    return _fail(args, f"{stage}: stopped ({STOP_SIGNALS[signum]}); files it already replaced are complete, and "
                       "the manifest still describes the previous run until it finishes", 128 + signum)


def load_ahead(modules: list[str] | tuple[str, ...]) -> Exception | None:
    """Import ``modules`` now (touching one the stage imported lazily loads it); the error that stopped
    an import, to be raised when the stage runs, or None."""
    try:
        for name in modules:
            dir(importlib.import_module(name))
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
    """``python cli.py STAGE --params P [--root R]``: exit 0 when the stage need not run again, else 1;
    prints the reason either way. pipeline.sh asks this before every stage (unless --force).

    ``python cli.py layout [--root R]``: exit 0 when the project's own folders can be written safely, else
    2 with the reason; pipeline.sh asks this before it takes the lock."""
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
        import manifest
        from params import load_params

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
