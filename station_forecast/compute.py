"""Where a stage's chunks of work run: on this process's threads, or on a Dask cluster (``[compute] scheduler``).

A stage hands its per-station chunks (and stage 3 its cross-validation fits) to
``pool.map``; the chunks are pure functions of their inputs and come back in
order, so the results, and every byte written from them, are the same wherever
they ran. Workers of a cluster only compute; the stage process writes, except
stage 1's station files, which workers write into the staging folder that the
stage then swaps in whole, so a failed run never leaves a partial artifact.

Only the standard library is imported here; Dask is imported only when a
cluster is asked for, and is an optional install (requirements-dask.txt).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from station_forecast import manifest, runtime
from station_forecast.errors import PipelineError
from station_forecast.files import PROJECT
from station_forecast.params import LOCAL_CLUSTER, SCHEDULER_ADDRESS
from station_forecast.storage import Paths

log = logging.getLogger("pipeline")

CONNECT_SECONDS = 20
GREETING_SECONDS = 10  # a Dask scheduler sends its handshake as soon as a connection is made
MAX_GREETING_BYTES = 1 << 24  # the handshake is a small message; a larger length is not Dask's
DEFAULT_SCHEDULER_PORT = 8786
# How long a stage waits with no worker connected before it gives up, and how often it looks.
NO_WORKERS_SECONDS = 120.0
POLL_SECONDS = 2.0
# A worker that dies takes the chunks it held with it; they are sent again, and after this
# many rounds, or a chunk that took this many workers down with it, the stage fails.
ALLOWED_FAILURES = 3
CODE = PROJECT  # the folder a worker must have on its path to import the stages and this package
LOCAL_WORKERS_PER_CPU = 4
SCATTER_RETRY_SECONDS = 1.0  # the scheduler notices a dead worker within about a second
IN_FLIGHT_PER_WORKER = 2  # chunks sent to a worker before its first is back: one running, one ready
IMAP_WINDOW_PER_WORKER = 4  # chunks per worker whose results ``imap`` holds at a time
WORKER_PEAKS = "Dask workers' peak memory (MB):"


class Cluster:
    """Chunks run on the workers of a Dask cluster, at most ``IN_FLIGHT_PER_WORKER`` per worker at a time,
    each chunk's input scattered straight to a worker (sending it inside the task, through the scheduler,
    took three times as long) and its result fetched and dropped as soon as it is done, so a worker's
    memory is bounded by the chunk size, not by the number of stations. A worker that dies takes its
    chunks' inputs with it: those chunks are sent again, up to ``ALLOWED_FAILURES`` times."""

    cluster = True

    def __init__(self, client: Any, scheduler: str) -> None:
        self.client, self.scheduler = client, scheduler
        # Threads of the stage process for the work that stays in it, while the workers wait for their next
        # chunks: one unless the stage sets its own thread budget.
        self.threads = 1

    def share(self, value: Any) -> Shared:
        return Shared(value)

    def map(self, function: Callable[..., Any], items: Sequence[Any], what: str | None = None,
            **shared: Any) -> list[Any]:
        name = what or function.__name__
        progress = runtime.Progress(what or "", len(items), quiet=what is None)
        results: dict[int, Any] = {}
        for _ in range(ALLOWED_FAILURES):
            todo = [i for i in range(len(items)) if i not in results]
            if not todo:
                break
            sent = {key: self._sent(value) for key, value in shared.items()}
            try:
                self._run(function, {i: items[i] for i in todo}, sent, results, progress)
            except Exception as exc:
                if type(exc).__name__ == "KilledWorker":
                    raise PipelineError(self._died(name)) from None
                raise
            if len(results) < len(items):
                log.warning("%s: a Dask worker died holding the inputs of %d chunk(s); sending them again", name,
                            len(items) - len(results))
        if len(results) < len(items):
            raise PipelineError(self._died(name))
        return [results.pop(i) for i in range(len(items))]

    def imap(self, function: Callable[..., Any], items: Sequence[Any], **shared: Any) -> Iterator[Any]:
        """``map``'s results yielded in order, a window of ``IMAP_WINDOW_PER_WORKER`` chunks per worker at a
        time, so a caller that writes them out or spills them holds only a window's results."""
        workers = max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))
        window = IMAP_WINDOW_PER_WORKER * workers
        for begin in range(0, len(items), window):
            yield from self.map(function, [items[i] for i in range(begin, min(begin + window, len(items)))],
                                **shared)

    def _run(self, function: Callable[..., Any], items: dict[int, Any], sent: dict[str, Any],
             results: dict[int, Any], progress: runtime.Progress) -> None:
        """Runs ``items`` (index -> input) a window at a time, putting each result in ``results``; a chunk
        whose input died with its worker is left out, a chunk's own error is raised."""
        from distributed import wait

        waiting = iter(items.items())
        window = IN_FLIGHT_PER_WORKER * max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))
        running: dict[Any, int] = {}
        alone_since = None
        try:
            while True:
                for index, item in itertools.islice(waiting, window - len(running)):
                    [data] = self._scatter([item])
                    running[self.client.submit(function, data, pure=False, **sent)] = index
                if not running:
                    return
                try:
                    wait(list(running), timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
                except Exception as exc:
                    if not _cancelled(exc):
                        raise
                for future in [f for f in running if f.status != "pending"]:
                    index = running.pop(future)
                    if future.status == "finished":
                        try:
                            results[index] = future.result()
                            progress.step()
                        except Exception as exc:  # the worker holding the result died: the chunk runs again
                            if not (isinstance(exc, OSError) or _cancelled(exc)):
                                raise
                    elif future.status == "error":
                        future.result()  # raises the chunk's own error
                    future.release()
                alone_since = self._check_alone(alone_since)
        finally:
            self.client.cancel(list(running))

    def _check_alone(self, alone_since: float | None) -> float | None:
        """When no worker has been connected since ``alone_since`` for too long, PipelineError."""
        if self.client.scheduler_info(n_workers=-1).get("workers"):
            return None
        alone_since = alone_since or time.monotonic()
        if time.monotonic() - alone_since > NO_WORKERS_SECONDS:
            raise PipelineError(f"no Dask worker connected to {self.scheduler} for {NO_WORKERS_SECONDS:.0f} s; "
                                "start workers (docs/cluster.md) or leave compute.scheduler empty")
        return alone_since

    def _died(self, name: str) -> str:
        return (f"{name}: Dask workers of {self.scheduler} died {ALLOWED_FAILURES} times running this stage's "
                "chunks (killed, or out of memory); give the workers more memory or use more of them, and run again")

    def _sent(self, value: Any) -> Any:
        """A shared value as every worker's own copy (sent afresh for every round: a worker may have died)."""
        return self._scatter(value.value, broadcast=True) if isinstance(value, Shared) else value

    def _scatter(self, data: Any, broadcast: bool = False) -> Any:
        """``client.scatter``, tried again while the scheduler still lists a worker that has just died."""
        for attempt in range(1, ALLOWED_FAILURES + 1):
            try:
                return self.client.scatter(data, broadcast=broadcast, hash=False)
            # The connection to a dead worker closed (distributed's CommClosedError), or the scheduler dropped the
            # worker it had just placed the data on before it recorded it there (a KeyError naming the worker).
            except (OSError, KeyError):
                time.sleep(SCATTER_RETRY_SECONDS * attempt)
        raise PipelineError(f"cannot send chunks to the Dask workers of {self.scheduler}: they died "
                            f"{ALLOWED_FAILURES} times in a row; check their memory and restarts")


def _cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is Dask's word that a chunk was cancelled (its input or result died with a worker; the
    chunk runs again): any of its CancelledError kinds, whose names change between versions."""
    return any(kind.__name__ == "CancelledError" for kind in type(exc).__mro__)


class Shared:
    """A value every chunk of a cluster's ``map`` receives."""

    def __init__(self, value: Any) -> None:
        self.value = value


