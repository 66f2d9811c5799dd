"""Stage 1: simulate daily air temperature at several weather stations.

Each station has its own climate (annual mean, seasonal amplitude and phase, slow
trend), day-to-day weather persistence (AR(1) noise) and measurement noise. Five
kinds of anomaly are injected at the rates in params.toml. Observations are split
in time: each station's last ``test_days`` go to data/test, the earlier days to
data/train; held-out stations go wholly to data/test. The ground truth (clean value
and anomaly kind per day) goes only to data/truth, which no training stage reads.

Outputs:
    data/train/raw/<station>.csv   date, temperature (observed; missing days absent)
    data/test/raw/<station>.csv    date, temperature
    data/truth/<station>.csv       date, clean_temperature, anomaly
    data/truth/stations.csv        each station's climate and role
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

import common
from common import ANOMALY_KINDS, Params, Paths, log

STAGE = "data_creation"
# Later kinds win where events overlap: a spike on a drifting sensor is a spike.
_EFFECT_ORDER = ["level_shift", "drift", "stuck", "spike", "missing"]


def station_climates(rng: np.random.Generator, data: dict) -> pd.DataFrame:
    """Draw each station's climate and decide its role and contamination."""
    n = data["n_stations"]
    contamination = np.ones(n)
    contamination[: data["clean_stations"]] = 0.0
    contamination[data["clean_stations"]: data["clean_stations"] + data["heavy_stations"]] = data["heavy_factor"]
    role = np.where(np.arange(n) >= n - data["holdout_stations"], "holdout", "train")
    width = max(3, len(str(n)))
    return pd.DataFrame({
        "station": [f"ST{i + 1:0{width}d}" for i in range(n)],
        "role": role,
        "annual_mean": rng.uniform(-2.0, 18.0, n),
        "amplitude": rng.uniform(5.0, 14.0, n),
        "warmest_doy": rng.uniform(190.0, 215.0, n),
        "trend_per_year": rng.uniform(-0.02, 0.06, n),
        "ar_coef": rng.uniform(0.6, 0.85, n),
        "weather_sd": rng.uniform(1.2, 2.5, n),
        "noise_sd": rng.uniform(0.2, 0.5, n),
        "contamination": contamination,
    })


