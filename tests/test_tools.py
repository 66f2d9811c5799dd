"""tools/: scripts that are not stages."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_real_scores_every_predictor_on_the_same_readings_beside_a_single_station_ridge(built, capsys):
    root, _ = built
    compare_real = load_tool("compare_real")
    row = compare_real.compare(root)
    predictions = pd.read_csv(root / "reports/predictions.csv")
    first = predictions[(predictions["step"] == 1) & predictions["observed"].notna()]
    assert 0 < row["readings"] <= len(first) and row["stations"] == first["station"].nunique() - 1  # one held out
    for name in compare_real.PREDICTORS:
        assert np.isfinite(row[name]) and row[name] > 0
    # A per-station autoregression beats tomorrow = today on a seasonal series with persistent weather.
    assert row["station_ridge"] < row["persistence"]
    difference, low, high = row["model_minus_station_ridge"]
    assert difference == pytest.approx(row["model"] - row["station_ridge"]) and low <= difference <= high
    assert compare_real.main([str(root)]) == 0
    assert f"{row['model']:.3f}" in capsys.readouterr().out
    # --by-station: a row per station over every project given, then one over all of them
    assert compare_real.main(["--by-station", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [*sorted(first["station"].unique())[:-1], "all"]
    assert lines[-1].split()[1:4] == [str(row["stations"]), str(row["readings"]), f"{row['model']:.3f}"]


def test_the_tools_answer_a_mistyped_argument_with_one_line_not_a_traceback(tmp_path, capsys):
    compare_real, benchmark = load_tool("compare_real"), load_tool("benchmark")
    with pytest.raises(SystemExit) as stopped:
        compare_real.main([str(tmp_path)])  # a folder where no run finished
    assert stopped.value.code == 2
    assert f"{tmp_path}: no reports/predictions.csv; run ./pipeline.sh --root" in capsys.readouterr().err
    assert benchmark.pairs("1000x10, 3000X10") == [(1000, 10), (3000, 10)]
    for typo in ("foo", "10x", "10x10x2", "-1x10"):
        with pytest.raises(argparse.ArgumentTypeError, match="not two whole numbers joined by x"):
            benchmark.pairs(typo)


def test_the_difference_interval_covers_the_year_s_luck_and_not_a_real_gap():
    compare_real = load_tool("compare_real")
    days = pd.Series(np.repeat(pd.date_range("2013-01-01", periods=365), 3))  # three stations a day
    noise = np.random.default_rng(1).normal(0, 1, len(days))
    noise -= noise.mean()  # a year whose differences average exactly 0
    low, high = compare_real.difference_interval(days, pd.Series(noise))
    assert low < 0 < high and high - low < 0.4
    low, high = compare_real.difference_interval(days, pd.Series(noise + 0.3))
    assert 0 < low < 0.3 < high
    assert compare_real.difference_interval(days, pd.Series(np.full(len(days), 0.25))) == pytest.approx((0.25, 0.25))
    assert compare_real.difference_interval(days, pd.Series(noise + 0.3)) == (low, high)  # the same every run
