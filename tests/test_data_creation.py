import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    REAL_FORMAT,
    REAL_FORMAT_FLAWS,
    ROOT,
    TINY,
    data_creation,
    run_stage,
    snapshot,
    write_params,
    write_real_format_station,
)

from station_forecast import errors, importing, manifest, storage
from station_forecast.errors import PipelineError
from station_forecast.flags import INJECTED
from station_forecast.params import load_params


@pytest.fixture(scope="module")
def params():
    return load_params()


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


@pytest.mark.parametrize("kind", INJECTED)
def test_each_kind_matches_its_configured_rate(params, kind):
    anomalies = {k: v if k.endswith("_days") or k == f"{kind}_rate" else 0.0 for k, v in params["anomalies"].items()}
    sim = dict(params["simulation"], n_stations=300, clean_stations=0, heavy_stations=0)
    simulation = data_creation.simulate(sim, 0, anomalies)
    observed, labels = simulation.observed, simulation.labels
    realised = (labels == kind).mean()
    # Within three standard deviations of a Poisson count of runs (long runs are few, so their share varies more).
    runs = labels.size * anomalies[f"{kind}_rate"] / np.mean(anomalies[f"{kind}_days"])
    assert realised == pytest.approx(anomalies[f"{kind}_rate"], rel=3 / np.sqrt(runs))
    assert set(np.unique(labels)) == {"none", kind}
    assert np.isnan(observed).mean() == (realised if kind == "missing" else 0.0)


def test_clean_and_heavy_stations(params):
    simulation = data_creation.simulate(params["simulation"], 1, params["anomalies"])
    climates, labels = simulation.climates, simulation.labels
    per_station = (labels != "none").mean(axis=1)
    assert per_station[0] == 0.0  # clean_stations = 1
    assert per_station[1] > 2 * np.median(per_station[2:])  # heavy_stations = 1, factor 4
    assert list(climates["role"]).count("holdout") == 1


def test_anomalies_change_readings_as_their_kind_says(params):
    simulation = data_creation.simulate(params["simulation"], 1, params["anomalies"])
    clean, observed, labels = simulation.clean, simulation.observed, simulation.labels
    error = observed - clean
    normal_error = np.abs(error[labels == "none"])
    assert normal_error.max() < 3.0  # measurement noise only
    assert np.quantile(np.abs(error[labels == "spike"]), 0.05) > 3.0  # (a spike may sit on a drift)
    assert np.abs(error[labels == "level_shift"]).mean() > 2.0
    assert np.isnan(observed[labels == "missing"]).all()
    stuck = labels == "stuck"
    within_run = stuck[:, 1:] & stuck[:, :-1]
    assert within_run.sum() > 50
    # (two stuck runs back to back freeze at two values, so not quite every pair)
    assert (observed[:, 1:][within_run] == observed[:, :-1][within_run]).mean() > 0.97
    # A date offset: each reading is the day before's or the day after's temperature, noise and all.
    keyed = labels[:, 1:-1] == "date_offset"
    other_day = np.minimum(np.abs(observed[:, 1:-1] - clean[:, :-2]), np.abs(observed[:, 1:-1] - clean[:, 2:]))
    assert keyed.sum() > 50
    assert np.median(other_day[keyed]) < 0.5 * np.median(np.abs(error[:, 1:-1][keyed]))


def _daily_anomalies(simulation) -> np.ndarray:
    """Clean temperature minus each station's own seasonal fit: the day-to-day weather."""
    dates = pd.DatetimeIndex(simulation.dates)
    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    design = np.column_stack([np.ones(len(dates)), np.arange(len(dates)), np.sin(angle), np.cos(angle),
                              np.sin(2 * angle), np.cos(2 * angle)])
    coefs = np.linalg.lstsq(design, simulation.clean.T, rcond=None)[0]
    return simulation.clean - (design @ coefs).T


def test_weather_is_shared_by_neighbours_the_more_the_closer(params):
    sim = dict(params["simulation"], n_stations=40)
    simulation = data_creation.simulate(sim, 0, params["anomalies"])
    xy = simulation.climates[["x_km", "y_km"]].to_numpy()
    assert xy.min() >= 0 and xy.max() <= sim["region_km"]
    distance = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    correlation = np.corrcoef(_daily_anomalies(simulation))
    pairs = np.triu_indices(len(xy), 1)
    near = correlation[pairs][distance[pairs] < 100]
    far = correlation[pairs][distance[pairs] > 250]
    assert 0.8 <= np.median(near) <= 0.97 and near.min() > 0.7
    assert np.median(far) < np.median(near) - 0.03


def test_weather_has_heavy_tails_and_a_wilder_winter(params):
    simulation = data_creation.simulate(params["simulation"], 0, params["anomalies"])
    change = np.diff(_daily_anomalies(simulation), axis=1)
    standardised = change / change.std()
    assert np.mean(standardised**4) > 3.5  # a normal distribution's kurtosis is 3
    month = pd.DatetimeIndex(simulation.dates[1:]).month
    assert change[:, np.isin(month, [12, 1, 2])].std() > 1.2 * change[:, np.isin(month, [6, 7, 8])].std()


def test_regional_extremes_are_labelled_and_hit_neighbours_together(params):
    simulation = data_creation.simulate(params["simulation"], 0, params["anomalies"])
    events = simulation.events
    assert set(np.unique(events)) == {"none", "cold_snap", "heat_wave", "front"}
    in_event = np.isin(events, ["cold_snap", "heat_wave"])
    assert 0.005 < in_event.mean() < 0.15
    stations_per_event_day = in_event.sum(axis=0)[in_event.any(axis=0)]
    assert np.median(stations_per_event_day) >= 2  # a regional event, not one station's fault
    # weather, not a fault: the labels of faults and events are independent
    assert (simulation.labels[in_event] == "none").mean() > 0.7


def test_a_front_splits_the_neighbours_for_a_day_and_changes_no_other_draw(params):
    """Fronts add weather that differs between neighbours the day one crosses the region (the stations it has
    passed against those it has not) and are labelled where they move a reading 2 °C or more; every other draw
    of the simulation (the faults, their places and kinds) is the same with or without them."""
    calm = data_creation.simulate({**params["simulation"], "fronts_per_year": 0.0}, 0, params["anomalies"])
    windy = data_creation.simulate({**params["simulation"], "fronts_per_year": 24.0}, 0, params["anomalies"])
    assert (calm.labels == windy.labels).all() and not (calm.events == "front").any()
    front = windy.clean - calm.clean
    assert ((windy.events == "front") == ((np.abs(front) >= 2.0) & (calm.events == "none"))).all()
    assert (front.max(axis=0) - front.min(axis=0)).max() >= 4.0  # some day, neighbours either side of a front
    assert np.abs(front).mean() > 0.1


def test_the_network_is_simulated_a_block_at_a_time_from_the_same_draws(params):
    """Each block of stations starts where every random stream stood after the blocks before it, so the faults,
    their places and the weather events do not depend on the block size, and the temperatures only by the
    rounding of a matrix product's sums; what the network keeps beside its blocks grows by far less than a
    station's days per station."""
    sim = dict(params["simulation"], n_stations=23)
    whole = data_creation.simulate(sim, 1, params["anomalies"], block_stations=23)
    blocks = data_creation.simulate(sim, 1, params["anomalies"], block_stations=4)
    assert whole.climates.equals(blocks.climates)
    assert (whole.labels == blocks.labels).all() and (whole.events == blocks.events).all()
    np.testing.assert_allclose(blocks.clean, whole.clean, rtol=0, atol=1e-9)
    assert (np.isnan(whole.observed) == np.isnan(blocks.observed)).all()
    assert np.nanmax(np.abs(blocks.observed - whole.observed)) <= 0.1 + 1e-9

    def held(n_stations: int) -> int:
        network = data_creation.plan(dict(sim, n_stations=n_stations), 1, params["anomalies"], block_stations=4)
        shared = (network.regional, network.events, network.fronts)
        return network.climates.memory_usage(deep=True).sum() + sum(
            value.nbytes for part in shared for value in part.values())

    days = len(whole.dates)
    assert held(230) - held(23) < (230 - 23) * days * 8 / 10


def test_whole_degree_fahrenheit_readings_repeat_more_often(params):
    repeats = {}
    for resolution in ("0.1C", "1F"):
        sim = dict(params["simulation"], resolution=resolution)
        observed = data_creation.simulate(sim, 0, {k: 0.0 if k.endswith("_rate") else v
                                                   for k, v in params["anomalies"].items()}).observed
        fahrenheit = observed * 9 / 5 + 32
        if resolution == "1F":
            np.testing.assert_allclose(fahrenheit, np.round(fahrenheit), atol=0.01)
        repeats[resolution] = np.mean(np.diff(observed, axis=1) == 0)
    assert repeats["1F"] > 2 * repeats["0.1C"]


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


@pytest.mark.parametrize(("key", "value", "said"), [("min_temp", 0.0, "reach -"), ("max_temp", 20.0, "reach [2-9]")])
def test_a_simulation_beyond_the_possible_range_stops_stage_1_naming_the_parameters(tmp_path, capsys, key, value,
                                                                                   said):
    """preprocessing.min_temp above the simulated winter (or max_temp below its summer): stage 2 refused a
    line of a raw file stage 1 had just written, as if it were the user's. Stage 1 names the parameters and
    leaves the last good run's files."""
    root = tmp_path / "root"
    assert run_stage(data_creation, root, write_params(tmp_path / "p.toml", **TINY)) == 0
    before = snapshot(root)
    narrow = write_params(tmp_path / "narrow.toml", **TINY, **{key: value})
    assert run_stage(data_creation, root, narrow) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.search(f"narrow.toml: the simulated readings {said}", err) and "min_temp .. max_temp" in err, err
    assert snapshot(root) == before


def test_station_files_are_the_same_bytes_on_any_number_of_threads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_creation, "STATIONS_PER_CHUNK", 2)  # three chunks of the five stations
    params = write_params(tmp_path / "p.toml", **TINY)
    files = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("PIPELINE_THREADS", threads)
        root = tmp_path / threads
        assert run_stage(data_creation, root, params) == 0
        assert f"working on {threads} thread(s)" in capsys.readouterr().err
        files[threads] = {f.relative_to(root): f.read_bytes() for f in sorted((root / "data").rglob("*.csv"))}
    # train, test and truth per station, less the held-out one's train file, plus the truth's and the positions'
    # station lists
    assert len(files["1"]) == 3 * TINY["n_stations"] + 1 and files["1"] == files["3"]


def test_split_is_in_time_and_holdout_stations_never_reach_training(built):
    root, _ = built
    stations = pd.read_csv(root / "data/truth/stations.csv")
    test_start = json.loads((root / "data/source.json").read_text())["test_start"]
    last_day = pd.read_csv(next((root / "data/truth").glob("ST0*.csv")))["date"].max()
    assert pd.Timestamp(last_day) - pd.Timestamp(test_start) == pd.Timedelta(days=TINY["test_steps"] - 1)
    for station, role in zip(stations["station"], stations["role"], strict=True):
        test = pd.read_csv(root / f"data/test/raw/{station}.csv")
        train_file = root / f"data/train/raw/{station}.csv"
        if role == "holdout":
            assert not train_file.exists()
        else:
            train = pd.read_csv(train_file)
            assert train["date"].max() < test_start <= test["date"].min()


def test_observation_files_hold_no_ground_truth(built):
    root, _ = built
    for path in (root / "data").glob("*/raw/*.csv"):
        assert list(pd.read_csv(path, nrows=1).columns) == ["date", "temperature"]
    truth = pd.read_csv(next((root / "data/truth").glob("ST*.csv")))
    assert list(truth.columns) == ["date", *storage.TRUTH_COLUMNS]
    stations = pd.read_csv(root / "data/truth/stations.csv")
    assert {"station", "role", "x_km", "y_km"} <= set(stations.columns)


def test_the_simulated_network_s_station_list_places_it_on_the_globe_as_its_kilometres_say(built):
    """data/stations.csv holds positions only (no climate, no role): what a real network's list gives."""
    root, _ = built
    listed = pd.read_csv(root / "data/stations.csv")
    truth = pd.read_csv(root / "data/truth/stations.csv")
    assert list(listed.columns) == ["station", "latitude", "longitude"]
    assert list(listed["station"]) == list(truth["station"])
    corner_lat, corner_lon = data_creation.SIMULATED_CORNER
    north_km = (listed["latitude"] - corner_lat) * data_creation.KM_PER_DEGREE
    east_km = (listed["longitude"] - corner_lon) * data_creation.KM_PER_DEGREE * np.cos(np.radians(corner_lat))
    assert np.allclose(north_km, truth["y_km"], atol=0.01) and np.allclose(east_km, truth["x_km"], atol=0.01)
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == len(listed)


def test_fewer_stations_leave_no_stale_files(built, tmp_path):

    root = tmp_path / "p"
    shutil.copytree(built[0], root)
    params = write_params(tmp_path / "fewer.toml", **{**TINY, "n_stations": 3})
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.stem for p in (root / "data/test/raw").glob("*.csv")) == ["ST001", "ST002", "ST003"]


def _import_params() -> dict:
    params = load_params()
    return {"data": dict(params["data"], holdout_stations=0), "pre": params["preprocessing"],
            "import": {k: REAL_FORMAT.get(k, v) for k, v in params["import"].items()}}


def test_a_real_format_file_is_cleaned_and_every_dropped_row_counted(tmp_path):
    write_real_format_station(tmp_path / "HOME.csv")
    p = _import_params()
    table, report = importing.read_user_station(tmp_path / "HOME.csv", p["import"], -90.0, 60.0)
    assert {k: report[k] for k in REAL_FORMAT_FLAWS} == REAL_FORMAT_FLAWS
    assert table["date"].is_monotonic_increasing and table["date"].is_unique
    assert table["temperature"].between(-30, 45).all()  # converted from °F
    assert (report["first"], report["last"]) == ("2020-01-01", "2022-12-31")


