"""The shared module: parameters, atomic writes and crash safety."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, STAGES, TINY, run_stage, snapshot, write_params

import errors
import storage
from params import load_params


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t + "\n[extra]\nx = 1\n", "unknown section [extra]"),
    (lambda t: t.replace("ridge_alpha = 1.0", "ridge_alpa = 1.0"), "unknown parameter model.ridge_alpa"),
    (lambda t: t.replace("cv_folds = 4", "#"), "model.cv_folds is missing"),
    (lambda t: t.replace("n_stations = 10", "n_stations = 0"), "simulation.n_stations = 0 is out of range [1, 100000]"),
    (lambda t: t.replace("n_stations = 10", 'n_stations = "ten"'), "simulation.n_stations must be int, got 'ten'"),
    (lambda t: t.replace("spike_days = [1, 1]", "spike_days = [3, 1]"), "anomalies.spike_days must be [min, max]"),
    (lambda t: t.replace('"2019-01-01"', '"2019-13-01"'), "simulation.start_date must be YYYY-MM-DD"),
    (lambda t: t.replace("holdout_stations = 1", "holdout_stations = 10"), "holdout_stations must leave"),
    (lambda t: t.replace("[data]", "[data"), "malformed parameters file"),
    (lambda t: t.replace('unit = "C"', 'unit = "K"'), "import.unit = 'K' must be one of 'C', 'F'"),
    (lambda t: t.replace('date_column = "date"', 'date_column = ""'), "import.date_column must not be empty"),
])
def test_bad_parameters_get_one_clear_message(tmp_path, edit, message):
    path = tmp_path / "params.toml"
    path.write_text(edit((ROOT / "params.toml").read_text()))
    with pytest.raises(errors.PipelineError) as caught:
        load_params(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


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