@contextmanager
def pool(scheduler: str, root: Path) -> Iterator[runtime.Threads | Cluster]:
    """The pool a stage's chunks run on: this process (one thread) when ``scheduler`` is empty, else a
    Dask cluster whose every worker has been checked to see ``root``."""
    if not scheduler:
        yield runtime.Threads()
        return
    try:
        import distributed
    except ImportError:
        raise PipelineError(f"compute.scheduler = {scheduler!r} needs Dask, an optional install: "
                            "pip install -r requirements-dask.txt (docs/cluster.md)") from None
    import dask

    for name in ("distributed", "tornado", "asyncio"):  # a restarted worker is reported here, as one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # The local cluster's workers keep freed memory as the stage process does (Dask's default trims at 64 KiB).
    kept_heap = {f"distributed.nanny.pre-spawn-environ.{name}": value
                 for name, value in runtime.kept_heap_environment().items()}
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES - 1, **kept_heap}), \
            _client(distributed, scheduler) as client:
        _check_workers(client, root, scheduler)
        yield Cluster(client, scheduler)
        peaks = client.run(worker_peak_mb, on_error="return")
        log.info("%s %s", WORKER_PEAKS, ", ".join(
            f"{peak:.0f}" for _, peak in sorted(peaks.items()) if isinstance(peak, float)) or "unknown")