@pytest.mark.parametrize(("dates", "hint"), [
    (["2020-01-01T06:00:00Z", "2020-01-02T06:00:00Z"], '; they read as import.date_format = "%Y-%m-%dT%H:%M:%S%z"'),
    (["2020-01-02 06:00", "2020-01-13 06:00"], '; they read as import.date_format = "%Y-%m-%d %H:%M"'),
    (["02/01/2020", "03/01/2020"], '; they read as import.date_format = "%d/%m/%Y" or "%m/%d/%Y" (every date fits '
                                   "each: which is meant, only the source says)"),
    ([f"{day}/01/2020" for day in range(1, 14)], '; they read as import.date_format = "%d/%m/%Y"'),
    (["2020-13-01", "2020-14-01"], ""),
])
def test_dates_the_format_does_not_read_are_named_with_a_common_format_that_reads_them(tmp_path, dates, hint):
    path = tmp_path / "HOME.csv"
    path.write_text("DATE;TMAX\n" + "".join(f"{date};50\n" for date in dates))
    params = _import_params()["import"] | {"date_format": "%Y%j"}
    with pytest.raises(PipelineError) as caught:
        importing.read_user_station(path, params, -90.0, 60.0)
    assert str(caught.value) == (f"{path}: no value in column 'DATE' matches import.date_format '%Y%j' "
                                 f"(the first is {dates[0]!r}){hint}")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"DATE;TMAX\n", "header only, no data rows"),
    (b"DATE,TMAX\n01/01/2020,50\n", "no column 'DATE' (header is 'DATE,TMAX'); set import.date_column or "
                                    "import.delimiter"),
    (b"DATE;TEMP\n01/01/2020;50\n", "no column 'TMAX'"),
    (b"DATE;Tmax\n01/01/2020;50\n", "no column 'TMAX' (header is 'DATE;Tmax'); its 'Tmax' differs only in case, "
                                    "and names must match exactly; set import.temperature_column"),
    (b"DATE;Oslo;Bergen;Troms\xc3\xb8\n01/01/2020;1;2;3\n",
     "no column 'TMAX' (header is 'DATE;Oslo;Bergen;Troms\u00f8'); a column per station? set "
     'import.temperature_column = "*"'),
    (b"DATE;" + ";".join(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]).encode()
     + b"\n2020;1;2;3;4;5;6;7;8;9;10;11;12\n",
     "no column 'TMAX' (header is 'DATE;JAN;FEB;MAR;APR;MAY;JUN;JUL;AUG;SEP;OCT;NOV;DEC'); a year to a row and a "
     'column per month? set import.temperature_column = "months" (with date_format = "%Y")'),
    (b"DATE;TEMP\n01/01/2020;50\n", "no column 'TMAX' (header is 'DATE;TEMP'); set import.temperature_column"),
    (b"DATE;TMAX\n01/01/2020;50\n01/01/2020;40\n02/01/2020;51\n02/01/2020;42\n03/01/2020;52\n",
     "4 of its 5 rows share their time with a different reading: two stations' rows in one file, or readings at "
     "several times of a day whose time import.date_column does not read"),
    (b"DATE;TMAX\n2020-01-01;50\n", "no value in column 'DATE' matches import.date_format '%d/%m/%Y' "
                                    '(the first is \'2020-01-01\'); they read as import.date_format = "%Y-%m-%d"'),

    (b"\xff\xfeD\x00A\x00\x00\xd8", "starts with UTF-16's byte-order mark but is not UTF-16 text"),
    (b"DATE;TMAX\n01/01/2020;NaN\n02/01/2020;999\n", "no usable readings (1 missing value, 1 impossible); read "
                                                      "as unit 'F' its readings lie outside preprocessing's "
                                                      "[min_temp, max_temp] = [-90, 60] °C (the first: '999'): is "
                                                      "import.unit right for it?"),
    (b"DATE;TMAX\n01/01/2020;272.1\n02/01/2020;275.3\n", "no usable readings (2 impossible); read as unit 'F'"),
    (b"\n\n\n<!DOCTYPE html>\n<html lang=\"en\">\n<title>HOME.csv at main</title><table><tr><td>DATE,TMAX</td>",
     "a web page (HTML), not a CSV table: saved from the page that shows the file rather than from the file itself"),
    (b"\xef\xbb\xbf<HTML><BODY>DATE;TMAX<BR>01/01/2020;50", "a web page (HTML), not a CSV table"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d"
     b"17e2393\nsize 3162758\n", "a Git LFS pointer (132 bytes naming the file's content), not the table itself"),
    (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00", "a zip archive (an Excel .xlsx workbook is one), not CSV "
                                                     "text: save the sheet as CSV, or unzip it"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", "an old Excel .xls workbook, not CSV text: save the sheet as CSV"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip-compressed, not CSV text: name it <station>.csv.gz"),
    (b"\0" * 20_000_000, "binary data (a NUL byte at offset 0), not a CSV text file"),
    (b"DATE;TMAX\n01/01/2020;5\0\n", "binary data (a NUL byte at offset 22)"),
    (";".join(f"c{i}" for i in range(10**6)).encode() + b"\n1;2\n" * 1435,
     "the first line is longer than 65,536 bytes; not a CSV header"),
    (";".join(f"c{i}" for i in range(2000)).encode() + b"\n1;2\n", "the header has 2,000 columns, more than the 1,000"),
])
def test_an_unusable_own_file_gets_one_clear_message(tmp_path, content, message):
    import resource

    path = tmp_path / "HOME.csv"
    path.write_bytes(content)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PipelineError) as caught:
        importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)
    assert str(caught.value).startswith(f"{path}: {message}")
    # refused without parsing: no more memory than the file's bytes (a table of 10^6 columns took 7 GB)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 3 * len(content) + 50 * 2**20


def test_own_folder_problems_are_named(tmp_path):
    p = _import_params()
    with pytest.raises(PipelineError, match=r"data\.source not found \(a folder of station files, or one file\)"):
        importing.import_stations(tmp_path / "nowhere", p["data"], p["import"], p["pre"])
    with pytest.raises(PipelineError, match=r"no \.csv files in the data\.source folder"):
        importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])
    write_real_format_station(tmp_path / "HOME.csv")
    with pytest.raises(PipelineError, match=r"data\.holdout_stations = 1 leaves no station to train on"):
        importing.import_stations(tmp_path, dict(p["data"], holdout_stations=1), p["import"], p["pre"])
    with pytest.raises(PipelineError, match="no station has readings before"):
        importing.import_stations(tmp_path, dict(p["data"], test_steps=5000), p["import"], p["pre"])


def test_a_station_file_named_in_another_encoding_than_utf_8_is_named_with_the_rename(tmp_path):
    """An archive unpacked from an old zip keeps its names' Latin-1 bytes ("M\xfcnchen.csv"), which the file
    system hands over undecoded: the stage stops naming the file's bytes and how they read, where writing the
    station's name stopped it with an internal error."""
    p = _import_params()
    write_real_format_station(tmp_path / "HOME.csv")
    os.rename(tmp_path / "HOME.csv", os.path.join(os.fsencode(tmp_path), b"M\xfcnchen.csv"))
    with pytest.raises(PipelineError, match=r"the file name b'M\\xfcnchen.csv' is not UTF-8 \(an older system's "
                                            r"encoding; as Latin-1 it reads 'M\u00fcnchen.csv'\): rename it"):
        importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])


def test_own_stations_share_one_time_cut_and_the_last_can_be_held_out():
    def station(start: str, end: str) -> pd.DataFrame:
        dates = pd.date_range(start, end, freq="D")
        return pd.DataFrame({"date": dates, "temperature": 1.0})

    stations = {"A": station("2020-01-01", "2020-12-31"), "B": station("2020-03-01", "2020-10-31"),
                "C": station("2020-01-01", "2020-12-31")}
    parts, cutoff = importing.split_in_time(stations, test_steps=100, holdout_stations=1)
    assert cutoff == pd.Timestamp("2020-12-31") - pd.Timedelta(days=99)
    for name in ("A", "B"):
        assert parts[name]["train"]["date"].max() < cutoff <= parts[name]["test"]["date"].min()
    assert len(parts["B"]["test"]) == (pd.Timestamp("2020-10-31") - cutoff).days + 1  # its own last days
    assert parts["C"]["train"].empty and len(parts["C"]["test"]) == 366


def test_importing_writes_the_raw_contract_and_no_ground_truth(built, tmp_path):

    root = tmp_path / "p"
    shutil.copytree(built[0], root)  # a simulated run first: its truth must not survive the import
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, root, params) == 0
    assert not list((root / "data/truth").glob("[!.]*"))
    train, test = (pd.read_csv(root / f"data/{s}/raw/HOME.csv") for s in ("train", "test"))
    assert list(train.columns) == ["date", "temperature"]
    assert train["date"].max() < test["date"].min() and test["date"].max() == "2022-12-31"
    source = json.loads((root / "data/source.json").read_text())
    assert source["source"] == str(own) and source["files"]["HOME"]["kept"] == len(train) + len(test)


def test_a_station_file_compressed_as_archives_ship_it_imports_as_the_plain_file(tmp_path, monkeypatch):
    import gzip

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    write_real_format_station(plain / "HOME.csv")
    (packed / "HOME.csv.gz").write_bytes(gzip.compress((plain / "HOME.csv").read_bytes()))
    p = _import_params()
    (from_plain, report_plain, _), (from_packed, report_packed, _) = (
        importing.import_stations(folder, p["data"], p["import"], p["pre"]) for folder in (plain, packed))
    assert list(from_packed) == ["HOME"]
    pd.testing.assert_frame_equal(from_packed["HOME"]["train"], from_plain["HOME"]["train"])
    assert report_packed["HOME"]["file"] == "HOME.csv.gz"
    assert {k: v for k, v in report_packed["HOME"].items() if k != "file"} == \
        {k: v for k, v in report_plain["HOME"].items() if k != "file"}
    (packed / "HOME.csv").write_bytes((plain / "HOME.csv").read_bytes())
    with pytest.raises(PipelineError, match=r"names the same station as HOME\.csv"):
        importing.import_stations(packed, p["data"], p["import"], p["pre"])
    (packed / "HOME.csv").unlink()
    (packed / "AWAY.csv.gz").write_bytes(gzip.compress(b"DATE;TMAX\n")[:-8])  # cut short in transfer
    with pytest.raises(PipelineError, match=r"AWAY.csv.gz: not a complete gzip file"):
        importing.import_stations(packed, p["data"], p["import"], p["pre"])
    (packed / "AWAY.csv.gz").write_bytes(gzip.compress(b"0" * 5000))
    monkeypatch.setattr(storage, "MAX_INPUT_BYTES", 4096)  # a small file may expand to any size
    with pytest.raises(PipelineError, match=r"AWAY.csv.gz: decompresses to more than the 4,096 bytes a data file may "
                                            r"have; split a table of many stations' rows"):
        importing.import_stations(packed, p["data"], p["import"], p["pre"])
    (packed / "AWAY.csv.gz").unlink()
    (packed / "AWAY.csv").write_bytes(b"0" * 5000)  # a plain one the same, before it is read
    with pytest.raises(PipelineError, match=r"AWAY.csv: 5,000 bytes, more than the 4,096 a data file may have; split "
                                            r"a table of many stations' rows \(import.station_column\) between lines"):
        importing.import_stations(packed, p["data"], p["import"], p["pre"])


def test_a_day_s_maximum_and_minimum_make_its_mean_where_an_archive_keeps_no_mean(tmp_path):
    """Most stations of NOAA's daily archives keep TMAX and TMIN only: temperature_column = ["TMAX", "TMIN"]
    reads each day as their mean; a day missing either, or with a declared code in either, is missing."""
    (tmp_path / "export.csv").write_text(
        "STATION,DATE,TMAX,TMIN,PRCP\n"
        + "".join(f"HOME,2020-01-{day:02d},{50 + day},{30 + day},0.1\n" for day in range(1, 29))
        + "HOME,2020-01-29,55,,0\nHOME,2020-01-30,-99,31,0\nRAIN,2020-01-01,,,0.3\n")
    p = _import_params()
    imp = {**p["import"], "station_column": "STATION", "date_column": "DATE", "date_format": "%Y-%m-%d",
           "delimiter": ",", "temperature_column": ["TMAX", "TMIN"], "quantity": "mean", "unit": "F",
           "missing_values": [-99]}
    stations = importing.read_long_form([tmp_path / "export.csv"], imp, p["pre"], tmp_path)
    assert list(stations) == ["HOME"]  # the rain gauge, without a temperature, is left out
    table, counts = stations["HOME"]
    expected = ((np.arange(1, 29) * 2 + 80) / 2 - 32) * 5 / 9
    np.testing.assert_allclose(table["temperature"], expected.round(2))
    assert counts["missing_value"] == 1 and counts["missing_code"] == 1
    with pytest.raises(PipelineError, match=r"import.quantity is 'max': set quantity = \"mean\""):
        importing.read_long_form([tmp_path / "export.csv"], {**imp, "quantity": "max"}, p["pre"], tmp_path)


GHCN_BY_STATION = {"date_column": "#2", "date_format": "%Y%m%d", "delimiter": ",", "element_column": "#3",
                   "value_column": "#4", "unit": "0.1C", "missing_values": [-9999], "station_column": ""}


def _ghcn_rows(station: str, days: int, skip_tmin: int = -1) -> str:
    """GHCN-Daily by-station rows as shipped (no header; ID, YYYYMMDD, element, value in tenths, flags, time),
    the elements of a day in no fixed order, precipitation among them; day ``skip_tmin`` has no TMIN."""
    rows = []
    for day in range(1, days + 1):
        date = (pd.Timestamp("2020-01-01") + pd.Timedelta(days=day - 1)).strftime("%Y%m%d")
        rows.append(f"{station},{date},PRCP,{day % 7},,,S,")
        if day != skip_tmin:
            rows.append(f"{station},{date},TMIN,{-50 + day},,,S,")
        rows.append(f"{station},{date},TMAX,{50 + day if day != 3 else -9999},,{'I' if day == 4 else ''},S,0700")
    return "\n".join(rows) + "\n"


def test_a_ghcn_daily_by_station_file_is_read_as_shipped(tmp_path, capsys):
    """GHCN-Daily's by-station files hold a row per day and element: import.element_column and value_column
    read the element(s) temperature_column names, leave the other elements out (counted), and match a day's
    maximum and minimum by date for their mean."""
    (tmp_path / "USW00000001.csv").write_text(_ghcn_rows("USW00000001", 80, skip_tmin=10))
    p = _import_params()
    imp = {**p["import"], **GHCN_BY_STATION, "temperature_column": "TMAX", "quantity": "max"}
    table, report = importing.read_user_station(tmp_path / "USW00000001.csv", imp, -90.0, 60.0)
    assert report["rows"] == 80 and report["other_elements"] == 159  # PRCP, and TMIN but on day 10
    assert report["missing_code"] == 1 and report["kept"] == 79
    expected = pd.Series((50 + np.arange(1, 81)) / 10).drop(2).reset_index(drop=True)
    np.testing.assert_allclose(table["temperature"], expected)
    assert "159 rows of other elements not read" in importing._describe(report)

    mean = {**imp, "temperature_column": ["TMAX", "TMIN"], "quantity": "mean"}
    table, report = importing.read_user_station(tmp_path / "USW00000001.csv", mean, -90.0, 60.0)
    assert report["rows"] == 80 and report["other_elements"] == 80
    assert report["missing_value"] == 1 and report["missing_code"] == 1  # day 10 without TMIN, day 3 coded
    day = np.arange(1, 81)
    expected = pd.Series(((50 + day) + (-50 + day)) / 20, index=day).drop([3, 10]).to_numpy()
    np.testing.assert_allclose(table["temperature"], expected)
    assert table["date"].is_monotonic_increasing and not report["out_of_order"]

    # The same days as NCEI's data service ships them: a row per day, flags beside each element in quoted fields.
    (tmp_path / "access").mkdir()
    (tmp_path / "access/USW00000001.csv").write_text(
        "STATION,DATE,LATITUDE,LONGITUDE,ELEVATION,NAME,PRCP,PRCP_ATTRIBUTES,TMAX,TMAX_ATTRIBUTES,TMIN,TMIN_ATTRIBUTES\n"
        + "".join(f'"USW00000001","{(pd.Timestamp("2020-01-01") + pd.Timedelta(days=d - 1)).date()}","40.7","-73.9",'
                  f'"42.7","CENTRAL PARK, NY US","{d % 7}",",,W,2400","{50 + d if d != 3 else -9999}",",,W",'
                  f'"{-50 + d if d != 10 else ""}",",,W"\n' for d in range(1, 81)))
    wide = {**mean, "element_column": "", "value_column": "", "date_column": "DATE", "date_format": "%Y-%m-%d"}
    from_wide, _ = importing.read_user_station(tmp_path / "access/USW00000001.csv", wide, -90.0, 60.0)
    pd.testing.assert_frame_equal(from_wide, table)

    with pytest.raises(PipelineError, match=r"USW00000001.csv: no row of element 'TAVG' in column '#3' "
                                            r"\(import.element_column\), which holds 'PRCP', 'TMIN', 'TMAX'"):
        importing.read_user_station(tmp_path / "USW00000001.csv", {**imp, "temperature_column": "TAVG"}, -90.0, 60.0)


