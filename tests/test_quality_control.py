"""The network quality control: what it learns, what it flags, what it repairs."""

import warnings

import numpy as np
import pandas as pd
import pytest

from station_forecast import runtime
from station_forecast.flags import CODE, FAULTS
from station_forecast.params import load_params
from station_forecast.quality_control import checks, climatology, learning, robust
from station_forecast.quality_control import neighbours as qc_neighbours
from station_forecast.quality_control import verdict as verdicts

DAYS = 3 * 365
TEST_FROM = 2 * 365  # the first two years are the learning days


@pytest.fixture(scope="module")
def settings() -> dict:
    return load_params()["quality_control"]


def network(n_stations: int = 5, seed: int = 0, resolution: float = 0.1) -> pd.DataFrame:
    """Daily readings of stations that share most of their weather (dates x stations)."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2020-01-01", periods=DAYS, freq="D")
    season = 10 - 9 * np.cos(2 * np.pi * (dates.day_of_year.to_numpy() - 20) / 365.25)
    shared = np.zeros(DAYS)
    for t in range(1, DAYS):  # a few hundred steps of AR(1); fine for a fixture
        shared[t] = 0.7 * shared[t - 1] + rng.normal(0, 2.2)
    readings = {f"S{i}": season + rng.uniform(-3, 3) + shared * rng.uniform(0.9, 1.1)
                + rng.normal(0, 0.6, DAYS) for i in range(n_stations)}
    return (pd.DataFrame(readings, index=dates) / resolution).round() * resolution


def learning_days(observed: pd.DataFrame) -> pd.DataFrame:
    early = np.arange(len(observed)) < TEST_FROM
    return pd.DataFrame(np.repeat(early[:, None], observed.shape[1], axis=1), index=observed.index,
                        columns=observed.columns)


def verdict(observed: pd.DataFrame, settings: dict) -> tuple[dict, dict[str, pd.DataFrame]]:
    detector = learning.learn(observed, learning_days(observed), settings)
    return detector, verdicts.detect(observed, detector)


def faults(result: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return result["flag"].isin(FAULTS)


def test_neighbours_are_learned_on_the_learning_days_only(settings):
    observed = network()
    detector = learning.learn(observed, learning_days(observed), settings)
    changed = observed.copy()
    changed.iloc[TEST_FROM:] += np.random.default_rng(1).normal(0, 5, changed.iloc[TEST_FROM:].shape)
    assert learning.learn(changed, learning_days(changed), settings) == detector
    buddies = detector["stations"]["S0"]["neighbours"]["buddies"]
    assert [b["station"] for b in buddies] and all(b["correlation"] > 0.8 for b in buddies)


def test_a_regional_cold_snap_is_weather_not_a_fault(settings):
    observed = network()
    snap = observed.index[TEST_FROM + 30: TEST_FROM + 33]
    depth = np.array([-11.0, -9.5, -10.5, -12.0, -8.5])  # every station, a little differently
    observed.loc[snap] += depth
    _, result = verdict(observed, settings)
    assert not faults(result).loc[snap].to_numpy().any()
    assert (result["repaired"].loc[snap] == observed.loc[snap]).all().all()


def test_a_3_degree_shift_at_one_of_five_stations_is_found_within_days_and_mostly_removed(settings):
    observed = network()
    clean = observed.copy()
    start, length = TEST_FROM + 40, 40
    observed.iloc[start: start + length, 2] += 3.0
    _, result = verdict(observed, settings)
    flagged = faults(result)["S2"].to_numpy()
    first = int(np.argmax(flagged[start:]))
    assert flagged[start:].any() and first <= 7, first
    assert flagged[start + 10: start + length].mean() > 0.9
    assert result["flag"]["S2"].iloc[start + 10: start + length].isin(["level_shift", "drift"]).mean() > 0.9
    repaired = result["repaired"]["S2"].iloc[start + 10: start + length]
    left = (repaired - clean["S2"].iloc[start + 10: start + length]).mean()
    assert abs(left) < 1.0  # of the 3 °C offset
    others = faults(result).drop(columns="S2").iloc[start: start + length]
    assert not others.to_numpy().any()  # the neighbours of a faulty station are not blamed


def test_a_record_listed_twice_is_not_its_own_neighbour_so_its_faults_are_still_found(settings):
    """An archive that lists one station under two names: each copy would be the other's perfect neighbour and
    every fault in the record would pass as weather. Neither is the other's neighbour, also where one copy is in
    whole °F; the shift and spike in the record are found in both copies; a whole-degree neighbour that often
    reads the same is no copy."""
    observed = network(6)
    observed["S5"] = observed["S0"]
    observed["W"] = observed["S1"].round() + 0.4  # agrees with S1 to the degree, never to 0.1
    observed["F"] = (((observed["S2"] * 1.8 + 32).round() - 32) / 1.8).round(2)  # S2's record in whole °F
    start = TEST_FROM + 40
    observed.iloc[start: start + 40, [0, 5]] += 4.0
    observed.iloc[TEST_FROM + 150, [0, 5]] += 9.0
    detector, result = verdict(observed, settings)
    for station, copy in (("S0", "S5"), ("S5", "S0")):
        found = detector["stations"][station]["neighbours"]
        assert copy not in [b["station"] for b in found["buddies"]] and len(found["buddies"]) >= 3
        assert [c["station"] for c in found["same_record"]] == [copy] and found["same_record"][0]["share"] == 1.0
        assert faults(result)[station].iloc[start + 7: start + 40].mean() > 0.9
        assert result["flag"][station].iloc[TEST_FROM + 150] == "spike"
    for station, copy in (("S2", "F"), ("F", "S2")):  # a copy at another resolution is a copy too
        found = detector["stations"][station]["neighbours"]
        assert copy not in [b["station"] for b in found["buddies"]]
        assert [c["station"] for c in found["same_record"]] == [copy] and found["same_record"][0]["share"] == 1.0
    assert qc_neighbours.same_records(detector).keys() == {"S0", "S5", "S2", "F"}


@pytest.mark.parametrize("size", [15.0, 25.0, -20.0])  # far beyond the weather: a sensor gone to °F, a lost sign
@pytest.mark.parametrize("n_stations", [3, 5])  # with 3, each neighbour's median of lines is a mean, half the fault
def test_a_shift_far_beyond_the_weather_is_flagged_throughout_and_removed(settings, size, n_stations):
    observed = network(n_stations)
    clean = observed.copy()
    start, length = TEST_FROM + 40, 40
    observed.iloc[start: start + length, 2] += size
    _, result = verdict(observed, settings)
    assert faults(result)["S2"].iloc[start: start + length].all()
    left = (result["repaired"]["S2"] - clean["S2"]).iloc[start: start + length]
    assert left.abs().mean() < 1.0
    assert not faults(result).drop(columns="S2").iloc[start: start + length].to_numpy().any()


@pytest.mark.parametrize("both_read", [True, False])
def test_a_shift_is_blamed_on_a_station_only_while_two_neighbours_read(settings, both_read):
    """With one neighbour reading, a lasting departure is either station's fault: neither is flagged for it."""
    observed = network(3)
    start, length = TEST_FROM + 40, 40
    observed.iloc[start: start + length, 2] += 10.0
    if not both_read:
        observed.iloc[start - 10: start + length + 10, 1] = np.nan
    _, result = verdict(observed, settings)
    lasting = result["flag"].isin(["level_shift", "drift"]).iloc[start: start + length]
    if both_read:
        assert lasting["S2"].sum() >= 15 and not lasting[["S0", "S1"]].to_numpy().any()
    else:
        assert not lasting.to_numpy().any()


