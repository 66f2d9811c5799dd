"""Where the chunks run: this process's threads, or a Dask cluster that gives the same bytes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REAL_FORMAT, ROOT, STAGES, TINY, run_stage, write_params, write_real_format_station

from station_forecast import compute, manifest, runtime
from station_forecast.errors import PipelineError
from station_forecast.params import scheduler_problem

COMPARED = ("data", "reports", "models/metrics.json", "models/model.joblib", "models/scaler.joblib",
            "models/detector.json")


def outputs(root: Path) -> dict[str, bytes]:
    """The data, features, flags, models, metrics and report of a run, by path."""
    found = {}
    for name in COMPARED:
        path = root / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found[str(file.relative_to(root))] = file.read_bytes()
    return found


def double(item: int, plus: int = 0) -> int:
    return 2 * item + plus


def die_once(item: int, marker: str) -> int:
    """Kills the worker it runs on the first time item 0 runs; then works."""
    if item == 0 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * item


def always_die(item: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return item


@pytest.mark.parametrize("value", ["", "local:1", "local:4", "tcp://10.0.0.5:8786", "tcp://scheduler",
                                   "tcp://[::1]:8786", "tcp://node-7.cluster.example:8786"])
def test_scheduler_values_that_are_accepted(value):
    assert scheduler_problem(value) is None


@pytest.mark.parametrize("value", ["local", "local:0", "local:x", "local:999", "10.0.0.5:8786", "tcp://", "dask",
                                   "local:²", "tls://127.0.0.1:1", "tcp://:::::", "tcp://a b", "tcp://host:99999",
                                   "tcp://host:"])
def test_scheduler_values_that_are_refused_say_what_is_accepted(value):
    problem = scheduler_problem(value)
    assert problem and repr(value) in problem


def test_a_bad_scheduler_in_the_parameters_is_one_clear_line(tmp_path):
    params = write_params(tmp_path / "p.toml", scheduler="local:0")
    done = subprocess.run([sys.executable, str(ROOT / "model_testing.py"), "--params", str(params), "--root",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"model_testing: error: {params}: compute.scheduler = 'local:0': local:N needs N, the number of worker "
        "processes, from 1 to 256"]


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_keep_the_order_and_pass_shared_values(threads):
    assert runtime.Threads(threads).map(double, list(range(7)), plus=1) == [2 * i + 1 for i in range(7)]


def test_the_local_run_does_not_import_dask(built):
    """The default install has no Dask: a run with compute.scheduler empty never imports it."""
    root, params = built
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import model_testing; from station_forecast import cli; "
              "code = cli.run('model_testing', model_testing.main, model_testing.parser(), sys.argv[2:]); "
              "print(code, 'dask' in sys.modules, 'distributed' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), "--root", str(root), "--params", str(params)],
                          capture_output=True, text=True)
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stderr


def test_without_dask_a_cluster_asks_for_the_optional_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what "not installed" looks like to import
    with pytest.raises(PipelineError, match=r"requirements-dask\.txt"), compute.pool("local:1", tmp_path):
        pass


def test_a_local_cluster_far_larger_than_the_cpus_is_refused(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(PipelineError, match=f"asks for {4 * cpus + 1} worker processes on {cpus} CPU"), \
            compute.pool(f"local:{4 * cpus + 1}", tmp_path):
        pass


def test_an_unreachable_scheduler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(compute, "CONNECT_SECONDS", 1)
    with pytest.raises(PipelineError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"), \
            compute.pool("tcp://127.0.0.1:9", tmp_path):
        pass


def test_workers_that_cannot_see_the_folder_or_run_other_code_are_named(tmp_path):
    code, version = compute.CODE, "v1"
    good = {"code": str(code), "version": version, "probe": "token"}
    assert compute.storage_problem({"tcp://a:1": good}, tmp_path, "token", code, version) is None
    blind = {"tcp://a:1": good, "tcp://b:1": {**good, "probe": "cannot read it: No such file"}}
    problem = compute.storage_problem(blind, tmp_path, "token", code, version)
    assert "tcp://b:1" in problem and str(tmp_path) in problem and "shared storage" in problem
    elsewhere = {"tcp://a:1": {**good, "code": "/elsewhere"}}
    assert "PYTHONPATH" in compute.storage_problem(elsewhere, tmp_path, "token", code, version)
    stale = {"tcp://a:1": {**good, "version": "v0"}}
    assert "restart the workers" in compute.storage_problem(stale, tmp_path, "token", code, version)
    assert "no workers" in compute.storage_problem({}, tmp_path, "token", code, version)


def test_a_worker_that_outlives_a_code_change_is_told_to_restart(tmp_path, scheduler, monkeypatch):
    """The workers of a running cluster keep the modules they imported: after an edit they are refused."""
    with compute.pool(scheduler, tmp_path):
        pass  # the workers have seen the code as it is
    monkeypatch.setattr(manifest, "code_hash", lambda stage=None: "edited since")
    with pytest.raises(PipelineError, match="restart the workers"), compute.pool(scheduler, tmp_path):
        pass


def test_a_cluster_checks_its_workers_and_keeps_the_order(tmp_path):
    with compute.pool("local:2", tmp_path) as pool:
        assert pool.cluster
        assert pool.map(double, list(range(9)), plus=pool.share(1)) == [2 * i + 1 for i in range(9)]
        # The workers started keeping freed memory as the stage process does, not with Dask's 64 KiB trim.
        assert set(pool.client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {
            str(runtime.KEPT_HEAP["MALLOC_TRIM_THRESHOLD_"])}
    assert not list(tmp_path.glob(".compute-check-*"))  # the probe file is gone


def test_every_kind_of_dask_cancellation_is_a_chunk_to_run_again():
    """A worker killed while it held a chunk's input or result cancels that chunk's future, with one of
    Dask's CancelledError kinds (their names change between versions; one of them once ended a stage with
    an internal error): each is a chunk to send again, and nothing else is."""
    from distributed.client import CancelledError, FutureCancelledError, FuturesCancelledError

    assert compute._cancelled(FutureCancelledError("read_station_files-1", None))
    assert compute._cancelled(FuturesCancelledError([]))
    assert compute._cancelled(CancelledError())
    assert not compute._cancelled(ValueError("a chunk's own error"))
    assert not compute._cancelled(OSError("connection closed"))


def test_sending_a_chunk_to_a_worker_that_has_just_died_is_tried_again(monkeypatch):
    """A worker killed while chunks are sent: the connection closes (an OSError), or the scheduler, which had
    placed the data on that worker, drops it before recording it there and answers with a KeyError naming the
    worker (seen once in the test below). Either is tried again; the third in a row stops the stage."""
    class Client:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def scatter(self, data, broadcast=False, hash=True):
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            return data

    monkeypatch.setattr(compute, "SCATTER_RETRY_SECONDS", 0.0)
    client = Client([KeyError("tcp://127.0.0.1:42069"), OSError("closed")])
    assert compute.Cluster(client, "tcp://here:8786")._scatter(["chunk"]) == ["chunk"] and client.calls == 3
    with pytest.raises(PipelineError, match="they died 3 times in a row"):
        compute.Cluster(Client([KeyError("tcp://a:1")] * 3), "tcp://here:8786")._scatter(["chunk"])


def test_a_killed_worker_s_chunks_run_again_on_the_others(tmp_path):
    marker = tmp_path / "died"
    with compute.pool("local:2", tmp_path) as pool:
        assert pool.map(die_once, list(range(6)), marker=str(marker)) == [0, 2, 4, 6, 8, 10]
    assert marker.exists()  # a worker really died on chunk 0


def test_a_chunk_that_kills_every_worker_it_meets_fails_with_one_line(tmp_path):
    with pytest.raises(PipelineError, match="died 3 times running") as caught, \
            compute.pool("local:2", tmp_path) as pool:
        pool.map(always_die, [1], what="station files read (chunks)")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("station files read (chunks):")


def test_a_cluster_run_gives_the_same_bytes_as_a_local_run(built, tmp_path, monkeypatch):
    """All four stages on a LocalCluster of two worker processes, against the local run of the same parameters:
    with the simulation's blocks of stations on the workers, stage 2's training blocks spilled to disk, and
    the quality control's network-wide work in the stage process on its own two threads while the workers
    wait (not on one, as it once was)."""
    from station_forecast import quality_control

    local_root, _ = built
    data_creation, model_preprocessing = STAGES[0], STAGES[1]
    monkeypatch.setattr(data_creation, "STATIONS_PER_CHUNK", 2)
    monkeypatch.setattr(model_preprocessing, "SPILL_BYTES", 0)
    monkeypatch.setattr(quality_control, "STATION_BLOCK", 1)  # a chunk per station: the stage asks for threads
    monkeypatch.setenv("PIPELINE_THREADS", "2")
    used = []
    for module in (quality_control.learning, quality_control.verdict):
        monkeypatch.setattr(module, "local_threads", _recorded(module.local_threads, used))
    params = write_params(tmp_path / "params.toml", **TINY, scheduler="local:2")
    for module in STAGES:
        assert run_stage(module, tmp_path, params) == 0, module.STAGE
    assert used and set(used) == {2}
    local, cluster = outputs(local_root), outputs(tmp_path)
    assert sorted(cluster) == sorted(local)
    assert [name for name in local if local[name] != cluster[name]] == []


def _recorded(function, results: list):
    def recording(*args, **kwargs):
        results.append(function(*args, **kwargs))
        return results[-1]
    return recording


def test_own_files_are_read_on_the_workers_as_here_and_a_bad_one_is_one_line(tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    for name in ("HOME", "FARM"):
        write_real_format_station(own / f"{name}.csv")
    roots = {}
    for scheduler in ("", "local:2"):
        root = roots[scheduler] = tmp_path / (scheduler.replace(":", "") or "here")
        root.mkdir()
        params = write_params(root / "own.toml", **TINY, **REAL_FORMAT, source=str(own), scheduler=scheduler)
        assert run_stage(STAGES[0], root, params) == 0
    assert outputs(roots[""]) == outputs(roots["local:2"])
    (own / "FARM.csv").write_text("when,value\n2020-01-01,3\n")
    assert run_stage(STAGES[0], roots["local:2"], params) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"data_creation: error: {own / 'FARM.csv'}: no column")


@pytest.fixture
def scheduler(tmp_path) -> Iterator[str]:
    """A Dask scheduler and two worker processes started as a user starts them (README), on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    dask = str(Path(sys.executable).parent / "dask")
    started = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                env=environment, cwd=tmp_path, stderr=subprocess.DEVNULL)]
    started.append(subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                     "--no-dashboard"], env=environment, cwd=tmp_path, stderr=subprocess.DEVNULL))
    try:
        import distributed

        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)


