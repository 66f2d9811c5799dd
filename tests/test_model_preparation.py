import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from conftest import TINY, data_creation, model_preparation, model_preprocessing, run_stage, write_params

from station_forecast import errors, features, manifest, runtime, storage


def test_folds_validate_only_on_later_dates():
    dates = pd.Series(np.repeat(pd.date_range("2020-01-01", periods=100).astype(str), 3))
    folds = model_preparation.time_folds(dates, 4)
    assert len(folds) == 4
    for fit, valid in folds:
        assert dates.iloc[fit].max() < dates.iloc[valid].min()
        assert set(dates.iloc[fit]).isdisjoint(dates.iloc[valid])  # a date is never split across the two


def test_gradient_boosting_stops_on_its_latest_training_dates_and_the_final_fit_grows_as_many_trees():
    """On rows only trees can model, boosting is chosen; each fold's trees stop growing before the limit,
    and the final fit on every row grows their median number."""
    rng = np.random.default_rng(0)
    dates = pd.date_range("2020-01-01", periods=400).strftime("%Y-%m-%d")
    rows = pd.DataFrame({name: rng.normal(size=len(dates)) for name in features.FEATURES})
    rows["temp_today"] = 10.0 + rng.normal(size=len(dates))
    rows["target"] = rows["temp_today"] + 3.0 * np.sign(rows["temp_lag1"]) + rng.normal(0, 0.3, len(dates))
    rows = rows.assign(station="A", date=dates, target_date=dates, step=1, change_sd60=1.0)
    params = {"cv_max_rows": 10**6, "cv_folds": 3, "ridge_alpha": 1.0, "gbr_max_iter": 300,
              "gbr_learning_rate": 0.3, "gbr_max_leaf_nodes": 4, "random_state": 0, "tie_tolerance": 0.01,
              "interval_level": 0.9}
    fitted = model_preparation.fit_step(rows, params)
    trees = fitted["record"]["cv"]["trees"]["gradient_boosting"]
    assert fitted["record"]["chosen"] == "gradient_boosting" and len(trees) == 3
    assert all(t < params["gbr_max_iter"] for t in trees)  # stopped early, every fold
    assert fitted["estimator"].full.max_iter == int(np.median(trees)) == fitted["estimator"].full.n_iter_
    assert fitted["estimators"]["gradient_boosting"].max_iter == params["gbr_max_iter"]  # the candidate as given


def test_too_few_dates_for_the_folds():
    with pytest.raises(errors.PipelineError, match="only 6 training dates"):
        model_preparation.time_folds(pd.Series([f"2020-01-0{d}" for d in range(1, 7)]), 4)


@pytest.mark.parametrize(("ridge", "boosting", "expected"), [
    (1.00, 0.95, "gradient_boosting"),
    (1.00, 0.995, "ridge"),  # within the 1 % tie tolerance: the simpler model wins
    (0.90, 1.00, "ridge"),
])
def test_selection_rule(ridge, boosting, expected):
    scores = {"persistence": [2.0], "ridge": [ridge], "gradient_boosting": [boosting]}
    assert model_preparation.choose(scores, ["ridge", "gradient_boosting"], 0.01) == expected


def test_record_and_model_on_the_tiny_configuration(built):
    root, _ = built
    record = json.loads((root / "models/model.json").read_text())
    bundle = joblib.load(root / "models/model.joblib")
    assert bundle["steps"][0]["name"] == record["chosen"] and bundle["features"] == features.FEATURES
    assert set(record["cv"]["mean_mae"]) == {"persistence", "ridge", "gradient_boosting"}
    assert all(len(v) == record["cv"]["folds"] for v in record["cv"]["mae"].values())
    assert record["training_data_sha256"] == storage.sha256_file(root / "data/train/features.csv")
    assert record["libraries"]["scikit-learn"] == manifest.library_versions()["scikit-learn"]
    # the chosen model beats persistence in cross-validation, not only on the test year
    assert record["cv"]["mean_mae"][record["chosen"]] < record["cv"]["mean_mae"]["persistence"]


