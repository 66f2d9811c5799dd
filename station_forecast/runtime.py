"""What every stage needs to run well on a shared machine, from the standard library only: how many threads
to use, how much memory is left and how to hand it back, progress lines for long work, lazy imports, and
the in-process pool that runs a stage's chunks on threads (``compute`` adds the Dask cluster beside it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from types import ModuleType
from typing import Any

from station_forecast.errors import PipelineError

log = logging.getLogger("pipeline")
INHERITED_LOCK = "PIPELINE_LOCK_FD"  # names the descriptor of the project's lock a stage inherits from pipeline.sh
MAX_THREADS = 1024


def work_threads(chunks: int) -> int:
    """Threads for a stage's ``chunks`` pieces of independent work: one for a single piece (no need to look
    at the machine), else ``thread_budget``'s count, logged with why."""
    if chunks <= 1:
        return 1
    threads, why = thread_budget()
    log.info("working on %d thread(s) (%s)", threads, why)
    return threads


def thread_budget() -> tuple[int, str]:
    """How many threads a stage's work should use, and why.

    ``PIPELINE_THREADS`` decides when set. Otherwise: the CPUs this process may
    run on (its affinity, not the machine's count), less those other processes
    kept busy over the last tenth of a second, and at least one: on a shared
    server, threads beyond the idle CPUs do not add speed. Under pipeline.sh,
    the stage it started ahead of this one imports for a second or two and then
    waits for its turn: it does not count as busy, since the threads sized here
    block rather than spin while they wait (stage 3 fits on one OpenMP thread
    each), so they share the CPU with it for those seconds and then have it to
    themselves.
    """
    import time

    chosen = chosen_threads()
    if chosen is not None:
        return chosen, "PIPELINE_THREADS"
    cpus = usable_cpus()
    try:
        ahead_first = _siblings_jiffies()
        first, own_first = _busy_jiffies(), os.times()
        time.sleep(0.1)
        second, own_second = _busy_jiffies(), os.times()
        ahead_second = _siblings_jiffies()
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
    """The CPUs this process may use: its affinity, not the machine's count, and no more than its control
    group's CPU quota allows (a container run with ``--cpus 2``, a cluster job's limit), rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cpus, quota)) if quota is not None else cpus


# Control groups: where Linux keeps the CPU and memory limits of a container, a cluster job or a systemd
# service. Read with cgroup v2's files, or v1's where a machine mounts one tree per controller.
CGROUPS = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")
UNLIMITED_V1 = 2**62  # v1 writes "no memory limit" as a number near 2^63


def control_groups(controller: str) -> list[Path]:
    """The folders of this process's control group for ``controller`` ("cpu", "memory") and of every group above
    it, innermost first, as mounted here: a limit set on any of them holds. A container sees its own group as
    the root of the tree (a path of its group that does not exist there is skipped)."""
    try:
        lines = OWN_CGROUPS.read_text().splitlines()
    except OSError:
        return []
    folders: list[Path] = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and not controllers:  # v2: one tree for every controller, where it is mounted here
            if not (CGROUPS / "cgroup.controllers").exists():  # (v1 beside an empty v2 tree elsewhere)
                continue
            tree = CGROUPS
        elif controller in controllers.split(","):  # v1: a tree per controller
            tree = CGROUPS / controller
        else:
            continue
        parts = Path(path).relative_to("/").parts if path.startswith("/") else ()
        folders += [tree.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)
                    if tree.joinpath(*parts[:depth]).is_dir()]
    return folders


def _read_numbers(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def cpu_quota() -> int | None:
    """The most CPUs the control groups' quotas allow this process (quota over period, rounded up); None where
    no quota is set or none can be read."""
    limits = []
    for folder in control_groups("cpu"):
        quota, period = (_read_numbers(folder / "cpu.max") or ["", ""])[:2]  # v2: "max 100000", "200000 100000"
        if not quota:
            quota, period = (_read_numbers(folder / "cpu.cfs_quota_us") or [""])[0], \
                (_read_numbers(folder / "cpu.cfs_period_us") or [""])[0]  # v1: -1 for no quota
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(-(-int(quota) // int(period)))
    return min(limits) if limits else None


def cgroup_memory_free() -> int | None:
    """Bytes the control groups' memory limits leave this process: per group, its limit less what it uses
    but could not give back (the page cache of files read, which the kernel reclaims first, not counted);
    the least over the groups; None where no limit is set or none can be read."""
    free = []
    for folder in control_groups("memory"):
        names = ("memory.max", "memory.current", "inactive_file") if (folder / "memory.max").exists() else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        limit, used = (_read_numbers(folder / name) for name in names[:2])
        if not (limit and limit[0].isdigit() and int(limit[0]) < UNLIMITED_V1 and used and used[0].isdigit()):
            continue
        stat = _read_numbers(folder / "memory.stat")
        cache = dict(zip(stat[::2], stat[1::2], strict=False)).get(names[2], "0")
        free.append(int(limit[0]) - int(used[0]) + (int(cache) if cache.isdigit() else 0))
    return min(free) if free else None


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
# Each step ahead past the first adds a row per station-step to the features. While stage 2 builds a block of
# them and stage 3 holds the table whole, the larger peak grows by about 420 bytes per station-step and step
# (stage 3, 47 MB a step on a real network of 16 stations x 7,037 days, horizons 1-30; 45 MB on 100 simulated
# stations x 4 years, horizons 1-15), rounded up. Further ahead it stops growing: stage 2 builds fewer stations
# at a time, and stage 3 reads a table past 1 GiB in batches and holds at most 1 GiB of rows at a time (the
# network above, 120 steps ahead: 1.2 GB in stage 2, 1.4 GB of its own memory in stage 3), so while stage 2
# can still build fewer stations at a time, what the horizon adds is counted up to HORIZON_BYTES_CAP.
PEAK_BYTES_PER_STATION_STEP_AHEAD = 440
HORIZON_BYTES_CAP = 3 << 30


def check_memory(station_steps: int, what: str, horizon: int = 1, bounded: bool = False) -> None:
    """Refuse, before any work, a network whose largest stage would need more memory than this machine has
    free (a MemoryError or the kernel's out-of-memory killer would otherwise end it part-way), forecasting
    ``horizon`` steps ahead; ``bounded``: the stages hold a bounded share of the rows of the steps ahead (up to
    ``HORIZON_BYTES_CAP``)."""
    ahead = station_steps * PEAK_BYTES_PER_STATION_STEP_AHEAD * (horizon - 1)
    needed = station_steps * PEAK_BYTES_PER_STATION_STEP + (min(ahead, HORIZON_BYTES_CAP) if bounded else ahead)
    free = available_memory()
    if free is not None and needed > free:
        steps = f" forecast {horizon} steps ahead (forecast.horizon)" if horizon > 1 else ""
        raise PipelineError(f"{what} is {station_steps:,} station-steps{steps}: about {needed / 2**30:.1f} GiB for "
                            f"the largest stage, and {free / 2**30:.1f} GiB is free here; run fewer stations or "
                            f"years{', or a shorter horizon' if horizon > 1 else ''}, or on a machine with more "
                            "memory")


# What stage 2 puts on disk per station-step (``du -b``; 100 simulated stations x 4 years at 1 and 5 steps ahead,
# and a real network of 16 stations x 7,037 days at 120): a feature row per step ahead, 222-229 bytes of CSV
# text (a longer station name adds its length), while the same rows lie spilled beside it, 217 bytes each in
# binary, until their text is written; and a row of flags, 47 bytes. Rounded up.
FEATURE_TEXT_BYTES = 240
SPILLED_ROW_BYTES = 220
FLAG_ROW_DISK_BYTES = 50


def check_disk(station_steps: int, what: str, horizon: int, folder: Path, spilled_above: int) -> None:
    """Refuse, before any work, to build features ``horizon`` steps ahead that the disk holding ``folder``
    has no room for: a run far ahead writes gigabytes, and would otherwise stop with a full disk only when
    its work is done. ``spilled_above``: the bytes of rows beyond which stage 2 keeps them on disk."""
    import shutil

    rows = station_steps * horizon
    spilled = rows * SPILLED_ROW_BYTES if rows * SPILLED_ROW_BYTES > spilled_above else 0
    needed = rows * FEATURE_TEXT_BYTES + spilled + station_steps * FLAG_ROW_DISK_BYTES
    try:
        usage = shutil.disk_usage(folder)
    except OSError:  # cannot tell: the write itself will say if the disk fills
        return
    if usage.total == 0:  # a file system that reports no size at all (some network mounts): nothing to go by
        return
    free = usage.free
    if needed > free:
        steps = f" forecast {horizon} steps ahead (forecast.horizon)" if horizon > 1 else ""
        raise PipelineError(f"{what}, {station_steps:,} station-steps in the stations' records{steps}: their "
                            f"features and flags take about {_in_bytes(needed)} on disk while they are written, "
                            f"and {_in_bytes(free)} is free in {folder}; free space there (or move "
                            "the project to a disk with room), or run fewer stations or years"
                            f"{', or a shorter horizon' if horizon > 1 else ''}")


def _in_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


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
    limited = cgroup_memory_free()
    if limited is not None:
        found.append(limited)
    return min(found) if found else None


# glibc's allocator, left to its defaults, hands the top of its heap back to the system as soon as 128 KiB
# lie free there, and maps arrays above a moving threshold afresh each time: a stage that makes and drops
# tables of megabytes all the time then pays a page fault for every 4 KiB it touches again. Kept instead,
# and handed back only by ``release_memory`` between phases: stage 2 at 3,000 stations x 10 years spent
# 26 s of 124 s in the kernel, 22 s of 117 s so (peak 2,092 -> 2,114 MiB). Dask's worker processes trim at
# 64 KiB; there the kernel's share was a third of their time. The names are glibc's environment variables
# (read when a process starts), the values at most a C int (``mallopt``'s argument).
KEPT_HEAP = {"MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_MMAP_THRESHOLD_": 32 << 20}
_MALLOPT_OPTION = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_TRIM_THRESHOLD, M_MMAP_...


def keep_freed_memory() -> None:
    """Let this process's allocator keep freed memory for reuse (``KEPT_HEAP``) rather than hand it back at
    once; a setting of the user's (these variables, or the same in ``GLIBC_TUNABLES``) wins. Does nothing
    where there is no glibc. Results are the same either way."""
    import ctypes

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in KEPT_HEAP) or "trim_threshold" in tunables or "mmap_threshold" in tunables:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for name, value in KEPT_HEAP.items():
        mallopt(_MALLOPT_OPTION[name], value)


def kept_heap_environment() -> dict[str, str]:
    """``KEPT_HEAP`` as the environment of a process about to start (a Dask worker), a value the user set
    in this one's environment kept."""
    return {name: os.environ.get(name, str(value)) for name, value in KEPT_HEAP.items()}


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
    """``name`` as a module that is really imported on first use, from whichever thread uses it first.

    The stages import numpy and pandas this way, so ``--help`` and an argument
    error answer before the 0.3 s those imports take. (importlib's LazyLoader,
    used before, is not safe for threads before Python 3.12: a stage run alone
    whose threads first touched pandas together failed with "module 'pandas' has
    no attribute 'errors'", the module half made.)
    """
    return sys.modules.get(name) or _DeferredModule(name)


class _DeferredModule(ModuleType):
    """A module imported when one of its names is first looked up. The import system's lock on the module
    makes any other thread that looks one up meanwhile wait until it is whole. Then its names are copied
    in, so later look-ups cost what a module's do."""

    def __getattr__(self, attr: str) -> Any:
        import importlib

        module = importlib.import_module(self.__name__)
        if self.__spec__ is None:  # not copied in yet (a name the module makes on demand comes here each time)
            self.__dict__.update(module.__dict__)
        return getattr(module, attr)

    def __reduce__(self) -> tuple:  # sent to a Dask worker (a stage's functions, run as a script, go by value)
        import importlib

        return importlib.import_module, (self.__name__,)


class Threads:
    """Chunks run in this process, on ``threads`` threads (one: in order, in this thread)."""

    cluster = False

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, threads)

    def share(self, value: Any) -> Any:
        """``value`` as an argument that every chunk of a ``map`` receives."""
        return value

    def map(self, function: Callable[..., Any], items: Sequence[Any], what: str | None = None,
            **shared: Any) -> list[Any]:
        """``[function(item, **shared) for item in items]``, in order; with ``what``, progress is logged
        under that name when the chunks take a while."""
        progress = Progress(what or "", len(items), quiet=what is None)
        results = []
        for result in self.imap(function, items, **shared):
            results.append(result)
            progress.step()
        return results

    def imap(self, function: Callable[..., Any], items: Iterable[Any], **shared: Any) -> Iterator[Any]:
        """``function(item, **shared)`` for each item, yielded in order as each is ready; at most two
        results per thread wait to be taken, so a caller that writes them out keeps memory bounded (and
        an ``OnDemand`` item, or an item of a generator, is made only shortly before it runs)."""
        if self.threads == 1 or (isinstance(items, Sized) and len(items) < 2):
            yield from (function(item, **shared) for item in items)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(function, item, **shared))
                if len(pending) >= 2 * self.threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


class OnDemand(Sequence):
    """A sequence whose item ``i`` is ``make(i)``, made when a chunk is about to run: a stage's chunks are
    copies of parts of its tables, which would otherwise all exist at once beside the tables."""

    def __init__(self, make: Callable[[int], Any], count: int) -> None:
        self.make, self.count = make, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.make(index)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]
