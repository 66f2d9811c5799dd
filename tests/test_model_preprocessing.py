"""Stage 2: reading the station files, the quality control it runs, the features and the scaler."""

import json
import pickle
import re
import shutil
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
from conftest import TINY, data_creation, model_preparation, model_preprocessing, run_stage, snapshot, write_params

from station_forecast import errors, features, manifest, quality_control, station_files, storage
from station_forecast.features import FEATURES, SPREAD_COLUMN
from station_forecast.flags import Flag
from station_forecast.params import load_params
from station_forecast.storage import Paths

TRAIN, TEST = model_preprocessing.TRAIN, model_preprocessing.TEST

GOOD = "date,temperature\n2020-01-01,1.5\n2020-01-02,\n2020-01-03,-2.0\n"


def test_scaler_is_fitted_on_training_rows_only(built):
    root, _ = built
    scaler = joblib.load(root / "models/scaler.joblib")
    train = pd.read_csv(root / "data/train/features.csv")
    test = pd.read_csv(root / "data/test/features.csv")
    assert list(scaler.feature_names_in_) == FEATURES
    assert scaler.n_samples_seen_ == len(train)
    np.testing.assert_allclose(train[FEATURES].mean(), 0, atol=1e-4)
    np.testing.assert_allclose(train[FEATURES].std(ddof=0), 1, atol=1e-3)
    assert not np.allclose(test[FEATURES].mean(), 0, atol=1e-3)