def test_training_uses_only_usable_rows_in_date_order(built):
    root, _ = built
    table = pd.read_csv(root / "data/train/features.csv")
    rows = model_preparation.training_rows(table)
    assert (rows["target_ok"] == 1).all() and len(rows) < len(table)
    assert rows["target_date"].is_monotonic_increasing
    # The same rows and values as sorting the text itself, with the text as text: compared, sorted and
    # written as before.
    expected = table[table["target_ok"] == 1].sort_values(["target_date", "station"], kind="stable")
    assert list(rows.columns) == list(table.columns)
    pd.testing.assert_frame_equal(rows.astype({name: str for name in model_preparation.TEXT_COLUMNS}),
                                  expected.reset_index(drop=True).astype({name: str for name in
                                                                          model_preparation.TEXT_COLUMNS}))
    assert rows["target_date"].min() == expected["target_date"].min()
    assert rows["station"].isin([expected["station"].iat[0]]).sum() == (expected["station"] ==
                                                                        expected["station"].iat[0]).sum()


def test_same_inputs_same_model(project):
    root, params = project
    before = (root / "models/model.joblib").read_bytes(), (root / "models/model.json").read_bytes()
    assert run_stage(model_preparation, root, params) == 0
    assert ((root / "models/model.joblib").read_bytes(), (root / "models/model.json").read_bytes()) == before


def test_interval_is_the_central_quantile_band_of_the_scaled_residuals():
    residuals = np.random.default_rng(0).normal(0.0, 1.0, 200_000)
    band = model_preparation.calibrate_interval(residuals, 0.9)
    assert band["lower"] == pytest.approx(-1.645, abs=0.02) and band["upper"] == pytest.approx(1.645, abs=0.02)
    assert np.mean((residuals >= band["lower"]) & (residuals <= band["upper"])) == pytest.approx(0.9, abs=1e-3)


def test_interval_is_calibrated_on_validation_rows_only(built):
    """The band must come from forecasts on dates the model was not fitted on, not its training fit."""
    root, _ = built
    record = json.loads((root / "models/model.json").read_text())
    rows = model_preparation.training_rows(pd.read_csv(root / "data/train/features.csv"))
    folds = model_preparation.time_folds(rows["target_date"], record["cv"]["folds"])
    assert record["interval"]["model"]["residuals"] == sum(len(valid) for _, valid in folds) < len(rows)
    bundle = joblib.load(root / "models/model.joblib")
    assert bundle["steps"][0]["interval"] == record["interval"]["model"] and record["interval"]["model"]["level"] == 0.9


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> tuple[Path, Path]:
    """Stages 1 and 2 on enough rows (about 70,000) that BLAS would split Ridge's sums between threads."""
    root = tmp_path_factory.mktemp("larger")
    params = write_params(root / "params.toml", **{**TINY, "n_stations": 40, "n_years": 6})
    for module in (data_creation, model_preprocessing):
        assert run_stage(module, root, params) == 0
    return root, params


@pytest.mark.parametrize("which", ["tiny", "larger"])
def test_the_model_is_byte_identical_whatever_the_thread_count(project, larger, monkeypatch, which):
    """In this process, where every library is loaded already (run alone: the test of one thread per fit)."""
    root, params = project if which == "tiny" else larger
    models = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("PIPELINE_THREADS", threads)
        assert run_stage(model_preparation, root, params) == 0
        models[threads] = (root / "models/model.joblib").read_bytes(), (root / "models/model.json").read_bytes()
    assert models["1"] == models["2"]


def test_the_thread_budget_is_the_override_or_at_most_the_usable_cpus(monkeypatch):
    import os


    monkeypatch.setenv("PIPELINE_THREADS", "3")
    assert runtime.thread_budget() == (3, "PIPELINE_THREADS")
    monkeypatch.delenv("PIPELINE_THREADS")
    threads, why = runtime.thread_budget()
    assert 1 <= threads <= len(os.sched_getaffinity(0)) and "CPUs" in why