def _as_dly(rows: str) -> str:
    """GHCN-Daily by-station rows written in its fixed-width .dly layout: a line per station, month and element,
    31 days of a value and three flags each, -9999 on the days without a row and past the month's end."""
    table = pd.read_csv(io.StringIO(rows), header=None, usecols=[0, 1, 2, 3], names=["id", "date", "element", "value"],
                        dtype={"date": str})
    table["month"], table["day"] = table["date"].str[:6], table["date"].str[6:].astype(int)
    lines = []
    for (station, month, element), days in table.groupby(["id", "month", "element"], sort=True):
        value = dict(zip(days["day"], days["value"], strict=True))
        lines.append(f"{station}{month}{element}" + "".join(f"{value.get(day, -9999):5d}  S" for day in range(1, 32)))
    return "\n".join(lines) + "\n"


def test_a_ghcn_daily_dly_file_is_read_as_its_by_station_file(tmp_path):
    """GHCN-Daily's fixed-width .dly file holds what its by-station CSV file holds: with the same settings, the
    same readings (the days the .dly marks missing, -9999, are missing days either way)."""
    rows = _ghcn_rows("USW00000001", 80, skip_tmin=10)
    (tmp_path / "USW00000001.csv").write_text(rows)
    (tmp_path / "dly").mkdir()
    (tmp_path / "dly/USW00000001.dly").write_text(_as_dly(rows))
    imp = {**_import_params()["import"], **GHCN_BY_STATION, "temperature_column": ["TMAX", "TMIN"],
           "quantity": "mean"}
    from_csv, _ = importing.read_user_station(tmp_path / "USW00000001.csv", imp, -90.0, 60.0)
    from_dly, report = importing.read_user_station(tmp_path / "dly/USW00000001.dly", imp, -90.0, 60.0)
    pd.testing.assert_frame_equal(from_dly, from_csv)
    assert report["other_elements"] == 91  # PRCP on every day of January to March
    assert storage.station_files(tmp_path / "dly", as_shipped=True) == [tmp_path / "dly/USW00000001.dly"]
    assert storage.station_name(tmp_path / "dly/USW00000001.dly") == "USW00000001"

    with pytest.raises(PipelineError, match=r'USW00000001.dly: a GHCN-Daily .dly file is read as its by-station CSV '
                                            r'file would be: date_column = "#2"'):
        importing.read_user_station(tmp_path / "dly/USW00000001.dly", {**imp, "date_column": "DATE"}, -90.0, 60.0)
    (tmp_path / "dly/USW00000002.dly").write_text("USW00000002 2020 1TMAX   13  S\n")
    with pytest.raises(PipelineError, match=r"USW00000002.dly: line 1 has no year and month"):
        importing.read_user_station(tmp_path / "dly/USW00000002.dly", imp, -90.0, 60.0)
    (tmp_path / "dly/USW00000001.csv").write_text(rows)
    with pytest.raises(PipelineError, match=r"names the same station as USW00000001.csv"):
        storage.station_files(tmp_path / "dly", as_shipped=True)


def test_element_column_and_value_column_go_together(tmp_path):
    path = write_params(tmp_path / "p.toml", **TINY)
    text = path.read_text().replace('element_column = ""', 'element_column = "#3"')
    path.write_text(text)
    with pytest.raises(PipelineError, match=r"import\.element_column and import\.value_column go together"):
        load_params(path)


def test_a_bad_own_file_changes_nothing(built, tmp_path, capsys):

    root = tmp_path / "p"
    shutil.copytree(built[0], root)
    (tmp_path / "own").mkdir()
    (tmp_path / "own/HOME.csv").write_text("when,value\n2020-01-01,3\n")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    before = snapshot(root)
    assert run_stage(data_creation, root, params) == errors.EXIT_BAD_INPUT
    assert "HOME.csv: no column 'DATE'" in capsys.readouterr().err.splitlines()[-1]
    assert snapshot(root) == before


def test_a_future_or_ancient_date_and_an_overflowing_reading_are_dropped_and_counted(tmp_path):
    path = tmp_path / "HOME.csv"
    rows = [f"{day:02d}/01/2020;{40 + day}" for day in range(1, 29)]
    # The rows of the rest of this year, empty until their days come (a national service's yearly file), and an
    # empty ancient one are missing days, not typos: only a reading gives a date out of time away.
    empty = [f"{day:%d/%m/%Y};" for day in pd.date_range(pd.Timestamp.now().normalize() + pd.Timedelta(days=2),
                                                          periods=5)]
    path.write_text("DATE;TMAX\n" + "\n".join([*rows, "01/01/2099;50", "01/01/0001;50", "29/01/2020;1.7e308", *empty,
                                               "01/01/1066;"]) + "\n")
    table, report = importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)
    assert report["future_date"] == 1 and report["ancient_date"] == 1 and report["impossible"] == 1
    assert report["missing_value"] == 6
    assert report["kept"] == 28 and report["steps_without_reading"] == 0  # no gap of centuries
    assert table["date"].max() == pd.Timestamp("2020-01-28") and np.isfinite(table["temperature"]).all()


@pytest.mark.parametrize("date_format", ["%d/%m/%Y", "%d/%m/%y"])
def test_a_reading_of_a_date_a_station_far_east_has_reached_is_not_from_the_future(tmp_path, monkeypatch,
                                                                                   date_format):
    """A station's local date runs up to 14 hours ahead of UTC: at 20:00 UTC on 8 December it is 9 December in
    New Zealand, and a reading of that day (hourly readings of a day under way) was dropped as from the future,
    with a warning (with two-digit years, put a hundred years back)."""
    monkeypatch.setattr(importing, "utc_now", lambda: pd.Timestamp("2026-12-08 20:00", tz="UTC"))
    path = tmp_path / "HOME.csv"
    days = pd.date_range(end="2026-12-10", periods=40)
    path.write_text("DATE;TMAX\n" + "".join(f"{day.strftime(date_format)};{50 + i % 7}\n"
                                           for i, day in enumerate(days)))
    params = _import_params()["import"] | {"date_format": date_format}
    table, _ = importing.read_user_station(path, params, -90.0, 60.0)
    assert table["date"].max() == pd.Timestamp("2026-12-09")  # 10 December is from the future
    assert (table["date"] >= days[0]).sum() == len(days) - 1


def test_the_oldest_instrumental_record_is_read_from_its_first_month(tmp_path):
    path = tmp_path / "CET.csv"  # Central England's monthly means begin in January 1659
    months = pd.date_range("1659-01-01", "1662-12-01", freq="MS")
    path.write_text("DATE;TMAX\n" + "".join(f"{month:%d/%m/%Y};{50 + month.month}\n" for month in months)
                    + "01/12/1599;50\n")
    table, report = importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)
    assert report["kept"] == len(months) and report["ancient_date"] == 1
    assert table["date"].min() == pd.Timestamp("1659-01-01")


def test_an_ancient_date_is_named_in_a_warning_and_never_stretches_the_network(tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    with open(own / "HOME.csv", "a") as handle:
        handle.write("01/01/0001;50.0;HOME\n")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, tmp_path / "root", params) == 0
    assert "data_creation: warning: HOME.csv:" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "root/data/train/raw/HOME.csv")["date"].min() == "2020-01-01"


def test_a_station_name_too_long_for_a_file_name_is_refused_at_import(tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / f"{'A' * 251}.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert "a station name of 251 bytes; at most 100" in capsys.readouterr().err


def test_a_start_on_29_february_ends_whole_years_later(params):
    sim = dict(params["simulation"], start_date="2020-02-29", n_years=2, n_stations=2)
    dates = data_creation.simulate(sim, 0, params["anomalies"]).dates
    assert str(dates[0]) == "2020-02-29" and str(dates[-1]) == "2022-02-28"


@pytest.mark.parametrize("dates, expected", [
    (pd.date_range("2020-01-01", periods=90, freq="D"), "daily"),
    (pd.date_range("2020-01-01", periods=90, freq="D").delete(range(20, 50)), "daily"),  # a month-long gap
    (pd.date_range("1960-01-01", periods=120, freq="MS"), "monthly"),
    (pd.date_range("1960-01-31", periods=120, freq="ME"), "monthly"),
    (pd.date_range("1960-01-01", periods=120, freq="MS").delete([7, 8, 30]), "monthly"),  # missing months
])
def test_the_step_of_a_series_is_read_from_its_dates(dates, expected):
    assert importing.infer_frequency(pd.DatetimeIndex(dates)) == expected


@pytest.mark.parametrize("dates, message", [
    (pd.date_range("2020-01-05", periods=60, freq="W"), "irregular steps: readings are typically 7 days apart"),
    (pd.date_range("1990-01-01", periods=40, freq="MS").append(pd.date_range("1993-05-02", periods=10)),
     "mixed steps: readings are mostly a month apart, but 1993-05-02 and 1993-05-03 fall in the same month"),
    (pd.date_range("1990-01-01", periods=15, freq="MS").append(pd.date_range("1991-04-01", periods=300)),
     "mixed steps: readings are mostly a day apart, but from 1990-01-01 to 1991-01-01 they are a month apart"),
    (pd.date_range("2000-01-01", periods=24, freq="MS").map(lambda d: d.replace(day=15) if d.month == 6 else d),
     "mixed steps: readings are mostly a month apart, but not on the same day of each month"),
])
def test_irregular_or_mixed_steps_are_refused_with_a_reason(dates, message):
    with pytest.raises(ValueError, match=message):
        importing.infer_frequency(pd.DatetimeIndex(dates))


def _monthly_file(path, start: str = "1960-01", months: int = 240) -> None:
    dates = pd.date_range(f"{start}-01", periods=months, freq="MS")
    values = 10 + 8 * np.sin(2 * np.pi * dates.month.to_numpy() / 12) + np.random.default_rng(1).normal(0, 1, months)
    pd.DataFrame({"DATE": dates.strftime("%Y-%m-%d"), "TMAX": values.round(1)}).to_csv(path, sep=";", index=False)


def test_monthly_files_are_imported_as_monthly_steps_and_mixed_frequencies_refused(tmp_path):
    p = _import_params()
    imp = dict(p["import"], date_format="%Y-%m-%d", unit="C")
    data = dict(p["data"], test_steps=24)
    _monthly_file(tmp_path / "A.csv")
    _monthly_file(tmp_path / "B.csv", start="1961-01")
    parts, report, test_start = importing.import_stations(tmp_path, data, imp, p["pre"])
    assert test_start == "1979-01-01" and report["A"]["frequency"] == "monthly"
    assert len(parts["B"]["test"]) == 24 and parts["B"]["test"]["date"].dt.day.eq(1).all()
    assert len(parts["A"]["test"]) == 12  # A ends a year before B: its last 12 months are in the test period
    assert report["B"]["steps_without_reading"] == 0 and report["B"]["train_steps"] == 240 - 24
    with pytest.raises(PipelineError, match=r"readings are monthly, but data\.frequency is 'daily'"):
        importing.import_stations(tmp_path, dict(data, frequency="daily"), imp, p["pre"])
    dates = pd.date_range("1975-01-01", periods=400, freq="D")
    pd.DataFrame({"DATE": dates.strftime("%Y-%m-%d"), "TMAX": 10.0}).to_csv(tmp_path / "C.csv", sep=";", index=False)
    with pytest.raises(PipelineError, match=r"mixed frequencies: C.csv is daily, A.csv is monthly; one frequency"):
        importing.import_stations(tmp_path, data, imp, p["pre"])
    (tmp_path / "C.csv").write_text("DATE;TMAX\n1979-06-01;12.5\n")  # one reading: no step of its own
    _, report, _ = importing.import_stations(tmp_path, data, imp, p["pre"])
    assert "C" not in report and report["A"]["frequency"] == "monthly"  # too short to forecast: left out


def test_a_declared_missing_code_is_never_a_reading_nor_impossible(tmp_path):
    """-99 °F is -72.8 °C, inside any generous range: declared, it is a missing day, compared as written."""
    path = tmp_path / "HOME.csv"
    rows = [f"{day:02d}/01/2020;{40 + day}" for day in range(1, 29)]
    path.write_text("DATE;TMAX\n" + "\n".join([*rows, "29/01/2020;-99", "30/01/2020;-99.0", "31/01/2020;-9999",
                                               "01/02/2020;999.9", "02/02/2020;-98"]) + "\n")
    imp = dict(_import_params()["import"], missing_values=[-99, -9999, 999.9])
    table, report = importing.read_user_station(path, imp, -90.0, 60.0)
    assert report["missing_code"] == 4 and report["impossible"] == 0 and report["missing_value"] == 0
    assert report["kept"] == 29 and table["temperature"].min() == pytest.approx((-98 - 32) * 5 / 9, abs=0.01)
    assert "4 missing code" in importing._describe(report)
    undeclared = importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)[1]
    assert undeclared["kept"] == 31 and undeclared["impossible"] == 2  # -99 °F passed as a reading


