"""Stage 2: validate the station files, flag and repair anomalies, build scaled features.

Every reading is compared with the median of the ``window`` days before it; the
robust scale of that difference is learned per station on training days only, and
a day whose robust z-score exceeds ``threshold`` is flagged, as is a reading
repeated ``stuck_run`` times in a row. Flagged and missing days are repaired with
that trailing median. Everything is causal: a day's flag, repair and features use
only that day and earlier ones, never the next day that is being forecast.

Inputs:  data/train/raw/*.csv, data/test/raw/*.csv (date, temperature)
Outputs: data/{train,test}/features.csv  one row per station and forecast day
         data/{train,test}/flags.csv     the detector's verdict on every calendar day
         models/scaler.joblib            StandardScaler fitted on training features
         models/detector.json            the detector's settings learned on training days
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import common
from common import FEATURES, SPREAD_COLUMN, Params, Paths, PipelineError, log

STAGE = "model_preprocessing"
RAW_COLUMNS = ["date", "temperature"]
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
CLIMATOLOGY_HARMONICS = 3


# ------------------------------------------------------------------------ validation


def read_station_csv(path: Path, min_temp: float, max_temp: float) -> pd.DataFrame:
    """Read one raw station file, or raise PipelineError naming the file, line and problem.

    An empty temperature field is a missing reading; anything else must be a
    finite number in [min_temp, max_temp]. Dates must be unique YYYY-MM-DD days.
    """
    text = common.read_text_file(path)
    header = text.splitlines()[0].strip()
    columns = [c.strip() for c in header.split(",")]
    if any(sep in header for sep in (";", "\t", "|")) and len(columns) == 1:
        raise PipelineError(f"{path}: wrong delimiter in header {header!r}; fields must be separated by commas")
    for column in RAW_COLUMNS:
        if column not in columns:
            raise PipelineError(f"{path}: missing column {column!r} (header is {header!r})")
    extra = [c for c in columns if c not in RAW_COLUMNS]
    if extra:
        log.warning("%s: ignoring unexpected column(s) %s", path, ", ".join(map(repr, extra)))
    if not text.endswith("\n"):
        raise PipelineError(f"{path}: last line has no line ending; the file looks truncated")
    separators = pd.Series(text.splitlines()).str.count(",")
    short = ((separators < separators.iat[0]) & (separators.index > 0)).to_numpy()
    if short.any():
        raise PipelineError(f"{path}: line {short.argmax() + 1} has too few fields; the file looks truncated")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: malformed CSV ({str(exc).strip()})") from None
    if table.empty:
        raise PipelineError(f"{path}: header only, no data rows")
    line = pd.RangeIndex(2, len(table) + 2)  # line 1 is the header
    return pd.DataFrame({
        "date": _parse_dates(path, table["date"], line),
        "temperature": _parse_temperatures(path, table["temperature"], line, min_temp, max_temp),
    }).sort_values("date", ignore_index=True)


def _parse_dates(path: Path, text: pd.Series, line: pd.RangeIndex) -> pd.Series:
    dates = pd.to_datetime(text.str.strip(), format="%Y-%m-%d", errors="coerce")
    bad = dates.isna().to_numpy()
    if bad.any():
        i = bad.argmax()
        raise PipelineError(f"{path}: line {line[i]}: date {text.iloc[i]!r} is not a YYYY-MM-DD date")
    duplicated = dates.duplicated().to_numpy()
    if duplicated.any():
        i = duplicated.argmax()
        first = (dates == dates.iloc[i]).to_numpy().argmax()
        raise PipelineError(f"{path}: line {line[i]}: duplicate date {text.iloc[i]} (also on line {line[first]})")
    return dates


def _parse_temperatures(path: Path, text: pd.Series, line: pd.RangeIndex,
                        min_temp: float, max_temp: float) -> pd.Series:
    stripped = text.str.strip()
    values = pd.to_numeric(stripped.replace("", np.nan), errors="coerce").astype(float)
    not_number = (values.isna() & (stripped != "")).to_numpy()
    if not_number.any():
        i = not_number.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {text.iloc[i]!r} is not a number "
                            "(leave the field empty for a missing reading)")
    infinite = np.isinf(values.to_numpy())
    if infinite.any():
        i = infinite.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {text.iloc[i]!r} is not finite")
    impossible = ((values < min_temp) | (values > max_temp)).to_numpy()
    if impossible.any():
        i = impossible.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {values.iloc[i]:g} °C is outside the "
                            f"possible range [{min_temp:g}, {max_temp:g}]")
    return values


def load_stations(train_dir: Path, test_dir: Path, pre: dict) -> pd.DataFrame:
    """All raw files as one long table: station, date, temperature, split."""
    if not test_dir.is_dir():
        raise PipelineError(f"{test_dir}: input folder not found; run data_creation.py first")
    if not train_dir.is_dir():
        raise PipelineError(f"{train_dir}: input folder not found; run data_creation.py first")
    parts = []
    for split, folder in (("train", train_dir), ("test", test_dir)):
        for path in sorted(folder.glob("*.csv")):
            table = read_station_csv(path, pre["min_temp"], pre["max_temp"])
            parts.append(table.assign(station=path.stem, split=split, source=str(path)))
    if not any(p["split"].iat[0] == "train" for p in parts):
        raise PipelineError(f"{train_dir}: no station CSVs to train on")
    frame = pd.concat(parts, ignore_index=True)
    _check_station_periods(frame, pre["min_days"])
    return frame.drop(columns="source")


def _check_station_periods(frame: pd.DataFrame, min_days: int) -> None:
    by_split = frame.groupby(["station", "split"])["date"].agg(["min", "max"]).unstack("split")
    if "test" in by_split:
        overlap = by_split[("max", "train")] >= by_split[("min", "test")]
        if overlap.any():
            station = overlap.idxmax()
            raise PipelineError(f"station {station}: training dates reach into its test period; "
                                "the split must be in time order")
    observed = frame.dropna(subset=["temperature"])
    counts = observed.groupby("station").size().reindex(frame["station"].unique(), fill_value=0)
    if (counts < min_days).any():
        station = counts.idxmin()
        source = frame.loc[frame["station"] == station, "source"].iat[0]
        raise PipelineError(f"{source}: station {station} has only {counts[station]} observed days; "
                            f"at least preprocessing.min_days = {min_days} are needed to build features")


# ------------------------------------------------------------------------- detection


def to_calendar(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide tables (date x station) of observed temperature and of period (train/test).

    Every station gets a complete daily calendar from its first to its last day;
    missing days are NaN. Outside a station's own period the period is "".
    """
    observed = frame.pivot(index="date", columns="station", values="temperature")
    observed = observed.asfreq("D")
    split = frame.pivot(index="date", columns="station", values="split").reindex(observed.index)
    # A missing day belongs to the period of the day before it; days before a
    # station's first or after its last day belong to none.
    inside = split.ffill().notna() & split.bfill().notna()
    return observed, split.ffill().where(inside, "")


