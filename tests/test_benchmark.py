"""benchmark.py's ideal drift detector, the yardstick the README sets the detector's drift F1 against."""

import numpy as np

from station_forecast.flags import SCORED
from tools import benchmark


def test_ramp_evidence_is_exact_for_a_ramp_and_rarely_large_on_noise():
    phi, rate, onset = 0.4, 0.05, 200
    days = np.arange(400)
    departure = np.where(days >= onset, rate * (days - onset + 1), 0.0)
    innovations = departure - phi * np.r_[0.0, departure[:-1]]
    evidence = benchmark.ramp_evidence(innovations, phi)
    for age in (10, 30, 60):  # the test of the true start day is the largest, and its value is known
        weights = (1 - phi) * np.arange(age + 1) + 1
        assert np.isclose(evidence[onset + age], rate * np.sqrt(weights @ weights))
    assert (evidence[:onset] == 0).all()

    noise = benchmark.ramp_evidence(np.random.default_rng(1).normal(size=50_000), phi)
    assert (noise > 5).mean() < 1e-4  # each test is standard normal; the largest of 90 rarely passes 5
    assert (noise > 2).mean() > 0.05


def test_ideal_drift_counts_on_a_network(default_built):
    counts = benchmark.ideal_drift_counts(default_built)
    assert list(counts) == list(benchmark.IDEAL_THRESHOLDS)
    hits, flags, days = np.array(list(counts.values())).T
    assert (days == days[0]).all() and days[0] > 0, "the default network has drift days in its test period"
    assert (hits <= flags).all() and (hits <= days).all()
    assert (np.diff(flags) <= 0).all() and (np.diff(hits) <= 0).all(), "a higher threshold never flags more"
    again = benchmark.ideal_drift_counts(default_built)
    assert all((again[threshold] == counts[threshold]).all() for threshold in counts), "seeded: the same counts"


def test_f1_score_from_counts():
    precision, recall = 8 / 10, 8 / 16
    assert np.isclose(benchmark.f1_score(8, 10, 16), 2 * precision * recall / (precision + recall))
    assert benchmark.f1_score(0, 0, 5) == 0.0


def test_fault_days_by_error_add_up_to_the_detector_s_scores(default_built):
    from station_forecast import storage

    by_error = benchmark.found_by_error(default_built)
    scores = storage.read_json(storage.Paths(default_built).metrics)["detector"]
    for kind in SCORED:
        days, flagged = by_error[kind]
        assert len(days) == len(benchmark.ERROR_BANDS) + 1 and (flagged <= days).all()
        assert days.sum() == scores[kind]["days"]
        assert flagged.sum() == round(scores[kind]["recall"] * scores[kind]["days"])
    assert benchmark.normal_day_flags(scores["any"]) == round(
        scores["any"]["flagged"] - scores["any"]["recall"] * scores["any"]["days"])


def test_first_flag_delays_count_days_from_each_fault_s_start_to_its_first_flag(tmp_path):
    dates = [f"2021-01-{day:02d}" for day in range(1, 17)]
    anomaly = ["none"] * 16
    flag = ["none"] * 16
    anomaly[1] = "spike"
    flag[1] = "spike"
    anomaly[4:9] = ["level_shift"] * 5
    flag[6:9] = ["level_shift"] * 3  # found on the fault's third day
    anomaly[11:14] = ["drift"] * 3  # never found
    (tmp_path / "data/test").mkdir(parents=True)
    (tmp_path / "data/truth").mkdir(parents=True)
    rows = "".join(f"A,{d},{f}\n" for d, f in zip(dates, flag, strict=True))
    (tmp_path / "data/test/flags.csv").write_text("station,date,flag\n" + rows)
    truth = "".join(f"{d},{a}\n" for d, a in zip(dates, anomaly, strict=True))
    (tmp_path / "data/truth/A.csv").write_text("date,anomaly\n" + truth)
    delays = benchmark.first_flag_delays(tmp_path)
    assert delays["spike"] == [0.0] and delays["level_shift"] == [2.0] and delays["stuck"] == []
    assert len(delays["drift"]) == 1 and np.isnan(delays["drift"][0])