def test_a_code_shared_by_every_station_on_the_same_days_reaches_no_table(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    for name in ("A", "B", "C"):
        write_real_format_station(own / f"{name}.csv")
        with open(own / f"{name}.csv", "a") as handle:  # an outage of the archive: the same week everywhere
            handle.writelines(f"{day:02d}/06/2022;-99;{name}\n" for day in range(1, 8))
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own", missing_values=[-99])
    assert run_stage(data_creation, tmp_path / "root", params) == 0
    source = json.loads((tmp_path / "root/data/source.json").read_text())
    assert all(entry["missing_code"] >= 7 for entry in source["files"].values())
    for part in ("train", "test"):
        for path in (tmp_path / f"root/data/{part}/raw").glob("*.csv"):
            assert pd.read_csv(path)["temperature"].min() > -60, path


def test_a_bad_missing_values_setting_is_one_line(tmp_path):
    from station_forecast.params import load_params as load

    path = write_params(tmp_path / "p.toml", missing_values=["-99"])
    with pytest.raises(PipelineError, match=r"import.missing_values must be a list of at most 100 numbers"):
        load(path)


def imported_with_station_list(tmp_path: Path, listing: str) -> tuple[Path, Path]:
    """Stations A, B and C imported from a folder whose stations.csv holds ``listing``: the project folder
    and the parameters file."""
    own = tmp_path / "own"
    own.mkdir()
    for name in ("A", "B", "C"):
        write_real_format_station(own / f"{name}.csv")
    (own / "stations.csv").write_text(listing)
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    return root, params


@pytest.mark.parametrize("kind", ["broken link", "fifo"])
def test_a_station_entry_that_is_no_readable_file_stops_stage_1_naming_it(tmp_path, capsys, kind):
    """A link left behind when its file was moved (or a FIFO) named like a station file: one line naming it
    (and where the link points), never an internal error."""
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    if kind == "fifo":
        os.mkfifo(own / "GONE.csv")
    else:
        (own / "GONE.csv").symlink_to(tmp_path / "moved.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()[-1]
    said = f"a link to {tmp_path / 'moved.csv'}, which is not there" if kind == "broken link" else "(a FIFO)"
    assert err.startswith(f"data_creation: error: {own / 'GONE.csv'}: ") and said in err, err


def test_data_source_may_name_one_file(tmp_path, capsys):
    """One station's file (or one export of many stations) as data.source imports as a folder holding only it
    would, and a change to it makes stage 1 stale; the station list, a file that is no table or a path that is
    not there is refused, naming it."""
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    write_real_format_station(own / "AWAY.csv")
    (own / "stations.csv").write_text("STATION;LATITUDE;LONGITUDE\nHOME;1;2\n")
    (own / "notes.txt").write_text("checked in June\n")
    by_file = write_params(tmp_path / "file.toml", **TINY, **REAL_FORMAT, source="own/HOME.csv")
    assert run_stage(data_creation, tmp_path / "file", by_file) == 0
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone/HOME.csv").write_bytes((own / "HOME.csv").read_bytes())
    by_folder = write_params(tmp_path / "folder.toml", **TINY, **REAL_FORMAT, source="alone")
    assert run_stage(data_creation, tmp_path / "folder", by_folder) == 0
    for split in ("train", "test"):
        assert sorted(p.name for p in (tmp_path / "file/data" / split / "raw").glob("[!.]*")) == ["HOME.csv"]
        assert (tmp_path / "file/data" / split / "raw/HOME.csv").read_bytes() == \
            (tmp_path / "folder/data" / split / "raw/HOME.csv").read_bytes()
    assert not (tmp_path / "file/data/stations.csv").exists()  # a list is read beside a folder's files only
    paths = storage.Paths(tmp_path / "file")
    assert manifest.why_stale(paths, "data_creation", load_params(by_file)) is None
    with (own / "HOME.csv").open("a") as handle:
        handle.write("31/12/2030;50\n")
    assert "HOME.csv changed" in manifest.why_stale(paths, "data_creation", load_params(by_file))
    capsys.readouterr()
    for name, message in [("stations.csv", "data.source names the station list, which is never a station"),
                          ("notes.txt", "data.source names a file that is not a station table"),
                          ("gone.csv", "data.source not found (a folder of station files, or one file)")]:
        params = write_params(tmp_path / "other.toml", **TINY, **REAL_FORMAT, source=f"own/{name}")
        assert run_stage(data_creation, tmp_path / "other", params) == errors.EXIT_BAD_INPUT
        assert f"{own / name}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["appended", "removed"])
def test_a_station_file_changed_after_stage_1_read_it_is_read_again_by_the_next_run(tmp_path, monkeypatch, capsys,
                                                                                     change):
    """A sync job appending to (or deleting) a station file while stage 1 runs: the outputs come from what the
    stage read, so its record must not say the file is what it read (it said "up to date", with the new day
    never read; a deleted file stopped the stage with an internal error as it recorded what it read)."""
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    write_real_format_station(own / "AWAY.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    read = importing.read_user_station

    def read_then_changed(path: Path, *args: object) -> tuple:
        result = read(path, *args)
        if path.name == "HOME.csv" and change == "removed":
            path.unlink()
        elif path.name == "HOME.csv":
            with path.open("a") as handle:
                handle.write("01/01/2023;50\n")
        return result

    monkeypatch.setattr(importing, "read_user_station", read_then_changed)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert "1 input(s) changed or removed after data_creation read them, e.g. " in capsys.readouterr().err
    assert "HOME.csv" in manifest.why_stale(storage.Paths(root), "data_creation", load_params(params))


def test_a_station_file_changed_while_it_is_read_stops_stage_1_naming_it(tmp_path, monkeypatch):
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "AWAY.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    read_bytes = Path.read_bytes

    def read_while_written(path: Path) -> bytes:
        text = read_bytes(path)
        with path.open("a") as handle:
            handle.write("02/01/2023;50\n")
        return text

    monkeypatch.setattr(Path, "read_bytes", read_while_written)
    with pytest.raises(PipelineError, match=r"AWAY\.csv: changed while it was read \(a download or copy still "):
        importing.read_user_station(own / "AWAY.csv", load_params(params)["import"], -90.0, 60.0)


def test_a_station_file_added_while_stage_1_runs_is_read_by_the_next_run(tmp_path, monkeypatch):
    """A download adding stations while stage 1 reads the folder: the new file was not read, so the record
    of the folder must not list it (it was listed as the folder stood at the end: "up to date", the station
    never imported)."""
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "HOME.csv")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    read = importing.read_user_station

    def read_while_a_station_arrives(path: Path, *args: object) -> tuple:
        write_real_format_station(own / "LATE.csv")
        return read(path, *args)

    monkeypatch.setattr(importing, "read_user_station", read_while_a_station_arrives)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.name for p in (root / "data/train/raw").glob("[!.]*")) == ["HOME.csv"]
    assert "files were added" in manifest.why_stale(storage.Paths(root), "data_creation", load_params(params))


def test_a_station_list_is_metadata_not_a_station_and_its_coordinates_are_kept(tmp_path, capsys):
    root, params = imported_with_station_list(
        tmp_path, "STATION;LATITUDE;LONGITUDE;ELEVATION\nA;52.1;-1.5;100\nB;52.4;-1.9;80\nZ;10;10;0\n")
    own = tmp_path / "own"
    assert "stations.csv: no coordinates for 1 station(s), e.g. C" in capsys.readouterr().err
    listed = pd.read_csv(root / "data/stations.csv", dtype={"station": str})
    assert list(listed["station"]) == ["A", "B", "C"] and listed["latitude"].iloc[:2].tolist() == [52.1, 52.4]
    assert listed["latitude"].isna().iloc[2]
    assert sorted(p.stem for p in (root / "data/train/raw").glob("[!.]*")) == ["A", "B", "C"]
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == 2
    (own / "stations.csv").unlink()  # a later import without a list leaves no stale coordinates
    assert run_stage(data_creation, root, params) == 0 and not (root / "data/stations.csv").exists()


@pytest.mark.parametrize("header", ["id;name;longitude;latitude;elevation", "Station_ID;Name;Lon;Lat;Elev",
                                    "site_code;name;lng;lat;altitude"])
def test_a_station_list_is_read_by_the_names_archives_give_its_columns(tmp_path, header):
    """GHCN's derived packages name the station column "id", other lists "station_id", and many write lat / lon;
    a list that names its station as the station files do (``import.station_column``) is read by that name,
    and a station is matched whatever the case it is written in."""
    path = tmp_path / "stations.csv"
    path.write_text(f"{header}\nA;Here;-1.5;52.1;100\nB;There;-1.9;52.4;80\n")
    listed = importing.read_station_list(path, ";", {"A", "b", "C"}, station_column="SITE_CODE")
    assert listed.columns.tolist() == ["station", "latitude", "longitude", "elevation"]
    by_station = listed.set_index("station")
    assert by_station.loc["A"].tolist() == [52.1, -1.5, 100.0] and by_station.loc["b"].tolist() == [52.4, -1.9, 80.0]
    assert by_station.loc["C"].isna().all()  # matched whatever the case: B in the list is station b


def test_a_station_list_names_a_station_whatever_the_unicode_form_of_its_file_name(tmp_path):
    """macOS keeps a file's name decomposed (NFD: "u" and a combining diaeresis); a list typed elsewhere
    writes the composed "\u00fc" (NFC). The same name to a reader: the station keeps its coordinates, under
    its file's name."""
    decomposed, composed = "Zu\u0308rich", "Z\u00fcrich"
    path = tmp_path / "stations.csv"
    path.write_text(f"station,latitude,longitude\n{composed},47.4,8.5\nK\u00f6ln,50.9,6.9\n", encoding="utf-8")
    listed = importing.read_station_list(path, ",", {decomposed, "Ko\u0308ln"}).set_index("station")
    assert sorted(listed.index) == sorted([decomposed, "Ko\u0308ln"])
    assert listed.loc[decomposed].tolist() == [47.4, 8.5] and listed.loc["Ko\u0308ln"].tolist() == [50.9, 6.9]


@pytest.mark.parametrize("separator", [",", ";", "\t", "|"])
def test_a_station_list_is_read_with_the_delimiter_its_header_is_written_with(tmp_path, separator):
    """A list saved by hand from a spreadsheet (";" or tabs) beside station files separated by commas, or the
    reverse: the header says which delimiter the list uses."""
    path = tmp_path / "stations.csv"
    path.write_text("\n".join(separator.join(row) for row in [["station", "latitude", "longitude"],
                                                            ["A", "52.1", "-1.5"], ["B", "52.4", "-1.9"]]) + "\n")
    for delimiter in (",", ";"):
        listed = importing.read_station_list(path, delimiter, {"A", "B"})
        assert listed.values.tolist() == [["A", 52.1, -1.5], ["B", 52.4, -1.9]]


@pytest.mark.parametrize(("content", "message"), [
    ("STATION;Y;X\nA;1;2\n", "the station list has no column 'latitude' (any of 'latitude', 'lat', 'latitude (y)'; "
                              "it needs "),
    ("STATION;LATITUDE;LONGITUDE\nA;95;2\n", "station 'A': latitude '95' is not a number within ±90"),
    ("STATION;LATITUDE;LONGITUDE\nA;1;2\nA;1;2\n", "station 'A' is listed twice"),
    ("STATION;LATITUDE;LONGITUDE\n", "the station list lists no station (a header only)"),
    ("STATION;LATITUDE;LONGITUDE\nA;1;\n", "station 'A' has a latitude or a longitude but not both"),
    ("STATION;LATITUDE;LONGITUDE;ELEVATION\nA;1;2;9100\n", "station 'A': elevation '9100' is not a number of metres "
                                                            "up to 9000"),
])
def test_a_broken_station_list_is_named(tmp_path, capsys, content, message):
    own = tmp_path / "own"
    own.mkdir()
    write_real_format_station(own / "A.csv")
    (own / "stations.csv").write_text(content)
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_station_list_in_degrees_minutes_and_seconds_reads_as_decimal_degrees(tmp_path):
    """ECA&D's station list writes "+51:28:39" and "-000:26:56"; other lists 51°28'39"N or 0.45W."""
    path = tmp_path / "stations.csv"
    path.write_text("station,name,latitude,longitude,elevation\n"
                    "LONDON,London,+51:28:39,-000:26:56,25\n"
                    "SYDNEY,Sydney,33°52'S,151°12'30\"E,39\n"
                    "LISBON,Lisbon,38.72N,9.14W,77\n")
    table = importing.read_station_list(path, ",", {"LONDON", "SYDNEY", "LISBON"}).set_index("station")
    np.testing.assert_allclose(table.loc[["LONDON", "SYDNEY", "LISBON"], ["latitude", "longitude"]].to_numpy(),
                               [[51 + 28 / 60 + 39 / 3600, -(26 / 60 + 56 / 3600)],
                                [-(33 + 52 / 60), 151 + 12 / 60 + 30 / 3600], [38.72, -9.14]])
    path.write_text("station,latitude,longitude\nLONDON,51:28:39E,0\n")
    with pytest.raises(errors.PipelineError, match="latitude '51:28:39E' is not a number within"):
        importing.read_station_list(path, ",", {"LONDON"})


def test_unknowns_in_a_station_list_are_unknown_not_errors(tmp_path, capsys):
    """As archives write them: an empty elevation, GHCN's -999.9 for one, a station listed without a position."""
    root, _ = imported_with_station_list(
        tmp_path, "STATION;LATITUDE;LONGITUDE;ELEVATION\nA;52.1;-1.5;\nB;52.4;-1.9;-999.9\nC;;;12\n")
    err = capsys.readouterr().err
    assert "stations.csv: elevation -999.9 (station 'B') is below any land (-500 m): read as unknown" in err
    assert "stations.csv: no coordinates for 1 station(s), e.g. C" in err
    listed = pd.read_csv(root / "data/stations.csv", dtype={"station": str})
    assert listed["latitude"].tolist()[:2] == [52.1, 52.4] and listed.iloc[2, 1:].isna().all()
    assert listed["elevation"].isna().all()
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == 2


def test_a_file_that_is_not_a_station_s_is_named_with_the_way_out(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("author;remark\nme;checked in June\n")
    with pytest.raises(PipelineError, match=r"notes.csv: no column 'DATE' nor 'TMAX' .* move this file out of the "
                                            r"folder if it is not a station's"):
        importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)


def test_a_station_list_under_another_name_is_named_as_one_with_the_way_out(tmp_path):
    """As course repositories ship a network (``hawaii_measurements.csv`` beside ``hawaii_stations.csv``): the
    list shares the station column with the readings, so it lacks only the date and the temperature."""
    path = tmp_path / "hawaii_stations.csv"
    path.write_text('station,name,latitude,longitude,elevation\nUSC0001,"WAIKIKI, HI US",21.27,-157.82,3\n')
    imp = {**_import_params()["import"], "station_column": "station", "delimiter": ","}
    with pytest.raises(PipelineError, match=r"hawaii_stations.csv: coordinates but no column 'DATE' nor 'TMAX' .*"
                                            r"a station list under another name\? Only stations.csv is read as one "
                                            r".* rename it to stations.csv"):
        importing.read_user_station(path, imp, -90.0, 60.0)
    imp["station_column"] = ""  # without a station column, the same
    with pytest.raises(PipelineError, match=r"a station list under another name\?"):
        importing.read_user_station(path, imp, -90.0, 60.0)


def test_a_file_committed_with_a_git_merge_conflict_in_it_is_refused_naming_the_marker_line(tmp_path):
    """A course repository ships its network's table so: both versions of the rows between the markers, which
    stage 1 had read as two stations named by the markers and every day twice (merged where the versions
    agree, as there, and dropped as a conflicting duplicate where they differ)."""
    path = tmp_path / "HOME.csv"
    path.write_text("DATE;TMAX\n<<<<<<< HEAD\n01/01/2020;41.5\n=======\n01/01/2020;41.7\n>>>>>>> 20e750c\n"
                    "02/01/2020;43.0\n")
    with pytest.raises(PipelineError, match=r"HOME.csv: line 2 is '<<<<<<<', a git merge conflict's marker"):
        importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)
    path.write_text("DATE;TMAX\n01/01/2020;41.5\n02/01/2020;43.0\n")  # resolved: read
    assert len(importing.read_user_station(path, _import_params()["import"], -90.0, 60.0)[0]) == 2


def test_files_that_hold_many_stations_import_as_shipped(tmp_path, capsys):
    """As NOAA's exports come: a station column beside the date and the readings, several files by period."""
    own = tmp_path / "own"
    own.mkdir()
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D")
    rng = np.random.default_rng(11)
    rows = []
    for k, station in enumerate(["USW0001", "USW0002", "USC0003"]):
        values = np.round(50 + 20 * np.sin(2 * np.pi * dates.day_of_year.to_numpy() / 365.25)
                          + rng.normal(0, 4, len(dates)), 0)
        values[100 + k] = -99  # the archive's missing-day code
        rows.append(pd.DataFrame({"STATION": station, "NAME": f"PLACE {k}, US", "LATITUDE": 61.0 + k / 10,
                                  "DATE": dates.strftime("%Y-%m-%d"), "TMAX": values}))
    table = pd.concat(rows)
    table[table["DATE"] < "2021-06-01"].to_csv(own / "export-1.csv", index=False)
    table[table["DATE"] >= "2021-06-01"].to_csv(own / "export-2.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION", date_column="DATE",
                          temperature_column="TMAX", unit="F", missing_values=[-99], holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.stem for p in (root / "data/train/raw").glob("[!.]*")) == ["USC0003", "USW0001", "USW0002"]
    source = json.loads((root / "data/source.json").read_text())
    entry = source["files"]["USW0002"]
    assert entry["files"] == ["export-1.csv", "export-2.csv"] and entry["missing_code"] == 1
    assert entry["kept"] == len(dates) - 1
    assert "USW0002 (export-1.csv, export-2.csv): 1095 of 1096 rows kept; 1 missing code" in capsys.readouterr().err
    manifest_inputs = json.loads((root / "models/manifest.json").read_text())["stages"]["data_creation"]["inputs"]
    assert sorted(Path(key).name for key in manifest_inputs) == ["export-1.csv", "export-2.csv"]