@pytest.mark.parametrize("missing, threads", [(False, 1), (True, 1), (True, 3)])
def test_the_scaler_fitted_a_feature_at_a_time_is_the_fit_of_them_all(missing, threads):
    """The same pickled bytes as StandardScaler fitted on every training feature at once (one step ahead only),
    with and without a feature missing on some rows, the features fitted on one thread or several."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    rows = 5001
    train = pd.DataFrame({name: rng.normal(i, 1 + i, rows) for i, name in enumerate(FEATURES)})
    train["step"] = np.where(rng.random(rows) < 0.7, 1, 2)
    if missing:
        train.loc[rng.random(rows) < 0.1, FEATURES[5]] = np.nan
    whole = StandardScaler().fit(train.loc[train["step"] == 1, FEATURES].to_numpy())
    whole.feature_names_in_ = np.asarray(FEATURES, dtype=object)
    first = train[train["step"] == 1]
    fitted = model_preprocessing.fit_scaler(lambda name: first[name].to_numpy(), threads)
    assert pickle.dumps(fitted) == pickle.dumps(whole)


def test_the_flag_tables_made_a_block_of_stations_at_a_time_are_the_bytes_of_one_block(project, monkeypatch, capsys):
    """The flag tables are made and written FLAGS_BLOCK stations at a time (made whole, they were the stage's
    peak): a block per station writes the bytes one block for all writes, and counts the same repairs."""
    root, params = project
    paths = Paths(root)
    outputs = [paths.train_flags, paths.test_flags, paths.flagged]

    def run(block: int) -> tuple[dict, list[str]]:
        monkeypatch.setattr(model_preprocessing, "FLAGS_BLOCK", block)
        assert run_stage(model_preprocessing, root, params) == 0
        logged = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if "repaired" in line]
        return {path: path.read_bytes() for path in outputs}, logged

    whole, logged = run(10_000)
    assert whole[paths.flagged].count(b"\n") > 10 and len(logged) == 1
    assert run(1) == (whole, logged)


def test_feature_rows_kept_on_disk_a_block_at_a_time_are_written_byte_for_byte(project, monkeypatch, capsys):
    """Past SPILL_BYTES the training and test rows wait on disk, a block of stations at a time, until written
    (the scaler fitted from them): the tables and the scaler are the bytes of the run that held them, and
    the stage leaves no spilled block behind, nor touches what a link left in the spill folder's place
    points to."""
    root, params = project
    paths = Paths(root)
    outputs = [paths.train_features, paths.test_features, paths.scaler, paths.train_flags]
    monkeypatch.setattr(model_preprocessing, "STATION_BLOCK", 1)  # a block per station
    assert run_stage(model_preprocessing, root, params) == 0
    held = {path: path.read_bytes() for path in outputs}
    monkeypatch.setattr(model_preprocessing, "SPILL_BYTES", 0)
    mine = root.parent / "mine"  # a link in place of the spill folder is let go, never followed
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    (paths.data / model_preprocessing.SPILL_FOLDER).symlink_to(mine, target_is_directory=True)
    assert run_stage(model_preprocessing, root, params) == 0
    assert "a block at a time until written" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in outputs} == held
    assert not (paths.data / model_preprocessing.SPILL_FOLDER).exists()
    assert not model_preprocessing.test_spill(paths.data / model_preprocessing.SPILL_FOLDER).exists()
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_features_further_ahead_are_built_fewer_stations_at_a_time_and_the_same(project, tmp_path, monkeypatch):
    """A block holds a row per station-step and step ahead: 366 steps ahead on 16 real stations in one block
    was killed by the kernel at 22 GB. Forecasting h steps ahead, a block is STATION_BLOCK // h stations (at
    least one), and the feature tables are the bytes of one block holding every station."""
    root, _ = project
    params = write_params(tmp_path / "ahead.toml", **TINY, horizon=2)
    paths = Paths(root)
    built = model_preprocessing.block_rows
    sizes = []

    def recorded(block: tuple, horizon: int) -> dict:
        sizes.append(block[0][0].shape[1])  # the observed readings of the block's tables
        return built(block, horizon)

    monkeypatch.setattr(model_preprocessing, "block_rows", recorded)
    tables = {}
    for block in (100, 4):
        monkeypatch.setattr(model_preprocessing, "STATION_BLOCK", block)
        sizes.clear()
        assert run_stage(model_preprocessing, root, params) == 0
        tables[block] = [path.read_bytes() for path in (paths.train_features, paths.test_features)]
        assert sizes == ([5] if block == 100 else [2, 2, 1])
    assert tables[4] == tables[100]


@pytest.mark.parametrize("gap_across_the_start", [False, True])
def test_test_data_does_not_change_what_is_learned(project, gap_across_the_start):
    """Neighbours, scales and the scaler are learned before the test period: changing every test reading
    (a held-out station's earlier days are its history, not test data) changes none of them. With a station's
    gap running from its last training days into the test period, its days from the test's start on were
    training days filled from the neighbours' test readings, and the scaler learned from them."""
    root, params = project
    paths = Paths(root)
    test_start = json.loads(paths.source_record.read_text())["test_start"]
    if gap_across_the_start:
        first = sorted(paths.train_raw.glob("*.csv"))[0]
        for path, keep in ((first, lambda dates: dates < "2021-08-30"),
                           (paths.test_raw / first.name, lambda dates: dates >= "2021-09-10")):
            raw = pd.read_csv(path)
            raw[keep(raw["date"])].to_csv(path, index=False, float_format="%.1f")
        assert "2021-08-30" < test_start < "2021-09-10"
        _rerecord_raw(paths, params)
        assert run_stage(model_preprocessing, root, params) == 0
    before = {p: p.read_bytes() for p in (paths.detector, paths.train_features)}
    scaler_mean = joblib.load(paths.scaler).mean_
    for path in paths.test_raw.glob("*.csv"):
        raw = pd.read_csv(path)
        in_test = raw["date"] >= test_start
        raw.assign(temperature=raw["temperature"].where(~in_test, raw["temperature"] + 7.0)).to_csv(
            path, index=False, float_format="%.1f")
    _rerecord_raw(paths, params)
    assert run_stage(model_preprocessing, root, params) == 0
    assert {p: p.read_bytes() for p in before} == before
    np.testing.assert_array_equal(joblib.load(paths.scaler).mean_, scaler_mean)


def test_ground_truth_never_reaches_features_or_model(project):
    root, params = project
    paths = Paths(root)
    for table in (paths.train_features, paths.test_features, paths.train_flags, paths.test_flags):
        assert not set(pd.read_csv(table, nrows=1).columns) & set(storage.TRUTH_COLUMNS)
    before = snapshot(root)
    for path in paths.truth.glob("ST*.csv"):  # scramble the truth: nothing learned may move
        truth = pd.read_csv(path)
        truth.assign(clean_temperature=0.0, anomaly="spike").to_csv(path, index=False)
    assert run_stage(model_preprocessing, root, params) == 0
    assert run_stage(model_preparation, root, params) == 0
    after = snapshot(root)
    learned = [k for k in before if k.startswith(("data/train/features", "data/test/features", "models/model",
                                                  "models/scaler", "models/detector", "data/train/flags"))]
    assert len(learned) == 7
    assert all(after[k] == before[k] for k in learned)


def test_features_use_no_day_after_the_forecast_day():
    dates = pd.date_range("2020-01-01", periods=400, freq="D")
    rng = np.random.default_rng(0)
    shared = np.cumsum(rng.normal(size=400)) * 0.3
    values = pd.DataFrame({name: 10 + shared + rng.normal(0, 0.3, 400) for name in "ABC"}, index=dates)
    period = pd.DataFrame(np.where(np.arange(400) < 300, TRAIN, TEST)[:, None].repeat(3, axis=1),
                          index=dates, columns=values.columns)
    qc = load_params()["quality_control"]

    def features(observed):
        _, verdict = model_preprocessing.quality_control_flags(observed, period, qc)
        return model_preprocessing.build_features(observed, period, verdict["repaired"],
                                                  verdict["flag"] == Flag.NONE).set_index(["station", "date"])

    base = features(values)
    changed = values.copy()
    changed.iloc[350:, 0] += 25.0  # station A goes wrong from day 350 on
    after = features(changed)
    forecast_day_before = dates[349]  # the rows that forecast day 350
    earlier = base.index.get_level_values("date") <= forecast_day_before
    pd.testing.assert_frame_equal(base.loc[earlier, FEATURES], after.loc[earlier, FEATURES])
    assert base.loc[("A", forecast_day_before), "target"] != after.loc[("A", forecast_day_before), "target"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"date,temperature\n", "header only, no data rows"),
    (b"date\n2020-01-01\n", "missing column 'temperature' (header is 'date')"),
    (b"date;temperature\n2020-01-01;1.0\n", "wrong delimiter in header 'date;temperature'"),
    (b"date,temperature\n2020-01-01,warm\n", "line 2: temperature 'warm' is not a number"),
    (b"date,temperature\n2020-01-01,inf\n", "line 2: temperature 'inf' is not finite"),
    (b"date,temperature\n2020-01-01,nan\n", "line 2: temperature 'nan' is not a number (leave the field empty"),
    (b"date,temperature\n2020-01-01,1\n2020-01-02,99.5\n",
     "line 3: temperature 99.5 °C is outside the possible range [-90, 60]"),
    (b"date,temperature\n2020-01-01,1\n2020-02-30,2\n", "line 3: date '2020-02-30' is not a YYYY-MM-DD date"),
    (b"date,temperature\n2020-01-01,1\n2020-01-01,2\n", "line 3: duplicate date 2020-01-01 (also on line 2)"),
    (b"date,temperature\n2020-01-01,1\n\xff\xfe,2\n", "not UTF-8 text (byte 0xff at offset 30)"),
    (b"date,temperature\n2020-01-01,1\n2020-01-0", "last line has no line ending; the file looks truncated"),
    (b"date,temperature\n2020-01-01,1\n2020-01-02\n", "line 3 has too few fields; the file looks truncated"),
])
def test_bad_station_file_fails_with_one_line_and_changes_nothing(project, capsys, content, message):
    root, params = project
    bad = root / "data/train/raw/ST002.csv"
    bad.write_bytes(content)
    before = snapshot(root)
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"model_preprocessing: error: {bad}: {message}")
    assert "Traceback" not in err
    assert snapshot(root) == before


