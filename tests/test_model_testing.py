import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, model_preparation, model_testing, run_all, run_stage, snapshot, write_params

from station_forecast import errors, manifest, scoring, storage


def test_metrics_file_has_stable_keys_and_the_model_beats_both_baselines(built):
    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    assert {"forecast", "detector", "gate", "gate_reference", "model", "stations", "model_sha256"} <= set(metrics)
    assert set(metrics["forecast"]) == {"truth", "observed", "accepted"}
    for reference in ("truth", "observed", "accepted"):
        trained = metrics["forecast"][reference]["trained_stations"]
        assert set(trained) == {"model", "persistence", "climatology", "drift", "neighbours_ridge"}
        assert set(trained["model"]) == {"n", "mae", "rmse", "r2"}
        assert trained["model"]["n"] == trained["persistence"]["n"] == trained["climatology"]["n"] \
            == trained["drift"]["n"] == trained["neighbours_ridge"]["n"]
        assert trained["model"]["mae"] < trained["drift"]["mae"]
        assert trained["model"]["mae"] < trained["persistence"]["mae"] < trained["climatology"]["mae"]
        assert "climatology" not in metrics["forecast"][reference]["holdout_stations"]
    assert metrics["gate"]["passed"] is True


def test_detector_scores_per_kind():
    flags = pd.DataFrame({
        "flag": ["spike", "none", "spike", "stuck", "none", "missing", "none", "drift", "none", "none", "gross"],
        "anomaly": ["spike", "spike", "none", "stuck", "drift", "missing", "none", "drift", "none", "none",
                    "none"],
        "event": ["none", "none", "cold_snap", "none", "none", "none", "heat_wave", "none", "none", "front",
                  "front"],
    })
    scores = scoring.detector_scores(flags)
    assert scores["any"] == {"days": 5, "flagged": 5, "precision": 0.6, "recall": 0.6, "f1": 0.6}
    # for spikes only spike days and normal days count: 1 of 3 flags right (a flag of any kind on a normal
    # day is wrong), 1 of 2 spikes found
    assert scores["spike"]["precision"] == 0.3333 and scores["spike"]["recall"] == 0.5
    assert scores["drift"]["recall"] == 0.5
    assert scores["level_shift"]["recall"] is None
    # of the four weather days with no fault (a cold snap, a heat wave, two fronts), two were flagged
    assert scores["weather_events"] == {"days": 4, "flagged": 2, "share": 0.5}
    assert scores["fronts"] == {"days": 2, "flagged": 1, "share": 0.5}


def test_score_matches_definitions():
    actual, predicted = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 3.0, 2.0])
    assert scoring.score(actual, predicted) == {"n": 4, "mae": 0.75, "rmse": round(np.sqrt(5 / 4), 4), "r2": 0.0}




def test_scores_read_the_rows_with_a_reference_and_only_the_columns_they_score():
    frame = pd.DataFrame({"station": ["A", "B", "A", "B"], "observed": [1.0, np.nan, 3.0, 4.0],
                          "model": [1.5, 2.0, 2.5, 4.5], "features_kept_for_the_report": [9.0] * 4})
    rows = scoring.scored_rows(frame, "observed", ["model"])
    assert list(rows.columns) == ["observed", "station", "model"]
    assert rows.index.tolist() == [0, 2, 3] and rows["model"].tolist() == [1.5, 2.5, 4.5]

def test_gate_failure_exits_3_with_a_clear_line(project, capsys):
    root, _ = project
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_steps=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == errors.EXIT_GATE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("model_testing: error: quality gate failed: model MAE")
    assert "flagged by the detector" not in err  # judged against the truth, which no flag changes


def _scores(model: float, persistence: float, n: int) -> dict:
    return {"all_stations": {"model": {"mae": model, "n": n}, "persistence": {"mae": persistence, "n": n}}}


def test_a_failed_gate_on_the_readings_says_how_many_were_flagged_and_the_scores_without_them():
    metrics = {"gate_reference": "observed",
               "forecast": {"observed": _scores(1.978, 1.897, 365), "accepted": _scores(2.288, 2.592, 267)}}
    assert scoring.flagged_aside(metrics) == (
        "98 of the 365 readings scored were flagged by the detector; against the other 267 (accepted, a "
        "reference beside the gate) model MAE 2.288 vs persistence 2.592: check the flags (reports/summary.md) "
        "before trusting either")
    metrics["forecast"]["accepted"] = _scores(1.978, 1.897, 365)
    assert scoring.flagged_aside(metrics) == ""
    metrics["forecast"]["accepted"] = {"all_stations": {}}
    assert scoring.flagged_aside(metrics).startswith("365 of the 365 readings scored were flagged by the detector:")
    assert scoring.flagged_aside({**metrics, "gate_reference": "truth"}) == ""