@pytest.mark.parametrize("named_by", ["file", "STATION"])
def test_a_folder_a_year_with_a_file_per_station_imports_as_one_file_a_station(tmp_path, capsys, named_by):
    """NOAA's GSOD ships a folder a year, each with a file per station named by its id (1995/72530094846.csv,
    1996/72530094846.csv, ...; every field quoted, the station in each row): a station's files in every folder
    are one station, read as its years in one file are, whether it is named by the files or by its column; a
    file added to a year's folder makes the stage stale."""
    days = pd.date_range("2019-01-01", "2021-12-31", freq="D")
    rng = np.random.default_rng(3)
    (tmp_path / "flat").mkdir()
    for station in ("72530094846", "72534014819"):
        readings = 50 + 20 * np.sin(np.arange(len(days)) / 58) + rng.normal(0, 4, len(days))
        table = pd.DataFrame({"STATION": station, "DATE": days.strftime("%Y-%m-%d"), "TEMP": readings.round(1)})
        table.to_csv(tmp_path / "flat" / f"{station}.csv", index=False)
        for year, part in table.groupby(days.year):
            (tmp_path / "years" / str(year)).mkdir(parents=True, exist_ok=True)
            part.to_csv(tmp_path / "years" / str(year) / f"{station}.csv", index=False, quoting=1)
    settings = dict(**TINY, date_column="DATE", temperature_column="TEMP", unit="F", holdout_stations=0,
                    station_column="" if named_by == "file" else named_by)
    flat, years = tmp_path / "flat_root", tmp_path / "years_root"
    assert run_stage(data_creation, flat, write_params(tmp_path / "flat.toml", source="flat", **settings)) == 0
    params = write_params(tmp_path / "years.toml", source="years", **settings)
    assert run_stage(data_creation, years, params) == 0
    for part in ("train", "test"):
        assert sorted(p.name for p in (years / f"data/{part}/raw").glob("[!.]*")) == \
            ["72530094846.csv", "72534014819.csv"]
        for station in ("72530094846", "72534014819"):
            assert (years / f"data/{part}/raw/{station}.csv").read_bytes() == \
                (flat / f"data/{part}/raw/{station}.csv").read_bytes()
    entry = json.loads((years / "data/source.json").read_text())["files"]["72530094846"]
    assert entry["files"] == ["2019/72530094846.csv", "2020/72530094846.csv", "2021/72530094846.csv"]
    assert "72530094846 (2019/72530094846.csv, 2020/72530094846.csv, 2021/72530094846.csv): 1096 of 1096 rows kept" \
        in capsys.readouterr().err
    assert not manifest.why_stale(storage.Paths(years), data_creation.STAGE, load_params(params))
    shutil.copy(tmp_path / "years/2020/72530094846.csv", tmp_path / "years/2020/72599999999.csv")
    assert "files were added to or removed from" in manifest.why_stale(storage.Paths(years), data_creation.STAGE,
                                                                      load_params(params))


def test_station_files_in_a_folder_beside_station_files_are_named_as_not_read(tmp_path, capsys):
    own = tmp_path / "own"
    (own / "extra").mkdir(parents=True)
    (own / "notes").mkdir()
    write_real_format_station(own / "HOME.csv")
    write_real_format_station(own / "extra" / "AWAY.csv")
    (own / "notes" / "readme.txt").write_text("not a station\n")
    params = write_params(tmp_path / "own.toml", **TINY, **REAL_FORMAT, source="own")
    assert run_stage(data_creation, tmp_path / "root", params) == 0
    assert sorted(p.name for p in (tmp_path / "root/data/train/raw").glob("[!.]*")) == ["HOME.csv"]
    assert (f"warning: {own}: the station files in 1 folder(s) inside data.source are not read (extra/), only "
            "those of the folder itself") in capsys.readouterr().err


def test_a_station_named_in_two_cases_across_year_folders_is_named_with_both_files(tmp_path, capsys):
    """1995/abc.csv and 1996/ABC.csv: on a disk that ignores case they are one file, and in the report one would
    hide the other; the message names both files (it named import.station_column, which is not set)."""
    for year, name in (("1995", "abc"), ("1996", "ABC")):
        (tmp_path / "years" / year).mkdir(parents=True)
        (tmp_path / "years" / year / f"{name}.csv").write_text(f"date,temperature\n{year}-01-01,1.0\n")
    params = write_params(tmp_path / "p.toml", **TINY, source="years", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert ("station 'ABC' differs from 'abc' only in case or in how an accent is encoded (the file names "
            "1995/abc.csv and 1996/ABC.csv); one would hide the other: rename one (to the other's name, if they are "
            "one station)") in capsys.readouterr().err


def test_the_project_s_own_folders_are_never_read_as_a_folder_of_folders(tmp_path):
    """``data.source = "."`` beside params.toml in the project folder, which holds no station file itself: its
    folders are read, but never data/ or models/, where the pipeline's own tables (flags, features) are."""
    root = tmp_path / "project"
    (root / "own").mkdir(parents=True)
    days = pd.date_range("2019-01-01", "2021-12-31", freq="D")
    pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "temperature": 10 + 8 * np.sin(np.arange(len(days)) / 58)}) \
        .round(1).to_csv(root / "own" / "HOME.csv", index=False)
    params = write_params(root / "params.toml", **TINY, source=".", holdout_stations=0)
    for own in ("data/flagged.csv", "models/table.csv"):
        (root / own).parent.mkdir(exist_ok=True)
        (root / own).write_text("station,date,flag\nHOME,2020-01-01,spike\n")
    assert run_stage(data_creation, root, params) == 0
    assert json.loads((root / "data/source.json").read_text())["files"]["HOME"]["file"] == "own/HOME.csv"
    assert sorted(p.name for p in (root / "data/train/raw").glob("[!.]*")) == ["HOME.csv"]


def test_a_wide_table_of_a_column_per_station_imports_as_its_long_form(tmp_path, capsys):
    """Tables of cities come wide: the date, then a column per station named by its header (hourly, in kelvins,
    ";"-separated in one course's copy), with a list of the cities' coordinates whose first column pandas left
    unnamed. ``temperature_column = "*"`` reads each column as a station: the same raw files as the long form
    of the same readings, and the list's coordinates."""
    stamps = pd.date_range("2020-01-01", "2022-12-31 23:00", freq="h")
    rng = np.random.default_rng(5)
    cities = ["San Francisco", "Los Angeles", "Portland"]
    wide = pd.DataFrame({"datetime": stamps.strftime("%d.%m.%Y %H:%M")})
    for k, city in enumerate(cities):
        wide[city] = np.round(283 + 8 * np.sin(np.arange(len(stamps)) / 1400.0 + k) + rng.normal(0, 1, len(stamps)), 2)
    wide.loc[wide.index[:30], "Portland"] = np.nan  # the archive's first hours, before the city's readings begin
    (tmp_path / "wide").mkdir()
    wide.to_csv(tmp_path / "wide" / "temperature.csv", sep=";", index=False)
    pd.DataFrame({"Country": "US", "Latitude": [37.77, 34.05, 45.52], "Longitude": [-122.4, -118.2, -122.7]},
                 index=cities).to_csv(tmp_path / "wide" / "stations.csv")
    settings = dict(**TINY, date_column="datetime", date_format="%d.%m.%Y %H:%M", unit="K", holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, write_params(tmp_path / "wide.toml", source="wide", delimiter=";",
                                                       temperature_column="*", **settings)) == 0
    assert "stations.csv: read its first column, which the header leaves unnamed, as the station" \
        in capsys.readouterr().err
    assert sorted(p.stem for p in (root / "data/train/raw").glob("[!.]*")) == sorted(cities)
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == 3

    (tmp_path / "long").mkdir()
    wide.melt(id_vars="datetime", var_name="city", value_name="K").to_csv(tmp_path / "long" / "all.csv", index=False)
    other = tmp_path / "other"
    assert run_stage(data_creation, other, write_params(tmp_path / "long.toml", source="long", station_column="city",
                                                        temperature_column="K", **settings)) == 0
    for part in ("train", "test"):
        for city in cities:
            assert (root / f"data/{part}/raw/{city}.csv").read_bytes() == \
                (other / f"data/{part}/raw/{city}.csv").read_bytes()

    wide["weather_description"] = "light rain"  # a column of text is no station: the message says to delete it
    wide.to_csv(tmp_path / "wide" / "temperature.csv", sep=";", index=False)
    assert run_stage(data_creation, root, tmp_path / "wide.toml") == errors.EXIT_BAD_INPUT
    assert ("temperature.csv [station weather_description]: no usable readings (26304 not a number (e.g. 'light "
            "rain')); most of its values do not read as numbers: with import.temperature_column = '*' every column "
            "but the date's is read as a station's, so a column of text") in capsys.readouterr().err


def test_a_table_of_a_row_per_year_and_a_column_per_month_imports_as_its_months(tmp_path):
    """Monthly station series are often published a year to a row (NASA GISS's station files: ``YEAR,JAN, ...,
    DEC,D-J-F, ...,metANN``, 999.90 on months without a reading; the Met Office's tables ``Year Jan ... Dec``).
    ``temperature_column = "months"`` reads the twelve months' columns, and not the seasons' or the year's:
    the same raw files as the readings written a month to a row. With a station column, one table holds
    many stations."""
    months = pd.date_range("2001-01-01", "2012-12-01", freq="MS")
    rng = np.random.default_rng(2)
    season = 15 + 10 * np.sin(2 * np.pi * (months.month.to_numpy() - 4) / 12)
    values = np.round(season + rng.normal(0, 1, len(months)), 2)
    values[[5, 40]] = 999.9
    by_year = values.reshape(-1, 12)
    names = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    giss = pd.DataFrame(by_year, columns=names)
    giss.insert(0, "YEAR", range(2001, 2013))
    giss["D-J-F"], giss["metANN"] = 999.9, by_year.mean(axis=1).round(2)
    for folder in ("years", "long", "many"):
        (tmp_path / folder).mkdir()
    giss.rename(columns=str.title).rename(columns={"Year": "YEAR"}).to_csv(tmp_path / "years" / "RIO.csv",
                                                                           index=False)  # Jan ... Dec
    pd.DataFrame({"date": months.strftime("%Y-%m-%d"), "t": values}).to_csv(tmp_path / "long" / "RIO.csv", index=False)
    pd.concat([giss.assign(STATION="RIO"), giss.assign(STATION="SAO")]).to_csv(tmp_path / "many" / "all.csv",
                                                                              index=False)
    settings = dict(**TINY | {"test_steps": 24}, holdout_stations=0, missing_values=[999.9])
    runs = {
        "years": dict(date_column="YEAR", date_format="%Y", temperature_column="months"),
        "long": dict(date_column="date", date_format="%Y-%m-%d", temperature_column="t"),
        "many": dict(date_column="YEAR", date_format="%Y", temperature_column="months", station_column="STATION"),
    }
    for name, columns in runs.items():
        params = write_params(tmp_path / f"{name}.toml", source=name, **settings, **columns)
        assert run_stage(data_creation, tmp_path / name / "root", params) == 0, name
    raw = {name: {part: (tmp_path / name / f"root/data/{part}/raw/RIO.csv").read_bytes() for part in ("train", "test")}
           for name in runs}
    assert raw["years"] == raw["long"] == raw["many"]
    assert (tmp_path / "many/root/data/train/raw/SAO.csv").read_bytes() == raw["years"]["train"]
    source = json.loads((tmp_path / "years/root/data/source.json").read_text())
    assert source["frequency"] == "monthly" and source["files"]["RIO"]["missing_code"] == 2


def test_a_wide_table_whose_lines_all_end_in_the_delimiter_reads_without_its_empty_last_column(tmp_path):
    """Some exports end every line with the delimiter: the header's last column has no name and no value, and
    is no station."""
    days = pd.date_range("2020-01-01", "2022-12-31")
    (tmp_path / "wide").mkdir()
    lines = ["date;A;B;", *(f"{day:%Y-%m-%d};{k % 7}.5;{k % 5}.25;" for k, day in enumerate(days))]
    (tmp_path / "wide" / "both.csv").write_text("\n".join(lines) + "\n")
    params = write_params(tmp_path / "wide.toml", **TINY, source="wide", delimiter=";", temperature_column="*",
                          holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == 0
    assert sorted(p.stem for p in (tmp_path / "root/data/train/raw").glob("[!.]*")) == ["A", "B"]


def test_a_table_of_a_row_per_year_and_day_and_a_column_per_month_imports_as_its_days(tmp_path):
    """The Met Office's daily Central England series as long shipped: no header, a row per year and day of the
    month, then twelve months in tenths of °C, -999 on the days a month does not have (30 February). Read with
    ``date_column = ["#1", "#2"]``, ``date_format = "%Y %d"``, ``temperature_column = "months"``: the same raw
    files as the readings written a day to a row, and the days no month has are no rows at all."""
    days = pd.date_range("2001-01-01", "2006-12-31")
    rng = np.random.default_rng(4)
    tenths = np.round(95 + 60 * np.sin(2 * np.pi * (days.day_of_year.to_numpy() - 110) / 365.25)
                      + rng.normal(0, 25, len(days))).astype(int)
    grid = np.full((6, 31, 12), -999)
    grid[days.year - 2001, days.day - 1, days.month - 1] = tenths
    lines = [f" {2001 + y:4d} {d + 1:4d}" + "".join(f"{v:5d}" for v in grid[y, d]) for y in range(6) for d in range(31)]
    for folder in ("cet", "long"):
        (tmp_path / folder).mkdir()
    (tmp_path / "cet" / "CET.csv").write_text("\n".join(lines) + "\n")
    pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "t": tenths}).to_csv(tmp_path / "long" / "CET.csv", index=False)
    settings = dict(**TINY, holdout_stations=0, unit="0.1C", missing_values=[-999])
    runs = {"cet": dict(date_column=["#1", "#2"], date_format="%Y %d", temperature_column="months",
                        delimiter="whitespace"),
            "long": dict(date_column="date", date_format="%Y-%m-%d", temperature_column="t")}
    for name, columns in runs.items():
        params = write_params(tmp_path / f"{name}.toml", source=name, **settings, **columns)
        assert run_stage(data_creation, tmp_path / name / "root", params) == 0, name
    for part in ("train", "test"):
        assert (tmp_path / f"cet/root/data/{part}/raw/CET.csv").read_bytes() == \
            (tmp_path / f"long/root/data/{part}/raw/CET.csv").read_bytes()
    entry = json.loads((tmp_path / "cet/root/data/source.json").read_text())["files"]["CET"]
    assert entry["rows"] == len(days) and entry["bad_date"] == entry["missing_code"] == 0
    assert not entry["out_of_order"]  # its rows run across the months, but that is the layout, not the file's fault


