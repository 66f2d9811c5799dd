"""The shared floor: parameters, storage, the lock and the runner, the manifest, the model registry."""

import errno
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, STAGES, TINY, lock_held, run_stage, snapshot, write_params

from station_forecast import cli, errors, files, manifest, runtime, storage
from station_forecast.params import load_params


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t + "\n[extra]\nx = 1\n", "unknown section [extra]"),
    (lambda t: t.replace("ridge_alpha = 1.0", "ridge_alpa = 1.0"), "unknown parameter model.ridge_alpa"),
    (lambda t: t.replace("test_steps = 365", "test_days = 365"),
     "unknown parameter data.test_days; it is now data.test_steps (the same meaning, counted in steps"),
    (lambda t: t.replace('frequency = "auto"', 'frequency = "monthly"'), "needs your own files (data.source)"),
    (lambda t: t.replace("cv_folds = 4", "#"), "model.cv_folds is missing"),
    (lambda t: t.replace("n_stations = 10", "n_stations = 0"), "simulation.n_stations = 0 is out of range [1, 100000]"),
    (lambda t: t.replace("n_stations = 10", 'n_stations = "ten"'), "simulation.n_stations must be int, got 'ten'"),
    (lambda t: t.replace("spike_days = [1, 1]", "spike_days = [3, 1]"), "anomalies.spike_days must be [min, max]"),
    (lambda t: t.replace('"2019-01-01"', '"2019-13-01"'), "simulation.start_date must be YYYY-MM-DD"),
    (lambda t: t.replace("holdout_stations = 1", "holdout_stations = 10"), "holdout_stations must leave"),
    (lambda t: t.replace("[data]", "[data"), "malformed parameters file"),
    (lambda t: t.replace('unit = "C"', 'unit = "R"'), "import.unit = 'R' must be one of 'C', '0.1C', 'F', 'K', 'none'"),
    (lambda t: t.replace('date_column = "date"', 'date_column = ""'), "import.date_column = '' must name a column"),
    (lambda t: t.replace('date_column = "date"', 'date_column = ["Y", "Y"]'), "or 2 to 6 different columns"),
    (lambda t: t.replace('date_column = "date"', 'date_column = 3'), "import.date_column must be str or list, got 3"),
    (lambda t: t.replace('temperature_column = "temperature"', 'temperature_column = ["TMAX", "TMIN", "TAVG"]'),
     "or two different columns whose mean is the day's reading"),
    (lambda t: t.replace('station_column = ""', 'station_column = ["City", "City"]'),
     "or 2 to 4 different columns whose values joined by a space name the station"),
    (lambda t: t.replace('station_column = ""', 'station_column = ["City", ""]'), "import.station_column = "),
    (lambda t: t.replace('"2019-01-01"', '"9999-01-01"'), "must stay within the years 1800 to 2261"),
    (lambda t: t.replace('"2019-01-01"', '"2258-01-01"'), "must stay within the years 1800 to 2261"),
])
def test_bad_parameters_get_one_clear_message(tmp_path, edit, message):
    path = tmp_path / "params.toml"
    path.write_text(edit((ROOT / "params.toml").read_text()))
    with pytest.raises(errors.PipelineError) as caught:
        load_params(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_parameters_file_made_before_the_newer_layout_keys_still_loads(tmp_path):
    """The import keys that switch on a file layout (many stations per file, a row per element, declared codes)
    were added later: a file without them loads with each layout off; any other missing key is still refused."""
    import re

    text = (ROOT / "params.toml").read_text()
    older = re.sub(r"^(missing_values|station_column|element_column|value_column) = .*$", "#", text, flags=re.M)
    (tmp_path / "old.toml").write_text(older)
    imp = load_params(tmp_path / "old.toml")["import"]
    assert (imp["missing_values"], imp["station_column"], imp["element_column"], imp["value_column"]) == \
        ([], "", "", "")
    (tmp_path / "older.toml").write_text(older.replace('quantity = "mean"', "#"))
    with pytest.raises(errors.PipelineError, match=r"import\.quantity is missing"):
        load_params(tmp_path / "older.toml")


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.STAGE)
def test_every_stage_checks_parameters_before_writing_anything(project, capsys, stage):
    root, _ = project
    bad = root / "bad.toml"
    bad.write_text((root / "params.toml").read_text().replace("window = 5", "window = 500"))
    before = snapshot(root)
    assert run_stage(stage, root, bad) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{stage.STAGE}: error: {bad}: quality_control.window = 500 is out of range [3, 90]")
    assert snapshot(root) == before


def test_missing_parameters_file(tmp_path):
    with pytest.raises(errors.PipelineError, match="parameters file not found"):
        load_params(tmp_path / "none.toml")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "a.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


@pytest.mark.parametrize(("stage", "writer", "code", "named", "advice"), [
    (1, "write_csv_parts", errno.ENOSPC, "data/.staging", "free space on that disk"),
    (2, "_write_csv_file", errno.ENOSPC, "data/train/features.csv", "free space on that disk"),
    (2, "_write_csv_file", errno.EDQUOT, "data/train/features.csv", "quota"),
    (3, "write_joblib", errno.EROFS, "model.joblib", "remount it read-write"),
    (2, "_write_csv_file", errno.EACCES, "data/train/features.csv", "no permission to write there"),
])
def test_a_disk_that_cannot_take_a_write_is_one_line_naming_the_file_and_the_last_run_stays(
        project, monkeypatch, capsys, stage, writer, code, named, advice):
    root, params = project
    before = snapshot(root)
    real = getattr(storage, writer)

    def full_disk(target, *args, **kwargs):
        first = target[0] if isinstance(target, list) else target
        if first.name.endswith(".tmp") or first.parent.name in ("train", "test", "truth", ".staging", "models"):
            raise OSError(code, os.strerror(code), None if stage != 3 else str(first))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(storage, writer, full_disk)
    assert run_stage(STAGES[stage - 1], root, params) == errors.EXIT_INTERNAL
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in err and f"cannot write ({os.strerror(code)})" in err and advice in err, err
    assert "internal error" not in err and "artifacts are intact" in err
    assert snapshot(root) == before  # nothing replaced, no temporary file left