def test_a_failed_gate_without_ground_truth_names_the_flagged_readings_it_scored(project, capsys):
    root, _ = project
    for path in (root / "data/truth").glob("ST*.csv"):
        path.unlink()
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_steps=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == errors.EXIT_GATE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    scores = json.loads((root / "models/metrics.json").read_text())["forecast"]
    rows, kept = (scores[name]["all_stations"]["model"]["n"] for name in ("observed", "accepted"))
    assert 0 < kept < rows
    assert f"; {rows - kept:,} of the {rows:,} readings scored were flagged by the detector; against the other " \
           f"{kept:,} (accepted" in err and err.endswith("keeps the last accepted model")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _rerecord(path, sign: bool) -> None:
    """Record a file's new hash in the manifest, and with ``sign`` its signature too."""
    manifest_path = path.parent / "manifest.json"
    record = json.loads(manifest_path.read_text())
    stage = "model_preparation" if path.name == "model.joblib" else "model_preprocessing"
    record["stages"][stage]["outputs"][f"models/{path.name}"] = storage.sha256_file(path)
    if sign:
        record["stages"][stage]["signatures"][f"models/{path.name}"] = manifest.signature(path)
    manifest_path.write_text(json.dumps(record))


def _corrupt_and_rerecord(path):
    """Damage a file and its manifest entry alike, as a disk fault before hashing and signing would."""
    path.write_bytes(b"\x80\x04not a pickle")
    _rerecord(path, sign=True)


def _replace_and_rehash(path):
    """What someone who can write models/ but cannot read the signing key can do."""
    path.write_bytes(b"\x80\x04not a pickle")
    _rerecord(path, sign=False)


@pytest.mark.parametrize(("file", "damage", "message"), [
    ("model.joblib", lambda p: p.unlink(), "model.joblib: missing; rerun model_preparation.py"),
    ("scaler.joblib", lambda p: p.unlink(), "scaler.joblib: missing; rerun model_preprocessing.py"),
    ("model.joblib", _truncate, "model.joblib: does not match its SHA-256 in the manifest"),
    ("scaler.joblib", lambda p: p.write_bytes(b"junk"), "scaler.joblib: does not match its SHA-256"),
    ("model.joblib", _corrupt_and_rerecord, "model.joblib: cannot be loaded (KeyError); rerun model_preparation.py"),
    ("model.joblib", _replace_and_rehash, "model.joblib: not signed with this machine's model-signing key"),
    # model.json also holds the scaler's hash, which catches the damaged scaler first
    ("scaler.joblib", _corrupt_and_rerecord, "model.joblib: was trained with another scaler than"),
])
def test_missing_damaged_or_corrupt_artifact_is_refused_and_nothing_changes(project, capsys, file, damage, message):
    root, params = project
    damage(root / "models" / file)
    before = snapshot(root)
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert snapshot(root) == before


def test_model_from_another_scikit_learn_is_refused(project, capsys):
    root, params = project
    manifest_path = root / "models/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["model_preparation"]["libraries"]["scikit-learn"] = "0.24.2"
    manifest_path.write_text(json.dumps(manifest))
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    assert "written with scikit-learn 0.24.2" in capsys.readouterr().err


def test_without_ground_truth_the_detector_is_not_scored(project):
    root, params = project
    for path in (root / "data/truth").glob("ST*.csv"):
        path.unlink()
    assert run_stage(model_testing, root, params) == 0
    metrics = json.loads((root / "models/metrics.json").read_text())
    assert "skipped" in metrics["detector"] and metrics["gate_reference"] == "observed"
    assert set(metrics["forecast"]) == {"observed", "accepted"}


def test_truth_for_some_stations_only_is_refused(project, capsys):
    root, params = project
    (root / "data/truth/ST002.csv").unlink()
    before = snapshot(root)
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    assert "ST002.csv: missing, while other stations have ground truth" in capsys.readouterr().err
    assert snapshot(root) == before


def test_observed_scores_count_every_test_reading_and_accepted_ones_are_a_subset(built):
    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    test = pd.read_csv(root / "data/test/features.csv")
    forecast_rows = test["target"].notna().sum()  # every test reading that has a forecast
    observed = metrics["forecast"]["observed"]["all_stations"]["model"]["n"]
    accepted = metrics["forecast"]["accepted"]["all_stations"]["model"]["n"]
    flags = pd.read_csv(root / "data/test/flags.csv")
    assert observed == forecast_rows
    assert accepted == forecast_rows - test.merge(
        flags[flags["flag"] != "none"].rename(columns={"date": "target_date"}), on=["station", "target_date"]
    )["target"].notna().sum() < observed


def test_a_held_out_station_is_scored_on_the_test_period_only(built):
    root, _ = built
    test_start = json.loads((root / "data/source.json").read_text())["test_start"]
    predictions = pd.read_csv(root / "reports/predictions.csv")
    held_out = pd.read_csv(root / "data/truth/stations.csv").query("role == 'holdout'")["station"]
    rows = predictions[predictions["station"].isin(held_out)]
    assert len(rows) and rows["target_date"].min() >= test_start
    rows = rows.dropna(subset=["clean_temperature"])  # the forecast beyond the record has nothing to score
    assert predictions["target_date"].min() >= test_start
    metrics = json.loads((root / "models/metrics.json").read_text())
    assert metrics["forecast"]["truth"]["holdout_stations"]["model"]["n"] == len(rows)