@contextmanager
def _client(distributed: Any, scheduler: str) -> Iterator[Any]:
    if scheduler.startswith(LOCAL_CLUSTER):
        workers = int(scheduler[len(LOCAL_CLUSTER):])
        cpus = runtime.usable_cpus()
        if workers > LOCAL_WORKERS_PER_CPU * cpus:  # each is a Python process holding chunks: memory, not speed
            raise PipelineError(f"compute.scheduler = {scheduler!r} asks for {workers} worker processes on {cpus} "
                                f"CPU(s); at most {LOCAL_WORKERS_PER_CPU * cpus} here")
        if workers > cpus:
            log.warning("%d worker processes on %d CPUs: they take turns, and each holds its own chunks in memory",
                        workers, cpus)
        # One thread per worker process, and one for its numerical libraries: the processes share the CPUs.
        single = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # the worker processes' start-up chatter
        try:
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.CRITICAL, env=single)
        except (RuntimeError, OSError, TimeoutError) as exc:
            raise PipelineError(f"could not start a Dask LocalCluster of {workers} worker process(es) "
                                f"(compute.scheduler): {type(exc).__name__}: {exc}") from None
        with cluster, distributed.Client(cluster) as client:
            log.info("Dask LocalCluster of %d worker process(es) at %s", workers, cluster.scheduler_address)
            yield client
        return
    check_greeting(scheduler)
    try:
        client = distributed.Client(scheduler, timeout=f"{CONNECT_SECONDS}s")
    except (OSError, TimeoutError) as exc:
        raise PipelineError(f"cannot reach the Dask scheduler at {scheduler} (compute.scheduler): "
                            f"{type(exc).__name__}: {exc}") from None
    with client:
        log.info("Dask scheduler %s with %d worker(s)", scheduler, len(client.scheduler_info()["workers"]))
        yield client


def check_greeting(address: str) -> None:
    """Refuse an address where no Dask scheduler answers, before Dask's client connects: that client waits
    for the handshake without a limit (a server that accepts and says nothing hung the stage), and reads any
    other server's first bytes as a message length (an HTTP server's made it allocate exbibytes)."""
    import re
    import socket
    import struct

    parts = re.fullmatch(SCHEDULER_ADDRESS, address)
    if parts is None:  # not an address params.py lets through: Dask's client judges it
        return
    host, port = parts.group(1).strip("[]"), int(parts.group(3)[1:]) if parts.group(3) else DEFAULT_SCHEDULER_PORT
    where = f"the Dask scheduler at {address} (compute.scheduler)"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS) as connection:
            connection.settimeout(GREETING_SECONDS)
            greeting = b""
            while len(greeting) < 8:
                part = connection.recv(8 - len(greeting))
                if not part:
                    break
                greeting += part
    except TimeoutError:
        raise PipelineError(f"{where} is not one, or is stuck: nothing came back within {GREETING_SECONDS} s of "
                            "connecting, and a scheduler greets at once") from None
    except OSError as exc:
        raise PipelineError(f"cannot reach {where}: {exc.strerror or exc}") from None
    if len(greeting) < 8 or not 0 < struct.unpack("<Q", greeting)[0] <= MAX_GREETING_BYTES:
        shown = repr(greeting.decode("ascii", errors="replace")) if greeting else "nothing before closing"
        raise PipelineError(f"{where} is not a Dask scheduler: it answered {shown}")