def test_a_run_on_a_real_scheduler_gives_the_same_bytes(built, tmp_path, scheduler):
    """The four stages against a scheduler and workers running as their own processes."""
    root = tmp_path / "project"
    root.mkdir()
    params = write_params(root / "params.toml", **TINY, scheduler=scheduler)
    for module in STAGES:
        assert run_stage(module, root, params) == 0, module.STAGE
    assert outputs(root) == outputs(built[0])


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.4])
def test_a_worker_killed_during_a_stage_changes_nothing(project, delay):
    """Stage 2 on two worker processes, one of them killed while the stage runs (``delay`` seconds after
    its cluster is up: while the files are read, the detector runs or the features are built): the stage
    still gives the local run's bytes."""
    root, _ = project
    local = outputs(root)
    params = write_params(root / "cluster.toml", **TINY, scheduler="local:2")
    stage = subprocess.Popen([sys.executable, str(ROOT / "model_preprocessing.py"), "--root", str(root),
                              "--params", str(params)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stage.stderr), daemon=True)
    reader.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and stage.poll() is None and time.monotonic() < deadline:
        workers = [pid for pid in _children(stage.pid) if "spawn_main" in _command(pid)]
        if any("Dask LocalCluster" in line for line in lines) and workers:  # the cluster is up: the stage works
            time.sleep(delay)
            os.kill(workers[0], signal.SIGKILL)
            # still working: running, and the workers' peaks (logged once every chunk is back) not yet logged
            killed = stage.poll() is None and not any(compute.WORKER_PEAKS in line for line in lines)
        time.sleep(0.01)
    stage.wait(timeout=120)
    reader.join(timeout=10)
    errors = "".join(lines)
    assert killed, "the stage's chunks were all done before a worker could be killed"
    assert stage.returncode == 0, errors
    assert outputs(root) == local


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(child) for child in children]
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize(("answer", "message"), [
    (None, "is not one, or is stuck: nothing came back within 1 s"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "is not a Dask scheduler: it answered 'HTTP/1.1'"),
    (b"", "is not a Dask scheduler: it answered nothing before closing"),
])
def test_a_server_that_is_not_a_dask_scheduler_is_one_clear_line(tmp_path, monkeypatch, answer, message):
    """Dask's own client would wait for ever on a silent server, and read an HTTP answer as a message length."""
    monkeypatch.setattr(compute, "GREETING_SECONDS", 1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []

    def serve() -> None:
        connection, _ = server.accept()
        accepted.append(connection)
        if answer is not None:
            connection.sendall(answer)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(PipelineError, match=f"the Dask scheduler at {address} .compute.scheduler. {message}"), \
                compute.pool(address, tmp_path):
            pass
    finally:
        server.close()
        for connection in accepted:
            connection.close()