def accept_another_model(root) -> None:
    """Train and accept a different model (heavily regularised Ridge) in ``root``."""
    other = write_params(root / "other.toml", n_stations=5, n_years=3, test_steps=120, gbr_max_iter=60,
                         cv_folds=3, ridge_alpha=5000.0, tie_tolerance=0.5)
    assert run_stage(model_preparation, root, other) == 0
    assert run_stage(model_testing, root, other) == 0


def _accepted(root):
    return {p.name: p.read_bytes() for p in sorted((root / "models/accepted").iterdir())}


def test_failed_gate_keeps_the_accepted_model_and_restore_undoes_an_acceptance(project):
    root, params = project
    first = _accepted(root)
    assert "model.joblib" in first and "SIGNATURES.json" in first
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_steps=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == errors.EXIT_GATE
    assert _accepted(root) == first

    accept_another_model(root)  # the first accepted set becomes models/previous
    second = _accepted(root)
    assert second["model.joblib"] != first["model.joblib"]
    assert {p.name: p.read_bytes() for p in sorted((root / "models/previous").iterdir())} == first

    assert run_stage(model_testing, root, params, "--restore") == 0
    assert _accepted(root) == first


def test_restore_refuses_a_damaged_backup(project, capsys):
    root, params = project
    accept_another_model(root)  # the first accepted set becomes models/previous
    (root / "models/previous/model.joblib").write_bytes(b"junk")
    assert run_stage(model_testing, root, params, "--restore") == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "model.joblib: not signed with this machine's model-signing key" in err and "cannot be restored" in err


def test_interval_score_matches_definitions():
    actual = np.array([0.0, 1.0, 2.0, 10.0])
    lower, upper = np.array([-1.0, 0.0, 2.5, 0.0]), np.array([1.0, 2.0, 3.5, 4.0])
    s = scoring.interval_score(actual, lower, upper, 0.9)
    assert (s["coverage"], s["below"], s["above"], s["width"]) == (0.5, 0.25, 0.25, 2.25)
    # a reading beyond a bound costs 0.95 per degree; one inside costs 0.05 per degree from the bound
    lower_loss = (0.05 * 1 + 0.05 * 1 + 0.95 * 0.5 + 0.05 * 10) / 4
    upper_loss = (0.05 * 1 + 0.05 * 1 + 0.05 * 1.5 + 0.95 * 6) / 4
    assert s["pinball"] == round((lower_loss + upper_loss) / 2, 4)


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_report_has_the_summary_predictions_and_valid_figures(built):
    root, _ = built
    reports = root / "reports"
    stations = sorted(pd.read_csv(root / "data/test/features.csv")["station"].unique())
    expected = {f"forecast_{s}.png" for s in stations[:3]} | {"error_by_station.png", "residuals.png"}
    assert {p.name for p in reports.glob("[!.]*")} == expected | {"summary.md", "predictions.csv"}
    for name in expected:
        size = _png_size(reports / name)
        assert size == ((1200, 450) if name.startswith("forecast_") else (1000, 500)), name
        assert (reports / name).stat().st_size > 10_000  # drawn, not blank
    summary = (reports / "summary.md").read_text()
    metrics = json.loads((root / "models/metrics.json").read_text())
    coverage = metrics["interval"]["truth"]["all_stations"]["model"]["coverage"]
    for text in ("**Quality gate: passed**", "## 90% prediction interval", f"covers **{coverage:.1%}**",
                 "| spike |", *(f"]({name})" for name in expected)):
        assert text in summary, text
    predictions = pd.read_csv(reports / "predictions.csv")
    scored = predictions.dropna(subset=["clean_temperature"])
    assert len(scored) == metrics["forecast"]["truth"]["all_stations"]["model"]["n"]
    ahead = predictions[predictions["clean_temperature"].isna()]  # one forecast beyond each record's end
    assert len(ahead) == predictions["station"].nunique() and ahead["observed"].isna().all()
    assert (predictions["model_lower"] <= predictions["model"]).all()
    assert (predictions["model"] <= predictions["model_upper"]).all()


def test_rerun_gives_byte_identical_metrics_and_report(project):
    root, params = project
    before = snapshot(root)
    before.update({f"reports/{p.name}": p.read_bytes() for p in (root / "reports").iterdir()})
    assert run_stage(model_testing, root, params) == 0
    for name in ("models/metrics.json", *(k for k in before if k.startswith("reports/"))):
        assert (root / name).read_bytes() == before[name], name


def test_a_terminal_that_writes_ascii_only_gets_the_table_with_escapes_not_a_failed_stage(project):
    """In the C locale without Python's UTF-8 mode (a minimal container, a cron job) standard output is ASCII:
    the table's "°C" stopped stage 4 after its work, exit 1. It is written as an escape instead."""
    import os
    import subprocess
    import sys

    root, params = project
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, str(storage.ROOT / "model_testing.py"), "--root", str(root), "--params",
                           str(params)], env=env, capture_output=True, text=True, encoding="ascii")
    assert done.returncode == 0, done.stderr
    assert "Test MAE / RMSE in \\xb0C against the truth temperature" in done.stdout