def test_missing_input_folder_fails_cleanly_and_changes_nothing(project, capsys):
    import shutil

    root, params = project
    shutil.rmtree(root / "data/test/raw")
    before = snapshot(root)
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"model_preprocessing: error: {root / 'data/test/raw'}: input folder not found; run data_creation.py first")
    assert snapshot(root) == before


def test_good_station_file_and_extra_column(tmp_path, caplog):
    path = tmp_path / "ST001.csv"
    path.write_text(GOOD)
    table = station_files.read_station_csv(path, -90.0, 60.0)
    assert table["temperature"].isna().sum() == 1 and len(table) == 3
    path.write_text("date,temperature,note\n2020-01-01,1.5,ok\n2020-01-02,,\n")
    station_files.read_station_csv(path, -90.0, 60.0)
    assert "ignoring unexpected column(s) 'note'" in caplog.text


def test_tampered_raw_file_is_refused(project, capsys):
    root, params = project
    path = root / "data/train/raw/ST003.csv"
    path.write_text(path.read_text().replace("\n2019-03-01,", "\n2019-03-01,1"))
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert "does not match its SHA-256 in the manifest" in capsys.readouterr().err


def _rerecord_raw(paths: Paths, params_file) -> None:
    """Accept hand-edited raw files as if data_creation had written them."""
    params = load_params(params_file)
    outputs = manifest.recorded_outputs(paths, "data_creation")
    manifest.record_stage(paths, "data_creation", params, [], outputs)


def test_station_with_too_few_days_fails_cleanly_and_changes_nothing(project, capsys):
    root, params = project
    for split in ("train", "test"):  # the count is over the station's whole record
        short = root / f"data/{split}/raw/ST002.csv"
        short.write_text("".join(short.read_text().splitlines(keepends=True)[:20]))
    before = snapshot(root)
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert "station ST002 has only" in capsys.readouterr().err
    assert snapshot(root) == before


def test_a_test_period_only_held_out_stations_reach_is_refused(tmp_path, capsys):
    """A held-out station that runs a year longer than the others must not leave the gate to it alone."""
    from conftest import REAL_FORMAT, TINY, data_creation, write_params, write_real_format_station

    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "A.csv")
    write_real_format_station(own / "B.csv")
    with open(own / "B.csv", "a") as handle:
        for day in pd.date_range("2023-01-01", "2023-12-31"):
            handle.write(f"{day:%d/%m/%Y};{60 + 20 * np.sin(day.day_of_year / 58):.1f};HOME\n")
    params = write_params(tmp_path / "own.toml", **TINY, **dict(REAL_FORMAT, holdout_stations=1), source="own")
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert "no station trained on has readings in the test period" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "date,temperature\n2020-01-02,1.5\n2020-01-01,\n2020-01-04,-0.5\n",  # as the pipeline writes, out of order
    "date,temperature\n2020-01-01, 1.5\n2020-01-02,2\n",  # a blank: only the careful path reads it
    "date,temperature,note\n2020-01-01,1.5,x\n",  # an extra column: the careful path warns about it
])
def test_the_fast_reader_and_the_careful_one_agree(tmp_path, monkeypatch, text):
    path = tmp_path / "A.csv"
    path.write_text(text)
    fast = station_files.read_station_csv(path, -90.0, 60.0)
    monkeypatch.setattr(station_files, "_read_clean_station_csv", lambda *args: None)
    pd.testing.assert_frame_equal(fast, station_files.read_station_csv(path, -90.0, 60.0))
    assert fast["date"].is_monotonic_increasing


def test_files_parsed_together_read_as_each_file_alone(tmp_path):
    texts = {"A": "date,temperature\n2020-01-02,1.5\n2020-01-01,\n",
             "B": "date,temperature\n2020-01-01,2.0\n\n2020-01-02,3.0\n",  # a blank line: parsed on its own
             "C": 'date,temperature\n2020-01-01,"4.5"\n',  # a quote: parsed on its own
             "D": "date,temperature\n2020-01-01,-1.0\n2020-01-03,-2.0\n2020-01-04,-2.5\n"}
    paths = []
    for name, text in texts.items():
        paths.append(tmp_path / f"{name}.csv")
        paths[-1].write_text(text)
    together = station_files.read_station_files(paths, -90.0, 60.0)
    for path, (dates, values) in zip(paths, together, strict=True):
        alone = station_files.read_station_csv(path, -90.0, 60.0)
        np.testing.assert_array_equal(dates, alone["date"].to_numpy())
        np.testing.assert_array_equal(values, alone["temperature"].to_numpy())
    assert together[0][1][1] == 1.5 and np.isnan(together[0][1][0])  # in date order

    paths[3].write_text("date,temperature\n2020-01-01,-1.0\n2020-01-02,warm\n")
    with pytest.raises(errors.PipelineError, match=r"D\.csv: line 3: temperature 'warm' is not a number"):
        station_files.read_station_files(paths, -90.0, 60.0)


