"""The salary case: forecast market salaries two years ahead and price a hiring plan with the pipeline.

A customer wants to hire 10 MLOps engineers over two years at the market level
without overpaying more than 500,000 RUB in total (docs/salary_case.md). This
script answers with numbers:

1. simulates a monthly market-salary series (gross, thousand RUB a month) for
   four grades: a trend, shocks every grade shares, noise;
2. runs this pipeline on them, in a working copy under ``--root``: monthly steps,
   ``horizon = 24``, the last 48 months as the backtest (test) period;
3. draws market paths **jointly** from the pipeline's own backtest errors (a
   shock moves every later month and every grade together) around its
   24-month forecast, and prices offer policies for the hiring plan: the
   probability that total overpay exceeds 500,000 RUB and that an offer falls
   so far below the market that the hire fails.

    .venv/bin/python tools/salary_case.py                # writes docs/salary_case/ (figures, results.json)
    .venv/bin/python tools/salary_case.py --draws 2000 --out /tmp/case

Everything is seeded: the same arguments give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent  # the project (this is tools/salary_case.py)
sys.path.insert(0, str(ROOT))  # its package, for a run as python tools/salary_case.py

from station_forecast.files import copy_runnable  # noqa: E402
from station_forecast.params import params_text_with  # noqa: E402

GRADES = {"junior": 70.0, "middle": 120.0, "senior": 170.0, "lead": 220.0}  # thousand RUB a month in 2012-01
GROWTH = {"junior": 0.05, "middle": 0.055, "senior": 0.06, "lead": 0.065}  # yearly, before shocks
START, MONTHS = "2012-01-01", 168  # 14 years of history, to 2025-12
HORIZON, BACKTEST = 24, 48
# The plan: 10 hires, the grade and the month (1 = the first month after the data) of each.
PLAN = [("junior", 2), ("middle", 3), ("middle", 6), ("senior", 8), ("middle", 10), ("junior", 13),
        ("senior", 15), ("middle", 18), ("lead", 20), ("senior", 23)]
LIMIT_RUB = 500_000
FAIL_GAP = 0.10  # an offer more than 10 % below the market at hire is turned down
POLICIES = {"median": 0.5, "lower quartile": 0.25, "lower decile": 0.10}


def simulate_market(seed: int) -> pd.DataFrame:
    """Monthly market salary per grade (date x grade, thousand RUB): trend, shared shocks, noise."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range(START, periods=MONTHS, freq="MS")
    t = np.arange(MONTHS) / 12.0
    shared = np.zeros(MONTHS)
    for m in range(1, MONTHS):  # a slow common cycle: months of AR(1), one small loop
        shared[m] = 0.93 * shared[m - 1] + rng.normal(0.0, 0.008)
    jumps = rng.random(MONTHS) < 1 / 48  # about one market-wide shock every four years, and it stays
    shared += np.cumsum(np.where(jumps, rng.choice([-1.0, 1.0], MONTHS) * rng.uniform(0.03, 0.07, MONTHS), 0.0))
    season = 0.006 * np.sin(2 * np.pi * (dates.month.to_numpy() - 4) / 12)  # spring pay reviews
    market = {grade: base * np.exp(GROWTH[grade] * t + shared * rng.uniform(0.8, 1.2) + season
                                   + rng.normal(0.0, 0.012, MONTHS))
              for grade, base in GRADES.items()}
    return pd.DataFrame(market, index=dates).round(1)


def run_pipeline(market: pd.DataFrame, work: Path) -> Path:
    """The four stages on the market series, in a working copy of the project; returns the copy."""
    project = work / "pipeline"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    copy_runnable(project)
    source = project / "salaries"
    source.mkdir()
    for grade in market:
        table = pd.DataFrame({"month": market.index.strftime("%Y-%m"), "salary": market[grade].to_numpy()})
        table.to_csv(source / f"{grade}.csv", index=False, lineterminator="\n")
    (project / "salary.toml").write_text(params_text_with({
        "source": "salaries", "frequency": "monthly", "test_steps": BACKTEST, "holdout_stations": 0,
        "date_column": "month", "temperature_column": "salary", "date_format": "%Y-%m", "unit": "none",
        "detector": "none", "min_temp": 1.0, "max_temp": 100000.0, "min_steps": 60, "horizon": HORIZON,
        "cv_folds": 3, "gbr_max_iter": 100,
    }, base=project / "params.toml"))
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(project / "pipeline.sh"), "--params", "salary.toml", "--force"],
                          cwd=project, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):  # 3: the gate refused the model; its forecasts are still reported
        raise SystemExit(f"salary_case: the pipeline failed:\n{done.stderr[-2000:]}")
    return project