def _check_workers(client: Any, root: Path, scheduler: str) -> None:
    """Fail with one clear line unless every worker runs the code this process runs and reads the
    files this process writes there (a token file is written and read back)."""
    try:  # the scheduler unpickles the tasks, so it needs the code too
        scheduler_code = client.run_on_scheduler(code_folder)
    except Exception as exc:
        scheduler_code = f"{type(exc).__name__}: {exc}"
    if scheduler_code != str(CODE):
        raise PipelineError(f"the Dask scheduler {scheduler} cannot use this project's code from {CODE} "
                            f"({scheduler_code}); start it with PYTHONPATH={CODE} (docs/cluster.md)")
    token = uuid.uuid4().hex
    probe = Paths(root).logs / f".compute-check-{token}"  # beside the lock: a folder the pipeline owns
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(token)
    try:
        seen = client.run(worker_view, str(probe.parent), probe.name, on_error="return")
    finally:
        probe.unlink(missing_ok=True)
    for worker, view in sorted(seen.items()):
        if isinstance(view, Exception) and not isinstance(view, OSError):  # OSError: it died meanwhile
            if "No module named" in str(view) or isinstance(view, ImportError):
                raise PipelineError(f"Dask worker {worker} cannot import this project's code ({view}); start the "
                                    f"workers with PYTHONPATH={CODE} (docs/cluster.md)")
            raise PipelineError(f"Dask worker {worker} failed its check of the project folder: {view}")
    # A worker that died meanwhile is not asked again: its chunks go to the others, or to its restart.
    problem = storage_problem({w: v for w, v in seen.items() if isinstance(v, dict)}, root, token, CODE,
                              manifest.code_hash())
    if problem:
        raise PipelineError(problem)


def worker_peak_mb() -> float | None:
    """Run on each worker: its peak resident memory so far, in MB (None where /proc does not tell).

    Read from /proc rather than getrusage: a process started by fork and exec
    inherits its parent's high-water mark in getrusage, not in VmHWM.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kilobytes = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(kilobytes) / 1024 if kilobytes else None


def code_folder() -> str:
    """Run on the scheduler: where it finds the project's code."""
    return str(CODE)


@functools.cache
def loaded_code() -> str:
    """A hash of the project's code as this process first saw it: a worker that outlives a stage keeps the
    modules it imported then, whatever is on disk later."""
    return manifest.code_hash()


def worker_view(root: str, probe: str) -> dict[str, str]:
    """Run on each worker: where it finds the project's code, which version of it, and what it reads in the
    probe file."""
    try:
        content = (Path(root) / probe).read_text()
    except OSError as exc:
        content = f"cannot read it: {exc.strerror}"
    return {"code": str(CODE), "version": loaded_code(), "probe": content}


def storage_problem(seen: dict[str, dict[str, str]], root: Path, token: str, code: Path, version: str
                    ) -> str | None:
    """What is wrong with the workers' view of the project, or None (``seen``: worker -> worker_view;
    ``code`` and ``version``: the folder and the hash of the code this process runs)."""
    if not seen:
        return "the Dask cluster has no workers; start some (docs/cluster.md)"
    for worker, view in sorted(seen.items()):
        if view["probe"] != token:
            return (f"Dask worker {worker} cannot see the project folder {root} ({view['probe'][:80]}); the "
                    "workers need it on shared storage at the same path")
        if Path(view["code"]) != code:
            return (f"Dask worker {worker} runs this project's code from {view['code']}, not from {code}; "
                    f"start the workers with PYTHONPATH={code}")
        if view["version"] != version:
            return (f"Dask worker {worker} runs this project's code as it was when the worker started, and it has "
                    "changed since; restart the workers (and the scheduler) so that they load it again")
    return None


Pool = runtime.Threads | Cluster