def ar1(innovations: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Stationary AR(1) series per row: x[t] = coef * x[t-1] + e[t], vectorised.

    Convolves each row with its impulse response coef**k by FFT, truncated where
    coef**k < 1e-12; rows start already in their stationary state because the
    first ``k`` innovations are a burn-in that is dropped.
    """
    n_total = innovations.shape[1]
    burn = int(np.ceil(np.log(1e-12) / np.log(coef.max())))
    n_out = n_total - burn
    if n_out <= 0:
        raise ValueError("ar1: fewer innovations than the burn-in")
    kernel = coef[:, None] ** np.arange(burn + 1)
    size = n_total + burn + 1
    full = np.fft.irfft(np.fft.rfft(innovations, size) * np.fft.rfft(kernel, size), size)
    return full[:, burn:n_total]


def draw_events(rng: np.random.Generator, rate: np.ndarray, days: list[int], n_days: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random runs of anomalous days covering about ``rate`` of each row's days.

    Returns the covered mask, each covered day's run start (-1 where none; it may
    be negative for a run begun before day 0) and its progress through the run
    in [0, 1), all of shape (stations, days).
    """
    low, high = days
    start_prob = np.clip(rate / ((low + high) / 2), 0.0, 1.0)
    # Runs may begin before the first day, so the first days are as likely to be
    # covered as any other and the realised fraction matches ``rate``.
    lead = high - 1
    starts = rng.random((len(rate), n_days + lead)) < start_prob[:, None]
    lengths = rng.integers(low, high + 1, size=starts.shape)
    day = np.arange(n_days + lead)
    run_start = np.maximum.accumulate(np.where(starts, day, -1), axis=1)
    run_length = np.take_along_axis(lengths, np.maximum(run_start, 0), axis=1)
    position = day - run_start
    covered = ((run_start >= 0) & (position < run_length))[:, lead:]
    progress = np.where(covered, (position / np.maximum(run_length, 1))[:, lead:], 0.0)
    run_start = np.where(covered, run_start[:, lead:] - lead, -1)
    return covered, run_start, progress


def simulate(data: dict, anomalies: dict) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Simulate every station. Returns climates, dates, clean, observed and labels.

    ``observed`` is NaN on missing days; ``labels`` holds the anomaly kind per day
    ("none" on normal days).
    """
    rng = np.random.default_rng(data["seed"])
    climates = station_climates(rng, data)
    start = np.datetime64(data["start_date"], "D")
    first = dt.date.fromisoformat(data["start_date"])
    end = np.datetime64(first.replace(year=first.year + data["n_years"]), "D")
    dates = np.arange(start, end)
    n_days, n_stations = len(dates), len(climates)

    day_of_year = (dates - dates.astype("datetime64[Y]")).astype(int) + 1
    years = np.arange(n_days) / 365.25
    c = {col: climates[col].to_numpy()[:, None] for col in climates.columns if col not in ("station", "role")}
    seasonal = c["amplitude"] * np.cos(2 * np.pi * (day_of_year - c["warmest_doy"]) / 365.25)
    burn = int(np.ceil(np.log(1e-12) / np.log(c["ar_coef"].max())))
    weather = ar1(rng.normal(0.0, 1.0, (n_stations, n_days + burn)) * c["weather_sd"], c["ar_coef"][:, 0])
    clean = c["annual_mean"] + c["trend_per_year"] * years + seasonal + weather
    observed = clean + rng.normal(0.0, 1.0, clean.shape) * c["noise_sd"]

    labels = np.full(clean.shape, "none", dtype=object)
    rows = np.arange(n_stations)[:, None]
    for kind in _EFFECT_ORDER:
        rate = anomalies[f"{kind}_rate"] * c["contamination"][:, 0]
        covered, run_start, progress = draw_events(rng, rate, anomalies[f"{kind}_days"], n_days)
        sign = rng.choice([-1.0, 1.0], size=clean.shape)
        size = rng.uniform(0.0, 1.0, size=clean.shape)
        at_start = np.maximum(run_start, 0)
        if kind == "level_shift":
            offset = np.take_along_axis(sign * (2.5 + 3.5 * size), at_start, axis=1)
            observed = np.where(covered, observed + offset, observed)
        elif kind == "drift":
            final = np.take_along_axis(sign * (3.0 + 5.0 * size), at_start, axis=1)
            observed = np.where(covered, observed + final * progress, observed)
        elif kind == "stuck":  # the sensor repeats its last good reading
            frozen = observed[rows, np.maximum(at_start - 1, 0)]
            observed = np.where(covered, frozen, observed)
        elif kind == "spike":
            observed = np.where(covered, observed + sign * (6.0 + 9.0 * size), observed)
        else:
            observed = np.where(covered, np.nan, observed)
        labels[covered] = kind
    return climates, dates, clean, np.round(observed, 1), labels


def training_days(climates: pd.DataFrame, n_days: int, test_days: int) -> np.ndarray:
    """Per station, how many leading days go to training; none for held-out stations."""
    return np.where(climates["role"] == "holdout", 0, n_days - test_days)


def station_tables(dates: np.ndarray, clean: np.ndarray, observed: np.ndarray,
                   labels: np.ndarray, train_end: int) -> dict[str, pd.DataFrame]:
    """The three files of one station: train and test observations, and its truth."""
    day_str = pd.Series(np.datetime_as_string(dates, unit="D"))
    present = ~np.isnan(observed)
    obs = pd.DataFrame({"date": day_str, "temperature": observed})
    in_train = np.arange(len(dates)) < train_end
    return {
        "train": obs[present & in_train],
        "test": obs[present & ~in_train],
        "truth": pd.DataFrame({"date": day_str, "clean_temperature": np.round(clean, 2), "anomaly": labels}),
    }


def write_station_files(staging: Path, climates: pd.DataFrame, dates: np.ndarray, clean: np.ndarray,
                        observed: np.ndarray, labels: np.ndarray, test_days: int) -> None:
    train_end = training_days(climates, len(dates), test_days)
    for folder in ("train", "test", "truth"):
        (staging / folder).mkdir(parents=True)
    for i, station in enumerate(climates["station"]):
        tables = station_tables(dates, clean[i], observed[i], labels[i], train_end[i])
        for folder, table in tables.items():
            if len(table):
                table.to_csv(staging / folder / f"{station}.csv", index=False, lineterminator="\n",
                             float_format="%.2f" if folder == "truth" else "%.1f")
    climates.round(4).to_csv(staging / "truth" / "stations.csv", index=False, lineterminator="\n")


def main(args) -> None:
    params: Params = common.load_params(args.params)
    paths = Paths(args.root)
    data = params["data"]
    climates, dates, clean, observed, labels = simulate(data, params["anomalies"])

    staging = paths.data / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_station_files(staging, climates, dates, clean, observed, labels, data["test_days"])
        for name, target in (("train", paths.train_raw), ("test", paths.test_raw), ("truth", paths.truth)):
            target.parent.mkdir(parents=True, exist_ok=True)
            common.replace_folder(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outputs = sorted(p for folder in (paths.train_raw, paths.test_raw, paths.truth) for p in folder.glob("*.csv"))
    common.record_stage(paths, STAGE, params, [], outputs)

    counts = {kind: int((labels == kind).sum()) for kind in ANOMALY_KINDS}
    log.info("%d stations x %d days (%s to %s); anomalous days: %s", len(climates), len(dates),
             dates[0], dates[-1], ", ".join(f"{k} {v}" for k, v in counts.items()))
    log.info("wrote %s, %s, %s", paths.train_raw, paths.test_raw, paths.truth)


if __name__ == "__main__":
    raise SystemExit(common.run(STAGE, main, common.stage_parser(__doc__.splitlines()[0])))