def test_under_pipeline_sh_the_stage_started_ahead_and_its_cpu_time_are_found(monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from station_forecast import cli

    # This test's process stands in for pipeline.sh, its busy child for the stage it started ahead.
    monkeypatch.delenv("PIPELINE_THREADS", raising=False)
    monkeypatch.setenv(cli.INHERITED_LOCK, "9")
    ahead = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        first = runtime._siblings_jiffies(parent=os.getpid())
        time.sleep(0.3)
        second = runtime._siblings_jiffies(parent=os.getpid())
        assert second[ahead.pid] > first[ahead.pid], "its clock ticks are read"
        monkeypatch.delenv(cli.INHERITED_LOCK)
        assert runtime._siblings_jiffies(parent=os.getpid()) == {}, "outside pipeline.sh no process is left out"
    finally:
        ahead.kill()
        ahead.wait()


def test_model_selection_cost_is_bounded_and_the_final_fit_uses_every_row(project):
    from conftest import TINY, write_params

    root, _ = project
    params = write_params(root / "bounded.toml", **TINY, cv_max_rows=1000)
    assert run_stage(model_preparation, root, params) == 0
    record = json.loads((root / "models/model.json").read_text())
    all_rows = model_preparation.training_rows(pd.read_csv(root / "data/train/features.csv"))
    assert record["training_rows"] == len(all_rows) > record["cv"]["rows"]
    assert record["cv"]["stations"] < all_rows["station"].nunique()
    sample = model_preparation.cv_sample(all_rows, 1000)
    assert sample["target_date"].is_monotonic_increasing  # still in time order
    per_station = all_rows.groupby("station").size()
    assert (sample.groupby("station").size() == per_station[sample["station"].unique()]).all()  # whole stations
    assert model_preparation.cv_sample(all_rows, len(all_rows)) is all_rows


def test_every_step_ahead_gets_its_own_model_and_a_band_from_its_own_validation_rows(horizon_built):
    from conftest import HORIZON

    record = json.loads((horizon_built / "models/model.json").read_text())
    bundle = joblib.load(horizon_built / "models/model.joblib")
    rows = model_preparation.training_rows(pd.read_csv(horizon_built / "data/train/features.csv"))
    assert [entry["step"] for entry in record["steps"]] == list(range(1, HORIZON + 1)) == \
        [entry["step"] for entry in bundle["steps"]]
    widths = []
    for entry, fitted in zip(record["steps"], bundle["steps"], strict=True):
        step_rows = rows[rows["step"] == entry["step"]].reset_index(drop=True)
        folds = model_preparation.purged(model_preparation.time_folds(step_rows["target_date"], entry["cv"]["folds"]),
                                         step_rows)
        assert entry["interval"]["model"]["residuals"] == sum(len(valid) for _, valid in folds) < len(step_rows)
        assert fitted["interval"] == entry["interval"]["model"]
        widths.append(entry["interval"]["model"]["upper"] - entry["interval"]["model"]["lower"])
    assert widths == sorted(widths) and widths[0] < widths[-1]  # further ahead, wider


def test_folds_leave_out_training_targets_a_forecast_could_not_have_known():
    dates = pd.Series(pd.date_range("2020-01-01", periods=400, freq="D"))
    for step in (1, 5):
        rows = pd.DataFrame({"date": dates, "target_date": dates + pd.Timedelta(days=step), "step": step})
        folds = model_preparation.purged(model_preparation.time_folds(rows["target_date"], 3), rows)
        for fit, valid in folds:
            assert rows["target_date"].iloc[fit].max() <= rows["date"].iloc[valid].min()
            assert len(fit) == (rows["target_date"].iloc[fit].max() - rows["target_date"].min()).days + 1
        plain = model_preparation.time_folds(rows["target_date"], 3)
        assert sum(len(f) for f, _ in folds) == sum(len(f) for f, _ in plain) - (len(plain) * (step - 1))
    with pytest.raises(errors.PipelineError, match="too few training steps to validate forecasts 300 steps ahead"):
        rows = pd.DataFrame({"date": dates, "target_date": dates + pd.Timedelta(days=300), "step": 300})
        model_preparation.purged(model_preparation.time_folds(rows["target_date"], 3), rows)


def test_a_station_whose_readings_stand_still_trains_and_scores_with_detection_off(tmp_path):
    """With the detector off, 90 days of one value reach the model: a spread of zero must not divide the
    residuals (it made the model record NaN, which JSON refuses)."""
    root = tmp_path / "root"
    params = write_params(tmp_path / "p.toml", **TINY, detector="none")
    assert run_stage(data_creation, root, params) == 0
    for part in ("train", "test"):
        path = root / f"data/{part}/raw/ST001.csv"
        table = pd.read_csv(path)
        table["temperature"] = 5.0  # the whole record stands still
        storage.write_csv(path, table, fixed={"temperature": 1})
    record = json.loads((root / "models/manifest.json").read_text())  # as stage 1 would have written them
    for part in ("train", "test"):
        key = f"data/{part}/raw/ST001.csv"
        record["stages"]["data_creation"]["outputs"][key] = storage.sha256_file(root / key)
    (root / "models/manifest.json").write_text(json.dumps(record))
    for module in (model_preprocessing, model_preparation):
        assert run_stage(module, root, params) == 0, module.STAGE
    spread = pd.read_csv(root / "data/train/features.csv")[features.SPREAD_COLUMN].dropna()
    assert (spread >= features.MIN_SPREAD).all()


GBR_OFF = {"gbr_max_iter": 1, "gbr_learning_rate": 0.1, "gbr_max_leaf_nodes": 2, "random_state": 0}


def test_rows_without_the_ridge_feature_are_forecast_by_a_model_fitted_without_it():
    """A station never trained on has no ridge of its own: its rows get the fallback model's forecast, from its
    anomalies instead of its temperatures; the model of the other rows reads the temperatures and the ridge."""
    rng = np.random.default_rng(2)
    rows = pd.DataFrame({name: rng.normal(size=300) for name in features.FEATURES})
    rows["temp_today"] = 10.0
    rows["target"] = 10.0 + 2.0 * rows[features.RIDGE_FEATURE] + rows["temp_lag1"]
    ridge = model_preparation.candidates({**GBR_OFF, "ridge_alpha": 1.0})["ridge"]
    forecaster = model_preparation.fit_forecaster(ridge, rows)
    assert list(forecaster.full.feature_names_in_) == features.FULL_FEATURES
    assert list(forecaster.fallback.feature_names_in_) == features.FALLBACK_FEATURES
    assert features.RIDGE_FEATURE not in features.FALLBACK_FEATURES
    assert not set(features.TEMPERATURE_FEATURES) & set(features.FALLBACK_FEATURES)
    assert not set(features.CLIMATE_FEATURES) & set(features.FULL_FEATURES)
    unknown = rows.assign(**{features.RIDGE_FEATURE: np.nan})
    made = features.forecast(forecaster, pd.concat([rows.iloc[:5], unknown.iloc[:5]]))
    assert np.isfinite(made).all()
    np.testing.assert_allclose(made[:5], rows["target"].iloc[:5], atol=0.1)
    np.testing.assert_allclose(made[5:], forecaster.fallback.predict(unknown[features.FALLBACK_FEATURES].iloc[:5]) + 10)
    without = model_preparation.fit_forecaster(ridge, rows, fallback=False)
    with pytest.raises(ValueError, match="5 rows need a model"):
        features.forecast(without, unknown.iloc[:5])


def _forecasts(root: Path) -> np.ndarray:
    bundle = joblib.load(root / "models/model.joblib")
    test = pd.read_csv(root / "data/test/features.csv")
    return np.concatenate([features.forecast(step["estimator"], test[test["step"] == step["step"]])
                           for step in bundle["steps"]])


@pytest.mark.parametrize("root_of", ["project", "horizon"])
def test_a_features_table_too_large_to_hold_is_read_in_batches_with_the_same_choice_and_fit(
        project, horizon_built, tmp_path, monkeypatch, root_of):
    """Above STREAM_BYTES the training features are read twice in batches (which here cut stations and steps
    apart) and never held whole: the cross-validation is on the same rows, so its scores and the choice are
    the same, and the Ridge summed batch by batch forecasts as scikit-learn's fitted on every row does (and
    gradient boosting, chosen for steps 2 and 3, on every row while they are no more than BOOSTING_MAX_ROWS)."""
    import shutil

    if root_of == "project":
        root, params = project
    else:
        root = tmp_path / "horizon"
        shutil.copytree(horizon_built, root, symlinks=True)
        params = root / "params.toml"
    assert run_stage(model_preparation, root, params) == 0
    whole, whole_forecasts = json.loads((root / "models/model.json").read_text()), _forecasts(root)
    monkeypatch.setattr(model_preparation, "STREAM_BYTES", 0)
    monkeypatch.setattr(model_preparation, "STREAM_BATCH_ROWS", 997)
    assert run_stage(model_preparation, root, params) == 0
    streamed = json.loads((root / "models/model.json").read_text())
    assert streamed["training_rows"] == whole["training_rows"]
    for one, other in zip(streamed["steps"], whole["steps"], strict=True):
        assert one["cv"] == other["cv"] and one["chosen"] == other["chosen"]
        assert one["interval"] == other["interval"]
    assert whole["chosen"] == "ridge" and "normal equations summed over all" in streamed["fit"]
    np.testing.assert_allclose(_forecasts(root), whole_forecasts, rtol=0, atol=1e-9)


def test_a_streamed_table_is_read_again_for_each_group_of_steps_with_the_same_models(horizon_built, tmp_path,
                                                                                     monkeypatch, capsys):
    """Read in batches, the rows kept for every step at once grew with the horizon (4.8 GB at 120 steps on 16
    real stations). Past STEP_GROUP_BYTES the table is read again for each group of steps: the same models,
    byte for byte, as from one reading."""
    import shutil

    root = tmp_path / "horizon"
    shutil.copytree(horizon_built, root, symlinks=True)
    params = root / "params.toml"
    monkeypatch.setattr(model_preparation, "STREAM_BYTES", 0)
    monkeypatch.setattr(model_preparation, "STREAM_BATCH_ROWS", 997)
    models = {}
    for budget in (1 << 40, 1):
        monkeypatch.setattr(model_preparation, "STEP_GROUP_BYTES", budget)
        assert run_stage(model_preparation, root, params) == 0
        models[budget] = (root / "models/model.joblib").read_bytes()
    steps = json.loads((root / "models/model.json").read_text())["steps"]
    assert len(steps) > 1 and f"the table is read once for each of {len(steps)} groups of steps" in \
        capsys.readouterr().err
    assert models[1] == models[1 << 40]
    assert model_preparation.step_groups([1, 2, 3, 4], {1: 5, 2: 5, 3: 12, 4: 1}, 10) == [[1, 2], [3], [4]]


def test_gradient_boosting_on_a_table_too_large_to_hold_is_fitted_on_every_k_th_row(project, monkeypatch):
    root, params = project
    boosting_only = model_preparation.candidates
    monkeypatch.setattr(model_preparation, "candidates",
                        lambda model: {"gradient_boosting": boosting_only(model)["gradient_boosting"]})
    monkeypatch.setattr(model_preparation, "STREAM_BYTES", 0)
    monkeypatch.setattr(model_preparation, "BOOSTING_MAX_ROWS", 1000)
    assert run_stage(model_preparation, root, params) == 0
    record = json.loads((root / "models/model.json").read_text())
    rows = record["training_rows"]
    stride = -(-rows // 1000)
    assert record["chosen"] == "gradient_boosting"
    assert record["fit"] == (f"one in {stride} of the {rows} training rows, in the table's order "
                             f"({-(-rows // stride)} rows; at most 1000)")
    forecasts = _forecasts(root)
    assert np.isfinite(forecasts).mean() > 0.9


def test_run_alone_every_fit_runs_on_one_blas_and_openmp_thread_whatever_the_threads_given(project):
    """BLAS and OpenMP split sums between their threads, so the model's bytes would follow the machine's load.
    The stage sets one thread for both, which reaches only the libraries loaded by then: run alone (not started
    ahead by pipeline.sh), numpy, scipy and scikit-learn's OpenMP load on first use. A fresh interpreter, as a
    user runs the stage."""
    import ast
    import os
    import subprocess
    import sys

    root, params = project
    probe = (
        "import sys, threadpoolctl, model_preparation\n"
        "from station_forecast import cli\n"
        "fitted = model_preparation.fitted_steps\n"
        "def spy(*args, **kwargs):\n"
        "    result = fitted(*args, **kwargs)\n"
        "    print('THREADS', [(info['user_api'], info['num_threads']) for info in threadpoolctl.threadpool_info()],\n"
        "          file=sys.stderr)\n"
        "    return result\n"
        "model_preparation.fitted_steps = spy\n"
        f"sys.exit(cli.run('model_preparation', model_preparation.main, cli.stage_parser('x'),\n"
        f"                 ['--root', {str(root)!r}, '--params', {str(params)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={**os.environ, "PIPELINE_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    threads = ast.literal_eval(next(line for line in done.stderr.splitlines() if line.startswith("THREADS"))[8:])
    assert {api for api, _ in threads} == {"blas", "openmp"} and {count for _, count in threads} == {1}