def test_the_calendar_gives_each_station_its_days_and_each_day_its_period():
    """Readings land on their station's column and date; a missing day takes the period of the day before; days
    before a station's first reading or after its last are outside; test days before the test period are
    history (a held-out station's past)."""
    OUTSIDE, HISTORY = model_preprocessing.OUTSIDE, model_preprocessing.HISTORY
    rows = [("B", "2020-01-02", 1.0, "train"), ("B", "2020-01-04", 2.0, "test"), ("B", "2020-01-06", np.nan, "test"),
            ("A", "2020-01-01", 3.0, "train"), ("A", "2020-01-02", 4.0, "train"), ("A", "2020-01-03", 5.0, "train"),
            ("A", "2020-01-05", 6.0, "test")]
    frame = pd.DataFrame(rows, columns=["station", "date", "temperature", "split"])
    frame["date"] = pd.to_datetime(frame["date"])
    observed, period = model_preprocessing.to_calendar(frame, pd.Timestamp("2020-01-05"))

    assert list(observed.columns) == ["A", "B"] and list(period.columns) == ["A", "B"]
    assert list(observed.index) == list(pd.date_range("2020-01-01", "2020-01-06"))
    np.testing.assert_array_equal(observed["A"], [3.0, 4.0, 5.0, np.nan, 6.0, np.nan])
    np.testing.assert_array_equal(observed["B"], [np.nan, 1.0, np.nan, 2.0, np.nan, np.nan])
    assert list(period["A"]) == [TRAIN, TRAIN, TRAIN, TRAIN, TEST, OUTSIDE]
    assert list(period["B"]) == [OUTSIDE, TRAIN, TRAIN, HISTORY, TEST, TEST]
    assert period.dtypes.eq(np.int8).all() and observed.to_numpy().flags["C_CONTIGUOUS"]


def test_a_gap_begun_in_training_belongs_to_the_test_period_from_its_first_day():
    """The days of a gap from the test period's first day on are test days: as training days, the rows of
    forecasts made from them (target-less) reached the scaler with a test day's features."""
    rows = [("A", "2020-01-01", 1.0, "train"), ("A", "2020-01-02", 2.0, "train"), ("A", "2020-01-06", 3.0, "test")]
    frame = pd.DataFrame(rows, columns=["station", "date", "temperature", "split"])
    frame["date"] = pd.to_datetime(frame["date"])
    _, period = model_preprocessing.to_calendar(frame, pd.Timestamp("2020-01-04"))
    assert list(period["A"]) == [TRAIN, TRAIN, TRAIN, TEST, TEST, TEST]


def test_the_climatology_baseline_of_a_station_that_started_months_ago_is_not_guessed():
    """Yearly harmonics fitted to five months extrapolate wildly into the other seven; the baseline takes the
    seasons its neighbours show instead (or its own level alone, without a detector)."""
    dates = pd.date_range("2020-01-01", periods=3 * 365, freq="D")
    rng = np.random.default_rng(5)
    season = 10 - 12 * np.cos(2 * np.pi * (dates.day_of_year.to_numpy() - 20) / 365.25)
    weather = np.convolve(rng.normal(0, 2.0, len(dates) + 9), np.ones(10) / np.sqrt(10), mode="valid")
    values = pd.DataFrame({name: season + level + weather + rng.normal(0, 0.5, len(dates))
                           for name, level in zip("ABCD", (0.0, 1.0, -1.5, 3.0), strict=True)}, index=dates)
    values.iloc[: 2 * 365 - 150, 3] = np.nan  # D started 150 days before the test year
    period = pd.DataFrame(np.where(np.arange(len(dates)) < 2 * 365, TRAIN, TEST)[:, None].repeat(4, axis=1),
                          index=dates, columns=values.columns)
    qc = load_params()["quality_control"]
    detector, verdict = model_preprocessing.quality_control_flags(values, period, qc)
    test_dates = dates[2 * 365:]
    true_d = pd.Series(season[2 * 365:] + 3.0, index=test_dates)
    for learned in (detector, None):
        coefs = model_preprocessing.baseline_climatology(values, period, verdict["flag"] == Flag.NONE, learned)
        baseline = quality_control.climatology_at(coefs, test_dates, values.columns)["D"]
        worst = (baseline - true_d).abs().max()
        assert worst < (3.0 if learned else 25.0), worst  # its own mean alone misses the seasons, but stays sane
    naive = quality_control.climatology_at(quality_control.fit_climatology(values.where(period == TRAIN)),
                                           test_dates, values.columns)["D"]
    assert (naive - true_d).abs().max() > 10.0


def test_network_features_compare_the_station_with_its_neighbours_on_the_origin_day_only():
    dates = pd.date_range("2021-01-01", periods=40, freq="D")
    rng = np.random.default_rng(5)
    readings = pd.DataFrame(rng.normal(0, 3, (40, 3)).cumsum(axis=0), index=dates, columns=["A", "B", "C"])
    readings.iloc[10, 2] = np.nan  # a neighbour's missing day: the others stand for it
    near = {"A": ["B", "C"], "B": ["A"]}  # C has no neighbour
    network = model_preprocessing.network_features
    tables = network(["A", "B", "C"], model_preprocessing.compared_values(readings), near)
    assert list(tables) == list(features.NETWORK_FEATURES)
    change = readings.diff()
    expected = change[["B", "C"]].mean(axis=1) - change["A"]
    assert np.allclose(tables["nbr_change"]["A"].iloc[1:], expected.iloc[1:])
    assert tables["nbr_change"]["A"].iloc[11] == pytest.approx(change["B"].iloc[11] - change["A"].iloc[11])
    assert (tables["nbr_change"]["C"].dropna() == 0).all() and (tables["nbr_week_departure"]["C"].dropna() == 0).all()
    shifted = readings.assign(B=readings["B"] + 7.0)  # a neighbour always 7 °C warmer changes nothing
    assert np.allclose(network(["A"], model_preprocessing.compared_values(shifted), near)["nbr_week_departure"]["A"],
                       tables["nbr_week_departure"]["A"], equal_nan=True)
    later = readings.copy()
    later.iloc[30:] += 50.0  # readings after the origin day never reach its features
    for name, table in network(["A", "B", "C"], model_preprocessing.compared_values(later), near).items():
        assert np.allclose(table.iloc[:30], tables[name].iloc[:30], equal_nan=True), name


