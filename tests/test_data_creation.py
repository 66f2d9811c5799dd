import numpy as np
import pandas as pd
import pytest
from conftest import TINY, data_creation, run_stage, write_params

import common


@pytest.fixture(scope="module")
def params():
    return common.load_params()


def test_ar1_matches_the_recursion():
    rng = np.random.default_rng(1)
    coef = np.array([0.5, 0.8])
    innovations = rng.normal(size=(2, 600))
    fast = data_creation.ar1(innovations, coef)
    burn = innovations.shape[1] - fast.shape[1]
    slow = np.zeros_like(innovations)
    for t in range(innovations.shape[1]):
        slow[:, t] = innovations[:, t] + (coef * slow[:, t - 1] if t else 0)
    np.testing.assert_allclose(fast, slow[:, burn:], atol=1e-9)


@pytest.mark.parametrize("kind", common.ANOMALY_KINDS)
def test_each_kind_matches_its_configured_rate(params, kind):
    anomalies = {k: v if k.endswith("_days") or k == f"{kind}_rate" else 0.0 for k, v in params["anomalies"].items()}
    sim = dict(params["simulation"], n_stations=300, clean_stations=0, heavy_stations=0)
    *_, observed, labels = data_creation.simulate(sim, 0, anomalies)
    realised = (labels == kind).mean()
    assert realised == pytest.approx(anomalies[f"{kind}_rate"], rel=0.12)
    assert set(np.unique(labels)) == {"none", kind}
    assert np.isnan(observed).mean() == (realised if kind == "missing" else 0.0)


def test_clean_and_heavy_stations(params):
    climates, _, _, _, labels = data_creation.simulate(params["simulation"], 1, params["anomalies"])
    per_station = (labels != "none").mean(axis=1)
    assert per_station[0] == 0.0  # clean_stations = 1
    assert per_station[1] > 2 * np.median(per_station[2:])  # heavy_stations = 1, factor 4
    assert list(climates["role"]).count("holdout") == 1


def test_anomalies_change_readings_as_their_kind_says(params):
    _, _, clean, observed, labels = data_creation.simulate(params["simulation"], 1, params["anomalies"])
    error = observed - clean
    normal_error = np.abs(error[labels == "none"])
    assert normal_error.max() < 3.0  # measurement noise only
    assert np.abs(error[labels == "spike"]).min() > 3.0
    assert np.abs(error[labels == "level_shift"]).mean() > 2.0
    assert np.isnan(observed[labels == "missing"]).all()
    stuck = labels == "stuck"
    within_run = stuck[:, 1:] & stuck[:, :-1]
    assert within_run.sum() > 50
    assert (observed[:, 1:][within_run] == observed[:, :-1][within_run]).all()


def test_same_seed_same_bytes_and_other_seed_other_data(tmp_path):
    params = write_params(tmp_path / "p.toml", **TINY)
    other = write_params(tmp_path / "q.toml", **TINY, seed=43)
    files = {}
    for name, p in (("a", params), ("b", params), ("c", other)):
        root = tmp_path / name
        assert run_stage(data_creation, root, p) == 0
        files[name] = {f.relative_to(root): f.read_bytes() for f in sorted((root / "data").rglob("*.csv"))}
    assert files["a"] == files["b"]
    assert files["a"].keys() == files["c"].keys() and files["a"] != files["c"]


def test_split_is_in_time_and_holdout_stations_never_reach_training(built):
    root, _ = built
    stations = pd.read_csv(root / "data/truth/stations.csv")
    for station, role in zip(stations["station"], stations["role"], strict=True):
        test = pd.read_csv(root / f"data/test/raw/{station}.csv")
        train_file = root / f"data/train/raw/{station}.csv"
        if role == "holdout":
            assert not train_file.exists()
        else:
            train = pd.read_csv(train_file)
            assert train["date"].max() < test["date"].min()
            assert pd.Timestamp(test["date"].max()) - pd.Timestamp(train["date"].max()) <= pd.Timedelta(
                days=TINY["test_days"])


def test_observation_files_hold_no_ground_truth(built):
    root, _ = built
    for path in (root / "data").glob("*/raw/*.csv"):
        assert list(pd.read_csv(path, nrows=1).columns) == ["date", "temperature"]
    truth = pd.read_csv(next((root / "data/truth").glob("ST*.csv")))
    assert list(truth.columns) == ["date", *common.TRUTH_COLUMNS]


def test_fewer_stations_leave_no_stale_files(built, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(built[0], root)
    params = write_params(tmp_path / "fewer.toml", **{**TINY, "n_stations": 3})
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.stem for p in (root / "data/test/raw").glob("*.csv")) == ["ST001", "ST002", "ST003"]