def backtest_errors(predictions: pd.DataFrame) -> tuple[np.ndarray, float]:
    """From the pipeline's backtest: the spread of the relative error at each step 1..HORIZON, and how
    much of it every grade shares (the correlation of two grades' errors at the same origin and step)."""
    scored = predictions.dropna(subset=["observed"]).assign(
        error=lambda f: (f["observed"] - f["model"]) / f["model"])
    sigma = scored.groupby("step")["error"].std().reindex(range(1, HORIZON + 1)).to_numpy()
    sigma = np.maximum.accumulate(sigma)  # the error of a later month is never smaller than an earlier one's
    standard = scored.assign(z=scored["error"] / scored["step"].map(dict(enumerate(sigma, start=1))))
    wide = standard.pivot_table(index=["date", "step"], columns="station", values="z")
    pairs = wide.corr().to_numpy()[np.triu_indices(wide.shape[1], k=1)]
    return sigma, float(np.clip(np.mean(pairs), 0.0, 0.99))


def market_paths(forecast: pd.DataFrame, sigma: np.ndarray, shared: float, draws: int, seed: int,
                 joint: bool = True) -> np.ndarray:
    """Market levels (draws x months x grades) around the forecast.

    Jointly drawn: each path's error is a random walk over the months (its
    variance at month h is sigma[h]^2, so a shock carries on into later months)
    made of a part every grade shares (``shared`` of the variance) and a part of
    its own. With ``joint = False`` every month and grade is drawn on its own,
    the way a table of monthly quantiles would be read.
    """
    rng = np.random.default_rng(seed)
    n_months, n_grades = forecast.shape
    if not joint:
        return forecast.to_numpy()[None] * (1 + sigma[None, :, None] * rng.standard_normal((draws, n_months, n_grades)))
    steps = np.sqrt(np.diff(np.concatenate([[0.0], sigma**2])))
    common = np.cumsum(steps[None, :] * rng.standard_normal((draws, n_months)), axis=1)
    own = np.cumsum(steps[None, :, None] * rng.standard_normal((draws, n_months, n_grades)), axis=1)
    error = np.sqrt(shared) * common[:, :, None] + np.sqrt(1 - shared) * own
    return forecast.to_numpy()[None] * (1 + error)


def price_plan(paths: np.ndarray, forecast: pd.DataFrame, sigma: np.ndarray, policy: str, seed: int) -> dict:
    """Overpay and failed hires of the plan under one offer policy, over all drawn market paths.

    Overpay of a hire = max(offer - market at hire, 0) x months employed up to the end of the two
    years, in RUB; the plan's overpay is the sum over hires (an underpaid hire does not offset an
    overpaid one: it is a risk of its own, counted as a failed hire when the offer is more than
    FAIL_GAP below the market). Offers: at a quantile of the market forecast made now for the month
    of the hire, or ("re-forecast") the pipeline's one-month-ahead forecast made just before it.
    """
    grades = list(forecast.columns)
    rng = np.random.default_rng(seed)
    overpay = np.zeros(len(paths))
    failed = np.zeros(len(paths))
    for grade, month in PLAN:
        market = paths[:, month - 1, grades.index(grade)]
        if policy == "re-forecast":
            offer = market * (1 + sigma[0] * rng.standard_normal(len(paths)))
        else:
            offer = np.full(len(paths), np.quantile(market, POLICIES[policy]))
        employed = HORIZON - month + 1
        overpay += np.maximum(offer - market, 0.0) * 1000 * employed
        failed += offer < (1 - FAIL_GAP) * market
    return {"p_overpay_over_limit": round(float(np.mean(overpay > LIMIT_RUB)), 4),
            "median_overpay_rub": round(float(np.median(overpay)), -3),
            "p95_overpay_rub": round(float(np.quantile(overpay, 0.95)), -3),
            "p_any_failed_hire": round(float(np.mean(failed > 0)), 4),
            "expected_failed_hires": round(float(np.mean(failed)), 3),
            "overpay": overpay}