@pytest.mark.parametrize("gap", [3, 4])
def test_a_burst_of_spikes_that_each_return_is_not_taken_for_a_shift(settings, gap):
    observed = network()
    days = [TEST_FROM + 50 + gap * i for i in range(5)]
    observed.iloc[days, 1] += 10.0
    _, result = verdict(observed, settings)
    flag = result["flag"]["S1"]
    assert (flag.iloc[days] == "spike").all()
    around = flag.iloc[TEST_FROM + 40: days[-1] + 40].drop(flag.index[days])
    assert not around.isin(FAULTS).any()


def test_spikes_and_stuck_runs_are_flagged_and_repaired_by_the_expected_value(settings):
    observed = network()
    clean = observed.copy()
    observed.iloc[TEST_FROM + 10, 1] += 9.0
    observed.iloc[TEST_FROM + 60: TEST_FROM + 68, 3] = observed.iloc[TEST_FROM + 59, 3]
    _, result = verdict(observed, settings)
    assert result["flag"].iloc[TEST_FROM + 10, 1] == "spike"
    assert abs(result["repaired"].iloc[TEST_FROM + 10, 1] - clean.iloc[TEST_FROM + 10, 1]) < 2.5
    stuck = result["flag"].iloc[TEST_FROM + 60: TEST_FROM + 68, 3]
    assert (stuck == "stuck").mean() >= 0.75
    assert result["confidence"].where(faults(result)).stack().dropna().between(0.5, 1.0).all()


def test_a_stuck_reading_between_its_neighbours_lines_is_flagged_but_never_moved(settings):
    """A repair must not move a reading away from its neighbours: a stuck reading that lies between their
    lines keeps its value (its flag stands); one beyond them all is repaired when the flag is confident."""
    observed = network()
    observed.iloc[TEST_FROM + 60: TEST_FROM + 90, 3] = observed.iloc[TEST_FROM + 59, 3]
    detector, result = verdict(observed, settings)
    stations = detector["stations"]
    coefs = pd.DataFrame({s: e["climatology"] for s, e in stations.items()})
    anomaly = observed - climatology.climatology_at(coefs, observed.index, observed.columns)
    beyond = qc_neighbours.outside_the_lines(anomaly, {s: e["neighbours"] for s, e in stations.items()})
    stuck, moved = result["flag"] == "stuck", result["repaired"] != observed
    sure = result["confidence"] >= settings["repair_confidence"]
    assert (stuck & (beyond == 0)).to_numpy().sum() >= 2 and (stuck & (beyond > 0) & sure).to_numpy().sum() >= 2
    assert not (stuck & (beyond == 0) & moved).to_numpy().any()
    assert moved[stuck & (beyond > 0) & sure].stack().all()


def test_flags_up_to_a_day_never_depend_on_later_readings(settings):
    observed = network()
    detector = learning.learn(observed, learning_days(observed), settings)
    day = TEST_FROM + 100
    changed = observed.copy()
    rng = np.random.default_rng(5)
    changed.iloc[day + 1:] += rng.normal(0, 8, changed.iloc[day + 1:].shape)
    changed.iloc[day + 5: day + 30, 0] += 6.0
    before, after = verdicts.detect(observed, detector), verdicts.detect(changed, detector)
    for name in ("flag", "confidence", "repaired", "expected"):
        pd.testing.assert_frame_equal(before[name].iloc[: day + 1], after[name].iloc[: day + 1])
    assert not before["flag"].iloc[day + 1:].equals(after["flag"].iloc[day + 1:])


@pytest.mark.parametrize("next_day", [0.0, 10.0])  # a spike the next day returns from, or a shift's first day
def test_flags_up_to_a_day_never_depend_on_the_next_readings_after_a_fault(settings, next_day):
    observed = network()
    detector = learning.learn(observed, learning_days(observed), settings)
    spike = TEST_FROM + 60
    observed.iloc[[spike - 9, spike - 5, spike], 1] += 10.0
    observed.iloc[spike + 1: spike + 20, 1] += next_day
    observed.iloc[spike - 3: spike + 3, 3] = observed.iloc[spike - 4, 3]  # a stuck run at another station
    whole = verdicts.detect(observed, detector)
    assert whole["flag"].iloc[spike, 1] == "spike"
    for day in range(spike - 10, spike + 4):
        readings = observed.copy()
        readings.iloc[day + 1:] = np.nan
        cut = verdicts.detect(readings, detector)
        for name in ("flag", "confidence", "repaired"):
            pd.testing.assert_frame_equal(cut[name].iloc[: day + 1], whole[name].iloc[: day + 1])


@pytest.mark.parametrize("shape, lags", [("step", checks.STEP_LAGS), ("ramp", checks.RAMP_LAGS)])
def test_the_change_tests_on_a_day_take_its_innovations_as_known_that_day(shape, lags):
    rng = np.random.default_rng(3)
    days = pd.date_range("2021-01-01", periods=120, freq="D")
    departure = pd.DataFrame(rng.normal(0, 1, (120, 2)), index=days, columns=["a", "b"])
    departure.iloc[[40, 70], 0] += 9.0  # spikes the next day returns from
    departure.iloc[60:, 0] += np.linspace(0, 6, 60)  # and a drift under them
    flag = pd.DataFrame("none", index=days, columns=departure.columns)
    flag.iloc[[40, 70], 0] = "spike"
    flag.iloc[50:53, 1] = "stuck"
    codes = flag.replace({kind.value: code for kind, code in CODE.items()}).astype(np.int8)
    persistence = pd.Series(0.4, index=departure.columns)

    def evidence(upto: int) -> np.ndarray:
        known = departure.iloc[: upto + 1]
        innovation = checks.departure_innovation(known, persistence, pd.Series(1.0, index=known.columns))
        explained = checks.explained_readings(codes.iloc[: upto + 1], known)
        summed, latest = checks.explained_innovations(innovation, known, explained)
        return checks.change_evidence(summed, persistence, lags, shape, latest=latest)[0].to_numpy()

    whole = evidence(len(days) - 1)
    assert checks.explained_readings(codes, departure).iloc[[40, 70], 0].tolist() == [2, 2]
    for day in range(35, 80):
        np.testing.assert_allclose(evidence(day)[-1], whole[day], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [3, 1])  # blocks in parallel, or one after the other
@pytest.mark.parametrize("verdict_block", [verdicts.VERDICT_BLOCK, 2])  # the change tests on threads; the whole verdict
def test_the_verdict_does_not_depend_on_threads_or_station_blocks(settings, monkeypatch, verdict_block, threads):
    observed = network(n_stations=7, seed=2)
    observed.iloc[TEST_FROM + 40:TEST_FROM + 90, 3] += np.linspace(0, 5, 50)
    observed.iloc[TEST_FROM + 100:TEST_FROM + 110, 5] = 12.3
    reference = verdict(observed, settings)
    monkeypatch.setattr(checks, "STATION_BLOCK", 2)
    monkeypatch.setattr(verdicts, "VERDICT_BLOCK", verdict_block)
    monkeypatch.setattr(qc_neighbours, "EXPECTED_BLOCK", 3)  # the expected values in blocks too
    monkeypatch.setattr(learning, "EXPECTED_BLOCK", 3)  # and the persistences
    detector = learning.learn(observed, learning_days(observed), settings, runtime.Threads(threads))
    assert detector == reference[0]
    blocked = verdicts.detect(observed, detector, runtime.Threads(threads))
    assert set(blocked["flag"].stack()) >= {"drift", "stuck"}
    for name, table in reference[1].items():
        pd.testing.assert_frame_equal(blocked[name], table)