def test_two_wide_tables_with_a_column_of_one_name_and_other_readings_are_named(tmp_path, capsys):
    """Two wide tables whose columns of one name hold different readings of the same days are two stations under
    one name: the message says to rename one, not to name stations by more columns (which a wide table has not)."""
    days = pd.date_range("2020-01-01", "2022-12-31").strftime("%Y-%m-%d")
    (tmp_path / "wide").mkdir()
    pd.DataFrame({"date": days, "A": 1.5, "B": 2.5}).to_csv(tmp_path / "wide" / "one.csv", index=False)
    pd.DataFrame({"date": days, "B": 7.5}).to_csv(tmp_path / "wide" / "two.csv", index=False)
    params = write_params(tmp_path / "wide.toml", **TINY, source="wide", temperature_column="*", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert ("one.csv [station B]: 2,192 of its 2,192 rows share their time with a different reading: two stations' "
            "columns of one name in several files (rename one)") in capsys.readouterr().err


def test_a_table_written_by_pandas_with_its_dates_as_the_index_reads_its_first_column_as_the_date(tmp_path, capsys):
    """``series.to_csv()`` of a station's readings indexed by date writes ``,temperature``, and a wide table's
    ``frame.to_csv()`` ``,A,B``: the header leaves the date's column unnamed, and no setting could name it. That
    first column is read as ``import.date_column``, and the log says so: the same raw files as the column named."""
    days = pd.date_range("2020-01-01", "2022-12-31")
    rng = np.random.default_rng(6)
    frame = pd.DataFrame({"A": np.round(10 + rng.normal(0, 3, len(days)), 1),
                          "B": np.round(12 + rng.normal(0, 3, len(days)), 1)}, index=days)
    for folder in ("indexed", "named", "wide_indexed", "wide_named"):
        (tmp_path / folder).mkdir()
    frame["A"].rename("temperature").to_csv(tmp_path / "indexed" / "A.csv")
    frame["A"].rename("temperature").rename_axis("date").to_csv(tmp_path / "named" / "A.csv")
    frame.to_csv(tmp_path / "wide_indexed" / "both.csv")
    frame.rename_axis("date").to_csv(tmp_path / "wide_named" / "both.csv")
    assert (tmp_path / "indexed" / "A.csv").read_text().startswith(",temperature\n")
    for name in ("indexed", "named", "wide_indexed", "wide_named"):
        columns = {"temperature_column": "*"} if name.startswith("wide") else {}
        params = write_params(tmp_path / f"{name}.toml", **TINY, source=name, holdout_stations=0, **columns)
        assert run_stage(data_creation, tmp_path / name / "root", params) == 0, name
    assert "A.csv: its first column, unnamed in the header, read as the date column 'date'" in capsys.readouterr().err
    for part in ("train", "test"):
        assert (tmp_path / f"indexed/root/data/{part}/raw/A.csv").read_bytes() == \
            (tmp_path / f"named/root/data/{part}/raw/A.csv").read_bytes()
        for station in ("A", "B"):
            assert (tmp_path / f"wide_indexed/root/data/{part}/raw/{station}.csv").read_bytes() == \
                (tmp_path / f"wide_named/root/data/{part}/raw/{station}.csv").read_bytes()


@pytest.mark.parametrize("header, settings, message", [
    ("datetime;A;;B", {}, "column 3 of the header has no name"),
    ("datetime;A;B;A", {}, "the header names 'A' twice (columns 2 and 4)"),
    ("datetime", {}, "no column but the date's"),
    ("datetime;A;B", {"station_column": "A"}, 'import.temperature_column = "*" reads a wide table'),
    ("datetime;A;B", {"temperature_column": ["*", "A"]}, 'either "*" (a wide table'),
    ("datetime;Jan;Feb", {"temperature_column": "months"}, 'date_column names the year\'s column, with date_format'),
    ("datetime;Jan;Feb", {"temperature_column": "months", "date_format": "%Y"}, "no column for Mar, Apr, May"),
    ("datetime;Jan;January", {"temperature_column": "months", "date_format": "%Y"}, "no column for Feb"),
])
def test_a_wide_table_whose_header_would_hide_or_invent_a_station_is_refused(tmp_path, capsys, header, settings,
                                                                               message):
    width = len(header.split(";"))
    rows = [";".join([f"2021-01-0{day}", *["1.5"] * (width - 1)]) for day in range(1, 4)]
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "cities.csv").write_text("\n".join([header, *rows]) + "\n")
    params = write_params(tmp_path / "wide.toml", **TINY, source="wide", delimiter=";", date_column="datetime",
                          **{"temperature_column": "*", **settings})
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_stations_whose_names_repeat_are_told_apart_by_more_columns(tmp_path, capsys):
    """Kaggle's table of major cities' daily means names Portland, Maine and Portland, Oregon both "Portland",
    with the state beside it (empty outside the United States). By the city alone their rows merge, every day
    twice with two readings (but the few days two draws agree): the stage says so and how to name them, where it
    said the readings were 179 days apart. ``station_column = ["City", "State"]`` names them by both, an empty
    state left out."""
    days = pd.date_range("2019-01-01", "2021-12-31")
    rng = np.random.default_rng(8)
    season = 50 + 20 * np.sin(2 * np.pi * (days.day_of_year.to_numpy() - 110) / 365.25)
    rows = [pd.DataFrame({"Country": country, "State": state, "City": city, "Month": days.month, "Day": days.day,
                          "Year": days.year,
                          "AvgTemperature": np.round(season + offset + rng.normal(0, 5, len(days)), 1)})
            for country, state, city, offset in [("US", "Maine", "Portland", -5), ("US", "Oregon", "Portland", 3),
                                                 ("France", "", "Paris", 0)]]
    (tmp_path / "kaggle").mkdir()
    pd.concat(rows).to_csv(tmp_path / "kaggle" / "city_temperature.csv", index=False)
    settings = dict(**TINY, source="kaggle", date_column=["Year", "Month", "Day"], date_format="%Y %m %d",
                    temperature_column="AvgTemperature", unit="F", holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, write_params(tmp_path / "city.toml", station_column="City", **settings)) \
        == errors.EXIT_BAD_INPUT
    assert ("city_temperature.csv [station Portland]: 2,188 of its 2,192 rows share their time with a different "
            "reading: two stations' rows under one name (name them by more columns: import.station_column = "
            '["City", "State"], say), or readings at several times of a day') in capsys.readouterr().err
    params = write_params(tmp_path / "both.toml", station_column=["City", "State"], **settings)
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.stem for p in (root / "data/train/raw").glob("[!.]*")) == ["Paris", "Portland Maine",
                                                                              "Portland Oregon"]


def test_an_export_s_stations_without_any_reading_in_the_column_are_left_out_with_a_warning(tmp_path, capsys):
    """Archives' exports of an area list every station in it; many measure rain or snow only, their
    temperature fields empty: they are left out, named, and the others imported."""
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D")
    temperature = np.round(10 + 10 * np.sin(np.arange(len(dates)) / 58.0), 1).astype(str)
    rows = [pd.DataFrame({"STATION": station, "DATE": dates.strftime("%Y-%m-%d"), "TMAX": values, "PRCP": "0.1"})
            for station, values in [("USW0001", temperature), ("USC0002", ""), ("USC0003", "-99"),
                                    ("USW0004", temperature)]]
    (tmp_path / "own").mkdir()
    pd.concat(rows).to_csv(tmp_path / "own" / "export.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION", date_column="DATE",
                          temperature_column="TMAX", missing_values=[-99], holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    assert sorted(p.stem for p in (root / "data/train/raw").glob("[!.]*")) == ["USW0001", "USW0004"]
    assert ("warning: 2 station(s) left out, with no reading in column 'TMAX' (every value empty or a declared "
            "missing code: stations that measure other things), e.g. USC0002, USC0003") in capsys.readouterr().err
    pd.DataFrame({"STATION": "USC0002", "DATE": dates.strftime("%Y-%m-%d"), "TMAX": ""}).to_csv(
        tmp_path / "own" / "export.csv", index=False)
    assert run_stage(data_creation, root, params) == errors.EXIT_BAD_INPUT
    assert "no station has a reading in column 'TMAX'" in capsys.readouterr().err


def test_stations_too_short_to_build_features_from_are_left_out_with_a_warning(tmp_path, caplog):
    """One short record (a station opened last month) must not stop a network's run."""
    p = _import_params()
    days = pd.date_range("2020-01-01", periods=800, freq="D")
    for name, length in [("LONG1", 800), ("SHORT", 25), ("LONG2", 800)]:
        pd.DataFrame({"DATE": days[-length:].strftime("%d/%m/%Y"), "TMAX": "50"}).to_csv(
            tmp_path / f"{name}.csv", sep=";", index=False)
    parts, report, _ = importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])
    assert sorted(parts) == sorted(report) == ["LONG1", "LONG2"]
    min_steps = p["pre"]["min_steps"]
    assert (f"1 station(s) left out, with fewer than preprocessing.min_steps = {min_steps} readings (too few to "
            "build features from): SHORT (25)") in caplog.text
    for name in ("LONG1", "LONG2"):
        (tmp_path / f"{name}.csv").unlink()
    with pytest.raises(PipelineError, match=rf"no station has the preprocessing.min_steps = {min_steps} readings "
                                            r"the features need \(the most: 25\)"):
        importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])


def test_a_station_file_without_a_reading_is_left_out_like_a_short_one(tmp_path, caplog):
    """A station closed before the archive's years ships as a file of missing codes and empty values: it has
    no readings, so it is left out with the short stations, not a reason to stop the run; a file mostly of
    values that do not read as numbers still stops it (a setting is wrong)."""
    caplog.set_level("INFO", logger="pipeline")
    p = _import_params()
    p["import"]["missing_values"] = [-99]
    dates = pd.date_range("2020-01-01", periods=800, freq="D").strftime("%d/%m/%Y")
    for name, values in [("OPEN1", "50"), ("CLOSED", ["-99", ""] * 400), ("OPEN2", "51")]:
        pd.DataFrame({"DATE": dates, "TMAX": values}).to_csv(tmp_path / f"{name}.csv", sep=";", index=False)
    parts, report, _ = importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])
    assert sorted(parts) == sorted(report) == ["OPEN1", "OPEN2"]
    assert "CLOSED.csv: 0 of 800 rows kept; 400 missing value, 400 missing code" in caplog.text
    assert "1 station(s) left out, with fewer than preprocessing.min_steps" in caplog.text
    assert "CLOSED (0)" in caplog.text
    pd.DataFrame({"DATE": dates, "TMAX": ["n/r", ""] * 400}).to_csv(tmp_path / "CLOSED.csv", sep=";", index=False)
    with pytest.raises(PipelineError, match=r"CLOSED\.csv: no usable readings \(400 missing value, 400 not a number "
                                            r"\(e\.g\. 'n/r'\)\); most of its values do not read as numbers"):
        importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])


def test_exports_joined_with_cat_import_as_the_parts_did(tmp_path, capsys):
    """Archives hand out large exports in parts; joined with `cat`, each part's header (quoted, as NOAA's are)
    is a line of the file: skipped and counted, never a station or a reading."""
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D")
    rows = [pd.DataFrame({"STATION": station, "NAME": f"PLACE {k}, US", "DATE": dates.strftime("%Y-%m-%d"),
                          "TMAX": np.round(10 + 10 * np.sin(np.arange(len(dates)) / 58.0) + k, 1)})
            for k, station in enumerate(["USW0001", "USW0002"])]
    table = pd.concat(rows, ignore_index=True).sort_values(["DATE", "STATION"], ignore_index=True)
    parts = [table.iloc[:1000].to_csv(index=False, quoting=1), table.iloc[1000:].to_csv(index=False, quoting=1)]
    raw = {}
    for name, files in {"parts": {"export-1.csv": parts[0], "export-2.csv": parts[1]},
                        "joined": {"export.csv": parts[0] + parts[1]}}.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
        params = write_params(tmp_path / f"{name}.toml", **TINY, source=name, station_column="STATION",
                              date_column="DATE", temperature_column="TMAX", holdout_stations=0)
        assert run_stage(data_creation, tmp_path / f"root-{name}", params) == 0
        raw[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"root-{name}/data/train/raw").glob("[!.]*"))}
    assert raw["joined"] == raw["parts"] and sorted(raw["joined"]) == ["USW0001.csv", "USW0002.csv"]
    assert "export.csv: 1 repeated header line(s) skipped (files joined together)" in capsys.readouterr().err


def test_files_in_the_encodings_archives_ship_import_as_the_utf8_file_does(tmp_path, capsys):
    """A spreadsheet's "Unicode text" (UTF-16 with its byte-order mark) and an older archive's Latin-1 read
    as their UTF-8 twin, and so do lines ended by CR LF (Windows) or CR alone (old Mac spreadsheets); Latin-1
    is a guess, so it is said."""
    own = tmp_path / "own"
    own.mkdir()
    dates = pd.date_range("2020-01-01", "2021-12-31", freq="D")
    text = "STATION;NAME;DATE;TMAX\n" + "".join(
        f"{station};{name};{day:%d/%m/%Y};{np.sin(i / 58.0) * 20 + k:.1f}\n"
        for k, (station, name) in enumerate([("SÃO", "São Paulo, Mirante"), ("KÖLN", "Köln-Bonn")])
        for i, day in enumerate(dates))
    raw = {}
    for encoding, line_end in [("utf-8", "\n"), ("utf-16", "\n"), ("latin-1", "\n"), ("utf-8", "\r\n"),
                               ("utf-8", "\r"), ("utf-16", "\r")]:
        (own / "export.csv").write_bytes(text.replace("\n", line_end).encode(encoding))
        params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION",
                              **{k: v for k, v in REAL_FORMAT.items() if k != "unit"})
        root = tmp_path / f"root-{encoding}-{len(raw)}"
        assert run_stage(data_creation, root, params) == 0
        raw[encoding, line_end] = {p.name: p.read_bytes() for p in sorted((root / "data/train/raw").glob("[!.]*"))}
        said = capsys.readouterr().err
        assert ("warning: SÃO (export.csv): 731 of 731 rows kept; not UTF-8: read as Latin-1" in said) \
            == (encoding == "latin-1")
    assert all(files == raw["utf-8", "\n"] for files in raw.values())
    assert sorted(raw["utf-8", "\n"]) == ["KÖLN.csv", "SÃO.csv"]


def test_dates_written_in_year_month_and_day_columns_import_as_one_date_column_does(tmp_path):
    """As the Australian Bureau of Meteorology's daily files come: the year, month and day in columns of their
    own (here the day not zero-padded), the station's number in a column named in words."""
    dates = pd.date_range("2020-01-01", "2021-12-31", freq="D")
    rows = pd.concat([pd.DataFrame({
        "Product code": "IDCJAC0010", "Bureau of Meteorology station number": station,
        "Year": dates.year, "Month": dates.strftime("%m"), "Day": dates.day, "date": dates.strftime("%Y-%m-%d"),
        "Maximum temperature (Degree C)": np.round(20 + 8 * np.sin(np.arange(len(dates)) / 58.0) + k, 1),
        "Quality": "Y"}) for k, station in enumerate(["066062", "086071"])], ignore_index=True)
    raw = {}
    for how, dated in {"one column": {"date_column": "date"},
                       "three columns": {"date_column": ["Year", "Month", "Day"], "date_format": "%Y %m %d"}}.items():
        own = tmp_path / how
        own.mkdir()
        rows.drop(columns=["date"] if how == "three columns" else ["Year", "Month", "Day"]).to_csv(
            own / "IDCJAC0010.csv", index=False)
        params = write_params(tmp_path / f"{how}.toml", **TINY, source=how, holdout_stations=0,
                              station_column="Bureau of Meteorology station number",
                              temperature_column="Maximum temperature (Degree C)", **dated)
        assert run_stage(data_creation, tmp_path / f"root {how}", params) == 0
        raw[how] = {p.name: p.read_bytes() for p in sorted((tmp_path / f"root {how}/data/train/raw").glob("[!.]*"))}
    assert raw["three columns"] == raw["one column"] and sorted(raw["one column"]) == ["066062.csv", "086071.csv"]