def test_a_failed_gate_still_writes_the_report_and_says_so(project):
    root, _ = project
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_steps=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == errors.EXIT_GATE
    assert "**Quality gate: FAILED**" in (root / "reports/summary.md").read_text()


def test_interval_coverage_on_the_default_data_is_within_tolerance(default_built):
    metrics = json.loads((default_built / "models/metrics.json").read_text())
    level, tolerance = 0.9, 0.03
    assert metrics["interval"]["level"] == level
    for reference in ("truth", "accepted"):
        overall = metrics["interval"][reference]["all_stations"]
        assert abs(overall["model"]["coverage"] - level) <= tolerance, (reference, overall)
        # a narrower and better-scored band than persistence's, calibrated the same way
        assert overall["model"]["width"] < overall["persistence"]["width"]
        assert overall["model"]["pinball"] < overall["persistence"]["pinball"]
    # every reading, faulty ones included, is reported too, and cannot be covered better than the clean truth
    observed = metrics["interval"]["observed"]["all_stations"]["model"]["coverage"]
    assert observed < metrics["interval"]["truth"]["all_stations"]["model"]["coverage"]
    summary = (default_built / "reports/summary.md").read_text()
    assert summary.count("within 3 percentage points of the nominal 90%") >= 2


def test_on_the_default_simulation_the_detector_finds_faults_and_leaves_weather_alone(default_built):
    """Loose floors, far below the figures in the README, so that a broken detector fails here."""
    detector = json.loads((default_built / "models/metrics.json").read_text())["detector"]
    for kind, floor in (("spike", 0.8), ("stuck", 0.75), ("level_shift", 0.6), ("drift", 0.4)):
        assert detector[kind]["f1"] >= floor, (kind, detector[kind])
    assert detector["weather_events"]["share"] <= 0.02