@pytest.mark.parametrize("by_position", [False, True])
def test_above_the_all_pairs_size_each_station_is_compared_with_its_candidates_and_chooses_the_same(
        monkeypatch, by_position):
    """A network too large to compare every pair compares each station with its nearest stations where their
    positions are known (the quality control's neighbours), else with the stations its anomalies resemble most
    (a sketch; the forecast's neighbours always), block by block (blocks of stations near each other where
    positions are known); on a simulated network it chooses exactly the neighbours, and the same lines, that
    comparing every pair does."""
    import data_creation
    from station_forecast.params import load_params

    params = load_params()
    # Positions are a sound first cut where weather varies with distance across the network: a region five times
    # the default's, as a national network is. (In the default 300 km square every station's weather is nearly
    # the same, and at 600 stations 96 % chose the same lists, the others as well correlated to 0.005.)
    sim = {**params["simulation"], "n_stations": 120, "n_years": 3, "seed": 5,
           **({"region_km": 1500.0} if by_position else {})}
    simulation = data_creation.simulate(sim, 0, params["anomalies"])
    observed = pd.DataFrame(simulation.observed.T, index=pd.DatetimeIndex(simulation.dates),
                            columns=[f"S{i:03d}" for i in range(120)])
    anomaly = observed - climatology.climatology_at(climatology.fit_climatology(observed), observed.index,
                                                    observed.columns)
    positions = data_creation.station_list(simulation.climates)[["latitude", "longitude"]].to_numpy() \
        if by_position else None

    def choose() -> tuple[dict, dict]:
        return qc_neighbours.learn_neighbours(anomaly, 5, 0.7, positions), qc_neighbours.forecast_neighbours(
            anomaly, 8, 0.3, positions=positions)

    every_pair = choose()
    monkeypatch.setattr(qc_neighbours, "ALL_PAIRS_STATIONS", 0)
    monkeypatch.setattr(qc_neighbours, "CANDIDATES", 16)
    monkeypatch.setattr(qc_neighbours, "CANDIDATES_PER_NEIGHBOUR", 8)  # 40 and 64 of the 119 others
    monkeypatch.setattr(qc_neighbours, "PAIR_BLOCK", 32)
    if by_position:  # the candidates are each station's 40 nearest by great-circle distance
        index = qc_neighbours.pair_statistics(anomaly.to_numpy(), wanted=5, positions=positions)[0]
        lat, lon = np.radians(positions[:, 0]), np.radians(positions[:, 1])
        haversine = np.sin((lat[:, None] - lat) / 2) ** 2 \
            + np.cos(lat[:, None]) * np.cos(lat) * np.sin((lon[:, None] - lon) / 2) ** 2
        nearest = np.argsort(haversine, axis=1, kind="stable")[:, 1:41]
        assert all(set(index[i]) == set(nearest[i]) for i in range(120))
    learned, forecast = choose()
    assert forecast == every_pair[1]
    for station, found in learned.items():
        expected = every_pair[0][station]["buddies"]
        assert [b["station"] for b in found["buddies"]] == [b["station"] for b in expected]
        for key in ("correlation", "slope", "intercept"):
            assert [b[key] for b in found["buddies"]] == pytest.approx([b[key] for b in expected], abs=2e-4)
    assert sum(len(found["buddies"]) for found in learned.values()) > 300  # most stations have their 5


def test_without_positions_the_stations_compared_together_are_those_that_share_weather():
    """Where no station list places the stations, the blocks compared at a time follow the leading patterns
    of the network's weather, which on a network wider than its weather systems put near each other the
    stations near each other on the map: a block's candidates then overlap (at 10,000 simulated stations x 10
    years, 2,907 stations' worth of pairs a block instead of 5,505), and the order is the same every run."""
    import data_creation

    params = load_params()
    sim = {**params["simulation"], "n_stations": 120, "n_years": 3, "seed": 5, "region_km": 1500.0}
    simulation = data_creation.simulate(sim, 0, params["anomalies"])
    observed = pd.DataFrame(simulation.observed.T, index=pd.DatetimeIndex(simulation.dates))
    anomaly = observed - climatology.climatology_at(climatology.fit_climatology(observed), observed.index,
                                                    observed.columns)
    sketch = qc_neighbours._standardised(anomaly.to_numpy())
    order = qc_neighbours._weather_order(sketch)
    assert sorted(order) == list(range(120)) and np.array_equal(order, qc_neighbours._weather_order(sketch))
    places = data_creation.station_list(simulation.climates)[["latitude", "longitude"]].to_numpy()

    def apart(ordered: np.ndarray) -> float:  # mean distance in degrees from one station to the next
        return float(np.hypot(*np.diff(places[ordered], axis=0).T).mean())

    assert apart(order) < 0.5 * apart(np.arange(120))

    def pairs_compared(ordered: np.ndarray) -> int:  # the stations' worth of pairs blocks of 16 compare, in all
        similar = sketch.T @ sketch
        np.fill_diagonal(similar, -np.inf)
        chosen = np.argpartition(-similar, 15, axis=1)[:, :16]
        return sum(len(np.unique(chosen[ordered[begin:begin + 16]])) for begin in range(0, 120, 16))

    assert pairs_compared(order) < 0.8 * pairs_compared(np.arange(120))
    blank = anomaly.to_numpy().copy()
    blank[:, 0] = np.nan  # a station with no reading on the days compared: no warning, nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not qc_neighbours._standardised(blank)[:, 0].any()


@pytest.mark.parametrize("threads, block", [(1, qc_neighbours.EXPECTED_BLOCK), (3, 2)])
def test_the_expected_anomaly_is_the_joint_line_where_all_neighbours_report_else_their_lines_median(
        monkeypatch, threads, block):
    rng = np.random.default_rng(3)
    anomaly = pd.DataFrame(rng.normal(size=(40, 5)), columns=[f"S{i}" for i in range(5)])
    anomaly[anomaly > 1.2] = np.nan
    anomaly.loc[5, ["S0", "S3", "S4"]] = np.nan  # none of S1's neighbours reports
    line = {"slope": 0.9, "intercept": 0.1}
    neighbours = {
        "S0": {"constant": 0.5, "buddies": [{"station": "S1", "weight": 0.6, **line},
                                            {"station": "S2", "weight": 0.3, **line}]},
        "S1": {"constant": None, "buddies": [{"station": "S0", "weight": None, **line},
                                             {"station": "S3", "weight": None, "slope": 2.0, "intercept": 0.0},
                                             {"station": "S4", "weight": None, "slope": -1.0, "intercept": 1.0}]},
        "S2": {"constant": 0.0, "buddies": [{"station": "gone", "weight": 1.0, **line}]},  # not in the table
        "S3": {"constant": None, "buddies": []},
    }
    monkeypatch.setattr(qc_neighbours, "EXPECTED_BLOCK", block)
    expected = qc_neighbours.expected_anomaly(anomaly, neighbours, threads)

    a = anomaly.to_numpy()
    with warnings.catch_warnings():  # days when no neighbour reports: NaN, as expected
        warnings.simplefilter("ignore", RuntimeWarning)
        s0_lines = np.nanmedian(np.column_stack([0.1 + 0.9 * a[:, 1], 0.1 + 0.9 * a[:, 2]]), axis=1)
        s1 = np.nanmedian(np.column_stack([0.1 + 0.9 * a[:, 0], 2.0 * a[:, 3], 1.0 - a[:, 4]]), axis=1)
    both = ~np.isnan(a[:, 1]) & ~np.isnan(a[:, 2])
    s0 = np.where(both, 0.5 + 0.6 * a[:, 1] + 0.3 * a[:, 2], s0_lines)
    assert both.any() and not both.all() and np.isnan(s1).any()  # each path is taken
    np.testing.assert_allclose(expected["S0"], s0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected["S1"], s1, rtol=0, atol=1e-12)
    assert expected[["S2", "S3", "S4"]].isna().all().all()  # a neighbour not in the table, none, unknown
    pd.testing.assert_frame_equal(expected, qc_neighbours.expected_anomaly(anomaly, neighbours))  # the same bytes