def _follower_network(days: int = 800) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Station B reads what upwind station A read the day before; 600 training days, then test days; every
    reading accepted."""
    dates = pd.date_range("2020-01-01", periods=days, freq="D")
    rng = np.random.default_rng(3)
    upwind = pd.Series(np.cumsum(rng.normal(0, 1, days)) * 0.3 + rng.normal(0, 2, days), index=dates)
    readings = pd.DataFrame({"A": upwind, "B": upwind.shift(1) + rng.normal(0, 0.3, days)})
    period = pd.DataFrame(np.where((dates < dates[600])[:, None], TRAIN, TEST).repeat(2, axis=1),
                          index=dates, columns=readings.columns)
    accepted = pd.DataFrame(True, index=dates, columns=readings.columns)
    return readings, period, accepted, quality_control.fit_climatology(readings.where(period == TRAIN))


def test_the_ridge_feature_forecasts_each_block_of_training_days_from_a_fit_on_the_other_blocks():
    """Stacking without a leak: moving the targets of some early training days leaves the feature's forecasts
    from those days as they were (their own targets never reach their fit), while later blocks and the
    baseline, fitted on them, move."""
    readings, period, accepted, coefs = _follower_network()

    def forecasts(observed):
        return model_preprocessing.neighbours_ridge(["B"], model_preprocessing.departures(readings, coefs), observed,
                                                    period, accepted, coefs, {"B": ["A"]}, 1)

    baseline, stacked = forecasts(readings)
    moved = readings.copy()
    moved.iloc[30:90, 1] += 25.0  # targets of origins 29-88, inside the first of five blocks of ~600 days
    baseline_moved, stacked_moved = forecasts(moved)
    assert np.allclose(stacked_moved[1][29:89, 0], stacked[1][29:89, 0])
    assert not np.allclose(stacked_moved[1][300:400, 0], stacked[1][300:400, 0])
    assert not np.allclose(baseline_moved[1][29:89, 0], baseline[1][29:89, 0])
    test = slice(601, 799)  # the test days: one fit on every training day, for both
    assert np.allclose(stacked_moved[1][test, 0] - stacked[1][test, 0],
                       baseline_moved[1][test, 0] - baseline[1][test, 0], atol=0.5)
    error = np.abs(stacked[1][test, 0] - readings["B"].shift(-1).to_numpy()[test])
    assert np.nanmean(error) < 0.5


def test_forecast_neighbours_are_the_stations_that_read_today_what_the_station_reads_tomorrow():
    """B follows A a day late and C is B's same-day twin: the quality control pairs B with C, the forecast
    with A, whose today is B's tomorrow."""
    rng = np.random.default_rng(8)
    days = 400
    upwind = rng.normal(0, 3, days)
    follower = np.concatenate([[0.0], upwind[:-1]]) + rng.normal(0, 0.3, days)
    anomaly = pd.DataFrame({"A": upwind, "B": follower, "C": follower + rng.normal(0, 0.3, days)},
                           index=pd.date_range("2020-01-01", periods=days, freq="D"))
    assert [b["station"] for b in quality_control.learn_neighbours(anomaly, 1, 0.3)["B"]["buddies"]] == ["C"]
    assert quality_control.forecast_neighbours(anomaly, 1, 0.3)["B"] == ["A"]
    assert quality_control.forecast_neighbours(anomaly, 2, 0.3)["A"] == []  # nothing foretells A


def test_a_station_that_holds_another_s_record_is_never_its_forecast_neighbour():
    rng = np.random.default_rng(8)
    upwind = rng.normal(0, 3, 400)
    anomaly = pd.DataFrame({"A": upwind, "B": np.concatenate([[0.0], upwind[:-1]]) + rng.normal(0, 0.3, 400)},
                           index=pd.date_range("2020-01-01", periods=400, freq="D"))
    anomaly["A2"] = anomaly["A"]
    assert quality_control.forecast_neighbours(anomaly, 2, 0.3)["B"] == ["A", "A2"]
    assert quality_control.forecast_neighbours(anomaly, 2, 0.3, {"B": ["A2"]})["B"] == ["A"]


def own_files_of(root, own):
    """The project's simulated stations as a folder of the user's own files (date, temperature)."""
    own.mkdir()
    for path in sorted((root / "data/train/raw").glob("*.csv")):
        table = pd.concat([pd.read_csv(path), pd.read_csv(root / "data/test/raw" / path.name)])
        table.to_csv(own / path.name, index=False)
    return own


def stage_2_warnings(project, tmp_path, capsys, edit, marker: str, **params) -> tuple[str, list[str]]:
    """Stages 1 and 2 on the project's stations as own files, the first file's readings changed by ``edit``
    (a table in, a column of readings out): that station, and stage 2's warnings that hold ``marker``."""
    root, _ = project
    own = own_files_of(root, tmp_path / "own")
    first = sorted(own.glob("*.csv"))[0]
    table = pd.read_csv(first)
    table["temperature"] = edit(table)
    table.to_csv(first, index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source=str(own), **params)
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == 0
    return first.stem, [line for line in capsys.readouterr().err.splitlines() if marker in line]