class _Payload:
    """A pickle that, when loaded, leaves a marker file: what a planted model would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_model_never_runs_nor_becomes_the_accepted_one(project, tmp_path, capsys):
    import joblib

    root, params = project
    marker = tmp_path / "planted-code-ran"
    accepted = {p.name: p.read_bytes() for p in (root / "models/accepted").iterdir()}
    joblib.dump(_Payload(str(marker)), root / "models/model.joblib")
    _rerecord(root / "models/model.joblib", sign=False)  # the hash is right; the signature cannot be
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    assert "not signed with this machine's model-signing key" in capsys.readouterr().err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in (root / "models/accepted").iterdir()} == accepted


def test_a_planted_previous_set_is_never_restored(project, tmp_path, capsys):
    import joblib

    root, params = project
    assert run_stage(model_testing, root, params, "--restore") == errors.EXIT_BAD_INPUT  # no previous yet
    assert "no previously accepted model to restore" in capsys.readouterr().err
    accept_another_model(root)  # the first accepted set becomes models/previous
    marker = tmp_path / "planted-code-ran"
    previous = root / "models/previous"
    joblib.dump(_Payload(str(marker)), previous / "model.joblib")
    signatures = json.loads((previous / "SIGNATURES.json").read_text())
    signatures["model.joblib"] = "0" * 64  # rewritable, but not computable without the key
    (previous / "SIGNATURES.json").write_text(json.dumps(signatures))
    accepted = {p.name: p.read_bytes() for p in (root / "models/accepted").iterdir()}
    assert run_stage(model_testing, root, params, "--restore") == errors.EXIT_BAD_INPUT
    assert "not signed with this machine's model-signing key" in capsys.readouterr().err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in (root / "models/accepted").iterdir()} == accepted


def test_figures_keep_one_colour_per_predictor_true_titles_and_a_readable_year():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as colours
    import matplotlib.pyplot as plt

    from station_forecast import report

    scores = {"mae": 1.0}
    per_station = {"A": {p: scores for p in report.PREDICTORS}, "B": {"model": scores, "persistence": scores}}
    fig = report._error_by_station_figure(plt, per_station, "truth")
    assert "B never trained on" in fig.axes[0].get_title()
    fig = report._error_by_station_figure(plt, {"A": per_station["A"]}, "truth")
    assert "no climatology" not in fig.axes[0].get_title()

    days = pd.date_range("2000-01-01", periods=800, freq="D")
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"station": "A", "step": 1, "target_date": days.strftime("%Y-%m-%d"),
                         "model": rng.normal(size=800), "observed": rng.normal(size=800), "flag": "none"})
    rows["model_lower"], rows["model_upper"] = rows["model"] - 1, rows["model"] + 1
    rows["persistence"] = rows["model"]
    metrics = {"interval": {"level": 0.9, "truth": {"per_station": {"A": {"coverage": 0.9}}}},
               "gate_reference": "truth"}
    fig = report._forecast_figure(plt, rows, metrics)
    left, right = fig.axes[0].get_xlim()
    assert right - left < 450 and "last 365 steps" in fig.axes[0].get_title()  # 365 days and margins

    frame = rows.assign(clean_temperature=rows["observed"])
    fig = report._residuals_figure(plt, report.residual_histograms(frame, "truth"), "truth")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    colour = {label.split(" ")[0]: colours.to_hex(handle.get_facecolor()[:3])
              for handle, label in zip(handles, labels, strict=True)}
    assert colour == {p: colours.to_hex(report.COLOURS[p]) for p in ("model", "persistence")}
    assert "interval" not in fig.axes[0].get_title()
    plt.close("all")


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda t: t.replace("none", "broken", 1), "unknown anomaly label 'broken'"),
    (lambda t: t.replace("\n2019-01-02,", "\n2019-01-02,warm", 1), "clean_temperature is not numeric"),
    (lambda t: t.replace("\n2019-01-02,", "\n2019-01-01,", 1), "dates are not unique YYYY-MM-DD days"),
])
def test_damaged_ground_truth_is_refused_with_exit_2(project, capsys, edit, problem):
    import json

    from station_forecast.storage import sha256_file

    root, params = project
    path = root / "data/truth/ST002.csv"
    path.write_text(edit(path.read_text()))
    before = snapshot(root)
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT  # an edit: not what stage 1 wrote
    assert "ST002.csv: does not match its SHA-256 in the manifest" in capsys.readouterr().err
    record = json.loads((root / "models/manifest.json").read_text())  # as if stage 1 itself had written it so
    record["stages"]["data_creation"]["outputs"]["data/truth/ST002.csv"] = sha256_file(path)
    (root / "models/manifest.json").write_text(json.dumps(record))
    before = snapshot(root)
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    assert f"ST002.csv: damaged ground truth ({problem})" in capsys.readouterr().err
    assert snapshot(root) == before


@pytest.mark.parametrize(("stations", "days", "repeats"), [
    ("aabb", [1, 2, 1, 2], False),
    ("aabba", [1, 2, 1, 2, 3], False),  # a station's rows in two blocks
    ("aabba", [1, 2, 1, 2, 2], True),
    ("aaa", [3, 1, 2], False),  # out of date order
    ("aaa", [1, 3, 1], True),
    ("ab", [1, 1], False),
])
def test_a_day_twice_at_a_station_is_found_wherever_its_rows_are(stations, days, repeats):
    assert model_testing._repeats_a_day(pd.Series(list(stations)), np.array(days, dtype="i8")) is repeats


def test_a_fifo_planted_as_a_model_file_is_refused_at_once(project, capsys):
    import os

    root, params = project
    accept_another_model(root)  # the first accepted set becomes models/previous
    planted = root / "models/previous/model.joblib"
    planted.unlink()
    os.mkfifo(planted)
    assert run_stage(model_testing, root, params, "--restore") == errors.EXIT_BAD_INPUT
    assert "not a regular file (a FIFO)" in capsys.readouterr().err
    (root / "models/model.joblib").unlink()
    os.mkfifo(root / "models/model.joblib")
    assert run_stage(model_testing, root, params) == errors.EXIT_BAD_INPUT
    assert "model.joblib: not a regular file (a FIFO)" in capsys.readouterr().err


def test_forecasts_several_steps_ahead_are_scored_per_step_and_step_one_is_unchanged(built, horizon_built):
    from conftest import HORIZON

    one = json.loads((built[0] / "models/metrics.json").read_text())
    several = json.loads((horizon_built / "models/metrics.json").read_text())
    assert list(several["by_step"]) == [str(step) for step in range(1, HORIZON + 1)] and several["horizon"] == HORIZON
    assert several["by_step"]["1"]["forecast"] == one["by_step"]["1"]["forecast"]
    assert several["by_step"]["1"]["forecast"]["model"] == one["forecast"]["truth"]["trained_stations"]["model"]
    steps = [several["by_step"][str(step)] for step in range(1, HORIZON + 1)]
    persistence = [s["forecast"]["persistence"]["mae"] for s in steps]
    assert persistence == sorted(persistence) and persistence[0] < persistence[-1]
    assert all(s["forecast"]["model"]["mae"] < s["forecast"]["persistence"]["mae"] for s in steps)
    widths = [s["interval"]["model"]["width"] for s in steps]
    assert widths[0] < widths[-1] and all(0.75 <= s["interval"]["model"]["coverage"] <= 0.99 for s in steps)
    first = pd.read_csv(built[0] / "reports/predictions.csv")
    later = pd.read_csv(horizon_built / "reports/predictions.csv")
    pd.testing.assert_frame_equal(later[later["step"] == 1].reset_index(drop=True), first)
    ahead = later[later["target_date"] > later.dropna(subset=["clean_temperature"])["target_date"].max()]
    assert sorted(ahead["step"].unique()) == list(range(1, HORIZON + 1))  # the forecast beyond the record
    summary = (horizon_built / "reports/summary.md").read_text()
    assert "## By step ahead" in summary and "](error_by_step.png)" in summary
    assert (horizon_built / "reports/error_by_step.png").stat().st_size > 10_000


def test_pinball_loss_is_scikit_learns():
    from sklearn.metrics import mean_pinball_loss

    rng = np.random.default_rng(3)
    actual, quantile = rng.normal(size=500), rng.normal(size=500)
    for alpha in (0.05, 0.5, 0.95):
        assert scoring.pinball_loss(actual, quantile, alpha) == pytest.approx(
            mean_pinball_loss(actual, quantile, alpha=alpha), rel=1e-12)


def test_the_console_speaks_of_the_series_own_unit_when_it_is_not_a_temperature(built):
    from station_forecast import report

    metrics = json.loads((built[0] / "models/metrics.json").read_text())
    headers = [line.split(" (")[0] for line in report.console_table(metrics, {"unit": "none"}).splitlines()
               if line.startswith(("Test MAE", "90% prediction interval"))]  # before each reference's description
    assert len(headers) == 4 and not any("°C" in line or "temperature" in line for line in headers), headers
    assert "Test MAE / RMSE in the series' own unit against the observed value" in headers[1]
    assert "Test MAE / RMSE in °C against the observed temperature" in report.console_table(metrics, {"unit": "F"})


def test_the_neighbours_ridge_baseline_is_fitted_per_station_on_training_rows_only():
    """A station that follows its neighbour a day late is forecast from the neighbour's reading; the test
    period's targets never reach the fit (changing them changes no forecast)."""
    import model_preprocessing
    from model_preprocessing import TEST, TRAIN
    from station_forecast import quality_control

    dates = pd.date_range("2020-01-01", periods=800, freq="D")
    rng = np.random.default_rng(3)
    upwind = pd.Series(np.cumsum(rng.normal(0, 1, len(dates))) * 0.3 + rng.normal(0, 2, len(dates)), index=dates)
    readings = pd.DataFrame({"A": upwind, "B": upwind.shift(1) + rng.normal(0, 0.3, len(dates))})
    period = pd.DataFrame(np.where((dates < dates[600])[:, None], TRAIN, TEST).repeat(2, axis=1),
                          index=dates, columns=readings.columns)
    accepted = pd.DataFrame(True, index=dates, columns=readings.columns)
    coefs = quality_control.fit_climatology(readings.where(period == TRAIN))

    def forecast(observed):
        return model_preprocessing.neighbours_ridge(["B"], model_preprocessing.departures(readings, coefs), observed,
                                                    period, accepted, coefs, {"B": ["A"]}, 1)[0][1][:, 0]

    made = forecast(readings)
    test = (period["B"].shift(-1) == TEST).to_numpy() & ~np.isnan(made)
    error = np.abs(made - readings["B"].shift(-1).to_numpy())[test]
    assert np.nanmean(error) < 0.5 < np.nanmean(np.abs(readings["B"] - readings["B"].shift(-1)).to_numpy()[test])
    changed = readings.where(period == TRAIN, readings + 100.0)  # the test period's targets moved
    assert np.allclose(forecast(changed), made, equal_nan=True)