def test_the_neighbours_work_done_in_blocks_of_stations_on_threads_is_the_same_bytes_as_in_one_piece(monkeypatch):
    rng = np.random.default_rng(4)
    anomaly = pd.DataFrame(rng.normal(size=(120, 7)), columns=[f"S{i}" for i in range(7)])
    anomaly = anomaly.add(rng.normal(size=(120, 1)), axis=0)  # weather the stations share: neighbours to find
    anomaly[anomaly > 1.8] = np.nan
    neighbours = qc_neighbours.learn_neighbours(anomaly, 3, 0.3)

    def everything(threads: int) -> tuple:
        return (qc_neighbours.learn_neighbours(anomaly, 3, 0.3, threads=threads),
                qc_neighbours.outside_the_lines(anomaly, neighbours, threads),
                qc_neighbours.nearest_line_distance(anomaly, neighbours, threads),
                checks.trailing_median(anomaly, 15, threads))

    whole = everything(1)
    monkeypatch.setattr(qc_neighbours, "EXPECTED_BLOCK", 2)
    monkeypatch.setattr(checks, "MEDIAN_BLOCK", 3)
    blocked = everything(3)
    assert sum(len(found["buddies"]) for found in whole[0].values()) >= 14  # most stations have neighbours
    assert blocked[0] == whole[0]
    for made, expected in zip(blocked[1:], whole[1:], strict=True):
        assert made.notna().any().all()
        pd.testing.assert_frame_equal(made, expected, check_exact=True)


def test_the_nearest_line_distance_is_to_the_closest_neighbour_line_that_day():
    anomaly = pd.DataFrame({"S0": [1.0, 2.0, 3.0, np.nan], "S1": [1.0, np.nan, 9.0, 0.0],
                            "S2": [4.0, 2.5, np.nan, np.nan]})
    line = {"weight": None, "slope": 1.0, "intercept": 0.0}
    neighbours = {"S0": {"constant": None, "buddies": [{"station": "S1", **line}, {"station": "S2", **line}]},
                  "S1": {"constant": None, "buddies": [{"station": "S0", **line, "slope": 2.0}]},
                  "S2": {"constant": None, "buddies": []}}
    distance = qc_neighbours.nearest_line_distance(anomaly, neighbours)
    np.testing.assert_allclose(distance["S0"], [0.0, 0.5, 6.0, np.nan])  # |S0 - S1|, |S0 - S2|: the smaller
    np.testing.assert_allclose(distance["S1"], [1.0, np.nan, 3.0, np.nan])  # |S1 - 2 S0|
    assert distance["S2"].isna().all()  # no neighbours


class BlockedPool(runtime.Threads):
    """Runs here, but takes a cluster's path: the verdict in blocks of stations."""

    cluster = True


def test_the_verdict_in_blocks_of_stations_is_the_verdict_in_one_piece(settings, monkeypatch):
    observed = network(n_stations=7, seed=2)
    observed.iloc[TEST_FROM + 40:TEST_FROM + 90, 3] += np.linspace(0, 5, 50)
    observed.iloc[TEST_FROM + 100:TEST_FROM + 110, 5] = 12.3
    reference = verdict(observed, settings)
    monkeypatch.setattr(verdicts, "VERDICT_BLOCK", 2)
    detector = learning.learn(observed, learning_days(observed), settings, BlockedPool(2))
    assert detector == reference[0]
    blocked = verdicts.detect(observed, detector, BlockedPool(2))
    assert set(blocked["flag"].stack()) >= {"drift", "stuck"}  # the blocks really had faults to find
    for name, table in reference[1].items():
        pd.testing.assert_frame_equal(blocked[name], table)


def test_a_single_station_gets_only_gross_checks(settings):
    observed = network(n_stations=1)
    july = observed.index[TEST_FROM + 190]
    observed.loc[july, "S0"] = -57.8
    cold_front = observed.index[TEST_FROM + 40: TEST_FROM + 42]
    observed.loc[cold_front, "S0"] -= 10.0
    detector, result = verdict(observed, settings)
    assert detector["stations"]["S0"]["neighbours"]["buddies"] == []
    flagged = faults(result)["S0"]
    assert result["flag"].loc[july, "S0"] == "gross" and result["repaired"].loc[july, "S0"] > 0
    assert not flagged.loc[cold_front].any()
    assert set(result["flag"]["S0"][flagged]) <= {"gross", "stuck"}
    assert flagged.drop(july).mean() < 0.001


def test_whole_degree_fahrenheit_repeats_are_not_taken_for_a_stuck_sensor(settings):
    celsius = network(resolution=0.1)
    fahrenheit = network(resolution=1.0 * 5 / 9)  # whole °F steps, in °C
    runs = {}
    for name, observed in (("C", celsius), ("F", fahrenheit)):
        detector, result = verdict(observed, settings)
        runs[name] = detector["stations"]["S0"]["repeat_share"]
        assert (result["flag"] == "stuck").to_numpy().mean() < 0.002, name
    assert runs["F"] > runs["C"]


def test_without_detection_only_missing_days_are_filled():
    observed = network(n_stations=2)
    observed.iloc[100:103, 0] = np.nan
    result = verdicts.no_detection(observed, 5)
    assert set(result["flag"].stack()) == {"none", "missing"}
    assert result["repaired"].iloc[100:103, 0].notna().all()
    pd.testing.assert_frame_equal(result["repaired"].drop(index=observed.index[100:103]),
                                  observed.drop(index=observed.index[100:103]))


def local_weather(n_stations: int, seed: int, persistence: float = 0.6, sd: float = 0.8) -> np.ndarray:
    """Weather of each station's own (AR(1)), which its neighbours do not share: persistent departures."""
    rng = np.random.default_rng(100 + seed)
    kicks = rng.normal(0, sd * np.sqrt(1 - persistence**2), (DAYS, n_stations))
    weather = np.zeros_like(kicks)
    for t in range(1, DAYS):  # a few hundred steps; fine for a fixture
        weather[t] = persistence * weather[t - 1] + kicks[t]
    return weather


@pytest.mark.parametrize("size, length", [(4.0, 40), (-5.0, 30)])
def test_a_shift_that_ended_is_not_flagged_in_the_weeks_after(settings, size, length):
    start, after = TEST_FROM + 40, []
    for seed in range(6):
        observed = network(seed=seed) + local_weather(5, seed)
        observed.iloc[start: start + length, 2] += size
        _, result = verdict(observed, settings)
        flagged = faults(result)["S2"]
        assert flagged.iloc[start + 10: start + length].mean() > 0.6
        later = flagged.iloc[start + length + 3: start + length + 40]
        after += list(later[later].index)
    assert not after


def test_a_shift_in_the_learning_years_is_left_out_from_the_day_it_began():
    onset = pd.DataFrame({"a": [-1, -1, -1, -1, 1, 1, -1, -1], "b": [-1] * 7 + [7]})
    assert learning.since_onset(onset)["a"].tolist() == [False, True, True, True, True, True, False, False]
    assert learning.since_onset(onset)["b"].tolist() == [False] * 7 + [True]


@pytest.mark.parametrize("axis", [0, 1])
def test_medians_leave_missing_values_out_as_numpy_does(axis):
    rng = np.random.default_rng(4)
    values = rng.normal(size=(40, 7)).round(1)  # ties, odd and even counts
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, 2] = np.nan
    values[5, :] = np.nan
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # numpy warns about the all-NaN rows
        expected = np.nanmedian(values, axis=axis)
    assert np.array_equal(robust.nanmedian(values, axis=axis), expected, equal_nan=True)