def test_a_training_period_too_short_for_any_climatology_stops_stage_2_with_what_to_change(tmp_path, capsys):
    """66 training days (data.test_steps leaves more than min_steps): no station gets a climatology or its
    own ridge, so every training row lacked its climate features and stage 3 stopped with scikit-learn's
    "Input X contains NaN" as an internal error."""
    params = write_params(tmp_path / "p.toml", **{**TINY, "test_steps": 1030})
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()[-1]
    assert "is too short to learn a forecast from: no station has the 70 accepted training readings its " \
           "climatology needs (the most: 66); lower data.test_steps" in err, err
    assert not (root / "data/train/features.csv").exists()


def unit_changed(table: pd.DataFrame) -> pd.Series:
    """°C written where °F is read, from the middle of the record's years on."""
    later = table.index >= len(table) // 2
    return table["temperature"].where(~later, ((table["temperature"] - 32) * 5 / 9).round(1))


def test_stage_2_names_a_station_left_without_a_neighbour(project, tmp_path, capsys):
    """A record whose unit changed partway correlates with none of its neighbours, and only the gross checks
    judge it: stage 2 names it and how near its best candidate came; the network's other stations keep theirs."""
    station, warned = stage_2_warnings(project, tmp_path, capsys, unit_changed, "with no neighbour whose daily")
    assert len(warned) == 1 and warned[0].count(": best 0.") == 1 and f"({station}: best 0." in warned[0]
    assert "changed unit, instrument or site partway" in warned[0]
    detector = json.loads((project[0] / "models/detector.json").read_text())
    assert quality_control.without_neighbours(detector).keys() == {station}


def test_a_network_none_of_whose_stations_has_a_neighbour_is_told_so_not_to_check_its_records(caplog):
    """Oahu's cooperative stations, each read at its observer's hour, correlate 0.67 at best: every station
    alone is the network's nature, and the warning says so instead of asking for each record to be checked."""
    def alone(best: str, correlation: float) -> dict:
        return {"neighbours": {"buddies": [], "nearest": {"station": best, "correlation": correlation}}}

    model_preprocessing.log_without_neighbours({"stations": {"A": alone("B", 0.67), "B": alone("A", 0.67)}}, 0.7)
    assert "no station of the network has one" in caplog.text and "check it" not in caplog.text
    assert "(A: best 0.67, B; B: best 0.67, A)" in caplog.text