def test_the_test_period_is_forecast_and_scored_a_block_of_stations_at_a_time_with_the_same_bytes(
        project, monkeypatch):
    """A large network's test features and flags are read, forecast, scored and let go a block of whole
    stations at a time (read in batches that cut a station's rows in two), its predictions table kept on disk:
    the metrics and every report file are the bytes of scoring it all in one piece, and nothing is left on
    disk."""
    root, params = project
    assert run_stage(model_testing, root, params) == 0
    outputs = [root / "models/metrics.json", *sorted((root / "reports").iterdir())]
    at_once = {path.name: path.read_bytes() for path in outputs}
    read = []
    monkeypatch.setattr(model_testing, "TEST_BATCH_ROWS", 97)
    monkeypatch.setattr(model_testing, "SPILL_BYTES", 0)
    monkeypatch.setattr(storage, "read_table_batches", _counting(storage.read_table_batches, read))
    assert run_stage(model_testing, root, params) == 0
    assert len(read) > 6 and max(read) == 97
    assert {path.name: path.read_bytes() for path in outputs} == at_once
    assert not (root / "data" / model_testing.SPILL_FOLDER).exists()


def test_tables_are_read_a_block_of_whole_stations_at_a_time_and_rows_out_of_station_order_are_refused(tmp_path):
    """Batches of rows are cut at a station's end (a station longer than a batch stays whole), and the flags
    of stations without a test row go with the block of the next station that has one, or come last; a table
    whose rows are not station by station in name order is refused, naming it."""
    path = tmp_path / "flags.csv"
    pd.DataFrame({"station": list("AABBBCDD"), "date": [f"2020-01-0{i}" for i in range(1, 9)],
                  "observed": np.arange(8.0), "flag": "none"}).to_csv(path, index=False)
    batches = [list(batch["station"]) for batch in storage.read_station_batches(path, ["station", "date"], 2)]
    assert batches == [["A", "A"], ["B", "B", "B"], ["C"], ["D", "D"]]
    flags = model_testing.FlagsByStation(path)
    assert list(flags.up_to("A")["station"]) == ["A", "A"]
    assert list(flags.up_to("C")["station"]) == ["B", "B", "B", "C"]  # B has no test rows of its own
    assert list(flags.up_to(None)["station"]) == ["D", "D"] and flags.rows == 8
    assert flags.up_to(None).empty

    path.write_text("station,date,observed,flag\n")  # a header only: no rows, no error
    assert list(storage.read_station_batches(path, ["station", "date"], 2)) == []
    assert model_testing.FlagsByStation(path).up_to(None).empty

    pd.DataFrame({"station": list("ABA"), "date": ["2020-01-01"] * 3}).to_csv(path, index=False)
    with pytest.raises(errors.PipelineError, match=r"flags\.csv: rows are not station by station in name order"):
        list(storage.read_station_batches(path, ["station", "date"], 2))