@pytest.mark.parametrize("solvable", [True, False])
def test_the_climatology_is_each_station_s_own_least_squares_fit(monkeypatch, solvable):
    if not solvable:  # the stations fitted together would need a singular system solved
        def singular(*args):
            raise np.linalg.LinAlgError("singular matrix")
        monkeypatch.setattr(np.linalg, "solve", singular)
    dates = pd.date_range("2020-01-01", periods=800, freq="D")
    rng = np.random.default_rng(6)
    season = 8.0 * np.cos(2 * np.pi * (dates.day_of_year.to_numpy() - 200) / 365.25)
    values = pd.DataFrame({f"S{i}": 5.0 + i + season + rng.normal(0, 2, len(dates)) for i in range(5)}, index=dates)
    values.iloc[rng.random(values.shape) < 0.2] = np.nan  # gaps differ from station to station
    values["S1"] = (5.0 + season + rng.normal(0, 2, len(dates))).round(1)
    values.loc[dates[80:], "S1"] = np.nan  # seen in January to March of one year only
    values.loc[dates[40:], "S2"] = np.nan  # too few readings: left out
    coefs = climatology.fit_climatology(values)
    assert list(coefs.columns) == ["S0", "S1", "S3", "S4"]
    design = climatology.harmonic_design(dates)
    for station in coefs.columns:
        seen = values[station].notna().to_numpy()
        alone = np.linalg.lstsq(design[seen], values[station].to_numpy()[seen], rcond=None)[0]
        assert np.allclose(coefs[station], alone, rtol=0, atol=1e-9), station


def test_the_seasonal_fit_is_not_moved_by_a_few_weeks_of_fault():
    dates = pd.date_range("2020-01-01", periods=DAYS, freq="D")
    rng = np.random.default_rng(3)
    departure = pd.DataFrame({"S0": rng.normal(0, 0.7, DAYS)}, index=dates)
    departure.iloc[290:340, 0] += 4.0  # one autumn of three
    robust = climatology.harmonic_design(dates) @ climatology.robust_seasonal_fit(departure)["S0"].to_numpy()
    plain = climatology.harmonic_design(dates) @ climatology.fit_climatology(departure)["S0"].to_numpy()
    autumn = slice(290, 340)
    assert np.abs(plain[autumn]).max() > 1.0  # least squares takes a third of the fault for the season
    assert np.abs(robust[autumn]).max() < 0.3


def test_a_drift_in_the_learning_years_does_not_bend_the_climatology(settings):
    for seed in (4, 5):
        observed = network(seed=seed)
        clean_detector = learning.learn(observed, learning_days(observed), settings)
        # An autumn drift at S1 before the test year: its first weeks are too small to be flagged.
        observed.iloc[280:340, 1] += np.linspace(0, 5, 60)
        detector = learning.learn(observed, learning_days(observed), settings)
        moved = np.subtract(detector["stations"]["S1"]["climatology"], clean_detector["stations"]["S1"]["climatology"])
        bent = climatology.harmonic_design(observed.index[280:340]) @ moved
        assert np.abs(bent).max() < 0.4


def test_a_station_that_started_months_ago_borrows_its_seasons_from_its_neighbours(settings):
    for first in (500, 600):  # 230 and 130 learning days, from late spring or summer on
        observed = network(seed=1)
        observed.iloc[:first, 3] = np.nan
        detector, result = verdict(observed, settings)
        # Its readings are all clean: no shift, drift or spike, and at most a natural repeat or two taken for
        # a stuck sensor (its repeat share and scales come from a few months).
        test_year = result["flag"]["S3"].iloc[TEST_FROM:]
        assert not test_year.isin(["gross", "spike", "level_shift", "drift"]).any()
        assert (test_year == "stuck").mean() < 0.01
        design = climatology.harmonic_design(observed.index[TEST_FROM:])
        learned = design @ np.array(detector["stations"]["S3"]["climatology"])
        truth = design @ np.array(detector["stations"]["S2"]["climatology"])
        offset = np.median(observed["S3"].iloc[first:TEST_FROM] - observed["S2"].iloc[first:TEST_FROM])
        assert np.abs(learned - truth - offset).max() < 2.0  # the same seasons as a neighbour's, at its level


def test_a_station_covers_the_year_only_with_readings_in_every_month():
    dates = pd.date_range("2020-01-01", periods=3 * 365, freq="D")
    values = pd.DataFrame({"full": 1.0, "late": 1.0, "gappy": 1.0}, index=dates)
    values.iloc[: 2 * 365 + 200, 1] = np.nan  # only its last 165 days: summer to December
    values.loc[values.index.month == 3, "gappy"] = np.nan
    values.loc[(values.index.month == 4) & (values.index.year == 2021), "gappy"] = np.nan  # April seen twice
    assert climatology.covers_the_year(values).to_dict() == {"full": True, "late": False, "gappy": False}
    monthly = pd.DataFrame({"m": 1.0}, index=pd.date_range("2015-01-01", periods=120, freq="MS"))
    assert climatology.covers_the_year(monthly)["m"]


def test_a_station_with_few_days_takes_the_network_s_repeat_share():
    dates = pd.date_range("2020-01-01", periods=1000, freq="D")
    steps = np.random.default_rng(0).integers(-20, 21, size=(1000, 3)).cumsum(axis=0) / 10
    values = pd.DataFrame(steps, index=dates, columns=["a", "b", "new"])
    values.iloc[:870, 2] = np.nan  # 130 days, by chance without a repeat
    values.iloc[870:, 2] = np.arange(130) / 10
    share = checks.repeat_share(values)
    assert 0.01 < share["new"] < 0.03  # the network repeats about 1 day in 41; 0 alone would make any repeat stuck
    assert share["a"] == pytest.approx((values["a"].diff() == 0).sum() / 999, rel=0.2)


def test_a_slow_departure_in_a_month_a_station_never_saw_is_not_taken_for_a_shift(settings):
    """Its climatology there is borrowed and may be off for weeks; in the months it saw, shifts are found."""
    observed = network(seed=1)
    observed.iloc[:600, 3] = np.nan  # learning days from late August to December only
    march, october = slice(TEST_FROM + 60, TEST_FROM + 90), slice(TEST_FROM + 275, TEST_FROM + 305)
    observed.iloc[march, 3] += 3.0
    observed.iloc[october, 3] += 3.0
    detector, result = verdict(observed, settings)
    assert detector["stations"]["S3"]["seen_months"] == 0b111110000000  # August (its last 9 days) to December
    kinds = result["flag"]["S3"]
    assert not kinds.iloc[march].isin(["level_shift", "drift"]).any()
    assert kinds.iloc[october].iloc[10:].isin(["level_shift", "drift"]).mean() > 0.8


def test_a_network_that_has_not_seen_a_whole_year_keeps_its_clean_readings(settings):
    """No station's own harmonics can be trusted beyond the six months it saw; a level each, with the
    neighbours' regression carrying the shared seasons, leaves the clean test year almost unflagged."""
    observed = network(seed=1)
    observed.iloc[:550, :] = np.nan  # every station: 180 learning days, July to December
    _, result = verdict(observed, settings)
    assert (faults(result).iloc[TEST_FROM:].mean() < 0.01).all()