@pytest.mark.parametrize("quantity", ["mean", "max", "min"])
def test_readings_at_several_times_a_day_become_the_day_s_quantity(tmp_path, quantity):
    """Hourly records: each complete day's mean, max or min (what import.quantity says the series is); a day
    with too few readings is dropped and counted, and one time written twice with two values is a conflict."""
    stamps = pd.date_range("2020-01-01", "2020-03-31 23:00", freq="h")
    values = np.round(5 + 4 * np.sin(2 * np.pi * stamps.hour.to_numpy() / 24) + stamps.day.to_numpy() / 10, 1)
    rows = pd.DataFrame({"DATE": stamps.strftime("%d/%m/%Y %H:%M"), "TMAX": values.astype(str)})
    short_day = rows["DATE"].str.startswith("15/02/2020") & (stamps.hour >= 5)  # 5 of its 24 hours left
    twice = pd.DataFrame({"DATE": ["01/03/2020 12:00"], "TMAX": ["30.0"]})  # disagrees with that hour's row
    path = tmp_path / "HOURLY.csv"
    pd.concat([rows[~short_day], twice]).to_csv(path, sep=";", index=False)
    imp = {**_import_params()["import"], "date_format": "%d/%m/%Y %H:%M", "unit": "C", "quantity": quantity}
    table, report = importing.read_user_station(path, imp, -90.0, 60.0)
    expected = pd.Series(values, index=stamps.normalize()).groupby(level=0).agg(quantity)
    expected = expected.drop([pd.Timestamp("2020-02-15"), pd.Timestamp("2020-03-01")])  # short; one hour lost
    expected["2020-03-01"] = pd.Series(values, index=stamps)[
        (stamps.normalize() == "2020-03-01") & (stamps.hour != 12)].agg(quantity)
    expected = expected.sort_index().round(2)
    assert table["date"].tolist() == expected.index.tolist()
    np.testing.assert_allclose(table["temperature"], expected.to_numpy())
    assert (report["incomplete_day"], report["conflicting_duplicate"]) == (5, 2)
    assert report["kept"] == len(expected) and report["frequency"] == "daily"
    assert report["within_days"] == len(rows) - 19 - 1 - 5 - len(expected)


def test_a_decimal_comma_reads_as_a_decimal_point_where_the_comma_is_not_the_delimiter(tmp_path):
    lines = [f"{day:02d}/01/2020;{day - 10.25:.2f}" for day in range(1, 32)]
    point, comma = tmp_path / "POINT.csv", tmp_path / "COMMA.csv"
    point.write_text("DATE;TMAX\n" + "\n".join(lines) + "\n")
    comma.write_text("DATE;TMAX\n" + "\n".join(line.replace(".", ",") for line in lines) + "\n")
    imp = _import_params()["import"]
    (expected, _), (table, report) = (importing.read_user_station(path, imp, -90.0, 60.0) for path in (point, comma))
    pd.testing.assert_frame_equal(table, expected)
    assert report["not_a_number"] == 0