def test_scores_added_up_block_by_block_are_those_of_all_rows_in_one_piece():
    """``scoring.Tally`` of blocks of whole stations gives the counts of scoring everything at once, and the
    same scores up to the last digit's rounding."""
    rng = np.random.default_rng(3)
    n = 600
    frame = pd.DataFrame({"station": np.repeat([f"S{i}" for i in range(6)], n // 6), "step": 1,
                          "clean_temperature": rng.normal(10, 5, n)})
    frame["observed"] = frame["clean_temperature"] + rng.normal(0, 1, n)
    frame["observed_accepted"] = frame["observed"].where(rng.random(n) > 0.1)
    for p in ("model", "persistence", "climatology", "drift", "neighbours_ridge"):
        frame[p] = frame["clean_temperature"] + rng.normal(0, 2, n)
    frame.loc[frame["station"] == "S5", ["climatology", "drift", "neighbours_ridge"]] = np.nan  # held out
    for p in ("model", "persistence"):
        frame[f"{p}_lower"], frame[f"{p}_upper"] = frame[p] - 2, frame[p] + 2
    flags = pd.DataFrame({"station": frame["station"], "date": np.arange(n).astype(str),
                          "flag": rng.choice(["none", "spike"], n)})
    truth = pd.DataFrame({"station": frame["station"], "date": flags["date"],
                          "anomaly": rng.choice(["none", "spike", "drift"], n), "event": "none"})
    whole = scoring.evaluate(frame, flags, truth, 0.9)
    tally = scoring.Tally(0.9, truth=True)
    for stations in (["S0", "S1"], ["S2"], ["S3", "S4", "S5"]):
        rows = frame["station"].isin(stations).to_numpy()
        tally.add_forecasts(frame[rows])
        tally.add_detector(flags[rows], truth[rows])
    blocks = tally.metrics()
    assert blocks["detector"] == whole["detector"] and blocks["stations"] == whole["stations"] == 6
    for reference in ("truth", "observed", "accepted"):
        assert blocks["forecast"][reference]["per_station"] == whole["forecast"][reference]["per_station"]
        for group in ("all_stations", "trained_stations", "holdout_stations"):
            for p, scores in whole["forecast"][reference][group].items():
                assert blocks["forecast"][reference][group][p] == pytest.approx(scores, abs=1e-4)
            for p, scores in whole["interval"][reference][group].items():
                assert blocks["interval"][reference][group][p] == pytest.approx(scores, abs=1e-4)
    assert set(whole["forecast"]["truth"]["holdout_stations"]) == {"model", "persistence"}


def _counting(batches, read: list):
    def counted(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            read.append(len(batch))
            yield batch
    return counted


def test_ground_truth_is_read_a_few_files_at_a_time_with_the_same_scores(project, monkeypatch):
    """A large network's truth (every day of every station) is parsed and checked a batch of files at a time,
    keeping only the test period's days: the scores are the ones reading it all at once gives."""
    root, params = project
    assert run_stage(model_testing, root, params) == 0
    at_once = (root / "models/metrics.json").read_bytes(), (root / "reports/predictions.csv").read_bytes()
    monkeypatch.setattr(model_testing, "TRUTH_FILES_PER_BATCH", 3)
    assert run_stage(model_testing, root, params) == 0
    assert ((root / "models/metrics.json").read_bytes(), (root / "reports/predictions.csv").read_bytes()) == at_once
    truth = model_testing.load_truth(root / "data/truth", ["ST001", "ST002", "ST003", "ST004"], since="2021-06-01")
    assert truth["date"].min() >= "2021-06-01" and truth["station"].is_monotonic_increasing


def test_a_held_out_station_of_another_climate_is_forecast_from_its_own(tmp_path):
    """A held-out station 14 °C colder than the stations trained on (a mountain beside lowlands) is forecast
    from its own climate, learned from its days before the test period, not pulled towards theirs."""
    (tmp_path / "own").mkdir()
    days = pd.date_range("2018-01-01", periods=3 * 365, freq="D")
    rng = np.random.default_rng(1)
    season = -np.cos(2 * np.pi * (days.day_of_year.to_numpy() - 20) / 365.25)
    shared = np.zeros(len(days))
    for day in range(1, len(days)):  # the region's weather: an AR(1) that every station reads
        shared[day] = 0.7 * shared[day - 1] + rng.normal(0, 2.5)
    for name, mean, amplitude in (("LOW1", 13.0, 9.0), ("LOW2", 12.0, 10.0), ("LOW3", 14.0, 8.0),
                                  ("PEAK", -1.0, 7.0)):  # the last by name is held out
        values = np.round(mean + amplitude * season + shared + rng.normal(0, 0.7, len(days)), 1)
        pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "temperature": values}).to_csv(
            tmp_path / f"own/{name}.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", holdout_stations=1)
    run_all(tmp_path / "root", params)
    predictions = pd.read_csv(tmp_path / "root/reports/predictions.csv").query("station == 'PEAK'")
    error = (predictions["model"] - predictions["observed"]).dropna()
    assert abs(error.mean()) < 0.5, f"held-out station forecast {error.mean():+.2f} °C off on average"
    held_out = json.loads((tmp_path / "root/models/metrics.json").read_text())[
        "forecast"]["observed"]["holdout_stations"]
    assert held_out["model"]["mae"] < held_out["persistence"]["mae"]