def test_a_missing_value_code_that_every_station_writes_on_the_same_days_is_gross_not_weather(settings):
    """-99 °F (-72.8 °C) written by all six stations on some days and by one on others: the neighbours agree
    and the day looks stormy, but no climate reaches it; every code is flagged gross and reported as shared,
    the days after a code are judged from the weather before it, and the gross check learned from training
    years full of codes still catches a 25 °C jump."""
    observed = network(n_stations=6, seed=4)
    code = (-99 - 32) * 5 / 9
    shared_days = observed.index[[100, 101, 102, 400, 650, TEST_FROM + 30, TEST_FROM + 31]]
    observed.loc[shared_days] = code
    lone = observed.index[[200, TEST_FROM + 90]]
    observed.loc[lone, "S2"] = code
    jump = observed.index[TEST_FROM + 200]
    observed.loc[jump, "S4"] += 25.0
    clean = network(n_stations=6, seed=4)
    detector, result = verdict(observed, settings)
    written = np.isclose(observed, code)
    assert (result["flag"].to_numpy()[written] == "gross").all()
    after = observed.index[[103, TEST_FROM + 32]]
    assert not faults(result).loc[after].any().any()
    assert result["flag"].loc[jump, "S4"] == "gross"
    assert (np.abs(result["repaired"].to_numpy()[written] - clean.to_numpy()[written]) < 8).all()
    thresholds = {s: e["gross_threshold"] * e["jump_scale"] for s, e in detector["stations"].items()}
    clean_detector = learning.learn(clean, learning_days(clean), settings)
    for station, entry in clean_detector["stations"].items():
        assert thresholds[station] == pytest.approx(entry["gross_threshold"] * entry["jump_scale"], rel=0.1)
    shared = verdicts.shared_values(observed, result["flag"])
    assert list(shared.index) == [round(code, 2)]
    flagged = [6 * len(shared_days) + len(lone), len(shared_days) + len(lone)]
    assert shared.iloc[0].tolist() == [6, *flagged, *flagged]


def test_a_shared_code_is_told_apart_from_the_same_value_read_as_weather_on_other_days():
    """0 °F written for a missing July day at two stations is a code; 0 °F on a January day is weather. Both are
    counted, apart: declaring the value missing would lose the January reading."""
    from station_forecast.flags import Flag

    code = round((0 - 32) * 5 / 9, 2)
    observed = pd.DataFrame({"A": [20.0, code, 21.0, code], "B": [19.0, code, 22.0, 3.0],
                             "C": [18.0, 17.0, 20.0, 4.0]}, index=pd.date_range("2020-07-01", periods=4))
    flag = pd.DataFrame(Flag.NONE.value, index=observed.index, columns=observed.columns)
    flag.iloc[1, :2] = Flag.GROSS.value
    shared = verdicts.shared_values(observed, flag)
    assert list(shared.index) == [code]
    assert shared.loc[code].tolist() == [2, 2, 1, 3, 2]  # most stations a day; flagged, their days; all, days


@pytest.mark.parametrize(("stations", "resolution", "coded"), [(2, 0.1, False), (3, 0.1, True), (4, 1.0, False),
                                                                 (5, 1.0, True)])
def test_a_code_some_stations_share_within_the_climate_is_gross_not_a_front(settings, stations, resolution, coded):
    """0 °C written for missing July days at some stations of a network: within any station's climate, and each
    coded station's neighbours reading it too drew lines it lay between, as a front's split does; of six Ohio
    stations sharing it, five passed as weather. Three stations that far from their neighbours do not read the
    same value by chance (two nearby ones on the same side of a front may; at whole degrees, four), so it is a
    code; the stations that read their weather are left alone."""
    observed = network(n_stations=8 if resolution < 1 else 16, resolution=resolution)
    days = [TEST_FROM + 30, TEST_FROM + 95, TEST_FROM + 160]
    # far below the day's weather, not beyond any climate
    code = ((observed.iloc[days].mean(axis=1) - 14.0) / resolution).round() * resolution
    for day, value in zip(days, code, strict=True):
        observed.iloc[day, :stations] = value
    _, result = verdict(observed, settings)
    assert (result["flag"].iloc[days, :stations] == "gross").all().all() == coded
    assert not coded or not faults(result).iloc[days, stations:].any().any()
    shared = verdicts.shared_values(observed, result["flag"])
    assert sorted(shared.index) == (sorted(code.round(2)) if coded else [])


def test_no_learned_jump_threshold_allows_a_jump_beyond_the_ceiling(settings):
    observed = network(n_stations=1)
    observed.iloc[::50, 0] += 60.0  # gross faults on 2 % of the days, too many for the 99.9th percentile
    lenient = dict(settings, climate_margin=100.0)
    detector = learning.learn(observed, learning_days(observed), lenient, jump_ceiling=50.0)
    entry = detector["stations"]["S0"]
    assert entry["gross_threshold"] * entry["jump_scale"] == pytest.approx(50.0, abs=1e-3)  # both rounded
    unbounded = learning.learn(observed, learning_days(observed), lenient)["stations"]["S0"]
    assert unbounded["gross_threshold"] * unbounded["jump_scale"] > 50.0


def test_a_single_repeat_at_whole_degrees_is_no_stuck_sensor_however_the_neighbours_moved():
    """At whole °F one day in ten repeats the day before: a two-day run is no evidence, a third day is (from
    that day on: the verdict on a day uses the days up to it)."""
    dates = pd.date_range("2021-01-01", periods=6, freq="D")
    run, start = checks.repeat_runs(pd.DataFrame({"A": [1.0, 2.0, 2.0, 3.0, 3.0, 3.0]}, index=dates))
    moved = pd.DataFrame({"A": [0.0, 0.0, 9.0, 0.0, 9.0, 9.0]}, index=dates)  # the neighbours moved far
    for share, expected in ((0.1, [False, False, False, False, False, True]),
                            (0.01, [False, False, True, False, True, True])):
        stuck, _ = checks.stuck_test(run, start, moved, pd.DataFrame({"A": share}, index=dates), least=1.0,
                                     hidden=pd.Series({"A": 0.0}))
        assert stuck["A"].tolist() == expected, share


def test_a_repeat_is_evidence_only_beyond_the_change_the_station_s_resolution_hides():
    """A reading written to whole degrees may have moved by up to a degree while it repeated: the neighbours'
    move counts only beyond that (``hidden``, in departure scales)."""
    dates = pd.date_range("2021-07-01", periods=5, freq="D")
    run, start = checks.repeat_runs(pd.DataFrame({"A": [1.0, 2.0, 2.0, 2.0, 5.0]}, index=dates))
    moved = pd.DataFrame({"A": [0.0, 0.0, 0.0, 4.0, 0.0]}, index=dates)  # z: the run's third day, 4 / sqrt(2) sds
    share = pd.DataFrame({"A": 0.1}, index=dates)  # a third day by chance: 1 %, so it needs 1.96 sds
    for hidden, expected in ((0.0, [False, False, False, True, False]), (1.0, [False, False, False, True, False]),
                             (2.0, [False, False, False, False, False])):
        stuck, _ = checks.stuck_test(run, start, moved, share, least=1.0, hidden=pd.Series({"A": hidden}))
        assert stuck["A"].tolist() == expected, hidden


def test_the_resolution_is_the_smallest_step_a_station_s_readings_change_by():
    dates = pd.date_range("2021-01-01", periods=400, freq="D")
    rng = np.random.default_rng(4)
    weather = np.cumsum(rng.normal(0, 2, len(dates))) / 3 + 10
    readings = pd.DataFrame({"C": weather.round(), "F": (((weather * 1.8 + 32).round() - 32) / 1.8).round(2),
                             "tenths": weather.round(1), "none": np.full(len(dates), 7.0)}, index=dates)
    found = checks.reading_resolution(readings)
    assert found["C"] == 1.0 and found["F"] == pytest.approx(5 / 9, abs=0.01)
    assert found["tenths"] == pytest.approx(0.1)
    assert np.isnan(found["none"])  # a station that never changes has no step to tell


def test_a_sensor_stuck_for_months_while_learning_does_not_teach_its_months_that_runs_are_natural(settings):
    """The learning rounds leave the faults they find out of the repeat shares, so a sensor stuck through July and
    August of a learning year leaves July's share near the year's, and a stuck run in a later July is found
    from its third day, as before."""
    observed = network(6, seed=3, resolution=5 / 9)  # whole °F
    july = observed.index.get_loc(pd.Timestamp("2020-07-01"))
    observed.iloc[july: july + 60, 2] = observed.iloc[july, 2]
    later = observed.index.get_loc(pd.Timestamp("2022-07-05"))
    observed.iloc[later: later + 10, 2] = observed.iloc[later, 2]
    detector, result = verdict(observed, settings)
    learned = detector["stations"]["S2"]
    assert learned["repeat_share_by_month"][6] < 1.5 * learned["repeat_share"]
    assert (result["flag"]["S2"].iloc[later + 2: later + 10] == "stuck").all()