@pytest.mark.parametrize("offsets", ["Europe/Berlin", "UTC"])
def test_time_stamps_with_utc_offsets_read_as_their_local_date_and_time(tmp_path, offsets):
    """ISO 8601 stamps as services export them: the offset changes with daylight saving time (or is +00:00)."""
    hours = pd.date_range("2021-03-20", "2021-11-10", freq="6h", tz=offsets)
    values = np.round(10 + 5 * np.sin(np.arange(len(hours)) / 9.0), 1)
    stamped, plain = tmp_path / "STAMPED.csv", tmp_path / "PLAIN.csv"
    pd.DataFrame({"time": hours.strftime("%Y-%m-%dT%H:%M:%S%z"), "t": values}).to_csv(stamped, index=False)
    pd.DataFrame({"time": hours.strftime("%Y-%m-%d %H:%M"), "t": values}).to_csv(plain, index=False)
    imp = {**_import_params()["import"], "date_column": "time", "temperature_column": "t", "delimiter": ",",
           "unit": "C", "quantity": "mean"}
    expected, _ = importing.read_user_station(plain, {**imp, "date_format": "%Y-%m-%d %H:%M"}, -90.0, 60.0)
    table, report = importing.read_user_station(stamped, {**imp, "date_format": "%Y-%m-%dT%H:%M:%S%z"}, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert report["bad_date"] == 0 and "+0" in stamped.read_text().splitlines()[1]


def test_a_typeset_minus_and_kelvins_read_as_the_plain_file_in_celsius(tmp_path):
    """Web pages and word processors write minus five with the minus sign U+2212; reanalyses write kelvins."""
    days = range(1, 32)
    lines = [f"2020-01-{day:02d},{day - 15.5:.1f}" for day in days]
    plain, typeset, kelvin = tmp_path / "PLAIN.csv", tmp_path / "TYPESET.csv", tmp_path / "KELVIN.csv"
    plain.write_text("date,temperature\n" + "\n".join(lines) + "\n")
    typeset.write_text("date,temperature\n" + "\n".join(line.replace(",-", ",\u2212") for line in lines) + "\n")
    kelvin.write_text("date,temperature\n" + "".join(f"2020-01-{day:02d},{day - 15.5 + 273.15:.2f}\n"
                                                     for day in days))
    imp = {**_import_params()["import"], "date_column": "date", "temperature_column": "temperature",
           "date_format": "%Y-%m-%d", "delimiter": ",", "unit": "C"}
    expected, _ = importing.read_user_station(plain, imp, -90.0, 60.0)
    table, report = importing.read_user_station(typeset, imp, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert report["not_a_number"] == 0 and "\u2212" in typeset.read_text()
    table, _ = importing.read_user_station(kelvin, {**imp, "unit": "K"}, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)


def test_a_met_office_station_file_reads_its_marked_values_and_dashes(tmp_path, capsys):
    """The UK Met Office's historic station data, as shipped: notes, then monthly columns aligned with spaces
    under a header and a line of units, estimated values marked "7.2*", missing ones "---", "Provisional" after
    the latest months. A marked value is the reading (the log counts them), dashes are no reading."""
    notes = ["Oxford", "Location: 450900E 207200N, Lat 51.761 Lon -1.262, 63 metres amsl",
             "Estimated data is marked with a * after the value.",
             "Missing data (more than 2 days missing in month) is marked by  ---.",
             "   yyyy  mm   tmax    tmin      af    rain     sun", "              degC    degC    days      mm   hours"]
    months = pd.date_range("2015-01-01", periods=96, freq="MS")
    tmax = np.round(14 + 7 * np.sin(2 * np.pi * (months.month.to_numpy() - 4) / 12), 1)
    written = [f"{value:.1f}" for value in tmax]
    written[3], written[10], written[40] = f"{tmax[3]:.1f}*", "---", f"{tmax[40]:.1f}#"
    rows = [f"   {day.year}  {day.month:2d}  {value:>6}    2.0       0    50.0     ---" for day, value in zip(
        months, written, strict=True)]
    rows[-1] += "  Provisional"
    path = tmp_path / "OXFORD.csv"
    path.write_text("\n".join(notes + rows) + "\n")
    imp = {**_import_params()["import"], "date_column": ["yyyy", "mm"], "temperature_column": "tmax",
           "date_format": "%Y %m", "delimiter": "whitespace", "unit": "C"}
    table, report = importing.read_user_station(path, imp, -90.0, 60.0)
    assert len(table) == 95 and report["missing_value"] == 1 and report["not_a_number"] == 0
    assert report["marked"] == 2 and report["marked_example"] == f"{tmax[3]:.1f}*"
    np.testing.assert_allclose(table["temperature"], np.delete(tmax, 10))
    assert "2 values read without the mark or unit after them (e.g. '" in importing._describe(report)
    # Read by position, past the notes and titles, the word after the last month no reason to refuse the file.
    by_position, report = importing.read_user_station(
        path, {**imp, "date_column": ["#1", "#2"], "temperature_column": "#3"}, -90.0, 60.0)
    pd.testing.assert_frame_equal(by_position, table)
    assert report["notes"] == 6 and report["marked"] == 2


def test_a_file_without_a_header_skips_the_notes_before_its_first_reading(tmp_path):
    """The Japan Meteorological Agency's downloads, as shipped: Shift_JIS, the time of the download, blank lines,
    the station's name and two lines of column titles, then "2015/1/1,6.7,8,1" (date, reading, quality,
    homogeneity). Read by position, the readings are those of the file without the lines before them."""
    days = pd.date_range("2015-01-01", periods=90, freq="D")
    readings = [f"{day.year}/{day.month}/{day.day},{5 + i / 10:.1f},8,1" for i, day in enumerate(days)]
    notes = ["ダウンロードした時刻\uff1a2023/01/05 10:00:00", "", "", "東京,東京,東京",
             "年月日,平均気温(℃),平均気温(℃),平均気温(℃)", ",,品質情報,均質番号"]
    shipped, plain = tmp_path / "TOKYO.csv", tmp_path / "PLAIN.csv"
    shipped.write_bytes(("\r\n".join(notes + readings) + "\r\n").encode("shift_jis"))
    plain.write_text("\n".join(readings) + "\n")
    imp = {**_import_params()["import"], "date_column": "#1", "temperature_column": "#2",
           "date_format": "%Y/%m/%d", "delimiter": ",", "unit": "C"}
    expected, _ = importing.read_user_station(plain, imp, -90.0, 60.0)
    table, report = importing.read_user_station(shipped, imp, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert len(table) == 90 and report["notes"] == 6 and report["bad_date"] == 0
    assert "6 lines before the first reading skipped" in importing._describe(report)


@pytest.mark.parametrize(("unit", "written", "read"), [
    ("C", ["12.5 °C", "-3.0°C", "4 C", "5.5ºC", "7 °F"], [12.5, -3.0, 4.0, 5.5, None]),
    ("F", ["54 °F", "60F", "12 °C"], [54.0, 60.0, None]),
    ("K", ["285.1 K", "280K"], [285.1, 280.0])])
def test_a_value_written_with_the_unit_import_names_is_read(unit, written, read):
    """Tables copied from web pages write "12.5 °C": the unit import.unit names is read away; another unit is
    not a number (54 °F is no reading in °C)."""
    imp = {**_import_params()["import"], "unit": unit, "delimiter": ","}
    values, _, _, marked = importing._column_as_written(pd.Series(written), imp)
    np.testing.assert_array_equal(values, np.array(read, dtype=float))
    assert list(marked) == [value is not None for value in read]


def test_two_digit_years_are_of_the_hundred_years_up_to_today(tmp_path):
    """An old record written "01/01/55" is from 1955: read as 2055 (Python's rule for 00-68), its days up to
    1968 were dropped as from the future."""
    days = pd.date_range("1950-01-01", "1979-12-31", freq="D")
    values = np.round(10 + 10 * np.sin(np.arange(len(days)) / 58.0), 1)
    imp = {**_import_params()["import"], "date_column": "date", "temperature_column": "temperature",
           "delimiter": ",", "unit": "C"}
    tables = {}
    for name, written in (("FOUR", "%d/%m/%Y"), ("TWO", "%d/%m/%y")):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame({"date": days.strftime(written), "temperature": values}).to_csv(path, index=False)
        tables[name], report = importing.read_user_station(path, {**imp, "date_format": written}, -90.0, 60.0)
        assert report["future_date"] == 0 and report["kept"] == len(days)
    pd.testing.assert_frame_equal(tables["TWO"], tables["FOUR"])


@pytest.mark.parametrize(("first", "said"), [(43831, "a spreadsheet's serial day numbers"),
                                             (1577836800, "seconds since 1970")])
def test_dates_written_as_day_or_second_numbers_are_named_as_such(tmp_path, first, said):
    """A spreadsheet saved with its dates formatted as numbers (43831 for 2020-01-01), or Unix time: no
    date_format reads them, and the message says what they look like."""
    step = 1 if first < 100_000 else 86_400
    path = tmp_path / "NUMBERED.csv"
    pd.DataFrame({"date": first + step * np.arange(100), "temperature": 10.0}).to_csv(path, index=False)
    imp = {**_import_params()["import"], "date_column": "date", "temperature_column": "temperature",
           "date_format": "%Y-%m-%d", "delimiter": ",", "unit": "C"}
    with pytest.raises(errors.PipelineError, match=f"look like {said}"):
        importing.read_user_station(path, imp, -90.0, 60.0)


def test_files_in_fahrenheit_read_as_celsius_are_named_in_one_warning(tmp_path, capsys):
    """°F read as °C loses every summer day as impossible and keeps the rest, wrong: the log says so once. A
    sentinel now and then (the real-format file's one 999.9 in 1,078 rows) is dropped without it."""
    days = pd.date_range("2018-01-01", periods=400, freq="D")
    fahrenheit = np.round(60 + 30 * np.sin(np.arange(400) / 58.0), 1)
    for folder, names in (("wrong", ["EAST", "WEST", "HOME"]), ("right", ["HOME"])):
        (tmp_path / folder).mkdir()
        for name in names:
            if name == "HOME":
                write_real_format_station(tmp_path / folder / "HOME.csv")
            else:
                pd.DataFrame({"DATE": days.strftime("%d/%m/%Y"), "TMAX": fahrenheit}).to_csv(
                    tmp_path / folder / f"{name}.csv", sep=";", index=False)
    settings = {**TINY, "test_steps": 30, "holdout_stations": 0, **{k: v for k, v in REAL_FORMAT.items()
                                                                   if k != "unit"}}
    right = write_params(tmp_path / "right.toml", **settings, source="right", unit="F")
    assert run_stage(data_creation, tmp_path / "root", right) == 0
    assert "outside preprocessing's" not in capsys.readouterr().err
    wrong = write_params(tmp_path / "wrong.toml", **settings, source="wrong", unit="C")
    assert run_stage(data_creation, tmp_path / "root", wrong) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "outside preprocessing's" in line]
    assert len(warned) == 1 and "3 file(s)" in warned[0] and "import.unit is probably wrong" in warned[0]
    assert "EAST.csv: " in warned[0] and "WEST.csv: " in warned[0]
    report = json.loads((tmp_path / "root/data/source.json").read_text())["files"]
    assert float(report["EAST"]["impossible_example"]) > 60


def test_whole_degree_celsius_readings_import_as_readings(tmp_path):
    """Old records and some national archives write whole °C: every reading a whole number."""
    (tmp_path / "own").mkdir()
    days = pd.date_range("2018-01-01", periods=400, freq="D")
    whole = np.round(8 + 10 * np.sin(np.arange(400) / 58.0)).astype(int)
    pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "temperature": whole}).to_csv(tmp_path / "own/WHOLE.csv",
                                                                                    index=False)
    params = write_params(tmp_path / "own.toml", **{**TINY, "test_steps": 30}, source="own", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == 0
    raw = pd.concat(pd.read_csv(tmp_path / f"root/data/{split}/raw/WHOLE.csv") for split in ("train", "test"))
    assert raw["temperature"].tolist() == whole.tolist()
    assert (tmp_path / "root/data/test/raw/WHOLE.csv").read_text().splitlines()[1].endswith(f",{whole[370]}.00")


def test_an_archive_s_notes_before_the_header_and_tenths_of_a_degree_import_as_a_plain_file(tmp_path):
    """As ECA&D's files come: lines of licence and format notes, then the header; readings in 0.1 °C, -9999
    on missing days."""
    dates = pd.date_range("2019-01-01", "2020-12-31", freq="D")
    tenths = np.round(80 + 90 * np.sin(np.arange(len(dates)) / 58.0)).astype(int)
    tenths[40:45] = -9999
    notes = ("EUROPEAN CLIMATE ASSESSMENT & DATASET (ECA&D), file created on: 05-12-2026\n"
             "THESE DATA CAN BE USED FREELY PROVIDED THAT THE FOLLOWING SOURCE IS ACKNOWLEDGED:\n\n"
             "FILE FORMAT (MISSING VALUE CODE IS -9999):\n15-22 DATE : Date YYYYMMDD\n"
             "24-28 TG   : mean temperature in 0.1 &#176;C\n\n")
    rows = "".join(f"   162,   100,{day:%Y%m%d},{value:5d},    0\n" for day, value in zip(dates, tenths, strict=True))
    archive, plain = tmp_path / "TG_STAID000162.csv", tmp_path / "PLAIN.csv"
    archive.write_text(notes + "STAID, SOUID,    DATE,   TG, Q_TG\n" + rows)
    plain.write_text("DATE,TG\n" + "".join(f"{day:%Y%m%d},{value / 10}\n" for day, value
                                            in zip(dates, tenths, strict=True) if value != -9999))
    imp = {**_import_params()["import"], "date_column": "DATE", "temperature_column": "TG", "date_format": "%Y%m%d",
           "delimiter": ","}
    table, report = importing.read_user_station(archive, {**imp, "unit": "0.1C", "missing_values": [-9999]},
                                                -90.0, 60.0)
    expected, _ = importing.read_user_station(plain, {**imp, "unit": "C"}, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert (report["preamble"], report["missing_code"]) == (7, 5)


@pytest.mark.parametrize(("files", "said"), [
    ({}, ["no .csv files in the data.source folder (it is empty)", "rename text tables to <station>.csv"]),
    ({"OSLO.txt": " 1  1  1995  24.0\n"},
     ["no .csv files in the data.source folder (it holds .txt files)", "rename text tables to <station>.csv"]),
    ({"ECA_blend_tg.zip": "PK", "readme.txt": "ECA&D"},  # an archive as downloaded
     ["no .csv files in the data.source folder, but archives (ECA_blend_tg.zip): unpack them (unzip, tar -xf)"]),
    ({"2019/OSLO.txt": " 1  1  2019  24.0\n", "2020/ECA.zip": "PK"},  # folders of no station files
     ["the data.source folder holds folders only (2019, 2020), and none of them holds station files",
      "point data.source at the folder that holds them"])])
def test_a_source_folder_without_csv_files_says_what_it_holds_and_what_is_read(tmp_path, capsys, files, said):
    (tmp_path / "own").mkdir()
    for name, text in files.items():
        (tmp_path / "own" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "own" / name).write_text(text)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert all(part in err for part in said)


def test_files_without_a_header_line_are_read_by_column_positions(tmp_path):
    """Some archives' bulk files have no header (date, mean, min, max, ...): "#1" names the first column."""
    days = pd.date_range("2020-01-01", "2021-12-31", freq="D")
    values = np.round(10 + 10 * np.sin(np.arange(len(days)) / 58.0), 1)
    plain, bare = tmp_path / "PLAIN.csv", tmp_path / "BARE.csv"
    plain.write_text("date,tavg\n" + "".join(f"{d:%Y-%m-%d},{v}\n" for d, v in zip(days, values, strict=True)))
    bare.write_text("".join(f"{d:%Y-%m-%d},{v},{v - 5},{v + 5}\n" for d, v in zip(days, values, strict=True)))
    imp = {**_import_params()["import"], "date_format": "%Y-%m-%d", "delimiter": ",", "unit": "C"}
    expected, _ = importing.read_user_station(plain, {**imp, "date_column": "date", "temperature_column": "tavg"},
                                              -90.0, 60.0)
    table, report = importing.read_user_station(bare, {**imp, "date_column": "#1", "temperature_column": "#2"},
                                                -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert report["rows"] == len(days)  # the first line is a reading, not a header
    with pytest.raises(PipelineError, match="no column '#7'"):
        importing.read_user_station(bare, {**imp, "date_column": "#1", "temperature_column": "#7"}, -90.0, 60.0)


def test_a_text_file_of_space_separated_columns_without_a_header_imports_as_its_csv_twin(tmp_path):
    """As the University of Dayton's daily archive ships each city: month, day, year and the mean in
    °F, aligned with runs of spaces, no header, -99 on missing days."""
    days = pd.date_range("2019-01-01", "2020-12-31", freq="D")
    values = np.round(50 + 20 * np.sin(np.arange(len(days)) / 58.0), 1)
    values[10] = -99
    aligned, twin = tmp_path / "CITY.csv", tmp_path / "TWIN.csv"
    aligned.write_text("".join(f" {d.month:<13d} {d.day:<13d} {d.year:<12d} {v}\n"
                               for d, v in zip(days, values, strict=True)))
    twin.write_text("date,temperature\n" + "".join(f"{d:%Y-%m-%d},{v}\n" for d, v in zip(days, values, strict=True)))
    imp = {**_import_params()["import"], "unit": "F", "missing_values": [-99]}
    expected, _ = importing.read_user_station(twin, {**imp, "date_column": "date", "temperature_column": "temperature",
                                                     "date_format": "%Y-%m-%d", "delimiter": ","}, -90.0, 60.0)
    table, report = importing.read_user_station(aligned, {**imp, "date_column": ["#3", "#1", "#2"],
                                                          "temperature_column": "#4", "date_format": "%Y %m %d",
                                                          "delimiter": "whitespace"}, -90.0, 60.0)
    pd.testing.assert_frame_equal(table, expected)
    assert (report["rows"], report["missing_code"]) == (len(days), 1)


def test_an_hourly_text_file_in_tenths_of_a_degree_imports_as_its_daily_means(tmp_path):
    """As NOAA's ISD-Lite ships a station-year: year, month, day and hour in columns aligned with spaces, the
    temperature in tenths of °C, -9999 where an hour has none; no header."""
    hours = pd.date_range("2019-01-01", "2020-12-31 23:00", freq="h")
    tenths = np.round(100 + 80 * np.sin(np.arange(len(hours)) / 1400.0)
                      + 30 * np.sin(2 * np.pi * hours.hour.to_numpy() / 24)).astype(int)
    tenths[5] = -9999
    path = tmp_path / "722950-23174-2019.csv"
    path.write_text("".join(f"{h.year:4d} {h.month:02d} {h.day:02d} {h.hour:02d} {t:5d}   -9999 10200\n"
                            for h, t in zip(hours, tenths, strict=True)))
    imp = {**_import_params()["import"], "delimiter": "whitespace", "date_column": ["#1", "#2", "#3", "#4"],
           "date_format": "%Y %m %d %H", "temperature_column": "#5", "unit": "0.1C", "missing_values": [-9999],
           "quantity": "mean"}
    table, report = importing.read_user_station(path, imp, -90.0, 60.0)
    celsius = pd.Series(np.where(tenths == -9999, np.nan, tenths / 10), index=hours)
    expected = celsius.dropna().groupby(celsius.dropna().index.normalize()).mean().round(2)
    assert table["date"].tolist() == expected.index.tolist()
    np.testing.assert_allclose(table["temperature"], expected.to_numpy())
    assert (report["missing_code"], report["kept"], report["frequency"]) == (1, len(expected), "daily")


def test_a_station_file_s_repeated_header_is_skipped_and_counted(tmp_path):
    lines = [f"{day:02d}/{month:02d}/2020;{day / 2}" for month in (1, 2) for day in range(1, 29)]
    once, joined = tmp_path / "once.csv", tmp_path / "joined.csv"
    once.write_text("DATE;TMAX\n" + "\n".join(lines) + "\n")
    joined.write_text("DATE;TMAX\n" + "\n".join(lines[:20]) + "\n DATE ; TMAX\n" + "\n".join(lines[20:]) + "\n")
    imp = _import_params()["import"]
    (expected, _), (table, report) = (importing.read_user_station(path, imp, -90.0, 60.0) for path in (once, joined))
    pd.testing.assert_frame_equal(table, expected)
    assert report["repeated_header"] == 1 and report["bad_date"] == 0 and report["kept"] == len(lines)


def test_a_file_without_the_station_column_names_it_and_the_header(tmp_path, capsys):
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "export.csv").write_text("DATE,TMAX,NAME\n2020-01-01,50,\"A, US\"\n")
    params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION", date_column="DATE",
                          temperature_column="TMAX", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert ("export.csv: no column 'STATION' (header is 'DATE,TMAX,NAME'); set import.station_column or "
            "import.delimiter") in capsys.readouterr().err


@pytest.mark.parametrize(("station", "message"), [("../x", "cannot name a station"), ("", "cannot name a station"),
                                                 ('"LINE\nBREAK"', "a control character such as a line break"),
                                                 ("TAB\tBED", "a control character such as a line break")])
def test_a_station_column_value_that_cannot_name_a_station_is_refused(tmp_path, capsys, station, message):
    own = tmp_path / "own"
    own.mkdir()
    (own / "export.csv").write_text(f"STATION,DATE,TMAX\n{station},2020-01-01,50\nA,2020-01-02,51\n")
    params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION", date_column="DATE",
                          temperature_column="TMAX", holdout_stations=0)
    assert run_stage(data_creation, tmp_path / "root", params) == errors.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_hidden_files_beside_the_station_files_are_not_stations(tmp_path):
    """A folder copied from a Mac to a shared or USB drive holds a binary "._HOME.csv" beside each file,
    editors leave hidden copies, and Excel an owner file "~$HOME.csv" while it has the file open: none is a
    station (they stopped stage 1 as binary data)."""
    write_real_format_station(tmp_path / "HOME.csv")
    (tmp_path / "._HOME.csv").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (tmp_path / ".HOME.csv.swp.csv").write_text("not a station\n")
    (tmp_path / "~$HOME.csv").write_bytes(b"\x04user" + b" " * 50 + b"\x00" * 4)  # Excel has HOME.csv open
    p = _import_params()
    parts, report, _ = importing.import_stations(tmp_path, p["data"], p["import"], p["pre"])
    assert list(parts) == list(report) == ["HOME"]


def test_a_station_file_named_with_a_control_character_is_refused(tmp_path):
    (tmp_path / "HOME\nAWAY.csv").write_text("date,temperature\n2020-01-01,5\n")
    with pytest.raises(PipelineError, match=r"a station name with a control character \(a line break or a tab\)"):
        storage.station_files(tmp_path)


def test_station_files_carrying_their_coordinates_make_the_station_list(tmp_path):
    """One file per station as NOAA's and Environment Canada's single-station downloads ship them, each row
    with the station's position: the positions become data/stations.csv as a long-form export's do."""
    own = tmp_path / "own"
    own.mkdir()
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D").strftime("%Y-%m-%d")
    readings = np.round(10 + 10 * np.sin(np.arange(len(dates)) / 58.0), 1)
    pd.DataFrame({"STATION": "USW0001", "NAME": "HERE, US", "LATITUDE": 61.0, "LONGITUDE": -146.3,
                  "ELEVATION": 10.0, "DATE": dates, "TAVG": readings}).to_csv(own / "USW0001.csv", index=False)
    pd.DataFrame({"Longitude (x)": -75.7, "Latitude (y)": 45.4, "Station Name": "OTTAWA", "DATE": dates,
                  "TAVG": readings + 1}).to_csv(own / "OTTAWA.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", date_column="DATE", temperature_column="TAVG",
                          unit="C", holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    listed = pd.read_csv(root / "data/stations.csv")
    assert listed.fillna(-1).to_dict("list") == {"station": ["OTTAWA", "USW0001"], "latitude": [45.4, 61.0],
                                                 "longitude": [-75.7, -146.3], "elevation": [-1, 10.0]}
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == 2


def test_a_long_form_export_s_coordinate_columns_become_the_station_list(tmp_path, capsys):
    """NOAA's exports carry LATITUDE, LONGITUDE and ELEVATION in every row: they become data/stations.csv (the
    most frequent value per station), and a value that is not a coordinate is refused naming the station."""
    own = tmp_path / "own"
    own.mkdir()
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D")
    rows = []
    for k, station in enumerate(["USW0001", "USW0002"]):
        rows.append(pd.DataFrame({"STATION": station, "LATITUDE": 61.0 + k / 10, "LONGITUDE": -146.3 - k / 10,
                                  "ELEVATION": 10.0 * (k + 1), "DATE": dates.strftime("%Y-%m-%d"),
                                  "TMAX": np.round(10 + 10 * np.sin(np.arange(len(dates)) / 58.0), 1)}))
    table = pd.concat(rows, ignore_index=True)
    table.loc[:2, "LATITUDE"] = 61.05  # three rows of the first station from an older position
    table.to_csv(own / "export.csv", index=False)
    params = write_params(tmp_path / "own.toml", **TINY, source="own", station_column="STATION", date_column="DATE",
                          temperature_column="TMAX", holdout_stations=0)
    root = tmp_path / "root"
    assert run_stage(data_creation, root, params) == 0
    listed = pd.read_csv(root / "data/stations.csv")
    assert listed.to_dict("list") == {"station": ["USW0001", "USW0002"], "latitude": [61.0, 61.1],
                                      "longitude": [-146.3, -146.4], "elevation": [10.0, 20.0]}
    # as other exports name the columns: the same list
    table.rename(columns={"LATITUDE": "Lat", "LONGITUDE": "lon", "ELEVATION": "ELEV"}).to_csv(own / "export.csv",
                                                                                             index=False)
    assert run_stage(data_creation, root, params) == 0
    assert pd.read_csv(root / "data/stations.csv").equals(listed)
    capsys.readouterr()
    table.loc[table["STATION"] == "USW0002", "ELEVATION"] = -999.9  # the archive's code for unknown
    table.to_csv(own / "export.csv", index=False)
    assert run_stage(data_creation, root, params) == 0
    assert "elevation -999.9 is below any land (-500 m): read as unknown" in capsys.readouterr().err
    listed = pd.read_csv(root / "data/stations.csv")
    assert listed["elevation"].iloc[0] == 10.0 and np.isnan(listed["elevation"].iloc[1])
    assert listed["latitude"].tolist() == [61.0, 61.1]
    assert json.loads((root / "data/source.json").read_text())["coordinates"] == 2
    table["LATITUDE"] = table["LATITUDE"].astype(object)
    table.loc[table.index[-1], "LATITUDE"] = "61 North"  # (N61 reads as 61)
    table.to_csv(own / "export.csv", index=False)
    capsys.readouterr()
    assert run_stage(data_creation, root, params) == 2
    assert "export.csv [station USW0002]: latitude '61 North' is not a number within ±90" in capsys.readouterr().err


def test_run_alone_as_a_script_it_imports_a_folder_of_many_files_on_several_threads(tmp_path):
    """The script run by hand, not by pipeline.sh (which loads its modules ahead): past FILES_PER_CHUNK files
    it reads them on threads, and those touched pandas first together. With Python 3.11's lazy loader every
    such run failed: "internal error: module 'pandas' has no attribute 'errors'"."""
    import subprocess
    import sys

    from station_forecast.station_files import FILES_PER_CHUNK

    own = tmp_path / "own"
    own.mkdir()
    days = pd.date_range("2019-01-01", periods=800, freq="D").strftime("%Y-%m-%d")
    rng = np.random.default_rng(0)
    for i in range(2 * FILES_PER_CHUNK + 1):
        readings = 10 + 8 * np.sin(np.arange(800) / 58) + rng.normal(0, 2, 800)
        pd.DataFrame({"date": days, "temperature": readings.round(1)}).to_csv(own / f"S{i:03d}.csv", index=False)
    params = write_params(tmp_path / "p.toml", **TINY, source=str(own), holdout_stations=0)
    (tmp_path / "root").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "data_creation.py"), "--root", str(tmp_path / "root"),
                             "--params", str(params)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PIPELINE_THREADS="2"))
    assert result.returncode == 0, result.stderr[-500:]
    assert len(list((tmp_path / "root/data/train/raw").glob("*.csv"))) == 2 * FILES_PER_CHUNK + 1