def test_a_data_folder_this_user_may_not_list_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A folder of station files made by another user with mode 700 (checked for real as an unprivileged user;
    root lists any folder, so here listing it raises as it would): stage 1 said "cannot write (Permission
    denied) ... the last good run's artifacts are intact" (exit 1) of the user's own folder."""
    from conftest import data_creation

    own = tmp_path / "own"
    own.mkdir()
    (own / "HOME.csv").write_text("date,temperature\n2020-01-01,1.0\n")
    listing = storage.listing

    def not_listable(folder):
        if Path(folder) == own:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return listing(folder)

    monkeypatch.setattr(storage, "listing", not_listable)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"data_creation: error: {own}: no permission (Permission denied): check the owner and mode of "
                   "it and of its folders (ls -ld), then rerun")


def test_running_out_of_memory_is_one_line_with_the_way_out(tmp_path, capsys):
    def allocates(args):
        raise MemoryError("Unable to allocate 2.27 GiB for an array with shape (3652, 83333)")

    assert cli.run("stage", allocates, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_INTERNAL
    err = capsys.readouterr().err.strip()
    assert err == ("stage: error: out of memory (Unable to allocate 2.27 GiB for an array with shape (3652, 83333)); "
                   "run fewer stations or years, or on a machine with more memory (docs/scale_plan.md)")


def test_a_library_missing_from_the_python_that_runs_a_stage_is_named_with_the_way_out(tmp_path, capsys):
    """A stage run by hand with a Python that lacks the requirements (the system's python3) imports them on
    first use, inside its work: it names the library and the interpreter, not an internal error."""
    def imports(args):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    assert cli.run("stage", imports, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_INTERNAL
    assert capsys.readouterr().err.strip() == (
        f"stage: error: numpy is not installed for {sys.executable}: run the stages with .venv/bin/python "
        "(./pipeline.sh --setup-only makes it), or pip install -r requirements.txt into this Python")

    def has_a_bug(args):  # a module of no library the stages need: a bug, said as one
        raise ModuleNotFoundError("No module named 'station_forecast.gone'", name="station_forecast.gone")

    assert cli.run("stage", has_a_bug, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_INTERNAL
    assert "internal error: ModuleNotFoundError" in capsys.readouterr().err


def test_a_python_environment_in_a_folder_not_named_in_utf_8_is_refused_before_any_work(tmp_path, capsys,
                                                                                         monkeypatch):
    """A project unpacked under a folder named in Latin-1 ("caf\xe9") has its .venv there too: threadpoolctl then
    stopped stage 3 with a UnicodeDecodeError, after stages 1 and 2 had run. Every stage now refuses such an
    environment first, naming its folder's bytes and the way out."""
    ran = []
    monkeypatch.setattr(sys, "prefix", os.fsdecode(b"/srv/caf\xe9/project/.venv"))
    assert cli.run("stage", ran.append, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_INTERNAL
    assert not ran
    assert capsys.readouterr().err.strip() == (
        "stage: error: the Python environment's folder b'/srv/caf\\xe9/project/.venv' is not UTF-8 (a folder above "
        "it is named in another encoding), and scikit-learn's threadpoolctl fails to load its libraries there: "
        "rename that folder, or keep the project there and run with PYTHON set to a Python installed elsewhere")


def test_killed_stage_leaves_no_partial_file_and_the_rerun_succeeds(built, tmp_path):
    """SIGKILL model_preprocessing while it writes, then check and rerun."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(built[0], root)
    params = write_params(root / "big.toml", **{**TINY, "n_stations": 40})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stage = [sys.executable, str(ROOT / "data_creation.py"), "--root", str(root), "--params", str(params)]
    assert subprocess.run(stage, env=env, capture_output=True).returncode == 0
    before = snapshot(root)

    stage[1] = str(ROOT / "model_preprocessing.py")
    proc = subprocess.Popen(stage, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((root / "data").rglob(".*.tmp")):
        time.sleep(0.001)
    assert list((root / "data").rglob(".*.tmp")), "never caught the stage mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    after = snapshot(root)
    changed = [name for name in before if after.get(name) != before[name]]
    for name in changed:  # a changed file is a complete new one, never a truncated one
        assert after[name].endswith(b"\n") or name.endswith(".joblib")
    # the manifest still describes the old run, so the next stage refuses the mix
    assert after["models/manifest.json"] == before["models/manifest.json"]

    assert subprocess.run(stage, env=env, capture_output=True).returncode == 0
    assert not list(root.rglob(".*.tmp"))
    stage[1] = str(ROOT / "model_preparation.py")
    assert subprocess.run(stage, env=env, capture_output=True).returncode == 0


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_a_parameters_file_saved_with_a_byte_order_mark_is_accepted(tmp_path, encoding):
    """An editor's UTF-8 mark, and Windows Notepad's "Unicode" (UTF-16 with its mark), with Windows' line ends."""
    path = tmp_path / "params.toml"
    text = (ROOT / "params.toml").read_text(encoding="utf-8").replace("\n", "\r\n")
    path.write_bytes((b"\xfe\xff" if encoding == "utf-16-be" else b"") + text.encode(encoding))
    assert load_params(path).sections == load_params(ROOT / "params.toml").sections


def test_a_source_is_found_relative_to_the_parameters_file_or_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "p").mkdir()
    for source, folder in [("own", tmp_path / "p/own"), ("../own", tmp_path / "own"), ("~/own", tmp_path / "home/own"),
                           (str(tmp_path / "x/own"), tmp_path / "x/own")]:
        params = write_params(tmp_path / "p/params.toml", **TINY, source=source)
        assert load_params(params).source_folder == folder.resolve()


@pytest.mark.parametrize(("source", "said"), [
    ("https://www.ncei.noaa.gov/data/global-summary-of-the-day/access/2020/72530094846.csv", "is a URL"),
    ("s3://noaa-gsod-pds/2020/", "is a URL"), ("own/*.csv", "is a pattern, which is not expanded")])
def test_a_source_written_as_a_url_or_a_pattern_is_named_as_one(tmp_path, source, said):
    """Either would otherwise be a folder "not found" under the parameters file's: /p/https:/www.ncei.noaa.gov/..."""
    (tmp_path / "own").mkdir()
    with pytest.raises(errors.PipelineError, match=f"data.source = '{re.escape(source)}' {said}"):
        load_params(write_params(tmp_path / "params.toml", **TINY, source=source))
    (tmp_path / "[2020]").mkdir()  # a folder whose name only looks like a pattern is a folder
    assert load_params(write_params(tmp_path / "params.toml", **TINY, source="[2020]")).source_folder.name == "[2020]"


def test_code_replaced_while_a_stage_runs_leaves_the_stage_to_run_again(project, monkeypatch):
    """An update deployed while a stage runs: its outputs come from the code it started with, so its record
    keeps that code's hash (taken as the stage started, it said "up to date" for code it never ran)."""
    from conftest import data_creation

    root, params = project
    started, hash_of = manifest.code_hash("data_creation"), manifest.code_hash
    deployed = []
    run = data_creation.main

    def main_during_a_deploy(args: object) -> None:
        deployed.append(True)  # from here on, the files hold other code
        run(args)

    monkeypatch.setattr(manifest, "code_hash", lambda stage=None: "deployed mid-run" if deployed else hash_of(stage))
    monkeypatch.setattr(data_creation, "main", main_during_a_deploy)
    assert run_stage(data_creation, root, params) == 0
    assert manifest.read_manifest(storage.Paths(root))["stages"]["data_creation"]["code"] == started
    assert manifest.why_stale(storage.Paths(root), "data_creation", load_params(params)) == "its code changed"


def test_a_stage_records_the_library_versions_it_loaded_not_those_installed_since(monkeypatch):
    """A library upgraded in the shared environment while a stage ran is not what the stage ran with."""
    import types

    installed = manifest.library_versions()["numpy"]
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.0.loaded"))
    assert manifest.library_versions()["numpy"] == "1.0.loaded" != installed


def test_debug_prints_the_traceback_and_keeps_the_exit_code(project, capsys):
    root, _ = project
    bad = root / "bad.toml"
    bad.write_text((root / "params.toml").read_text().replace("window = 5", "window = 500"))
    assert run_stage(STAGES[2], root, bad, "--debug") == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("model_preparation: error:")


def test_an_error_message_is_one_bounded_line(tmp_path, capsys):
    from station_forecast import cli

    def fails(args):
        raise errors.PipelineError("bad \x00\x01 bytes\n" + "x" * 5_000_000)

    assert cli.run("stage", fails, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and len(line) <= cli.MAX_MESSAGE + 30 and "characters)" in line


def test_what_a_stop_signal_breaks_on_its_way_out_is_reported_as_the_stop_not_as_a_bug(tmp_path, capsys):
    """Ctrl-C in the middle of importing a compiled module leaves an ImportError ("initialization failed"),
    not a KeyboardInterrupt: after a stop signal, any error is the stop's (exit 130), never an internal one."""
    import signal

    from station_forecast import cli

    def interrupted_import(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    code = cli.run("stage", interrupted_import, cli.stage_parser("test"), ["--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130 and "stage: stopped (interrupted)" in err and "internal error" not in err, err

    def fails(args):
        raise ImportError("initialization failed")

    assert cli.run("stage", fails, cli.stage_parser("test"), ["--root", str(tmp_path)]) == errors.EXIT_INTERNAL
    assert "internal error" in capsys.readouterr().err  # without a stop, the same error is a bug


def test_a_stop_whose_exception_python_dropped_still_stops_the_stage_before_it_commits_more(tmp_path, capsys):
    """A signal handled inside a callback the interpreter runs for itself (a weakref callback of the import
    machinery, a ``__del__``) has its exception dropped, with "Exception ignored" and a traceback on stderr:
    the stage must stop all the same before it renames anything more into place, in one line."""
    import signal

    from station_forecast import cli, storage

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(10_000):  # the handler raises in here, where Python can only drop the exception
                pass

    def stopped_then_writes(args):
        SignalledWhileCollected()
        storage.write_bytes(args.root / "after.txt", b"written after the stop\n")

    code = cli.run("stage", stopped_then_writes, cli.stage_parser("test"), ["--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 129 and "stage: stopped (hung up)" in err and "Traceback" not in err, err
    assert not (tmp_path / "after.txt").exists()

    def writes_then_stopped(args):
        storage.write_bytes(args.root / "before.txt", b"written before the stop\n")
        SignalledWhileCollected()

    code = cli.run("stage", writes_then_stopped, cli.stage_parser("test"), ["--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0 and "the stage finished" in err and "Traceback" not in err, err  # nothing was left to do
    assert (tmp_path / "before.txt").read_text() == "written before the stop\n"


def test_a_stage_process_ends_with_its_exit_code_and_everything_it_printed():
    # Stages end without the interpreter's teardown: what is still buffered must be written first.
    script = (f"import logging, sys; sys.path.insert(0, {str(ROOT)!r}); from station_forecast import cli\n"
              "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
              "for i in range(3000): print(i)\n"
              "logging.getLogger('stage').info('the last line')\n"
              "cli.exit_now(3)\n"
              "print('never printed')")
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=buffered)
    assert result.returncode == 3
    assert result.stdout.split() == [str(i) for i in range(3000)]
    assert result.stderr.strip().endswith("the last line")


@pytest.mark.parametrize(("setting", "huge_pages"), [(None, "False"), ("1", "True"), ("0", "False")])
def test_a_stage_asks_numpy_for_small_pages_unless_the_user_chose(tmp_path, setting, huge_pages):
    # Huge pages stalled first touches of large arrays on fragmented or virtual memory (docs/results.md).
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from station_forecast import cli\n"
              "def main(args):\n"
              "    import numpy._core.multiarray as m; print(m._get_madvise_hugepage())\n"
              f"cli.exit_now(cli.run('stage', main, cli.stage_parser('test'), ['--root', {str(tmp_path)!r}]))")
    env = {key: value for key, value in os.environ.items() if key != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == huge_pages


@pytest.mark.parametrize(("setting", "handed_back"), [(None, False), ("131072", True)])
def test_a_stage_keeps_freed_memory_for_reuse_unless_the_user_chose(tmp_path, setting, handed_back):
    # Handing the heap's top back at once cost stage 2 a fifth of its time in page faults (runtime.KEPT_HEAP);
    # release_memory() still hands it back between phases.
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from station_forecast import cli, runtime\n"
              "def rss():\n"
              "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
              "def main(args):\n"
              "    blocks = [bytearray(64 << 10) for _ in range(1600)]  # 100 MiB, each below the mmap threshold\n"
              "    before = rss(); del blocks; freed = before - rss()\n"
              "    runtime.release_memory(); released = before - rss()\n"
              "    print(freed > 50 << 20, released > 50 << 20)\n"
              "import os\n"
              f"cli.exit_now(cli.run('stage', main, cli.stage_parser('test'), ['--root', {str(tmp_path)!r}]))")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    if setting is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = setting
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(handed_back), "True"]


@pytest.mark.parametrize(("unit", "written", "said"), [("C", -40.0, "-40 °C"), ("F", -40.0, "-40.0 °F"),
                                                     ("0.1C", -9999.0, "-9999 (tenths of °C)"), ("none", 7.5, "7.5")])
def test_each_unit_converts_to_celsius_and_back_as_the_files_write_it(unit, written, said):
    from station_forecast import units

    assert units.as_written(units.to_celsius(written, unit), unit) == said


@pytest.mark.parametrize("told", ["go\n", "skip\n", ""])
def test_a_stage_waiting_for_go_runs_only_when_told(tmp_path, monkeypatch, capsys, told):
    import io

    from station_forecast import cli

    ran = []
    monkeypatch.setattr(sys, "stdin", io.StringIO(told))
    code = cli.run("stage", ran.append, cli.stage_parser("test"), ["--root", str(tmp_path), "--wait-for-go"],
                   imports=["json"])
    assert code == errors.EXIT_OK
    assert len(ran) == (told == "go\n")
    assert capsys.readouterr().err == "", "a stage told to skip, or never told, says nothing"


def test_an_import_that_fails_ahead_is_reported_when_the_stage_is_told_to_go(tmp_path, monkeypatch, capsys):
    import io

    from station_forecast import cli

    for told, expected in (("skip\n", errors.EXIT_OK), ("go\n", errors.EXIT_INTERNAL)):
        monkeypatch.setattr(sys, "stdin", io.StringIO(told))
        code = cli.run("stage", lambda args: None, cli.stage_parser("test"),
                       ["--root", str(tmp_path), "--wait-for-go"], imports=["no_such_module_here"])
        assert code == expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage: internal error: ModuleNotFoundError" in err and "no_such_module_here" in err


def test_a_stage_started_ahead_loads_its_imports_before_it_is_told_to_go(tmp_path):
    # The stage's own process: numpy and pandas are imported lazily, so only the wait makes them load.
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import model_preparation\n"
              "from station_forecast import cli\n"
              "cli.load_ahead(model_preparation.IMPORTS)\n"
              "print(all(type(sys.modules[name]).__name__ == 'module' for name in model_preparation.IMPORTS))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr


def test_under_a_profiler_a_stage_exits_normally_so_the_profile_is_reported():
    from station_forecast import cli

    sys.setprofile(lambda *args: None)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.exit_now(4)
    finally:
        sys.setprofile(None)
    assert ended.value.code == 4


def test_warnings_carry_a_marker(tmp_path, capsys):
    import logging

    from station_forecast import cli

    def warns(args):
        logging.getLogger("pipeline").warning("something to look at")

    assert cli.run("stage", warns, cli.stage_parser("test"), ["--root", str(tmp_path)]) == 0
    assert "stage: warning: something to look at" in capsys.readouterr().err


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.STAGE)
def test_a_stage_run_alone_waits_for_no_one_and_writes_nothing_under_a_live_run(project, capsys, stage):
    root, params = project
    before = snapshot(root)
    with lock_held(root):
        assert run_stage(stage, root, params) == errors.EXIT_BUSY
    assert "another run" in capsys.readouterr().err.splitlines()[-1]
    assert snapshot(root) == before


def test_restore_takes_the_lock_too(project, capsys):
    root, params = project
    with lock_held(root):
        assert run_stage(STAGES[3], root, params, "--restore") == errors.EXIT_BUSY


def test_only_a_dead_writers_temporary_files_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        live_tmp = tmp_path / f".a.csv.{sleeper.pid}.abc.tmp"
        dead_tmp = tmp_path / f".a.csv.{dead.stdout.strip()}.def.tmp"
        live_tmp.write_text("being written")
        dead_tmp.write_text("left by a killed writer")
        storage.write_bytes(tmp_path / "a.csv", b"new\n")
        assert live_tmp.exists() and not dead_tmp.exists()
        assert (tmp_path / "a.csv").read_bytes() == b"new\n"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_empty_or_damaged_manifest_is_no_dead_end(project, capsys):
    root, params = project
    (root / "models/manifest.json").write_text("")
    assert run_stage(STAGES[1], root, params) == errors.EXIT_BAD_INPUT
    assert "run ./pipeline.sh from the start" in capsys.readouterr().err
    for module in STAGES:  # the first stage starts a new manifest; the others follow
        assert run_stage(module, root, params) == 0, module.STAGE
    record = json.loads((root / "models/manifest.json").read_text())
    record["stages"]["model_preparation"]["outputs"] = "damaged"
    (root / "models/manifest.json").write_text(json.dumps(record))
    assert run_stage(STAGES[3], root, params) == errors.EXIT_BAD_INPUT
    assert "damaged record of stage model_preparation" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "loop"])
def test_a_station_file_that_is_not_a_regular_file_is_refused_at_once(project, capsys, kind):
    root, params = project
    path = root / "data/train/raw/ZZZ.csv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(path)
    before = snapshot(root)
    started = time.monotonic()
    assert run_stage(STAGES[1], root, params) == errors.EXIT_BAD_INPUT
    assert time.monotonic() - started < 60  # (a FIFO would block forever)
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"{path}:" in err and ("not a regular file" in err or "cannot be read" in err
                                  or "not the pipeline's" in err), err  # a folder: caught with the layout
    assert snapshot(root) == before


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(errors.PipelineError, match="more than the 100 a data file may have"):
        files.check_regular_file(path, limit=100)


def test_station_names_are_text_everywhere(tmp_path):
    """Files named NA, null, 001 and 1 are four stations, end to end."""
    import pandas as pd
    from conftest import REAL_FORMAT, run_all, write_real_format_station

    own = tmp_path / "own"
    own.mkdir()
    for name in ("NA", "null", "001", "1"):
        write_real_format_station(own / f"{name}.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    run_all(tmp_path / "root", params)
    predictions = pd.read_csv(tmp_path / "root/reports/predictions.csv", dtype={"station": str},
                              keep_default_na=False)
    assert sorted(set(predictions["station"])) == ["001", "1", "NA", "null"]


def test_station_names_with_spaces_and_punctuation_keep_their_report_readable(tmp_path):
    """Real station names hold spaces, commas, quotes and brackets: the tables keep them whole, and every
    figure the report links is the file of that name."""
    import re
    from urllib.parse import unquote

    import pandas as pd
    from conftest import REAL_FORMAT, run_all, write_real_format_station

    names = ["Dayton, OH", 'Lunken "Field"', "Erie | PA", "[old] Toledo"]
    own = tmp_path / "own"
    own.mkdir()
    for name in names:
        write_real_format_station(own / f"{name}.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own", report_stations=4)
    run_all(tmp_path / "root", params)
    reports = tmp_path / "root/reports"
    assert sorted(set(pd.read_csv(reports / "predictions.csv")["station"])) == sorted(names)
    summary = (reports / "summary.md").read_text()
    links = re.findall(r"^!\[.*\]\((.*)\)$", summary, flags=re.MULTILINE)
    assert len(links) == 4 + 2 and all((reports / unquote(link)).is_file() for link in links)
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    header = next(line for line in rows if line.startswith("| station | rows |"))
    for name in names:
        row = next(line for line in rows if line.startswith("| " + name.replace("|", "\\|").replace("[", "\\[")
                                                             .replace("]", "\\]") + " | "))
        assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"\|", header))


@pytest.mark.parametrize(("first", "second", "said"), [
    ("ST001.csv", "st001.CSV", "st001.CSV: names the same station as ST001.csv (station names may not differ only in "
                               "case or in how an accent is encoded"),
    ("Z\u00fcrich.csv", "Zu\u0308rich.csv", "rich.csv: names the same station as Z")])  # composed; macOS's decomposed
def test_two_station_files_differing_only_in_case_or_unicode_form_are_refused(tmp_path, capsys, first, second, said):
    from conftest import REAL_FORMAT, write_real_format_station

    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / first)
    write_real_format_station(own / second)
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(STAGES[0], tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert said in capsys.readouterr().err.splitlines()[-1]


def test_a_failed_promotion_changes_neither_the_accepted_nor_the_previous_model(project, monkeypatch):
    from station_forecast import registry

    root, _ = project
    paths = storage.Paths(root)
    links = {name: os.readlink(root / "models" / name) if (root / "models" / name).is_symlink() else None
             for name in ("accepted", "previous")}
    accepted = {p.name: p.read_bytes() for p in paths.accepted.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry, "write_bytes", disk_full)
    signatures = {path: manifest.signature(path) for path in (paths.scaler, paths.model)}
    with pytest.raises(OSError):
        registry.accept(paths, signatures)
    assert {p.name: p.read_bytes() for p in paths.accepted.iterdir()} == accepted
    assert all(os.readlink(root / "models" / name) == target for name, target in links.items() if target)


def test_a_promotion_killed_between_its_two_renames_leaves_a_complete_accepted_model(project, monkeypatch):
    from station_forecast import registry

    root, _ = project
    paths = storage.Paths(root)
    registry.accept(paths, {path: manifest.signature(path) for path in (paths.scaler, paths.model)})
    before = {p.name: p.read_bytes() for p in paths.accepted.iterdir()}
    other = write_params(root / "other.toml", **TINY, ridge_alpha=5000.0, tie_tolerance=0.5)
    assert run_stage(STAGES[2], root, other) == 0
    real_point, calls = registry._point, []

    def dies_on_second(link, name):
        calls.append(link.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real_point(link, name)

    monkeypatch.setattr(registry, "_point", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        registry.accept(paths, {path: manifest.signature(path) for path in (paths.scaler, paths.model)})
    assert {p.name: p.read_bytes() for p in paths.accepted.iterdir()} == before


def test_progress_is_logged_on_slow_work_only(caplog):
    import logging


    now = [0.0]
    caplog.set_level(logging.INFO, logger="pipeline")
    quick = runtime.Progress("quick things", 3, interval=5.0, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 1.0
        quick.step()
    slow = runtime.Progress("slow things", 10, interval=5.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 2.0
        slow.step()
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if line.startswith("quick things")]
    progress = [line for line in lines if line.startswith("slow things")]
    assert progress[0] == "slow things: 3 of 10, 6 s so far, about 14 s left" and 3 <= len(progress) <= 4


def test_a_parameters_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "params.toml"
    os.mkfifo(fifo)
    with pytest.raises(errors.PipelineError, match="not a regular file"):
        load_params(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(errors.PipelineError, match="more than the"):
        load_params(big)


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.STAGE)
def test_help_answers_without_importing_the_numerical_libraries(stage):
    probe = ("import sys, runpy; sys.argv = ['stage', '--help']\n"
             f"try:\n    runpy.run_path({str(ROOT / (stage.STAGE + '.py'))!r}, run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "loaded = [n for n in ('numpy', 'pandas', 'sklearn', 'matplotlib') if n in sys.modules]\n"
             "print('loaded:', *loaded)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert "usage:" in result.stdout and result.stdout.strip().splitlines()[-1] == "loaded:", result.stdout


def test_a_module_imported_on_first_use_is_whole_for_every_thread_that_uses_it_first():
    """A stage run alone imports numpy and pandas on first use. Its threads reading station files touched
    pandas first, together: with importlib's LazyLoader (Python 3.11) the second saw it half made, and stage 1
    failed on a folder of own files with "module 'pandas' has no attribute 'errors'"."""
    probe = ("from station_forecast import runtime\n"
             "pd = runtime.lazy_import('pandas')\n"
             "found = runtime.Threads(4).map(lambda i: (pd.errors.ParserError, pd.DataFrame), range(8))\n"
             "print(len(set(found)), pd.__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["1", "pandas"], result.stderr
    # A stage run as a script sends its functions to Dask's workers by value, with the modules they use.
    import pickle

    assert pickle.loads(pickle.dumps(runtime._DeferredModule("json"))) is __import__("json")


def test_tables_round_trip_with_awkward_text_and_missing_values(tmp_path):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"station": ["plain", 'with, comma and "quote"'], "x": [1.23456789, np.nan],
                          "n": [1, 2]})
    path = tmp_path / "t.csv"
    storage.write_csv(path, frame)
    text = path.read_text()
    assert text.splitlines()[0] == "station,x,n" and "1.234568" in text
    back = storage.read_table(path, ["station", "x", "n"])
    assert back["station"].tolist() == frame["station"].tolist()
    assert back["x"].iloc[0] == 1.234568 and np.isnan(back["x"].iloc[1])
    storage.write_csv(path, frame.iloc[:1])  # nothing to quote: no quotes at all
    assert '"' not in path.read_text()


@pytest.mark.parametrize("threads", [1, 3])
def test_table_bytes_do_not_depend_on_the_chunk_size_or_threads(tmp_path, monkeypatch, threads):
    import pandas as pd

    frame = pd.DataFrame({"station": ["a", "b", "c, quoted", "d"] * 5, "x": [0.1234567, 2.0, None, -1.5] * 5,
                          "date": pd.to_datetime(["2020-01-01", "2020-01-02", None, "2020-01-04"] * 5)})
    frame["x"] += [float(i) for i in range(len(frame))]
    whole, chunked = tmp_path / "whole.csv", tmp_path / "chunked.csv"
    storage.write_csv(whole, frame)
    monkeypatch.setattr(storage, "CSV_CHUNK_ROWS", 1)
    storage.write_csv(chunked, frame, threads=threads)
    assert chunked.read_bytes() == whole.read_bytes()
    assert whole.read_text().splitlines()[3] == '"c, quoted",,'


def test_tables_write_days_as_dates_and_keep_times_that_are_not_whole_days(tmp_path):
    import pandas as pd

    path = tmp_path / "t.csv"
    storage.write_csv(path, pd.DataFrame({"date": pd.to_datetime(["2020-02-29", "2021-01-01"])}))
    assert path.read_text().splitlines() == ["date", "2020-02-29", "2021-01-01"]
    with_time = pd.to_datetime(["2020-02-29 13:30", "2021-01-01"], format="ISO8601")
    storage.write_csv(path, pd.DataFrame({"date": with_time}))
    assert path.read_text().splitlines()[1].startswith("2020-02-29 13:30")


@pytest.mark.parametrize("label", ["plain", "needs, quotes"])
def test_a_table_written_a_batch_at_a_time_is_the_table_written_whole(tmp_path, monkeypatch, label):
    """Batches make one file with one header, the bytes of the whole table's (a value that needs quotes in
    a later batch quotes every value, as in the whole table), and the digest the manifest records."""
    import pandas as pd

    frame = pd.DataFrame({"date": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"] * 3),
                          "temperature": [0.1, -2.0, None] * 3, "station": ["A"] * 7 + [label] * 2})
    monkeypatch.setattr(storage, "CSV_CHUNK_ROWS", 2)  # rows cut across chunks as well as batches
    storage.write_csv(tmp_path / "whole.csv", frame)
    bounds = [0, 4, 4, 9]  # an empty batch among them
    storage.write_csv_batches(tmp_path / "batches.csv",
                              lambda: (frame.iloc[a:b] for a, b in itertools.pairwise(bounds)))
    assert (tmp_path / "batches.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert storage.sha256_file(tmp_path / "batches.csv") == storage.sha256_file(tmp_path / "whole.csv")


def test_whole_numbers_in_a_column_of_fixed_decimals_are_written_with_them(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"station": ["A", "B"], "temperature": [12, -3]})
    storage.write_csv(tmp_path / "whole.csv", frame, fixed={"temperature": 2})
    storage.write_csv_parts([tmp_path / "a.csv", tmp_path / "b.csv"], frame, [1, 1], fixed={"temperature": 2})
    assert (tmp_path / "whole.csv").read_text() == "station,temperature\nA,12.00\nB,-3.00\n"
    assert (tmp_path / "b.csv").read_text() == "station,temperature\nB,-3.00\n"


@pytest.mark.parametrize("label", ["plain", "needs, quotes"])
def test_row_ranges_written_as_files_of_their_own_are_what_each_file_alone_would_be(tmp_path, monkeypatch, label):
    import pandas as pd

    frame = pd.DataFrame({"date": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"] * 3),
                          "temperature": [0.1, -2.0, None, 12.345] * 3, "anomaly": ["none", label, "none", "x"] * 3})
    sizes = [5, 0, 4, 3]
    targets = [tmp_path / f"part{i}.csv" for i in range(len(sizes))]
    monkeypatch.setattr(storage, "CSV_CHUNK_ROWS", 2)  # rows cut across chunks as well as files
    storage.write_csv_parts(targets, frame, sizes, fixed={"temperature": 1})
    begin = 0
    for target, size in zip(targets, sizes, strict=True):
        if size == 0:
            assert not target.exists()
            continue
        alone = tmp_path / "alone.csv"
        storage.write_csv(alone, frame.iloc[begin:begin + size], fixed={"temperature": 1})
        assert target.read_bytes() == alone.read_bytes()
        begin += size
    second = targets[0].read_text().splitlines()[2]
    assert (second == "2020-01-02,-2.0,plain") if label == "plain" else second.endswith('"needs, quotes"')


def test_a_file_s_hash_is_read_again_once_it_changes_even_with_its_size_and_time_restored(tmp_path):
    import hashlib

    import pandas as pd

    path = tmp_path / "table.csv"
    storage.write_csv(path, pd.DataFrame({"x": [1.5, 2.5]}))
    assert storage.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = os.stat(path)
    time.sleep(0.05)  # file times tick in milliseconds: let the change fall in a later tick
    path.write_bytes(path.read_bytes().replace(b"1.5", b"9.5"))  # the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same modification time
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert storage.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_read_together_are_the_files_read_one_by_one(tmp_path):
    import pandas as pd

    texts = ["date,x,label\n2020-01-01,1.5,none\n2020-01-02,,spike\n", "date,x,label\n2020-01-01,-2,none\n"]
    paths = [tmp_path / f"{i}.csv" for i in range(len(texts))]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text)
    table, rows = storage.read_tables(paths, ["date", "x"])
    assert rows == [2, 1]
    pd.testing.assert_frame_equal(table, pd.concat([storage.read_table(p, ["date", "x"]) for p in paths],
                                                   ignore_index=True))
    for odd in ("date,label,x\n2020-01-01,none,1\n", "date,x,label\n", 'date,x,label\n2020-01-01,1,"a"\n',
                "date,x,label\n2020-01-01,1,none\n\n2020-01-02,2,none\n"):
        paths[1].write_text(odd)  # another header, no rows, a quote, a blank line: read one by one instead
        assert storage.read_tables(paths, ["date", "x"]) is None


# ------------------------------------------------------------ never outside the project's own folders


def outside_canary(tmp_path) -> tuple:
    """A folder outside the project holding a file and a subfolder, and a way to tell it is untouched."""
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep/file.txt").write_text("mine")
    (outside / "file.csv").write_text("date,temperature\n")
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    return outside, lambda: sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before \
        and (outside / "keep/file.txt").read_text() == "mine"


@pytest.mark.parametrize("folder", ["data", "data/train", "data/test", "data/train/raw", "data/test/raw", "data/truth",
                                    "models", "models/sets", "reports", "logs"])
def test_no_stage_writes_or_deletes_through_a_link_in_place_of_its_folder(project, tmp_path, capsys, folder):
    root, params = project
    outside, untouched = outside_canary(tmp_path)
    storage.remove_tree(root / folder)
    (root / folder).parent.mkdir(parents=True, exist_ok=True)
    (root / folder).symlink_to(outside, target_is_directory=True)
    for module in STAGES:
        assert run_stage(module, root, params) == errors.EXIT_BAD_INPUT, module.STAGE
        assert f"{root / folder}: a symbolic link" in capsys.readouterr().err
    assert untouched()


@pytest.mark.parametrize("source", ["data/truth", "data/train/raw", "data", "models", "reports", "logs"])
def test_a_source_inside_a_folder_the_pipeline_writes_is_refused_before_anything_is_touched(project, capsys, source):
    root, _ = project
    folder = root / source
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("the user's own notes")
    (folder / "MINE.csv").write_text("date,temperature\n2020-01-01,1.0\n")
    params = write_params(root / "own.toml", **TINY, source=source, holdout_stations=0)
    before = snapshot(root)
    assert run_stage(STAGES[0], root, params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err  # where the stage replaces the folder whole, the layout check names the note
    assert "inside a folder the pipeline writes and replaces" in err or "not the pipeline's" in err
    assert snapshot(root) == before and (folder / "README.txt").read_text() == "the user's own notes"


@pytest.mark.parametrize(("module", "place", "name"), [
    (0, "data/train/raw", "notes.txt"), (0, "data/truth", "old/ST001.csv"), (0, "data/test/raw", "README"),
    (0, "data/train/raw", "MINE.csv"), (3, "reports", "thesis.md"), (3, "reports", "drafts/summary.md"),
    (3, "reports", "figure.png")])
def test_a_stage_never_replaces_a_folder_that_holds_a_file_it_did_not_write(project, capsys, module, place, name):
    """A stage swaps some folders whole (data/train/raw, reports/): a person's file dropped into one would go
    with the swap, even of a kind the stage writes there (a station's .csv, a figure). The stage refuses,
    naming it, before it touches anything; the files it put there, and the hidden files a file manager
    leaves, are no reason to."""
    root, params = project
    (root / place / ".DS_Store").write_bytes(b"\0")
    top = (root / place / name).relative_to(root / place).parts[0]
    (root / place / name).parent.mkdir(exist_ok=True)
    (root / place / name).write_text("a person's own")
    before = snapshot(root)
    assert run_stage(STAGES[module], root, params) == errors.EXIT_BAD_INPUT
    assert f"{root / place / top}: not the pipeline's, in a folder it replaces whole" in capsys.readouterr().err
    assert snapshot(root) == before
    storage.remove_tree(root / place / top)
    assert run_stage(STAGES[module], root, params) == 0


def test_a_file_dropped_into_reports_while_stage_4_runs_is_not_swapped_away(project, capsys, monkeypatch):
    """The layout check runs as the stage starts; a file a person saves into reports/ while the stage runs is
    checked for again just before the swap, which would delete it: the stage stops, naming it, and accepts
    nothing."""
    from station_forecast import report

    root, params = project
    written = report.summary_markdown

    def saved_meanwhile(*args: object) -> str:
        (root / "reports" / "figure.png").write_bytes(b"a person's own")
        return written(*args)

    monkeypatch.setattr(report, "summary_markdown", saved_meanwhile)
    accepted = sorted((root / "models/sets").iterdir())
    assert run_stage(STAGES[3], root, params) == errors.EXIT_BAD_INPUT
    assert f"{root / 'reports/figure.png'}: not the pipeline's" in capsys.readouterr().err
    assert (root / "reports/figure.png").read_bytes() == b"a person's own"
    assert (root / "reports/summary.md").is_file() and not (root / "reports").with_name(".reports.new").exists()
    assert sorted((root / "models/sets").iterdir()) == accepted


def test_the_pipeline_refuses_a_foreign_file_before_any_stage_runs(project):
    """pipeline.sh checks every folder a stage replaces whole before the first stage: a thesis in reports/
    stops the run at once, not after three stages."""
    root, _ = project
    (root / "reports" / "thesis.md").write_text("a person's own")
    assert cli.up_to_date(["layout", "--root", str(root)]) == errors.EXIT_BAD_INPUT
    (root / "reports" / "thesis.md").unlink()
    assert cli.up_to_date(["layout", "--root", str(root)]) == 0


def test_accepting_a_model_never_deletes_what_the_pipeline_did_not_make(project, tmp_path):
    from station_forecast import registry

    root, params = project
    paths = storage.Paths(root)
    (paths.sets / "notes").mkdir()  # a user's folder among the sets: not a set, never deleted
    outside, untouched = outside_canary(tmp_path)
    os.symlink(outside, paths.sets / "0123456789abcdef")  # named like a set, but a link out of the project
    link = paths.models / ".previous.tmp"
    os.symlink(outside, link)
    os.replace(link, paths.previous)  # previous points out of the project
    assert registry.set_of(paths, paths.previous) is None
    for gate in ("0.0", "-0.5"):  # two acceptances: every unused set is forgotten
        edited = root / "again.toml"
        edited.write_text(params.read_text().replace("gate_min_improvement = 0.0", f"gate_min_improvement = {gate}"))
        assert run_stage(STAGES[3], root, edited) == 0
    assert untouched() and (paths.sets / "notes").is_dir() and (paths.sets / "0123456789abcdef").is_symlink()
    assert registry.set_of(paths, paths.accepted) is not None


@pytest.mark.parametrize("name", [".pipeline.pid", ".pipeline.lock"])
@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_the_lock_and_its_pid_file_are_never_written_through_a_link_or_waited_on(project, tmp_path, capsys, name,
                                                                                   kind):
    root, params = project
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    path = root / "logs" / name
    path.parent.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    {"link": lambda: path.symlink_to(target), "fifo": lambda: os.mkfifo(path), "folder": path.mkdir}[kind]()
    started = time.monotonic()
    assert run_stage(STAGES[3], root, params) == errors.EXIT_BAD_INPUT
    assert time.monotonic() - started < 60
    assert f"{path}: not a regular file" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_a_folder_where_a_file_goes_is_refused_with_the_way_out(project, capsys):
    root, params = project
    (root / "models/manifest.json").unlink()
    (root / "models/manifest.json").mkdir()
    before = snapshot(root)
    assert run_stage(STAGES[0], root, params) == errors.EXIT_BAD_INPUT
    assert f"rm -r {root / 'models/manifest.json'}" in capsys.readouterr().err
    assert snapshot(root) == before


def test_a_manifest_nested_too_deep_is_a_damaged_manifest(project, capsys):
    from station_forecast import cli

    root, params = project
    (root / "models/manifest.json").write_text('{"stages": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert run_stage(STAGES[1], root, params) == errors.EXIT_BAD_INPUT
    assert "corrupt manifest" in capsys.readouterr().err
    stage = STAGES[1].STAGE
    assert cli.up_to_date([stage, "--params", str(params), "--root", str(root)]) == 1
    assert capsys.readouterr().out.strip() == f"{stage}: runs (the manifest is damaged)"


@pytest.mark.parametrize("root_kind", ["missing", "file", "loop"])
def test_a_bad_root_is_one_line_and_never_created(tmp_path, capsys, root_kind):
    from station_forecast import cli

    root = tmp_path / "root"
    if root_kind == "file":
        root.write_text("")
    elif root_kind == "loop":
        root.symlink_to(root)
    params = write_params(tmp_path / "p.toml", **TINY)
    module = STAGES[0]
    code = cli.run(module.STAGE, module.main, cli.stage_parser("x"), ["--root", str(root), "--params", str(params)])
    assert code == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().startswith(f"data_creation: error: --root {root}:")
    assert root_kind != "missing" or not root.exists()


@pytest.mark.parametrize("value", ["²", "0", "two", "99999"])
def test_a_bad_thread_setting_is_refused_before_any_work(project, monkeypatch, capsys, value):
    root, params = project
    monkeypatch.setenv("PIPELINE_THREADS", value)
    before = snapshot(root)
    assert run_stage(STAGES[0], root, params) == errors.EXIT_BAD_INPUT
    assert "PIPELINE_THREADS=" in capsys.readouterr().err
    assert snapshot(root) == before


@pytest.mark.parametrize("problem", ["inside", "readable", "fifo"])
def test_a_signing_key_that_would_not_keep_its_secret_is_refused(project, tmp_path, monkeypatch, capsys, problem):
    root, params = project
    key = {"inside": storage.ROOT / "tests" / ".signing-key-test", "readable": tmp_path / "key",
           "fifo": tmp_path / "fifo"}[problem]
    try:
        if problem == "fifo":
            os.mkfifo(key)
        else:
            key.write_bytes(os.urandom(32))
            key.chmod(0o644 if problem == "readable" else 0o600)
        monkeypatch.setenv(manifest.KEY_ENVIRONMENT, str(key))
        started = time.monotonic()
        assert run_stage(STAGES[1], root, params) == errors.EXIT_BAD_INPUT
        assert time.monotonic() - started < 60
        err = capsys.readouterr().err
        assert {"inside": "is inside the project", "readable": "chmod 600",
                "fifo": "not a regular file (a FIFO), where the model-signing key should be"}[problem] in err, err
    finally:
        key.unlink(missing_ok=True)


def fake_cgroups(tmp_path: Path, monkeypatch, own: str, files: dict[str, str]) -> None:
    """A control-group tree in ``tmp_path`` (``files``: path inside it -> content) and this process's line(s)
    of /proc/self/cgroup, as runtime reads them."""
    for name, text in files.items():
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / name).write_text(text)
    (tmp_path / "self").write_text(own)
    monkeypatch.setattr(runtime, "CGROUPS", tmp_path / "tree")
    monkeypatch.setattr(runtime, "OWN_CGROUPS", tmp_path / "self")


GIB = 2**30


@pytest.mark.parametrize(("own", "files", "cpus", "free"), [
    # v2, a container (its group the tree's root): --cpus 1.5 and --memory 2g, 1.5 GiB used of which 1 GiB the
    # page cache of files read
    ("0::/\n", {"cgroup.controllers": "cpu memory", "cpu.max": "150000 100000", "memory.max": str(2 * GIB),
                 "memory.current": str(3 * GIB // 2), "memory.stat": f"anon 1\ninactive_file {GIB}\n"}, 2,
     3 * GIB // 2),
    # v2, a cluster job's group inside a user's: the job's own limit unset, its parent's set
    ("0::/user.slice/job_7\n", {"cgroup.controllers": "", "user.slice/cpu.max": "100000 100000",
                                  "user.slice/job_7/cpu.max": "max 100000", "user.slice/memory.max": str(4 * GIB),
                                  "user.slice/memory.current": str(GIB), "user.slice/job_7/memory.max": "max"},
     1, 3 * GIB),
    # v1, a tree per controller (older clusters): a job's limits
    ("4:memory:/slurm/job_9\n2:cpu,cpuacct:/slurm/job_9\n", {
        "cpu/slurm/job_9/cpu.cfs_quota_us": "300000", "cpu/slurm/job_9/cpu.cfs_period_us": "100000",
        "memory/slurm/job_9/memory.limit_in_bytes": str(8 * GIB),
        "memory/slurm/job_9/memory.usage_in_bytes": str(2 * GIB),
        "memory/slurm/job_9/memory.stat": "cache 5\ntotal_inactive_file 0\n",
        "memory/memory.limit_in_bytes": "9223372036854771712"}, 3, 6 * GIB),
    # v1 with no limits at all (this machine's kind)
    ("4:memory:/\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                                 "memory/memory.limit_in_bytes": "9223372036854771712",
                                 "memory/memory.usage_in_bytes": "1000"}, None, None),
])
def test_thread_and_memory_budgets_hold_to_the_control_group_s_limits(tmp_path, monkeypatch, own, files, cpus,
                                                                      free):
    """A container run with --cpus 2 on a 32-CPU host, or a cluster job, sees every CPU of the host in its
    affinity: sized by it, a stage ran 32 threads on the CPU time of 2. Its memory limit was read only where
    cgroup v2's tree was mounted, and counted the page cache of the files read as used."""
    fake_cgroups(tmp_path, monkeypatch, own, files)
    assert runtime.cpu_quota() == cpus
    assert runtime.cgroup_memory_free() == free
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert runtime.usable_cpus() == (cpus or 32)


def test_a_network_larger_than_the_free_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "available_memory", lambda: 2 * 2**30)
    params = write_params(tmp_path / "p.toml", **{**TINY, "n_stations": 2000, "n_years": 10})
    started = time.monotonic()
    assert run_stage(STAGES[0], tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "7,304,000 station-steps: about 3.5 GiB for the largest stage, and 2.0 GiB is free here" in err
    assert not (tmp_path / "root/data").exists()


def test_a_horizon_whose_features_outgrow_the_free_memory_is_refused_before_stage_2_works(tmp_path, monkeypatch,
                                                                                          capsys):
    """The features grow with the steps ahead: 366 steps on a real network of 16 stations x 19 years was
    killed by the kernel at 22 GB, with no word of why. 5 stations x 1,096 days at 200 steps ahead need about
    0.4 GiB; with 0.1 GiB free stage 2 refuses, naming the horizon, and writes nothing."""
    root = tmp_path / "root"
    assert run_stage(STAGES[0], root, write_params(tmp_path / "p.toml", **TINY)) == 0
    monkeypatch.setattr(runtime, "available_memory", lambda: 2**30 // 10)
    before = snapshot(root)
    far = write_params(tmp_path / "far.toml", **TINY, horizon=200)
    assert run_stage(STAGES[1], root, far) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "5 stations x 1096 steps is 5,480 station-steps forecast 200 steps ahead (forecast.horizon): about 0.4 GiB" \
        in err and "or a shorter horizon" in err, err
    assert snapshot(root) == before
    assert run_stage(STAGES[1], root, write_params(tmp_path / "near.toml", **TINY)) == 0  # one step: 3 MB
    # Far ahead the stages hold a bounded share of the rows while stage 2's blocks can shrink (up to
    # STATION_BLOCK steps ahead): the horizon adds at most HORIZON_BYTES_CAP; beyond, it is counted in full.
    monkeypatch.setattr(runtime, "available_memory", lambda: runtime.HORIZON_BYTES_CAP + 2**27)
    runtime.check_memory(112_592, "the Ohio valley", horizon=100, bounded=True)
    with pytest.raises(errors.PipelineError, match=r"about 3\.2 GiB for the largest stage, and 3\.1 GiB is free"):
        runtime.check_memory(112_592 * 4, "four times the Ohio valley", horizon=100, bounded=True)
    with pytest.raises(errors.PipelineError, match=r"about 16\.9 GiB"):
        runtime.check_memory(112_592, "the Ohio valley", horizon=366)


def test_features_the_disk_has_no_room_for_are_refused_before_stage_2_works(tmp_path, monkeypatch, capsys):
    """Features far ahead take gigabytes (a real network of 16 stations x 19 years, 120 steps ahead: 3.0 GB of
    CSV). Without room on the disk stage 2 refuses before its work, naming the folder and the horizon, and
    writes nothing; and what it estimates is what a run writes, not far above it."""
    import shutil

    root = tmp_path / "root"
    assert run_stage(STAGES[0], root, write_params(tmp_path / "p.toml", **TINY)) == 0
    before = snapshot(root)
    real_usage = shutil.disk_usage
    free = {"bytes": 2 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=free["bytes"]))
    far = write_params(tmp_path / "far.toml", **TINY, horizon=4)
    assert run_stage(STAGES[1], root, far) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert (f"5 stations x 1096 steps, 5,480 station-steps in the stations' records forecast 4 steps ahead "
            f"(forecast.horizon): their features and flags take about 5 MiB on disk while they are written, "
            f"and 2 MiB is free in {root / 'data'}; free space there") in err and "or a shorter horizon" in err
    assert snapshot(root) == before
    # Rows past stage 2's spill limit lie on disk in binary too while their text is written.
    free["bytes"] = 5480 * 4 * runtime.FEATURE_TEXT_BYTES + 5480 * runtime.FLAG_ROW_DISK_BYTES + 1
    runtime.check_disk(5480, "five stations", 4, root, spilled_above=2**28)
    with pytest.raises(errors.PipelineError, match="their features and flags take about 10 MiB"):
        runtime.check_disk(5480, "five stations", 4, root, spilled_above=2**20)
    # A file system that reports no size at all (some network mounts) gives nothing to go by.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(total=0, free=0))
    runtime.check_disk(5480, "five stations", 4, root, spilled_above=2**20)

    station_steps = []
    monkeypatch.setattr(runtime, "check_disk", lambda steps, *_: station_steps.append(steps))
    assert run_stage(STAGES[1], root, far) == 0
    paths = storage.Paths(root)
    text = sum(path.stat().st_size for path in (paths.train_features, paths.test_features, paths.train_flags,
                                                   paths.test_flags, paths.flagged))
    estimated = station_steps[0] * (runtime.FEATURE_TEXT_BYTES * 4 + runtime.FLAG_ROW_DISK_BYTES)
    assert 0.7 * estimated < text < estimated


# --------------------------------------------------------------------------- what makes a stage stale

FOLDERS_WRITTEN_WHOLE = [("data/train/raw", "data_creation"), ("data/test/raw", "data_creation"),
                         ("data/truth", "data_creation"), ("reports", "model_testing"),
                         ("models/accepted", "model_testing"), ("models/previous", "model_testing")]
FILES_WRITTEN = [("data/source.json", "data_creation"), ("data/train/features.csv", "model_preprocessing"),
                 ("data/test/flags.csv", "model_preprocessing"), ("models/scaler.joblib", "model_preprocessing"),
                 ("models/detector.json", "model_preprocessing"), ("models/model.joblib", "model_preparation"),
                 ("models/model.json", "model_preparation"), ("models/metrics.json", "model_testing")]


def stale_stages(root, params) -> list[str]:
    loaded = load_params(params)
    return [module.STAGE for module in STAGES if manifest.why_stale(storage.Paths(root), module.STAGE, loaded)]


def change_file(path, change: str) -> None:
    if change == "add":
        path.with_name(f"ZZ{path.name}").write_bytes(path.read_bytes())
    elif change == "remove":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes() + b"\n")


@pytest.mark.parametrize("change", ["add", "remove", "edit"])
@pytest.mark.parametrize(("folder", "writer"), FOLDERS_WRITTEN_WHOLE)
def test_a_file_added_to_removed_from_or_edited_in_a_folder_makes_its_writer_stale(project, folder, writer, change):
    root, params = project
    if folder == "models/previous":  # a second acceptance makes the first one the previous
        again = root / "again.toml"
        again.write_text(params.read_text().replace("gate_min_improvement = 0.0", "gate_min_improvement = -0.5"))
        assert run_stage(STAGES[3], root, again) == 0
        params = again
    assert stale_stages(root, params) == []
    files = sorted(p for p in (root / folder).iterdir() if p.is_file() and not p.name.startswith("."))
    change_file(files[-1], change)
    assert stale_stages(root, params)[:1] == [writer]


@pytest.mark.parametrize("change", ["remove", "edit"])
@pytest.mark.parametrize(("file", "writer"), FILES_WRITTEN)
def test_a_file_a_stage_wrote_removed_or_edited_makes_that_stage_stale(project, file, writer, change):
    root, params = project
    change_file(root / file, change)
    assert stale_stages(root, params)[:1] == [writer]
    said = manifest.why_stale(storage.Paths(root), writer, load_params(params))
    assert said == f"{file} is gone since it ran" if change == "remove" else said == f"{file} changed since it ran"


def test_a_moved_link_or_another_signing_key_makes_the_stage_that_made_it_stale(project, tmp_path, monkeypatch):
    root, params = project
    (root / "models/accepted").unlink()
    assert stale_stages(root, params) == ["model_testing"]
    assert run_stage(STAGES[3], root, params) == 0 and stale_stages(root, params) == []
    key = tmp_path / "another.key"  # the models were copied to another machine, or re-keyed
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    monkeypatch.setenv(manifest.KEY_ENVIRONMENT, str(key))
    assert stale_stages(root, params) == ["model_preprocessing", "model_preparation", "model_testing"]
    for module in STAGES[1:]:
        assert run_stage(module, root, params) == 0, module.STAGE
    assert stale_stages(root, params) == []


@pytest.mark.parametrize("change", ["add", "remove", "edit", "case twin"])
def test_the_listing_of_the_user_s_folder_is_an_input_of_stage_1(tmp_path, change):
    from conftest import REAL_FORMAT, write_real_format_station

    own = tmp_path / "own"
    own.mkdir()
    for name in ("A", "B"):
        write_real_format_station(own / f"{name}.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    root = tmp_path / "root"
    assert run_stage(STAGES[0], root, params) == 0
    assert stale_stages(root, params)[:1] == ["model_preprocessing"]  # stage 1 alone ran
    if change == "case twin":
        (own / "b.CSV").write_bytes((own / "B.csv").read_bytes())
    else:
        change_file(own / "B.csv", change)
    assert stale_stages(root, params)[:1] == ["data_creation"]


def test_a_stage_s_code_hash_covers_the_modules_it_runs_and_no_tool(tmp_path, monkeypatch):
    """Editing a tool (the salary case, the benchmark) reruns no stage; editing the report reruns only the
    stage that draws it; editing storage, which every stage imports, reruns them all."""
    import shutil

    from station_forecast.params import STAGES as STAGE_NAMES

    files.copy_runnable(tmp_path)
    shutil.copytree(manifest.ROOT / "tools", tmp_path / "tools")
    monkeypatch.setattr(manifest, "ROOT", tmp_path)
    package = tmp_path / manifest.PACKAGE

    def hashes() -> dict[str, str]:
        return {stage: manifest.code_hash(stage) for stage in STAGE_NAMES}

    def edit(path) -> None:
        with path.open("a") as handle:
            handle.write("\n# edited\n")

    before = hashes()
    for tool in ("salary_case.py", "benchmark.py"):
        edit(tmp_path / "tools" / tool)
    assert hashes() == before
    edit(package / "report.py")
    after = hashes()
    assert [stage for stage in STAGE_NAMES if after[stage] != before[stage]] == ["model_testing"]
    edit(package / "storage.py")
    edited = hashes()
    assert all(edited[stage] != after[stage] for stage in STAGE_NAMES)
    assert manifest.code_hash() != manifest.code_hash(STAGE_NAMES[0])  # every module: what a cluster's workers check
    edit(package / "__init__.py")  # a package's __init__ runs before any of its modules
    assert all(hashes()[stage] != edited[stage] for stage in STAGE_NAMES)


def test_the_package_imports_only_downward_and_never_in_a_circle():
    """Every module of the package is in a layer, imports nothing from a layer above its own (nor a stage
    script or a tool), and following its imports never leads back to it."""
    import station_forecast

    layer_of = {module: rank for rank, modules in enumerate(station_forecast.LAYERS.values()) for module in modules}
    package = manifest.PACKAGE
    modules = sorted(f"{package}.{path.relative_to(manifest.ROOT / package).with_suffix('').as_posix()}"
                     .replace("/", ".") for path in (manifest.ROOT / package).rglob("*.py")
                     if path.name != "__init__.py")
    imports = {}
    for module in modules:
        top = module.split(".")[1]
        assert top in layer_of, f"{module} is in no layer of station_forecast.LAYERS"
        imports[module] = {found for found in manifest.project_imports(module) if found != package}
        for found in imports[module]:
            assert found.startswith(f"{package}."), f"{module} imports {found}, which is not in the package"
            assert layer_of[found.split(".")[1]] <= layer_of[top], f"{module} imports {found}, a layer above it"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(found == goal or (found not in seen and not seen.add(found) and reaches(found, goal, seen))
                   for found in imports.get(start, ()))

    circles = [module for module in modules if reaches(module, module, set())]
    assert not circles, f"imports go round in a circle through {circles}"


def test_every_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    """The README is the map: each of its links, and each link between the docs, leads somewhere."""
    import re

    def anchors(page) -> set[str]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' comment in code is no heading
        return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in text.splitlines() if line.startswith("#")}

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # a web address
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
    assert len(pages) > 5 and "docs/stages.md" in (ROOT / "README.md").read_text()