def steady_summer_network(seed: int, n_stations: int = 6) -> pd.DataFrame:
    """Whole °C readings of a climate whose summer weather barely moves (a Gulf coast): in summer a day repeats
    the day before far more often than over the year."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2020-01-01", periods=DAYS, freq="D")
    phase = 2 * np.pi * (dates.day_of_year.to_numpy() - 20) / 365.25
    swing = 0.6 + 0.4 * np.cos(phase)  # winter's weather swings, summer's barely
    shared = np.zeros(DAYS)
    for t in range(1, DAYS):
        shared[t] = 0.7 * shared[t - 1] + rng.normal(0, 2.2)
    readings = {f"S{i}": 18 - 8 * np.cos(phase) + rng.uniform(-3, 3)
                + swing * (shared * rng.uniform(0.9, 1.1) + rng.normal(0, 0.6, DAYS)) for i in range(n_stations)}
    return pd.DataFrame(readings, index=dates).round()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summer_repeats_of_a_steady_whole_degree_climate_are_not_taken_for_a_stuck_sensor(settings, seed):
    """With the year's repeat share alone (and no allowance for the degree a repeat may hide), 0.6-0.9 % of these
    readings were flagged stuck, most in summer; as on the whole-degree copies of real networks."""
    detector, result = verdict(steady_summer_network(seed), settings)
    assert (result["flag"] == "stuck").to_numpy().mean() < 0.003
    by_month = detector["stations"]["S0"]["repeat_share_by_month"]
    assert by_month[6] > 1.5 * by_month[0]  # July's share against January's
    assert detector["stations"]["S0"]["resolution"] == 1.0


def test_a_departure_within_the_local_weather_s_wander_is_seldom_a_shift_but_one_beyond_it_is(settings,
                                                                                                 monkeypatch):
    """On real networks a station's departure from its neighbours wanders by a degree or two for weeks (snow
    cover, a lake breeze): an offset of 0.8 LEAST_SHIFT standard deviations of it is flagged on at most 60 %
    of the days it is without that floor; one of twice LEAST_SHIFT is flagged on most days."""
    start = TEST_FROM + 40

    def flagged_share(size_in_scales: float, floor: float) -> float:
        shares = []
        for seed in range(3):
            observed = network(seed=seed) + local_weather(5, seed)
            monkeypatch.setattr(verdicts, "LEAST_SHIFT", floor)
            detector, _ = verdict(observed, settings)
            shifted = observed.copy()
            shifted.iloc[start: start + 60, 2] += size_in_scales * detector["stations"]["S2"]["departure_scale"]
            shares.append(faults(verdicts.detect(shifted, detector))["S2"].iloc[start + 15: start + 60].mean())
        return float(np.mean(shares))

    floor = verdicts.LEAST_SHIFT
    assert floor > 0
    within, beyond = 0.8 * floor, 2.0 * floor
    assert flagged_share(within, floor) <= 0.6 * flagged_share(within, 0.0)
    assert flagged_share(beyond, floor) >= 0.8


def keyed_apart(observed: pd.DataFrame, station: str, rows: slice, days: int) -> pd.DataFrame:
    """``observed`` with the readings of ``station`` in ``rows`` taken from ``days`` later (a day early: 1)."""
    shifted = observed.copy()
    column = observed.columns.get_loc(station)
    shifted.iloc[rows, column] = observed.iloc[rows.start + days: rows.stop + days, column].to_numpy()
    return shifted


def test_a_station_keyed_a_day_early_for_weeks_is_a_date_offset_repaired_by_the_right_day_s_reading(settings):
    clean = network()
    start, length = TEST_FROM + 40, 40
    observed = keyed_apart(clean, "S2", slice(start, start + length), 1)
    _, result = verdict(observed, settings)
    flag = result["flag"]["S2"].to_numpy()
    found = flag[start: start + length] == "date_offset"
    first = int(np.argmax(found))
    assert found.any() and first <= 7, first
    # The calm days of the stretch too, not only the stormy ones, up to a natural repeat of the day before's
    # reading: at 0.1 °C that is what the end of an early stretch looks like, so the test starts afresh there.
    repeats = np.nonzero((observed["S2"].diff() == 0).to_numpy()[start + first: start + length])[0]
    until = first + (repeats[0] if len(repeats) else length - first)
    assert until - first >= 20 and found[first:until].mean() > 0.9
    # The day it ends reads the day before's temperature again: let go at once, not after days of weather.
    assert (flag[start + length:] != "date_offset").all()
    assert not faults(result).drop(columns="S2").iloc[start: start + length].to_numpy().any()
    # Yesterday's reading is today's temperature: the confident repairs are exactly the right readings.
    repaired, sure = result["repaired"]["S2"], result["confidence"]["S2"] >= settings["repair_confidence"]
    rows = np.arange(len(flag))
    inside = sure & (rows > start) & (rows < start + length) & (result["flag"]["S2"] == "date_offset")
    assert inside.sum() > length / 2
    np.testing.assert_array_equal(repaired[inside], clean["S2"][inside])


def test_the_repeat_that_ends_a_stretch_keyed_a_day_early_is_no_stuck_sensor(settings):
    """An early stretch ends with the right day's temperature read twice. On a day the weather moved a lot,
    a stuck sensor's repeat would stand out against the neighbours; this one is the right reading."""
    clean = network()
    change = clean.diff().abs().mean(axis=1).to_numpy()
    end = TEST_FROM + 60 + int(np.argmax(change[TEST_FROM + 60: DAYS - 5]))  # the stormiest day left
    observed = keyed_apart(clean, "S2", slice(end - 30, end), 1)
    assert observed["S2"].iloc[end] == observed["S2"].iloc[end - 1] and change[end] > 3.0
    _, result = verdict(observed, settings)
    flag = result["flag"]["S2"].to_numpy()
    assert (flag[end - 10: end] == "date_offset").all()
    assert flag[end] == "none" and result["repaired"]["S2"].iloc[end] == clean["S2"].iloc[end]


def test_at_whole_degrees_a_repeat_does_not_cut_a_stretch_keyed_a_day_early_short(settings):
    """At whole °F one reading in fourteen repeats the day before's, so a repeat says nothing of a stretch's
    end: the stretch stays flagged through them."""
    start, length = TEST_FROM + 40, 40
    observed = keyed_apart(network(resolution=5 / 9), "S2", slice(start, start + length), 1)
    detector, result = verdict(observed, settings)
    assert detector["stations"]["S2"]["repeat_share"] >= checks.OFFSET_ORDINARY_REPEAT
    found = result["flag"]["S2"].to_numpy()[start: start + length] == "date_offset"
    first = int(np.argmax(found))
    assert (observed["S2"].diff() == 0).to_numpy()[start + first: start + length].sum() >= 2
    assert found.any() and first <= 10 and found[first:].mean() > 0.9


def test_a_station_keyed_a_day_late_is_a_date_offset_left_as_read(settings):
    clean = network()
    start, length = TEST_FROM + 40, 40
    observed = keyed_apart(clean, "S1", slice(start, start + length), -1)
    _, result = verdict(observed, settings)
    keyed = result["flag"]["S1"] == "date_offset"
    assert keyed.iloc[start: start + length].mean() > 0.7
    # Tomorrow's reading, which holds today's temperature, is not known on the day: nothing to repair with.
    np.testing.assert_array_equal(result["repaired"]["S1"][keyed], observed["S1"][keyed])


