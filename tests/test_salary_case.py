"""The salary case: the monthly scenario end to end, and how its risk figures respond to the offer policy."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from tools import salary_case


@pytest.fixture(scope="module")
def forecast() -> pd.DataFrame:
    months = pd.date_range("2026-01-01", periods=salary_case.HORIZON, freq="MS")
    growth = np.linspace(1.0, 1.1, salary_case.HORIZON)[:, None]
    return pd.DataFrame(np.array([[150.0, 280.0, 400.0, 540.0]]) * growth, index=months,
                        columns=list(salary_case.GRADES))


def test_a_lower_offer_quantile_lowers_the_overpay_risk_and_raises_failed_hires(forecast):
    sigma = np.linspace(0.015, 0.04, salary_case.HORIZON)
    paths = salary_case.market_paths(forecast, sigma, 0.3, 4000, seed=1)
    priced = {p: salary_case.price_plan(paths, forecast, sigma, p, seed=1) for p in salary_case.POLICIES}
    overpay = [priced[p]["p_overpay_over_limit"] for p in ("median", "lower quartile", "lower decile")]
    failed = [priced[p]["p_any_failed_hire"] for p in ("median", "lower quartile", "lower decile")]
    assert overpay[0] > overpay[1] > overpay[2] and failed[0] < failed[1] < failed[2]
    wider = salary_case.market_paths(forecast, 2 * sigma, 0.3, 4000, seed=1)
    assert salary_case.price_plan(wider, forecast, 2 * sigma, "median", seed=1)["p_overpay_over_limit"] > overpay[0]


def test_joint_paths_carry_a_shock_into_later_months_and_every_grade(forecast):
    sigma = np.linspace(0.015, 0.04, salary_case.HORIZON)
    relative = salary_case.market_paths(forecast, sigma, 0.5, 20000, seed=2) / forecast.to_numpy()[None] - 1
    assert relative[:, -1, 0].std() == pytest.approx(sigma[-1], rel=0.05)  # each month keeps its spread
    assert np.corrcoef(relative[:, 5, 0], relative[:, 20, 0])[0, 1] > 0.4  # months move together
    assert np.corrcoef(relative[:, 10, 0], relative[:, 10, 3])[0, 1] == pytest.approx(0.5, abs=0.05)  # grades too
    alone = salary_case.market_paths(forecast, sigma, 0.5, 20000, seed=2, joint=False) / forecast.to_numpy()[None] - 1
    assert abs(np.corrcoef(alone[:, 5, 0], alone[:, 20, 0])[0, 1]) < 0.05


def test_the_scenario_runs_the_pipeline_on_monthly_data_24_months_ahead(tmp_path):
    script = ROOT / "tools" / "salary_case.py"
    done = subprocess.run([sys.executable, str(script), "--draws", "2000", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    backtest = results["backtest_mae_thousand_rub"]
    assert backtest["1"]["model"] < backtest["1"]["persistence"] and backtest["24"]["model"] < backtest["24"]["drift"]
    assert backtest["1"]["model"] < backtest["24"]["model"] and backtest["1"]["width"] < backtest["24"]["width"]
    policies = results["policies"]
    assert policies["median"]["p_overpay_over_limit"] > policies["lower quartile"]["p_overpay_over_limit"]
    assert all(0 <= r["p_overpay_over_limit"] <= 1 for r in policies.values())
    for name in ("fan_chart.png", "overpay.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "P(overpay>500k)" in done.stdout
