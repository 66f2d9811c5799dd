import json

import numpy as np
import pandas as pd
import pytest
from conftest import model_preparation, model_testing, run_stage, snapshot, write_params

import common


def test_metrics_file_has_stable_keys_and_the_model_beats_both_baselines(built):
    root, _ = built
    metrics = json.loads((root / "models/metrics.json").read_text())
    assert {"forecast", "detector", "gate", "gate_reference", "model", "stations", "model_sha256"} <= set(metrics)
    assert set(metrics["forecast"]) == {"truth", "observed"}
    for reference in ("truth", "observed"):
        trained = metrics["forecast"][reference]["trained_stations"]
        assert set(trained) == {"model", "persistence", "climatology"}
        assert set(trained["model"]) == {"n", "mae", "rmse", "r2"}
        assert trained["model"]["n"] == trained["persistence"]["n"] == trained["climatology"]["n"]
        assert trained["model"]["mae"] < trained["persistence"]["mae"] < trained["climatology"]["mae"]
        assert "climatology" not in metrics["forecast"][reference]["holdout_stations"]
    assert metrics["gate"]["passed"] is True


def test_detector_scores_per_kind():
    flags = pd.DataFrame({
        "flag": ["outlier", "none", "outlier", "stuck", "none", "missing", "none", "outlier"],
        "anomaly": ["spike", "spike", "none", "stuck", "drift", "missing", "none", "drift"],
    })
    scores = model_testing.detector_scores(flags)
    assert scores["any"] == {"days": 5, "flagged": 4, "precision": 0.75, "recall": 0.6, "f1": 0.6667}
    # for spikes only spike days and normal days count: 1 of 2 flags right, 1 of 2 spikes found
    assert scores["spike"]["precision"] == 0.5 and scores["spike"]["recall"] == 0.5
    assert scores["drift"]["recall"] == 0.5
    assert scores["level_shift"]["recall"] is None


def test_score_matches_definitions():
    actual, predicted = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 3.0, 2.0])
    assert model_testing.score(actual, predicted) == {"n": 4, "mae": 0.75, "rmse": round(np.sqrt(5 / 4), 4), "r2": 0.0}



def test_gate_failure_exits_3_with_a_clear_line(project, capsys):
    root, _ = project
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_days=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == common.EXIT_GATE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("model_testing: error: quality gate failed: model MAE")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _corrupt_and_rerecord(path):
    """Damage a file and its manifest entry alike, as a disk fault before hashing would."""
    path.write_bytes(b"\x80\x04not a pickle")
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    stage = "model_preparation" if path.name == "model.joblib" else "model_preprocessing"
    manifest["stages"][stage]["outputs"][f"models/{path.name}"] = common.sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("file", "damage", "message"), [
    ("model.joblib", lambda p: p.unlink(), "model.joblib: missing; rerun model_preparation.py"),
    ("scaler.joblib", lambda p: p.unlink(), "scaler.joblib: missing; rerun model_preprocessing.py"),
    ("model.joblib", _truncate, "model.joblib: does not match its SHA-256 in the manifest"),
    ("scaler.joblib", lambda p: p.write_bytes(b"junk"), "scaler.joblib: does not match its SHA-256"),
    ("model.joblib", _corrupt_and_rerecord, "model.joblib: cannot be loaded (KeyError); rerun model_preparation.py"),
    # model.json also holds the scaler's hash, which catches the damaged scaler first
    ("scaler.joblib", _corrupt_and_rerecord, "model.joblib: was trained with another scaler than"),
])
def test_missing_damaged_or_corrupt_artifact_is_refused_and_nothing_changes(project, capsys, file, damage, message):
    root, params = project
    damage(root / "models" / file)
    before = snapshot(root)
    assert run_stage(model_testing, root, params) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert snapshot(root) == before


def test_model_from_another_scikit_learn_is_refused(project, capsys):
    root, params = project
    manifest_path = root / "models/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["model_preparation"]["libraries"]["scikit-learn"] = "0.24.2"
    manifest_path.write_text(json.dumps(manifest))
    assert run_stage(model_testing, root, params) == common.EXIT_BAD_INPUT
    assert "written with scikit-learn 0.24.2" in capsys.readouterr().err


def test_without_ground_truth_the_detector_is_not_scored(project):
    root, params = project
    for path in (root / "data/truth").glob("ST*.csv"):
        path.unlink()
    assert run_stage(model_testing, root, params) == 0
    metrics = json.loads((root / "models/metrics.json").read_text())
    assert "skipped" in metrics["detector"] and metrics["gate_reference"] == "observed"
    assert set(metrics["forecast"]) == {"observed"}


def _accepted(root):
    return {p.name: p.read_bytes() for p in sorted((root / "models/accepted").iterdir())}


def test_failed_gate_keeps_the_accepted_model_and_restore_undoes_an_acceptance(project):
    root, params = project
    first = _accepted(root)
    assert "model.joblib" in first and "SHA256SUMS.json" in first
    strict = write_params(root / "strict.toml", n_stations=5, n_years=3, test_days=120, gbr_max_iter=60,
                          cv_folds=3, gate_min_improvement=0.5)
    assert run_stage(model_testing, root, strict) == common.EXIT_GATE
    assert _accepted(root) == first

    other = write_params(root / "other.toml", n_stations=5, n_years=3, test_days=120, gbr_max_iter=60,
                         cv_folds=3, ridge_alpha=5000.0, tie_tolerance=0.5)
    assert run_stage(model_preparation, root, other) == 0
    assert run_stage(model_testing, root, other) == 0
    second = _accepted(root)
    assert second["model.joblib"] != first["model.joblib"]
    assert {p.name: p.read_bytes() for p in sorted((root / "models/previous").iterdir())} == first

    assert run_stage(model_testing, root, params, "--restore") == 0
    assert _accepted(root) == first


def test_restore_refuses_a_damaged_backup(project, capsys):
    root, params = project
    assert run_stage(model_testing, root, params) == 0  # now models/previous exists
    (root / "models/previous/model.joblib").write_bytes(b"junk")
    assert run_stage(model_testing, root, params, "--restore") == common.EXIT_BAD_INPUT
    assert "previous/model.joblib: missing or damaged" in capsys.readouterr().err