def test_a_station_keyed_a_day_apart_in_every_learning_year_is_not_tested_for_it(settings):
    # Observation hours that differ from the neighbours' (a morning reading's maximum is yesterday's) are
    # that station's normal, not a fault that began: the test would flag most of its days.
    clean = network()
    observed = keyed_apart(clean, "S3", slice(1, DAYS - 1), -1)
    # This network's weather carries over to the next day at 0.7: a day apart, S3 correlates with its
    # neighbours at about that, and stays their neighbour only below it.
    detector, result = verdict(observed, dict(settings, min_correlation=0.5))
    assert detector["stations"]["S3"]["neighbours"]["buddies"]
    assert detector["stations"]["S3"]["offset_alignment"] < 0 < checks.OFFSET_LEAST_ALIGNMENT
    assert detector["stations"]["S0"]["offset_alignment"] > checks.OFFSET_LEAST_ALIGNMENT
    keyed = result["flag"].eq("date_offset")
    assert not keyed["S3"].any()
    assert keyed.mean().max() < 0.01  # its readings, still a neighbour's, may mislead the others on a few days


def test_the_date_offset_test_keeps_little_evidence_beyond_its_threshold_and_knows_where_a_stretch_began():
    evidence = np.array([[-1.0], [2.0], [3.0], [3.0], [3.0], [-2.0], [0.5], [-3.0], [-3.0]])
    bounded, summed, onset = checks.offset_evidence(evidence, threshold=6.0)
    ceiling = 6.0 + checks.OFFSET_MEMORY
    np.testing.assert_allclose(bounded[:, 0], [0, 2, 5, 7, 7, 5, 5.5, 2.5, 0])
    assert bounded.max() == ceiling
    np.testing.assert_allclose(summed[:, 0], [0, 2, 5, 8, 11, 9, 9.5, 6.5, 3.5])
    np.testing.assert_array_equal(onset[:, 0], [1, 1, 1, 1, 1, 1, 1, 1, 9])


def test_the_date_offset_test_leaves_alone_the_months_a_station_s_changes_are_its_own(settings):
    """In summer a coastal station's day-to-day changes are its showers and sea breezes more than the weather
    it shares: which day they follow cannot be told, so those months are not tested; a stretch keyed a day
    early in winter still is."""
    clean = network()
    summer = clean.index.month.isin([5, 6, 7, 8, 9])
    clean.loc[summer, "S3"] += np.random.default_rng(3).normal(0, 4.0, summer.sum())
    winter, july = TEST_FROM + 10, int(np.argmax(clean.index >= "2022-07-01"))
    observed = keyed_apart(keyed_apart(clean, "S3", slice(winter, winter + 30), 1), "S3", slice(july, july + 30), 1)
    detector, result = verdict(observed, settings)
    by_month = detector["stations"]["S3"]["offset_alignment_by_month"]
    assert max(by_month[5:8]) < checks.OFFSET_LEAST_ALIGNMENT < min(by_month[:3] + by_month[11:])
    assert min(detector["stations"]["S0"]["offset_alignment_by_month"]) > checks.OFFSET_LEAST_ALIGNMENT
    keyed = result["flag"]["S3"].eq("date_offset").to_numpy()
    assert keyed[winter: winter + 30].mean() > 0.6
    # Tested all year, its summer showers made 16 false flags in June to August (and missed July's stretch).
    assert not keyed[clean.index.month.isin([6, 7, 8]) & (np.arange(DAYS) >= TEST_FROM)].any()


def test_a_departure_that_wanders_more_in_summer_is_judged_by_its_summer_wander(settings):
    """A sea breeze or a town's summer heat makes a station's departure from its neighbours wander more in
    summer: a week's mean departure is measured against that season's spread (never less than the year's),
    which about halves the summer's shift and drift flags and leaves a winter shift found as before."""
    flags, found = {"season": 0, "year": 0}, {"season": [], "year": []}
    for seed in range(2):
        observed = network(seed=seed)
        summer = observed.index.month.isin([5, 6, 7, 8, 9])
        observed.loc[summer, "S2"] += local_weather(1, seed, persistence=0.9, sd=1.5)[summer, 0]
        start = TEST_FROM + 20  # January of the test year
        observed.iloc[start: start + 40, 2] += 2.0
        detector = learning.learn(observed, learning_days(observed), settings)
        by_month = detector["stations"]["S2"]["departure_scale_by_month"]
        assert min(by_month[5:8]) > detector["stations"]["S2"]["departure_scale"] > max(by_month[:2])
        year_only = {**detector, "stations": {station: {key: value for key, value in entry.items()
                                                        if key != "departure_scale_by_month"}
                                              for station, entry in detector["stations"].items()}}
        for name, learned in (("season", detector), ("year", year_only)):
            shifted = verdicts.detect(observed, learned)["flag"]["S2"].isin(["level_shift", "drift"]).to_numpy()
            flags[name] += int(shifted[summer & (np.arange(DAYS) >= TEST_FROM)].sum())
            found[name].append(shifted[start + 7: start + 40].mean())
    assert flags["year"] >= 30 and flags["season"] <= 0.55 * flags["year"]  # about halved
    assert found["season"] == found["year"] and max(found["season"]) > 0.5


def test_a_code_written_on_most_of_a_station_s_days_is_left_out_of_learning_and_flagged_gross(settings):
    """An archive that writes -72.8 (-99 °F) on the days of a years-long outage: at 60 % of a station's
    learning days its climatology, learned from them, would sit near the code, its real readings would look
    out of its climate and the code like weather. The code is found (the commonest value, far outside the
    station's other readings), nothing is learned from it, and every such reading is flagged gross."""
    clean = network()
    observed = clean.copy()
    outage = np.random.default_rng(5).random(DAYS) < 0.6
    observed.loc[outage, "S1"] = -72.8
    observed.loc[outage[:DAYS] & (np.arange(DAYS) % 7 == 0), "S3"] = -72.8  # a neighbour writes it some days
    detector, result = verdict(observed, settings)
    assert detector["stations"]["S1"]["codes"] == [-72.8]
    assert (result["flag"].to_numpy()[(observed == -72.8).to_numpy()] == "gross").all()
    reference, _ = verdict(clean, settings)
    assert abs(detector["stations"]["S1"]["climatology"][0] - reference["stations"]["S1"]["climatology"][0]) < 0.5
    assert faults(result)["S1"][~outage].mean() < 0.01  # its real readings are weather, as before
    assert checks.written_codes(clean) == {}
    assert checks.written_codes(network(resolution=5 / 9)) == {}  # whole °F: common repeats, none outside


def test_a_station_written_in_another_unit_than_its_neighbours_is_named(settings):
    """One station's file in °C among °F files, all read as °F: its mean lies some 20 °C below its neighbours'
    and its weather swings 5/9 of theirs. It is named; stations of one unit never are."""
    clean = network(6, seed=2) + 10.0
    observed = clean.copy()
    observed["S4"] = (clean["S4"] - 32) * 5 / 9  # °C numbers converted once more, as if they were °F
    detector = learning.learn(observed, learning_days(observed), settings)
    found = learning.other_units(detector)
    assert [f["station"] for f in found] == ["S4"]
    assert abs(found[0]["ratio"] / (5 / 9) - 1) < 0.3 and found[0]["neighbours_mean"] - found[0]["mean"] > 15
    assert learning.other_units(learning.learn(clean, learning_days(clean), settings)) == []
    # A mountain top among valleys: 16 °C colder, its weather 1.25 times as wild. Colder in another unit swings
    # 5/9 times as far, never more: it is no unit mix-up.
    mountain = clean.copy()
    mountain["S4"] = clean["S4"].mean() - 16 + 1.25 * (clean["S4"] - clean["S4"].mean())
    assert learning.other_units(learning.learn(mountain, learning_days(mountain), settings)) == []