def figures(out: Path, market: pd.DataFrame, forecast: pd.DataFrame, paths: np.ndarray, priced: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    history = market.loc[market.index >= market.index[-1] - pd.DateOffset(years=4)]
    for i, grade in enumerate(forecast.columns):
        colour = f"C{i}"
        ax.plot(history.index, history[grade], color=colour, linewidth=1.0, label=grade)
        low90, low50, high50, high90 = np.quantile(paths[:, :, i], [0.05, 0.25, 0.75, 0.95], axis=0)
        ax.fill_between(forecast.index, low90, high90, color=colour, alpha=0.12, linewidth=0)
        ax.fill_between(forecast.index, low50, high50, color=colour, alpha=0.25, linewidth=0)
        ax.plot(forecast.index, forecast[grade], "--", color=colour, linewidth=1.0)
    ax.axvline(market.index[-1], color="black", linewidth=0.8)
    ax.set_ylabel("market salary, thousand RUB a month (gross)")
    ax.set_title("24-month forecast by grade: median (dashed), 50 % and 90 % of jointly drawn market paths")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.savefig(out / "fan_chart.png", dpi=100, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    bins = np.linspace(0, 3_000_000, 61)
    for policy, result in priced.items():
        ax.hist(np.minimum(result["overpay"], bins[-1]), bins=bins, histtype="step", linewidth=1.5,
                label=f"{policy}: P(> 500,000) = {result['p_overpay_over_limit']:.0%}")
    ax.axvline(LIMIT_RUB, color="black", linestyle="--", label="500,000 RUB")
    ax.set_xlabel("total overpay of the 10 hires over the two years, RUB (beyond 3 M drawn at 3 M)")
    ax.set_ylabel("drawn market paths")
    ax.set_title("Overpay by offer policy")
    ax.legend()
    fig.savefig(out / "overpay.png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def _at_least(low: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {text!r}")
        return int(text)
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=_at_least(0), default=7, help="seed of the market simulation and the draws")
    parser.add_argument("--draws", type=_at_least(100), default=20_000,
                        help="market paths drawn, at least 100 (default 20000)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "salary_case",
                        help="folder for results.json and the figures (default docs/salary_case)")
    args = parser.parse_args()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: cannot be created ({exc.strerror})")

    market = simulate_market(args.seed)
    with tempfile.TemporaryDirectory(prefix="salary-case-") as work:
        project = run_pipeline(market, Path(work))
        metrics = json.loads((project / "models" / "metrics.json").read_text())
        predictions = pd.read_csv(project / "reports" / "predictions.csv", parse_dates=["date", "target_date"])
    sigma, shared = backtest_errors(predictions)
    ahead = predictions[predictions["date"] == predictions["date"].max()]
    forecast = ahead.pivot(index="target_date", columns="station", values="model")[list(GRADES)]

    paths = market_paths(forecast, sigma, shared, args.draws, args.seed)
    independent = market_paths(forecast, sigma, shared, args.draws, args.seed, joint=False)
    priced = {policy: price_plan(paths, forecast, sigma, policy, args.seed) for policy in [*POLICIES, "re-forecast"]}
    naive = {policy: price_plan(independent, forecast, sigma, policy, args.seed) for policy in POLICIES}

    by_step = metrics["by_step"]
    backtest = {step: {p: by_step[step]["forecast"][p]["mae"] for p in ("model", "persistence", "drift")}
                | {"coverage": by_step[step]["interval"]["model"]["coverage"],
                   "width": by_step[step]["interval"]["model"]["width"]}
                for step in ("1", "6", "12", "24")}
    results = {
        "gate": metrics["gate"]["verdict"], "model": metrics["model"],
        "backtest_mae_thousand_rub": backtest,
        "relative_error_sd": {"1": round(float(sigma[0]), 4), "12": round(float(sigma[11]), 4),
                              "24": round(float(sigma[23]), 4)},
        "shared_share": round(shared, 3),
        "policies": {p: {k: v for k, v in r.items() if k != "overpay"} for p, r in priced.items()},
        "policies_with_independent_draws": {p: {k: v for k, v in r.items() if k != "overpay"}
                                            for p, r in naive.items()},
        "draws": args.draws, "seed": args.seed,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures(args.out, market, forecast, paths, {p: priced[p] for p in ("median", "lower quartile", "re-forecast")})

    print(f"pipeline: {results['gate']} ({results['model']})")
    print("backtest MAE, thousand RUB:", json.dumps(backtest))
    print(f"relative error sd at 1/12/24 months: {sigma[0]:.3f} / {sigma[11]:.3f} / {sigma[23]:.3f}; "
          f"shared by all grades: {shared:.0%}")
    print(f"{'policy':16}{'P(overpay>500k)':>17}{'median overpay':>16}{'P(failed hire)':>16}"
          f"{'P(overpay>500k), independent draws':>36}")
    for policy, r in priced.items():
        alone = f"{naive[policy]['p_overpay_over_limit']:.1%}" if policy in naive else "-"
        print(f"{policy:16}{r['p_overpay_over_limit']:>17.1%}{r['median_overpay_rub']:>16,.0f}"
              f"{r['p_any_failed_hire']:>16.1%}{alone:>36}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