def trailing_residuals(observed: pd.DataFrame, window: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each reading minus the median of the ``window`` days before it, and that median."""
    reference = observed.shift(1).rolling(window, min_periods=window // 2).median()
    return observed - reference, reference


def learn_detector(observed: pd.DataFrame, split: pd.DataFrame, pre: dict) -> dict:
    """Learn the robust scale of the trailing residual per station, on training days only."""
    residual, _ = trailing_residuals(observed, pre["window"])
    train_residual = residual.where(split == "train")
    centred = train_residual - train_residual.median()
    scale = MAD_TO_SD * centred.abs().median()
    scale = scale.dropna()
    if scale.empty or (scale <= 0).any():
        raise PipelineError("training data too short or too constant to learn the anomaly detector's scale")
    return {
        "window": pre["window"],
        "threshold": pre["threshold"],
        "stuck_run": pre["stuck_run"],
        "scale": {station: round(float(v), 6) for station, v in scale.items()},
        # A station never seen in training gets the typical training station's scale.
        "default_scale": round(float(scale.median()), 6),
    }


def detect(observed: pd.DataFrame, detector: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Flag each day (none, outlier, stuck, missing) and repair flagged and missing days.

    Returns flags, repaired values and robust z-scores, each date x station.
    """
    residual, reference = trailing_residuals(observed, detector["window"])
    scale = pd.Series(detector["scale"]).reindex(observed.columns).fillna(detector["default_scale"])
    z = residual / scale
    outlier = z.abs() > detector["threshold"]
    same = observed.diff().eq(0)
    # Length of the current run of repeats: a cumulative count that restarts at every change.
    run = same.cumsum() - same.cumsum().where(~same).ffill().fillna(0)
    stuck = run >= detector["stuck_run"] - 1
    missing = observed.isna()
    flags = pd.DataFrame(np.select([missing, stuck, outlier], ["missing", "stuck", "outlier"], "none"),
                         index=observed.index, columns=observed.columns)
    repaired = observed.where(flags == "none", reference)
    return flags, repaired, z


# -------------------------------------------------------------------------- features


def day_of_year_terms(dates: pd.DatetimeIndex) -> tuple[np.ndarray, np.ndarray]:
    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    return np.sin(angle), np.cos(angle)


def fit_climatology(values: pd.DataFrame) -> pd.DataFrame:
    """Per station, least-squares coefficients of a mean plus yearly harmonics."""
    design = _harmonic_design(values.index)
    coefs = {}
    for station in values.columns:
        ok = values[station].notna().to_numpy()
        if ok.sum() >= 2 * design.shape[1]:
            coefs[station] = np.linalg.lstsq(design[ok], values[station].to_numpy()[ok], rcond=None)[0]
    return pd.DataFrame(coefs)


def climatology_at(coefs: pd.DataFrame, dates: pd.DatetimeIndex, stations: pd.Index) -> pd.DataFrame:
    table = pd.DataFrame(_harmonic_design(dates) @ coefs.to_numpy(), index=dates, columns=coefs.columns)
    return table.reindex(columns=stations)


def _harmonic_design(dates: pd.DatetimeIndex) -> np.ndarray:
    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    terms = [np.ones(len(dates))]
    for k in range(1, CLIMATOLOGY_HARMONICS + 1):
        terms += [np.sin(k * angle), np.cos(k * angle)]
    return np.column_stack(terms)


def build_features(observed: pd.DataFrame, split: pd.DataFrame, flags: pd.DataFrame,
                   repaired: pd.DataFrame) -> pd.DataFrame:
    """One row per station and forecast day t with the features for forecasting day t+1.

    Features use days up to t only. ``target`` is the repaired reading of t+1;
    ``target_ok`` says it was really observed and not flagged (only such rows are
    trained on). ``climatology`` is the station's training-years seasonal mean for
    t+1 (empty for stations never trained on), the climatology baseline.
    ``change_sd60`` is the spread of recent day-to-day changes, which scales the
    prediction interval.
    """
    dates = repaired.index
    wide = {
        "temp_lag0": repaired,
        "temp_lag1": repaired.shift(1),
        "temp_lag2": repaired.shift(2),
        "temp_lag3": repaired.shift(3),
        "temp_mean7": repaired.rolling(7).mean(),
        "temp_mean30": repaired.rolling(30, min_periods=20).mean(),
        "temp_std7": repaired.rolling(7).std(),
        "temp_trend7": repaired.rolling(7).mean() - repaired.shift(7).rolling(7).mean(),
        "repaired_today": (flags != "none").astype(float).where(split != ""),
        SPREAD_COLUMN: repaired.diff().rolling(60, min_periods=20).std(),
        "target": repaired.shift(-1),
        "target_ok": (flags.shift(-1) == "none").astype(float),
        "period": split.shift(-1),
    }
    train_values = observed.where((split == "train") & (flags == "none"))
    target_dates = dates + pd.Timedelta(days=1)
    wide["climatology"] = pd.DataFrame(
        climatology_at(fit_climatology(train_values), target_dates, observed.columns).to_numpy(),
        index=dates, columns=observed.columns)
    long = pd.DataFrame({name: table.stack(future_stack=True) for name, table in wide.items()})
    long.index.names = ["date", "station"]
    long = long.reset_index()
    sin, cos = day_of_year_terms(pd.DatetimeIndex(long["date"]) + pd.Timedelta(days=1))
    long["doy_sin"], long["doy_cos"] = sin, cos
    long["target_date"] = long["date"] + pd.Timedelta(days=1)
    long["temp_today"] = long["temp_lag0"]
    usable = long[[*FEATURES, SPREAD_COLUMN]].notna().all(axis=1) & long["period"].isin(["train", "test"])
    long = long[usable & long["target"].notna()]
    columns = ["station", "date", "target_date", "period", "temp_today", "target", "target_ok",
               "climatology", SPREAD_COLUMN, *FEATURES]
    return long[columns].sort_values(["station", "date"], ignore_index=True)


def fit_scaler(train: pd.DataFrame):
    """StandardScaler on the training features only."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(train[FEATURES])


def flags_table(observed: pd.DataFrame, split: pd.DataFrame, flags: pd.DataFrame,
                repaired: pd.DataFrame, z: pd.DataFrame) -> pd.DataFrame:
    wide = {"period": split, "observed": observed, "repaired": repaired, "flag": flags, "z": z.round(3)}
    long = pd.DataFrame({name: table.stack(future_stack=True) for name, table in wide.items()})
    long.index.names = ["date", "station"]
    long = long.reset_index()
    return long[long["period"] != ""][["station", "date", "period", "observed", "repaired", "flag", "z"]] \
        .sort_values(["station", "date"], ignore_index=True)


def _format_dates(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in ("date", "target_date"):
        if column in out:
            out[column] = out[column].dt.strftime("%Y-%m-%d")
    return out


def main(args) -> None:
    params: Params = common.load_params(args.params)
    paths = Paths(args.root)
    pre = params["preprocessing"]
    raw_files = sorted([*paths.train_raw.glob("*.csv"), *paths.test_raw.glob("*.csv")])
    frame = load_stations(paths.train_raw, paths.test_raw, pre)
    common.verify_outputs_of(paths, "data_creation", raw_files)

    observed, split = to_calendar(frame)
    detector = learn_detector(observed, split, pre)
    flags, repaired, z = detect(observed, detector)
    features = build_features(observed, split, flags, repaired)
    train = features[features["period"] == "train"].reset_index(drop=True)
    test = features[features["period"] == "test"].reset_index(drop=True)
    if train.empty or test.empty:
        raise PipelineError(f"no {'training' if train.empty else 'test'} rows left after building features; "
                            "the stations are too short for the feature windows")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scaler = fit_scaler(train)
    train[FEATURES] = scaler.transform(train[FEATURES])
    test[FEATURES] = scaler.transform(test[FEATURES])

    all_flags = flags_table(observed, split, flags, repaired, z)
    outputs = {
        paths.train_features: _format_dates(train.drop(columns="period")),
        paths.test_features: _format_dates(test.drop(columns="period")),
        paths.train_flags: _format_dates(all_flags[all_flags["period"] == "train"].drop(columns="period")),
        paths.test_flags: _format_dates(all_flags[all_flags["period"] == "test"].drop(columns="period")),
    }
    for path, table in outputs.items():
        common.write_csv(path, table)
    common.write_joblib(paths.scaler, scaler)
    common.write_json(paths.detector, detector)
    common.record_stage(paths, STAGE, params, raw_files, [*outputs, paths.scaler, paths.detector])

    counts = all_flags["flag"].value_counts()
    log.info("%d stations; flagged days: %s", observed.shape[1],
             ", ".join(f"{k} {counts.get(k, 0)}" for k in ("outlier", "stuck", "missing")))
    log.info("features: %d training rows, %d test rows; scaler fitted on the training rows", len(train), len(test))


if __name__ == "__main__":
    raise SystemExit(common.run(STAGE, main, common.stage_parser(__doc__.splitlines()[0])))