def test_stage_2_names_a_record_whose_unit_changed_partway_and_from_when(project, tmp_path, capsys):
    station, warned = stage_2_warnings(project, tmp_path, capsys, unit_changed, "that part of its file")
    own = pd.read_csv(tmp_path / "own" / f"{station}.csv")
    changed = pd.Timestamp(own["date"].iat[len(own) // 2])
    month = changed.strftime("%Y-%m") if changed.day <= 15 else (changed + pd.offsets.MonthBegin()).strftime("%Y-%m")
    assert len(warned) == 1 and f"station {station}: its readings from {month} on lie" in warned[0]
    assert "°C below those of the same months before, and swing 0." in warned[0]


def test_a_change_of_unit_is_found_in_a_station_alone_and_weather_is_not_one():
    days = pd.date_range("2000-01-01", "2009-12-31", freq="D")
    rng = np.random.default_rng(0)
    season = 10 - 12 * np.cos(2 * np.pi * days.day_of_year / 365.25)
    weather = pd.Series(rng.normal(0, 3, len(days))).ewm(alpha=0.4).mean().to_numpy()
    celsius = pd.DataFrame({"A": season + weather}, index=days)
    celsius.iloc[::7] = np.nan  # a day a week unread
    assert quality_control.unit_changes(celsius) == []
    written = celsius.copy()
    written.loc["2006-03-01":] = written.loc["2006-03-01":] * 9 / 5 + 32  # °F from March 2006, read as °C
    found = quality_control.unit_changes(written)
    assert [(f["station"], f["from"]) for f in found] == [("A", pd.Timestamp("2006-03-01"))]
    assert 30 < found[0]["change"] < 40 and 1.7 < found[0]["ratio"] < 1.9
    moved = celsius.copy()  # to a mountain top: 16 °C colder, its weather 1.3 times as wild; no unit reads so
    moved.loc["2006-03-01":] = moved.loc["2006-03-01":] * 1.3 - 16 - 0.3 * moved["A"].mean()
    assert quality_control.unit_changes(moved) == []
    coded = celsius.copy()
    coded.loc[:"2003-12-31"] = -72.8  # years of an undeclared missing-value code: no unit, and no warning either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quality_control.unit_changes(coded) == []


def test_a_best_correlation_just_under_the_least_is_not_shown_as_reaching_it(caplog):
    """0.6996 under min_correlation = 0.7 reads "best 0.69": "0.70" would read as meeting the least."""
    detector = {"stations": {"HILL": {"neighbours": {"buddies": [], "nearest": {"station": "VALE", "correlation":
                                                                                 0.6996}}},
                             "VALE": {"neighbours": {"buddies": [{"station": "HILL"}]}}}}
    with caplog.at_level("WARNING", logger="pipeline"):
        model_preprocessing.log_without_neighbours(detector, 0.7)
    assert "(HILL: best 0.69, VALE)" in caplog.text


@pytest.mark.parametrize("elsewhere", [0, 2])
def test_a_probable_code_is_named_as_written_with_what_declaring_it_would_lose(caplog, elsewhere):
    """0 °F written for missing July days at four stations: named as written ("0.0 °F", never "-0.0"), its
    flagged readings counted, and any reading of the same value that passed as weather (a January day at 0 °F)
    named as what declaring the code would lose."""
    code = round((0 - 32) * 5 / 9, 2)
    found = pd.DataFrame({"most_stations": [4], "flagged": [8], "flagged_days": [2], "readings": [8 + elsewhere],
                          "days": [2 + elsewhere]}, index=[code])
    with caplog.at_level("WARNING", logger="pipeline"):
        model_preprocessing.log_probable_codes(found, "F")
    assert "(0.0 °F as written in the files); 8 reading(s) on 2 day(s) flagged gross" in caplog.text
    assert ("2 reading(s) of the same value on other days pass as weather: declaring it in [import] missing_values "
            "would drop those too" in caplog.text) == bool(elsewhere)
    assert ("flagged gross; declare it in [import] missing_values" in caplog.text) == (not elsewhere)


def test_stage_2_names_two_files_that_hold_one_record(project, tmp_path, capsys):
    """A station list that names one station twice: stage 2 says which two files, and neither is the other's
    neighbour in the detector or in the forecast features."""
    root, params = project
    own = own_files_of(root, tmp_path / "own")
    first = sorted(own.glob("*.csv"))[0]
    shutil.copy(first, own / "TWIN.csv")
    params = write_params(tmp_path / "own.toml", **TINY, source=str(own))
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "two names" in line]
    assert len(warned) == 1 and f"stations {first.stem} and TWIN read the same (to within 0.3 °C) on 100 %" in warned[0]
    detector = json.loads((root / "models/detector.json").read_text())
    buddies = detector["stations"]["TWIN"]["neighbours"]["buddies"]
    assert buddies and first.stem not in [b["station"] for b in buddies]


def test_stage_2_names_a_code_one_station_writes_on_most_of_its_days(project, tmp_path, capsys):
    def coded(table):
        return table["temperature"].mask(np.random.default_rng(1).random(len(table)) < 0.6, -72.8)

    station, warned = stage_2_warnings(project, tmp_path, capsys, coded, "probably a missing-value code")
    assert len(warned) == 1 and f"station {station}: -72.8 on many training days" in warned[0]
    flags = pd.concat([pd.read_csv(project[0] / f"data/{part}/flags.csv") for part in ("train", "test")])
    assert (flags.loc[flags["observed"] == -72.8, "flag"] == "gross").all()


def test_stage_2_names_a_station_whose_readings_are_mostly_flagged(project, tmp_path, capsys):
    """A dead sensor that writes 0.0 every day: the quality control flags it, and stage 2 says so by name
    (its readings are still scored, so the user must hear why its persistence is unbeatable)."""
    station, warned = stage_2_warnings(project, tmp_path, capsys, lambda table: 0.0, "not a temperature record")
    assert len(warned) == 1 and f"station {station}: " in warned[0]
    flags = pd.concat([pd.read_csv(project[0] / f"data/{part}/flags.csv") for part in ("train", "test")])
    dead = flags[(flags["station"] == station) & flags["observed"].notna()]
    said = re.search(r"(\d+) of its (\d+) readings flagged", warned[0])
    assert (int(said[1]), int(said[2])) == ((dead["flag"] != "none").sum(), len(dead))
    assert int(said[1]) >= 0.5 * len(dead)


def test_a_record_that_never_changes_is_named_as_no_temperature_record(project, tmp_path, capsys):
    """A file whose readings are one value throughout (a stuck sensor, a fill value read as the temperature)
    leaves the quality control nothing to learn; the line said more training days were needed."""
    root, _ = project
    own = own_files_of(root, tmp_path / "own")
    files = sorted(own.glob("*.csv"))
    for other in files[1:]:
        other.unlink()
    pd.read_csv(files[0]).assign(temperature=5.0).to_csv(files[0], index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source=str(own), holdout_stations=0)
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"no station's training readings ever change ({files[0].stem}: 5 at all " in err
    assert "a stuck sensor or a fill value" in err and "more training days" not in err


def test_too_few_training_readings_for_the_quality_control_say_what_to_change():
    learned = pd.DataFrame({"A": [1.0, np.nan, np.nan], "B": [np.nan, 2.0, np.nan]})
    assert model_preprocessing.why_no_scales(learned) == (
        "the training period is too short to learn the quality control's scales (the most training readings at "
        "one station: 1); lower data.test_steps, or add earlier readings")


def test_a_station_with_weeks_of_history_alone_ends_in_a_clear_line_not_an_internal_error(project, tmp_path, capsys,
                                                                                          recwarn):
    """Too few readings for any climatology (a station opened weeks before the test period): stage 2 says
    the training period is too short, without a numerical warning on the way, and writes no features."""
    root, params = project
    own = own_files_of(root, tmp_path / "own")
    files = sorted(own.glob("*.csv"))
    pd.read_csv(files[0]).head(TINY["test_steps"] + 35).to_csv(files[0], index=False)
    for other in files[1:]:
        other.unlink()
    params = write_params(tmp_path / "own.toml", **TINY, source=str(own), holdout_stations=0)
    assert run_stage(data_creation, root, params) == 0
    features = snapshot(root)
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert not [warning for warning in recwarn if issubclass(warning.category, RuntimeWarning)]
    assert "no station has the 70 accepted training readings its climatology needs (the most: 35)" \
        in capsys.readouterr().err
    assert snapshot(root) == features


def test_only_the_steps_the_first_test_rows_read_that_the_quality_control_left_empty_hold_the_climatology(
        monkeypatch):
    days = pd.date_range("2020-01-01", periods=8, freq="D")
    outside, train, test = model_preprocessing.OUTSIDE, TRAIN, TEST
    period = pd.DataFrame({"A": [outside, train, train, train, train, test, test, outside],
                           "B": [train] * 5 + [test] * 3}, index=days)
    repaired = pd.DataFrame({"A": [np.nan, 1.0, np.nan, np.nan, 2.0, np.nan, 3.0, np.nan], "B": [1.0] * 8},
                            index=days)
    climates = pd.DataFrame({"A": [10.0] + [0.0] * 6})  # a level of 10 and no seasons
    monkeypatch.setattr(features, "HISTORY_STEPS", 2)  # the first test rows read the two days before the test
    filled, in_gaps = model_preprocessing.climate_in_gaps(repaired, period, climates, days[5])
    # Outside the record, and training days no test row reads, stay empty.
    assert filled["A"].fillna(-1.0).tolist() == [-1.0, 1.0, -1.0, 10.0, 2.0, 10.0, 3.0, -1.0]
    assert filled["B"].equals(repaired["B"])
    assert in_gaps["A"].tolist() == [False, False, False, True, False, True, False, False] and not in_gaps["B"].any()
    assert model_preprocessing.climate_in_gaps(repaired.fillna(0.0), period, climates, days[5])[1] is None


@pytest.mark.parametrize(("begins", "gap"), [(10, 20), (10, 50), (-30, 60)])
def test_a_station_alone_is_forecast_again_from_the_first_reading_after_a_gap_of_weeks(project, tmp_path, monkeypatch,
                                                                                        begins, gap):
    """A station without neighbours had no value on the days of a gap of over a week, and no forecast until
    weeks after it: the readings after the gap went unscored. Every test reading now has its forecast row (after
    a gap begun ``begins`` days into the test period, or before it), and the interval's spread is never made of
    the climatology put in the gap."""
    root, _ = project
    own = own_files_of(root, tmp_path / "own")
    files = sorted(own.glob("*.csv"))
    for other in files[1:]:
        other.unlink()
    table = pd.read_csv(files[0])
    first_test = len(table) - TINY["test_steps"]
    dropped = table["date"].iloc[first_test + begins:first_test + begins + gap]
    table.drop(dropped.index).to_csv(files[0], index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source=str(own), holdout_stations=0)
    assert run_stage(data_creation, root, params) == 0
    assert run_stage(model_preprocessing, root, params) == 0
    rows = pd.read_csv(root / "data/test/features.csv")
    read = pd.read_csv(root / "data/test/raw" / files[0].name)
    assert sorted(rows["target_date"][rows["target"].notna()]) == sorted(read["date"])
    in_gap = rows[rows["date"].isin(dropped)]
    test_start = json.loads((root / "data/source.json").read_text())["test_start"]
    first_origin = (pd.Timestamp(test_start) - pd.Timedelta(days=1)).strftime("%Y-%m-%d")  # forecasts the first
    assert len(in_gap) == (dropped >= first_origin).sum()
    assert rows["repaired_today"].nunique() == 2  # scaled: repaired or not
    assert (in_gap["repaired_today"] == rows["repaired_today"].max()).all()
    trained = pd.read_csv(root / "data/train/features.csv")
    assert in_gap[SPREAD_COLUMN].min() >= 0.5 * trained[SPREAD_COLUMN].median()
    # What is learned is what the readings alone teach: the same training rows and scaler as with no gap filled.
    learned = [(root / name).read_bytes() for name in ("data/train/features.csv", "models/scaler.joblib")]
    monkeypatch.setattr(model_preprocessing, "climate_in_gaps", lambda repaired, *_: (repaired, None))
    assert run_stage(model_preprocessing, root, params) == 0
    assert [(root / name).read_bytes() for name in ("data/train/features.csv", "models/scaler.joblib")] == learned


def test_stage_2_names_a_file_written_in_another_unit(project, tmp_path, capsys):
    def in_fahrenheit(table):  # °F among °C files
        return (table["temperature"] * 9 / 5 + 32).round(1)

    station, warned = stage_2_warnings(project, tmp_path, capsys, in_fahrenheit, "another unit", max_temp=200.0)
    assert len(warned) == 1 and f"station {station}: its mean" in warned[0]


def test_at_scale_the_quality_control_s_neighbours_are_sought_among_the_nearest_listed_stations(project, monkeypatch,
                                                                                                capsys):
    """The station list data_creation.py writes gives the positions the quality control's candidates come from
    at scale (and the order in which the forecast's neighbours are sought), and it is one of stage 2's inputs: a
    changed list is refused as a changed raw file is."""
    from station_forecast.quality_control import neighbours as qc_neighbours

    root, params = project
    given = []
    original = qc_neighbours.pair_statistics

    def spy(anomaly, lead=0, wanted=1, positions=None, by_position=True):
        given.append((lead, positions, by_position))
        return original(anomaly, lead, wanted, positions, by_position)

    monkeypatch.setattr(qc_neighbours, "ALL_PAIRS_STATIONS", 0)
    monkeypatch.setattr(qc_neighbours, "pair_statistics", spy)
    assert run_stage(model_preprocessing, root, params) == 0
    listed = pd.read_csv(root / "data/stations.csv")[["latitude", "longitude"]].to_numpy()
    same_day = [(positions, nearest) for lead, positions, nearest in given if lead == 0]
    assert same_day and all(np.array_equal(p, listed) and nearest for p, nearest in same_day)
    # Upwind: the candidates from the readings, the positions only ordering the blocks; of the stations trained
    # on (the held-out station, the last by name, is not).
    upwind = [(positions, nearest) for lead, positions, nearest in given if lead == 1]
    assert upwind and all(np.array_equal(p, listed[:-1]) and not nearest for p, nearest in upwind)
    path = root / "data/stations.csv"
    path.write_text(path.read_text().replace(",5", ",6", 1))
    assert run_stage(model_preprocessing, root, params) == errors.EXIT_BAD_INPUT
    assert "stations.csv" in capsys.readouterr().err