def test_a_station_never_trained_on_without_held_out_stations_is_named(tmp_path, capsys):
    """With data.holdout_stations = 0, a station whose days all fall in the test period is scored on the
    holdout_stations rows: stage 4 says which and why."""
    (tmp_path / "own").mkdir()
    days = pd.date_range("2018-01-01", periods=3 * 365, freq="D")
    rng = np.random.default_rng(0)
    weather = 8 + 10 * np.sin(np.arange(len(days)) / 58.0) + np.cumsum(rng.normal(0, 1, len(days))) * 0.1
    for name, first in (("EARLY", 0), ("OTHER", 0), ("LATE", len(days) - 100)):
        values = np.round(weather + rng.normal(0, 0.5, len(days)), 1)[first:]
        pd.DataFrame({"date": days[first:].strftime("%Y-%m-%d"), "temperature": values}).to_csv(
            tmp_path / f"own/{name}.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", holdout_stations=0)
    run_all(tmp_path / "root", params)
    warned = [line for line in capsys.readouterr().err.splitlines() if "never trained on" in line]
    assert len(warned) == 1 and "1 station(s)" in warned[0] and ": LATE (no training rows" in warned[0]
    metrics = json.loads((tmp_path / "root/models/metrics.json").read_text())
    assert metrics["forecast"]["observed"]["holdout_stations"]["model"]["n"] > 0


@pytest.mark.parametrize(("unit", "said"), [("F", ", converted from °F"), ("K", ", converted from kelvins"),
                                            ("0.1C", ", converted from tenths of °C"), ("C", "")])
def test_the_report_says_which_unit_readings_were_converted_from(built, unit, said):
    from station_forecast import report

    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    source = {"source": "own", "unit": unit, "stations": 2, "quantity": "mean", "frequency": "daily"}
    text = report.summary_markdown(metrics, source, {}, 0.05, pd.DataFrame())
    assert f"2 station files from `own` (daily mean temperature{said})." in text.splitlines()[2]


def test_the_report_counts_the_files_a_table_of_many_stations_came_in(built):
    """36 cities read from one wide table, or a long table's stations, are not 36 station files."""
    from station_forecast import report

    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    counts = dict.fromkeys(["rows", "kept", "missing_value", "missing_code", "bad_date", "future_date", "ancient_date",
                            "not_a_number", "impossible", "conflicting_duplicate", "repeated_rows", "train_steps",
                            "test_steps"], 0)
    files = {f"C{k}": {**counts, "file": "temperature.csv", "files": ["temperature.csv"], "out_of_order": False}
             for k in range(36)}
    source = {"source": "own", "unit": "K", "stations": 36, "quantity": "mean", "frequency": "daily", "files": files}
    text = report.summary_markdown(metrics, source, {}, 0.05, pd.DataFrame())
    assert "36 stations in 1 file from `own` (daily mean temperature, converted from kelvins)." in text.splitlines()[2]


def test_the_report_of_monthly_readings_names_their_step_apart_from_what_they_measure(built):
    """A monthly series of daily maxima (an archive's "monthly average maximum") is not the month's maximum, and
    not a daily record either."""
    from station_forecast import report

    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    source = {"source": "own", "unit": "F", "stations": 1, "quantity": "max", "frequency": "monthly"}
    text = report.summary_markdown(metrics, source, {}, 0.05, pd.DataFrame())
    said = "1 station file from `own` (maximum temperature in monthly steps, converted from °F)."
    assert said in text.splitlines()[2]


def test_a_model_the_stations_seasons_beat_is_named_though_it_passes_the_gate(caplog):
    """At monthly steps persistence is a low bar (Boston's monthly mean maxima: persistence 4.280, the model
    1.670, climatology 1.575): the gate passes, and the warning says the seasons alone did better."""
    def scores(model: float, climatology: float) -> dict:
        return {"gate_reference": "observed", "forecast": {"observed": {"all_stations": {
            "model": {"mae": model}, "climatology": {"mae": climatology}, "persistence": {"mae": 4.28}}}}}

    model_testing.log_behind_climatology(scores(1.670, 1.575))
    assert "climatology forecast the test period better than the model (all stations, observed reference: MAE " \
           "1.575 against 1.670)" in caplog.text
    caplog.clear()
    model_testing.log_behind_climatology(scores(1.5, 1.575))
    assert not caplog.text
