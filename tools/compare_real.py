"""Score finished runs on real station records against a single-station Ridge, and print one table row each.

usage: python tools/compare_real.py [--by-station] PROJECT [PROJECT ...]

Each PROJECT is a folder where ``pipeline.sh`` ran to the end (its ``reports/predictions.csv`` and
``data/*/raw``). Beside the pipeline's own predictors, it fits the reference a forecaster would try first: per
station, a scikit-learn Ridge on the station's last seven readings (lags 1-7 of the next day, a missing one
carried forward up to 3 days) and the target day's day-of-year terms, fitted on the training readings only.
Scores are MAE in the data's unit on the test readings one step ahead that every predictor forecast. Beside
them, the model's MAE minus the single-station Ridge's with a 95 % interval: one test year is a small sample of
weather, and the interval says whether a difference is more than that year's luck.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

LAGS = 7
PREDICTORS = ["model", "neighbours_ridge", "station_ridge", "persistence"]
# Resampled in runs of consecutive days, every station's readings of a day together: errors are correlated
# from day to day (a weather regime lasts days) and between stations (they share the weather).
BLOCK_DAYS = 14
RESAMPLES = 2000


def readings(folder: Path) -> dict[str, pd.Series]:
    return {path.stem: pd.read_csv(path, parse_dates=["date"]).set_index("date")["temperature"]
            for path in sorted(folder.glob("*.csv"))}


def station_ridge(train: pd.Series, test: pd.Series, origins: pd.DatetimeIndex) -> np.ndarray:
    """The single-station Ridge's next-day forecast from each of ``origins`` (NaN where it has no inputs)."""
    from sklearn.linear_model import Ridge

    series = pd.concat([train, test]).asfreq("D")
    inputs = pd.DataFrame({f"lag{lag + 1}": series.shift(lag).ffill(limit=3) for lag in range(LAGS)})
    angle = 2 * np.pi * (series.index + pd.Timedelta(days=1)).day_of_year.to_numpy() / 365.25
    inputs["doy_sin"], inputs["doy_cos"] = np.sin(angle), np.cos(angle)
    target = series.shift(-1)
    fit = inputs.notna().all(axis=1) & target.notna() & (inputs.index < train.index.max())
    forecast = np.full(len(origins), np.nan)
    if fit.sum() < 60:
        return forecast
    model = Ridge(alpha=1.0).fit(inputs[fit].to_numpy(), target[fit].to_numpy())
    chosen = inputs.reindex(origins)
    known = chosen.notna().all(axis=1).to_numpy()
    if known.any():
        forecast[known] = model.predict(chosen[known].to_numpy())
    return forecast


def difference_interval(dates: pd.Series, difference: pd.Series, seed: int = 0) -> tuple[float, float]:
    """A 95 % interval of the mean of ``difference`` (one value per reading, dated ``dates``) by a moving-block
    bootstrap over the test days: ``RESAMPLES`` resamples of runs of ``BLOCK_DAYS`` consecutive days."""
    by_day = pd.DataFrame({"total": difference.to_numpy(), "count": 1}).groupby(dates.to_numpy()).sum()
    by_day = by_day.reindex(pd.date_range(by_day.index.min(), by_day.index.max()), fill_value=0)
    total, count = by_day["total"].to_numpy(), by_day["count"].to_numpy()
    block = min(BLOCK_DAYS, len(by_day))
    starts = np.random.default_rng(seed).integers(0, len(by_day) - block + 1,
                                                   size=(RESAMPLES, -(-len(by_day) // block)))
    days = (starts[:, :, None] + np.arange(block)).reshape(RESAMPLES, -1)
    means = total[days].sum(axis=1) / np.maximum(count[days].sum(axis=1), 1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def scored_readings(project: Path) -> pd.DataFrame:
    """The test readings one step ahead of a finished run that every predictor forecast, with each forecast."""
    predictions = pd.read_csv(project / "reports/predictions.csv", parse_dates=["date"])
    predictions = predictions[(predictions["step"] == 1) & predictions["observed"].notna()]
    train, test = readings(project / "data/train/raw"), readings(project / "data/test/raw")
    parts = []
    for station, rows in predictions.groupby("station", sort=True):
        if station in train:
            rows = rows.assign(station_ridge=station_ridge(train[station], test.get(station, pd.Series(dtype=float)),
                                                           pd.DatetimeIndex(rows["date"])))
            parts.append(rows)
    return pd.concat(parts).dropna(subset=PREDICTORS)


def summary(name: str, scored: pd.DataFrame) -> dict:
    """Every predictor's MAE on ``scored``, the model's difference from the single-station Ridge with its
    interval, and at how many stations the model is at or below each ridge."""
    error = {predictor: (scored[predictor] - scored["observed"]).abs() for predictor in PREDICTORS}
    per_station = pd.DataFrame(error).groupby(scored["station"]).mean()
    low, high = difference_interval(scored["date"], error["model"] - error["station_ridge"])
    return {"project": name, "stations": len(per_station), "readings": len(scored),
            **{predictor: float(values.mean()) for predictor, values in error.items()},
            "model_minus_station_ridge": (float((error["model"] - error["station_ridge"]).mean()), low, high),
            "at_or_below_ridge": int((per_station["model"] <= per_station["neighbours_ridge"]).sum()),
            "at_or_below_station_ridge": int((per_station["model"] <= per_station["station_ridge"]).sum())}


def compare(project: Path) -> dict:
    return summary(project.name, scored_readings(project))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", nargs="+", type=Path)
    parser.add_argument("--by-station", action="store_true",
                        help="pool the projects' readings (e.g. runs of one station with other test years) and "
                             "print a row per station, then all of them")
    args = parser.parse_args(argv)
    unfinished = [project for project in args.projects if not (project / "reports/predictions.csv").is_file()]
    if unfinished:
        parser.error(f"{unfinished[0]}: no reports/predictions.csv; run ./pipeline.sh --root {unfinished[0]} to the "
                     "end first")
    print(f"{'project':<16}{'stations':>9}{'readings':>9}" + "".join(f"{name:>18}" for name in PREDICTORS)
          + "  model - station ridge [95 %]  model <= neighbours ridge / station ridge (stations)")
    if args.by_station:
        pooled = pd.concat([scored_readings(project) for project in args.projects], ignore_index=True)
        rows = [summary(station, scored) for station, scored in pooled.groupby("station", sort=True)]
        rows.append(summary("all", pooled))
    else:
        rows = (compare(project) for project in args.projects)
    for row in rows:
        print(f"{row['project']:<16}{row['stations']:>9}{row['readings']:>9}"
              + "".join(f"{row[name]:>18.3f}" for name in PREDICTORS)
              + "  {:+.3f} [{:+.3f}, {:+.3f}]".format(*row["model_minus_station_ridge"])
              + f"  {row['at_or_below_ridge']} / {row['at_or_below_station_ridge']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
