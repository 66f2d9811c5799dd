"""End to end: pipeline.sh on the tiny configuration in a temporary copy of the project."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    REAL_FORMAT,
    REAL_FORMAT_FLAWS,
    ROOT,
    TINY,
    lock_held,
    write_params,
    write_real_format_station,
)

from station_forecast import cli
from station_forecast.files import copy_runnable


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    copy_runnable(root)
    write_params(root / "tiny.toml", **TINY)
    return root


def stage_processes(root) -> list[str]:
    """The command lines of processes running a stage script of ``root`` (none may outlive a run)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if any(word.decode(errors="replace").startswith(f"{root}/") and word.endswith(b".py") for word in words):
            found.append(" ".join(word.decode(errors="replace") for word in words))
    return found


def pipeline(root, *args, cwd=None):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(root / "pipeline.sh"), *args], cwd=cwd or root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_pipeline_runs_end_to_end_from_another_directory_and_stops_at_a_failing_stage(copy, tmp_path):
    result = pipeline(copy, "--params", "repo/tiny.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("data_creation", "model_preprocessing", "model_preparation", "model_testing"):
        assert f"stage {stage}: start" in result.stdout
        assert f"stage {stage}: end" in result.stdout and "exit 0" in result.stdout
    assert "Test MAE / RMSE" in result.stdout and "prediction interval" in result.stdout
    logs = list((copy / "logs").glob("pipeline-*.log"))
    assert len(logs) == 1 and "stage model_testing: end" in logs[0].read_text()
    metrics = json.loads((copy / "models/metrics.json").read_text())
    overall = metrics["forecast"]["truth"]["all_stations"]
    assert overall["model"]["mae"] < overall["persistence"]["mae"]
    assert (copy / "reports/summary.md").exists()

    raw = copy / "data/test/raw/ST001.csv"
    raw.write_text(raw.read_text() + "2099-01-01,oops\n")
    failed = pipeline(copy, "--params", "tiny.toml", "--from", "model_preprocessing")
    assert failed.returncode == 2
    assert "stage model_preprocessing: start" in failed.stdout
    assert "data_creation: start" not in failed.stdout
    assert "FAILED at stage model_preprocessing (exit 2)" in failed.stdout
    assert "stage model_preparation" not in failed.stdout
    assert "model_preparation" not in failed.stderr, "the stage started ahead ends without a word"
    assert stage_processes(copy) == [], "the stage started ahead of the failed one is gone"


def test_a_real_format_station_file_goes_through_the_pipeline(copy):
    (copy / "own").mkdir()
    write_real_format_station(copy / "own/HOME.csv")
    write_params(copy / "own.toml", **TINY, **REAL_FORMAT, source="own")
    result = pipeline(copy, "--params", "own.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HOME.csv: 1057 of 1078 rows kept" in result.stderr  # stage logs go to stderr
    source = json.loads((copy / "data/source.json").read_text())
    assert {k: source["files"]["HOME"][k] for k in REAL_FORMAT_FLAWS} == REAL_FORMAT_FLAWS
    metrics = json.loads((copy / "models/metrics.json").read_text())
    assert set(metrics["forecast"]) == {"observed", "accepted"} and "skipped" in metrics["detector"]
    flags = pd.concat([pd.read_csv(copy / f"data/{split}/flags.csv") for split in ("train", "test")])
    readings = flags["observed"].notna()
    flagged = flags["flag"].isin(["spike", "level_shift", "drift", "stuck"])  # anything but gross errors
    assert flagged.sum() < 0.001 * readings.sum()
    overall = metrics["forecast"]["observed"]["all_stations"]
    assert overall["model"]["mae"] < overall["persistence"]["mae"]
    assert "climatology" in overall and "trained_stations" not in metrics["forecast"]["observed"]  # no holdout:
    assert "trained_stations" not in result.stdout  # one row per reference, with every baseline, not two alike
    assert 0.8 <= metrics["interval"]["observed"]["all_stations"]["model"]["coverage"] <= 0.97
    summary = (copy / "reports/summary.md").read_text()
    assert "daily maximum temperature, converted from °F" in summary
    assert "## Imported files" in summary and "Not scored: no ground-truth labels" in summary
    assert (copy / "reports/forecast_HOME.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_and_bad_options():
    help_text = subprocess.run(["bash", str(ROOT / "pipeline.sh"), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--from STAGE" in help_text.stdout
    bad = subprocess.run(["bash", str(ROOT / "pipeline.sh"), "--from", "nowhere"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert bad.returncode == 2 and "unknown stage 'nowhere'" in bad.stderr
    # Started with sh (dash on Debian and Ubuntu), the script runs itself again under bash.
    with_sh = subprocess.run(["sh", str(ROOT / "pipeline.sh"), "--help"], capture_output=True, text=True)
    assert with_sh.returncode == 0 and with_sh.stdout == help_text.stdout


def test_one_copy_of_the_code_serves_projects_in_other_folders(copy, tmp_path):
    """--root: data, models, reports and logs go to that folder, the code's own folder stays as it was,
    and the next run there finds every stage up to date; a folder that is not there is refused."""
    project = tmp_path / "project"
    project.mkdir()
    before = sorted(path.relative_to(copy) for path in copy.rglob("*"))
    result = pipeline(copy, "--params", "tiny.toml", "--root", str(project))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / "models/metrics.json").is_file() and (project / "reports/summary.md").is_file()
    assert len(list((project / "logs").glob("pipeline-*.log"))) == 1
    assert f"Metrics: {project}/models/metrics.json" in result.stdout
    assert sorted(path.relative_to(copy) for path in copy.rglob("*")) == before
    again = pipeline(copy, "--params", "tiny.toml", "--root", str(project))
    assert again.returncode == 0 and again.stdout.count(": up to date") == 4
    assert "warning" not in again.stdout
    # --from reuses an earlier stage's artifacts as they are, and says so where they no longer match
    (copy / "wider.toml").write_text((copy / "tiny.toml").read_text().replace("window = 5 ", "window = 7 ", 1))
    reused = pipeline(copy, "--params", "wider.toml", "--root", str(project), "--from", "model_preparation")
    assert reused.returncode == 0 and reused.stdout.count(": up to date") == 2, reused.stdout
    assert ("pipeline: warning: model_preprocessing is not up to date (its parameters changed); --from "
            "model_preparation reuses its artifacts as they are: run from model_preprocessing") in reused.stdout
    assert "data_creation is not up to date" not in reused.stdout
    missing = pipeline(copy, "--params", "tiny.toml", "--root", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "--root" in missing.stderr and "folder not found" in missing.stderr


def test_a_link_to_the_script_elsewhere_runs_the_project_it_links_to(copy, tmp_path):
    """As a user puts a command on the PATH (``ln -s …/pipeline.sh ~/bin/pipeline``): the script found its
    stage list beside the link, not beside itself, and stopped at its first lines."""
    link = tmp_path / "bin" / "pipeline"
    link.parent.mkdir()
    link.symlink_to(copy / "pipeline.sh")
    run = subprocess.run(["bash", str(link), "--params", str(copy / "tiny.toml"), "--setup-only"], cwd=tmp_path,
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stderr, run.stderr
    usage = subprocess.run(["bash", str(link), "--help"], capture_output=True, text=True, timeout=60)
    assert "Runs data_creation model_preprocessing model_preparation model_testing in order" in usage.stdout


def test_a_second_run_is_turned_away_while_one_holds_the_lock(copy):
    with lock_held(copy):
        result = pipeline(copy, "--params", "tiny.toml")
    assert result.returncode == 4
    assert "another run" in result.stderr
    # the holder died without cleaning up: its lock must not block the next run, which
    # gets as far as its first stage (that stage then fails: this copy has no artifacts)
    after = pipeline(copy, "--params", "tiny.toml", "--from", "model_testing")
    assert after.returncode == 2 and "stage model_testing: start" in after.stdout


@pytest.mark.parametrize("stage", ["model_preparation.py", "3"])
def test_from_takes_a_stage_s_script_or_number_too(copy, stage):
    """As the README's table names them: the script, or the stage's number (this copy has no artifacts, so the
    stage it starts at fails at once, after saying it started)."""
    result = pipeline(copy, "--params", "tiny.toml", "--from", stage)
    assert result.returncode == 2 and "stage model_preparation: start" in result.stdout
    assert "stage model_preprocessing" not in result.stdout


def test_wait_gives_up_after_its_timeout_with_a_clear_message(copy):
    (copy / "logs").mkdir()
    (copy / "logs/.pipeline.pid").write_text("12345\n")
    with lock_held(copy):
        result = pipeline(copy, "--params", "tiny.toml", "--wait", "1")
    assert result.returncode == 4
    assert "another run (pid 12345) is using" in result.stderr and "waiting up to 1s" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pipeline: gave up after 1s")
    assert not (copy / "models/metrics.json").exists()


def test_two_runs_started_together_run_one_after_the_other(copy, built):
    for folder in ("data", "models"):  # artifacts to rerun the last stage on
        shutil.copytree(built[0] / folder, copy / folder)
    env = dict(os.environ, PYTHON=sys.executable)
    command = ["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml", "--from", "model_testing",
               "--wait", "240"]
    runs = [subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    results = [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]
    assert [code for code, _, _ in results] == [0, 0], results
    waited = [err for _, _, err in results if "waiting up to 240s" in err]
    assert len(waited) == 1
    # the logs show the two runs did not overlap: one started after the other was done
    spans = []
    for log in (copy / "logs").glob("pipeline-*.log"):
        lines = log.read_text().splitlines()
        assert lines[-1].split(" ", 2)[2].startswith("pipeline: done")
        spans.append((lines[0][:19], lines[-1][:19]))
    first, second = sorted(spans)
    assert len(spans) == 2 and first[1] <= second[0]


def test_errors_go_to_stderr_and_a_run_that_changed_nothing_says_so(copy):
    (copy / "bad.toml").write_text((copy / "tiny.toml").read_text().replace("cv_folds = 3", "cv_folds = 1"))
    failed = pipeline(copy, "--params", "bad.toml")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("data_creation: error:")
    assert "error:" not in failed.stdout
    assert "no stage of this run replaced its outputs" in failed.stdout


def test_a_failure_after_stage_1_names_only_the_stages_that_ran(copy):
    assert pipeline(copy, "--params", "tiny.toml").returncode == 0
    strict = copy / "strict.toml"
    strict.write_text((copy / "tiny.toml").read_text().replace("gate_min_improvement = 0.0",
                                                                "gate_min_improvement = 0.5"))
    result = pipeline(copy, "--params", "strict.toml")
    assert result.returncode == 3
    assert "no stage of this run replaced its outputs" in result.stdout  # stages 1-3 were up to date
    (copy / "strict.toml").write_text(strict.read_text().replace("gbr_max_iter = 60", "gbr_max_iter = 50"))
    result = pipeline(copy, "--params", "strict.toml")
    assert result.returncode == 3
    assert "data_creation: up to date" in result.stdout and "model_preprocessing: up to date" in result.stdout
    assert "stages that ran and replaced their outputs: model_preparation;" in result.stdout


def wait_for_line(root, line: str) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list((root / "logs").glob("pipeline-*.log")) if (root / "logs").exists() else []
        if logs and line in logs[0].read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"never logged: {line}")


def as_from_a_terminal() -> None:
    """Stop signals at their default actions, as a terminal starts a command, even where the tests run with
    some ignored (SIGINT in a shell's background job, SIGHUP under nohup), which every process they start
    would inherit and a shell cannot trap."""
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_DFL)


def what_still_runs(group: int, root) -> str:
    """The processes of a run that did not end (what each waits in, what it holds open) and its log, for the
    failure message; then the run is killed."""
    import signal

    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc.name)) != group:
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            waits = (proc / "wchan").read_text()
            held = sorted(os.readlink(fd) for fd in (proc / "fd").iterdir())
        except OSError:  # ended meanwhile
            continue
        lines.append(f"{proc.name} [{waits}] {command} holds {held}")
    logs = sorted((root / "logs").glob("pipeline-*.log"))
    os.killpg(group, signal.SIGKILL)
    return "\n".join([*lines, "log:", logs[0].read_text() if logs else "(none)"])


def lock_is_free(root) -> bool:
    import fcntl

    with open(root / "logs/.pipeline.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


@pytest.mark.parametrize(("name", "to_group", "code"), [("SIGTERM", False, 143), ("SIGHUP", False, 129),
                                                          ("SIGINT", True, 130), ("SIGHUP", True, 129)])
def test_a_signal_to_the_pipeline_or_its_group_stops_the_running_stage_and_the_log_tells_the_truth(
        copy, name, to_group, code):
    """Ctrl-C reaches the whole process group; a background stage of a script starts with SIGINT ignored, yet
    must stop, and only stages that finished are named."""
    import signal

    process = subprocess.Popen(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                               env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_from_a_terminal)
    wait_for_line(copy, "stage model_preprocessing: start")
    if to_group:
        os.killpg(process.pid, getattr(signal, name))
    else:
        process.send_signal(getattr(signal, name))
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"the pipeline did not end: {what_still_runs(process.pid, copy)}") from timeout
    assert process.returncode == code, (out, err)
    assert f"pipeline: stopped by {name}" in out
    # The signal may come before the stage was told to run (then it never ran), or after it finished. Its end
    # line says how long it ran, whether it stopped or finished: "stage model_preprocessing: end, 0.4s, exit 0".
    ended = re.findall(r"stage model_preprocessing: end, [0-9.]+s, exit ([0-9]+)$", out, re.MULTILINE)
    finished = ended == ["0"]
    assert finished or all(exit_code == str(code) for exit_code in ended), out
    assert "Traceback" not in err and "internal error" not in err
    named = out.split(f"pipeline: stopped by {name}; ")[1]
    assert ("model_preprocessing" in named) == finished, (out, err)  # named if, and only if, it finished
    assert "model_preparation" not in err, "the stage started ahead ends without a word"
    assert stage_processes(copy) == []
    assert lock_is_free(copy), "no orphaned stage still holds it"
    assert pipeline(copy, "--params", "tiny.toml").returncode == 0


def test_a_stage_that_does_not_stop_when_signalled_is_killed_after_the_grace(copy):
    """Ctrl-C always ends the run: a stage still running after PIPELINE_STOP_GRACE seconds is killed (long
    before the stage's own sleep, 300 s, would end it)."""
    import signal

    (copy / "model_preprocessing.py").write_text(
        "import signal, sys, time\n"
        "for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
        "    signal.signal(stop, signal.SIG_IGN)\n"
        "sys.stdin.readline()\n"
        "print('deaf stage running', flush=True)\n"
        "time.sleep(300)\n")
    process = subprocess.Popen(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                               env=dict(os.environ, PYTHON=sys.executable, PIPELINE_STOP_GRACE="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_from_a_terminal)
    wait_for_line(copy, "deaf stage running")
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"the pipeline did not end: {what_still_runs(process.pid, copy)}") from timeout
    assert process.returncode == 143, (out, err)
    assert "stage model_preprocessing: did not stop within 1s of SIGTERM; killed (SIGKILL)" in out
    assert re.search(r"stage model_preprocessing: end, [0-9.]+s, exit 137$", out, re.MULTILINE), out
    assert "pipeline: stopped by SIGTERM; stages that ran and replaced their outputs: data_creation;" in out
    assert stage_processes(copy) == [] and lock_is_free(copy)


def test_a_stop_grace_that_is_not_whole_seconds_is_refused(copy):
    result = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                            env=dict(os.environ, PYTHON=sys.executable, PIPELINE_STOP_GRACE="5s"),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "pipeline: error: PIPELINE_STOP_GRACE takes whole seconds, got '5s'"


def test_a_killed_pipeline_leaves_no_stage_running_nor_the_lock_held_and_the_next_run_cleans_up(copy, tmp_path):
    import time

    clean = tmp_path / "clean"
    shutil.copytree(copy, clean)
    assert pipeline(clean, "--params", "tiny.toml").returncode == 0
    process = subprocess.Popen(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                               env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("model_preparation.py" in p for p in stage_processes(copy)):
        time.sleep(0.05)
    assert any("--wait-for-go" in p for p in stage_processes(copy)), "model_preparation was started ahead"
    process.kill()  # SIGKILL: no trap runs, nothing is told; the kernel tells the stages
    process.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (stage_processes(copy) or not lock_is_free(copy)):
        time.sleep(0.05)
    assert stage_processes(copy) == [] and lock_is_free(copy)
    assert list((copy / "logs").glob(".fifos-*")), "the killed run's FIFOs are left..."
    busy = pipeline(copy, "--params", "tiny.toml")
    assert busy.returncode == 0, busy.stdout + busy.stderr
    assert not list((copy / "logs").glob(".fifos-*")), "...and the next run removes them"
    assert (copy / "models/metrics.json").read_bytes() == (clean / "models/metrics.json").read_bytes()


def test_a_python_without_the_requirements_is_named(copy, tmp_path):
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # no site-packages: no numpy
    bare.chmod(0o755)
    result = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                            env=dict(os.environ, PYTHON=str(bare)), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"pipeline: error: PYTHON={bare} lacks numpy")


def test_a_rerun_does_only_the_work_whose_inputs_parameters_or_code_changed(copy):
    def ran(result):
        assert result.returncode == 0, result.stdout + result.stderr
        return [stage for stage in cli.STAGES if f"stage {stage}: start" in result.stdout]

    assert ran(pipeline(copy, "--params", "tiny.toml")) == cli.STAGES
    metrics = (copy / "models/metrics.json").read_bytes()
    again = pipeline(copy, "--params", "tiny.toml")
    assert ran(again) == [] and all(f"{stage}: up to date" in again.stdout for stage in cli.STAGES)
    assert (copy / "models/metrics.json").read_bytes() == metrics

    (copy / "tiny.toml").write_text((copy / "tiny.toml").read_text().replace("report_flags = 20", "report_flags = 5"))
    assert ran(pipeline(copy, "--params", "tiny.toml")) == ["model_testing"]

    with open(copy / "model_preparation.py", "a") as handle:
        handle.write("# an edit\n")
    assert ran(pipeline(copy, "--params", "tiny.toml")) == ["model_preparation", "model_testing"]

    features = copy / "data/train/features.csv"
    features.write_bytes(features.read_bytes() + b"\n")  # an artifact whose hash no longer matches
    assert ran(pipeline(copy, "--params", "tiny.toml")) == ["model_preprocessing"]  # same bytes again after it

    raw = copy / "data/train/raw/ST001.csv"
    raw.write_bytes(raw.read_bytes() + b"\n")  # stage 1 writes the same bytes again: nothing after it reruns
    assert ran(pipeline(copy, "--params", "tiny.toml")) == ["data_creation"]
    (copy / "tiny.toml").write_text((copy / "tiny.toml").read_text().replace("min_steps = 60", "min_steps = 61"))
    assert ran(pipeline(copy, "--params", "tiny.toml")) == ["data_creation", "model_preprocessing"]

    strict = copy / "strict.toml"
    strict.write_text((copy / "tiny.toml").read_text().replace("gate_min_improvement = 0.0",
                                                                "gate_min_improvement = 0.5"))
    assert pipeline(copy, "--params", "strict.toml").returncode == 3
    assert pipeline(copy, "--params", "strict.toml").returncode == 3  # a failed gate is never "up to date"
    assert ran(pipeline(copy, "--params", "tiny.toml", "--force")) == cli.STAGES


@pytest.mark.parametrize(("args", "message"), [
    (["--params", "folder"], "--params folder is a folder, not a parameters file"),
    (["--params", "fifo"], "--params fifo is not a regular file (a FIFO, device or terminal)"),
    (["--params", "/dev/zero"], "--params /dev/zero is not a regular file"),
    (["--params", "loop"], "--params loop is not a file on disk (a pipe, a link loop or a dangling link)"),
    (["--params", "missing.toml"], "parameters file not found: missing.toml"),
    (["--wait", "1e23"], "--wait takes whole seconds from 0 to 604800, got '1e23'"),
    (["--wait", "99999999999999999999999"], "--wait takes whole seconds from 0 to 604800"),
    (["--wait", "-1"], "--wait takes whole seconds"),
])
def test_a_bad_option_is_one_accurate_line_before_anything_is_touched(copy, args, message):
    (copy / "folder").mkdir()
    os.mkfifo(copy / "fifo")
    (copy / "loop").symlink_to(copy / "loop")
    result = pipeline(copy, *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"pipeline: error: {message}")
    assert not (copy / "logs").exists()


def test_parameters_edited_during_a_run_stop_it_before_the_next_stage_reads_them(copy, tmp_path):
    """Each stage reads the parameters file as it starts: edited while stage 1 ran, stages 2-4 would have
    worked from other parameters than stage 1 (a horizon changed mid-run gave a model accepted for one
    step ahead under a file saying three) and the run ended "done". It stops instead, and the next run
    remakes what the change touched."""
    params = copy / "tiny.toml"
    editing = tmp_path / "python"  # the interpreter as stage 1 starts: the user saves an edit meanwhile
    editing.write_text(f"""#!/bin/bash
case "$*" in *data_creation.py*) sed -i 's/^window = 5 /window = 7 /' {params} ;; esac
exec {sys.executable} "$@"
""")
    editing.chmod(0o755)
    result = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", str(params)], cwd=copy,
                            env=dict(os.environ, PYTHON=str(editing)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stage data_creation: end" in result.stdout and "stage model_preprocessing: start" not in result.stdout
    assert (f"pipeline: STOPPED before stage model_preprocessing: {params} changed (or went) during this run"
            in result.stdout), result.stdout
    assert "stages that ran and replaced their outputs: data_creation;" in result.stdout
    assert "window = 7 " in params.read_text()
    again = pipeline(copy, "--params", "tiny.toml")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "data_creation: up to date" in again.stdout and "stage model_preprocessing: start" in again.stdout


def test_parameters_on_standard_input_are_read_from_the_file_behind_it(copy):
    with open(copy / "tiny.toml") as stdin:
        result = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", "/dev/stdin", "--from",
                                 "model_testing"], cwd=copy, env=dict(os.environ, PYTHON=sys.executable),
                                stdin=stdin, capture_output=True, text=True, timeout=300)
    assert f"params {copy / 'tiny.toml'}" in result.stdout  # every stage reads the file, not a stream


def test_a_run_writes_nothing_outside_its_data_models_reports_and_logs_folders(copy, tmp_path):
    """The property behind every write: a full run, and a run with each folder replaced by a link or with
    the source inside one, changes no path outside data/, models/, reports/ and logs/ of its project."""
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    write_real_format_station(own / "AWAY.csv")
    write_params(copy / "own.toml", **TINY, **REAL_FORMAT, source=str(own))
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep/file.txt").write_text("mine")

    def everything_else() -> dict[str, bytes]:
        own_folders = [copy / name for name in ("data", "models", "reports", "logs", "__pycache__")]
        return {str(p): p.read_bytes() if p.is_file() and not p.is_symlink() else b"<not a file>"
                for p in tmp_path.rglob("*") if not any(p == f or f in p.parents for f in own_folders)}

    before = everything_else()
    for params in ("tiny.toml", "own.toml"):
        assert pipeline(copy, "--params", params).returncode == 0
        assert everything_else() == before
    for folder in ("data", "data/train", "data/test/raw", "data/truth", "models", "models/sets", "reports", "logs"):
        saved = tmp_path / "saved"
        (copy / folder).rename(saved)
        (copy / folder).symlink_to(outside, target_is_directory=True)
        result = pipeline(copy, "--params", "tiny.toml", "--force")
        assert result.returncode == 2 and f"{copy / folder}: a symbolic link" in result.stderr, result.stderr
        (copy / folder).unlink()
        saved.rename(copy / folder)
        assert everything_else() == before
    for source in ("data/truth", "data/train/raw", "models"):
        (copy / source / "README.txt").write_text("the user's")
        (copy / "inside.toml").write_text((copy / "own.toml").read_text().replace(f'"{own}"', f'"{source}"'))
        result = pipeline(copy, "--params", "inside.toml")
        # Refused as a source inside the pipeline's folders, or, in a folder a stage replaces whole, as a file
        # the stage did not write (checked before any stage runs).
        assert result.returncode == 2 and ("inside a folder the pipeline writes" in result.stderr
                                           or ("README.txt" in result.stderr and "not the pipeline's" in result.stderr))
        assert (copy / source / "README.txt").read_text() == "the user's"
        (copy / "inside.toml").unlink()


def test_the_default_run_prints_the_scores_the_results_page_shows(copy):
    """docs/results.md shows what a fresh clone's ``./pipeline.sh`` prints: a change that moves a figure must
    regenerate the page, or this fails (the held-out rows had gone stale once)."""
    run = pipeline(copy)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith("Test MAE / RMSE in °C against the truth"))
    end = next(i for i, line in enumerate(lines) if line.startswith("  flagged on fronts"))
    printed = "\n".join(lines[begin:end + 1])
    page = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    shown = page.split("```\n", 2)[1]  # the page's first block: the default run's output
    assert printed + "\n" == shown


@pytest.mark.parametrize("bsd_realpath", [False, True])
def test_a_system_without_linux_s_tools_is_told_what_it_lacks_before_anything_is_touched(copy, tmp_path,
                                                                                           bsd_realpath):
    """macOS has bash 3.2, BSD tools (a realpath without -e, a date without %N) and no flock: the script failed
    on its first lines with an unrelated message."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("date", "sha256sum", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if bsd_realpath:
        (bin_dir / "realpath").write_text('#!/bin/bash\n[ "$1" = -e ] && exit 1\necho "$@"\n')
        (bin_dir / "realpath").chmod(0o755)
    else:
        (bin_dir / "realpath").symlink_to(shutil.which("realpath"))
    before = sorted(path.name for path in copy.iterdir())
    run = subprocess.run([shutil.which("bash"), str(copy / "pipeline.sh")], cwd=copy, env={"PATH": str(bin_dir)},
                         capture_output=True, text=True, timeout=60)
    lacks = "GNU coreutils (realpath -e, date +%N, sha256sum, mv -T); flock (util-linux)" if bsd_realpath \
        else "flock (util-linux)"
    assert run.returncode == 2
    assert run.stderr.startswith(f"pipeline: error: this system lacks {lacks}: pipeline.sh is written for Linux;")
    assert sorted(path.name for path in copy.iterdir()) == before


def test_the_stages_run_with_docstrings_stripped(copy):
    """PYTHONOPTIMIZE=2 (python -OO) strips docstrings: every stage stopped at once, its options described by
    its docstring's first line."""
    run = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy,
                         env=dict(os.environ, PYTHON=sys.executable, PYTHONOPTIMIZE="2"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def broken_pandas(folder: Path) -> Path:
    """A folder whose ``pandas`` fails to import, as another Python's copy put first by PYTHONPATH does."""
    (folder / "pandas").mkdir(parents=True)
    (folder / "pandas" / "__init__.py").write_text('raise ImportError("built for another Python")\n')
    return folder


def test_a_stage_that_imports_another_copy_of_a_library_through_pythonpath_names_it(copy, tmp_path):
    other = broken_pandas(tmp_path / "site")
    run = subprocess.run([sys.executable, "data_creation.py", "--params", "tiny.toml"], cwd=copy,
                         env=dict(os.environ, PYTHONPATH=str(other)), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"data_creation: error: ImportError: built for another Python in {other}/pandas/__init__.py, which "
        f"PYTHONPATH={other} puts before this Python's own packages: unset PYTHONPATH, or run ./pipeline.sh, "
        "which ignores it with its .venv")


def test_the_pipeline_runs_its_venv_without_a_pythonpath_or_pythonhome_set_for_other_work(copy, tmp_path):
    """A cluster's module system sets PYTHONPATH to another Python's packages (or PYTHONHOME to its home): the
    .venv's Python imported them first and the stages failed, or did not start at all."""
    (copy / ".venv" / "bin").mkdir(parents=True)
    (copy / ".venv" / "bin" / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    (copy / ".venv" / "bin" / "python").chmod(0o755)
    marker = hashlib.sha256((copy / "requirements.txt").read_bytes()).hexdigest()
    (copy / ".venv" / ".requirements.sha256").write_text(marker + "\n")
    other = broken_pandas(tmp_path / "site")
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env.update(PYTHONPATH=str(other), PYTHONHOME="/nonexistent")
    run = subprocess.run(["bash", str(copy / "pipeline.sh"), "--params", "tiny.toml"], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"pipeline: PYTHONPATH={other} is ignored: .venv holds what the stages import" in run.stderr
    assert "pipeline: PYTHONHOME=/nonexistent is ignored" in run.stderr
    assert not list(copy.glob(".venv.broken-*"))


def test_a_venv_whose_python_no_longer_runs_is_moved_aside_and_made_again(copy, tmp_path):
    """The Python a .venv was made from removed or upgraded (its interpreter a dangling link): the run stopped
    with 'could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)'. The old .venv is moved aside,
    never deleted, and a new one made (here by a stand-in python3 that makes a venv and installs nothing)."""
    venv = copy / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/nonexistent/python3")
    (venv / "owned.txt").write_text("installed by its owner\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    stand_in.write_text('#!/bin/bash\n'
                        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
                        '  mkdir -p "$3/bin" && printf "#!/bin/bash\\nexit 0\\n" > "$3/bin/python"\n'
                        '  chmod +x "$3/bin/python"\n'
                        'fi\n')
    stand_in.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    run = subprocess.run(["bash", str(copy / "pipeline.sh"), "--setup-only"], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    aside = list(copy.glob(".venv.broken-*"))
    assert len(aside) == 1 and (aside[0] / "owned.txt").read_text() == "installed by its owner\n"
    assert f"moved it aside to {aside[0].name}" in run.stderr
    assert (venv / "bin" / "python").is_file() and (venv / ".requirements.sha256").is_file()
