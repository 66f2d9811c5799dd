"""Stage 4: evaluate the saved model on the test period, against baselines, with a gate.

Nothing is fitted here. Forecasts are scored against up to three references,
named in every output: ``truth``, the simulated clean temperature of every test
day (simulation only); ``observed``, every reading of the test period, whatever
the detector thought of it; and, beside it and never instead of it,
``accepted``, the readings the detector did not flag.
Forecasts of every step ahead are scored, each by its step's model and band,
pooled and per step. Three baselines are scored on the same rows: persistence
(the last repaired reading), the station's climatology from its training years,
and drift (the last reading plus the station's mean training-years change per
step, times the step); stations never trained on have neither of the last two.
The anomaly detector's flags on test days are scored against the injected
labels. Each forecast comes with the prediction interval calibrated in
model_preparation.py; its coverage, width and pinball loss are
scored against every reference. The report lists the flagged readings of the
whole record, largest departure first.

Inputs:  data/test/features.csv, data/test/flags.csv, data/flagged.csv, data/truth/*.csv,
         models/scaler.joblib, models/model.joblib, models/model.json
Outputs: models/metrics.json, and a table on stdout; reports/ with summary.md,
         predictions.csv and PNG figures (see report.py); on passing the gate, a signed
         set of the scaler, detector, model, record and metrics becomes models/accepted
         (the set accepted before becomes models/previous; see registry.py).
Exit 3 when the model's MAE does not beat persistence's (the quality gate); the
accepted model is then left as it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from station_forecast import (
    cli,
    compute,
    errors,
    features,
    manifest,
    registry,
    report,
    runtime,
    storage,
)
from station_forecast.errors import PipelineError
from station_forecast.features import BASELINE_COLUMNS, FEATURES, SPREAD_COLUMN
from station_forecast.flags import FAULTS, INJECTED, Flag
from station_forecast.params import Params, load_params
from station_forecast.report import PREDICTORS
from station_forecast.runtime import log
from station_forecast.storage import Paths

np = runtime.lazy_import("numpy")
pd = runtime.lazy_import("pandas")

STAGE = "model_testing"
# What the stage loads when it runs (the scaler's and the default model's modules, the figures'): imported
# ahead by --wait-for-go, and its import floor in benchmark.py.
IMPORTS = ["numpy", "pandas", "sklearn.preprocessing", "sklearn.linear_model", "matplotlib.pyplot", "joblib"]
STATION_BLOCK = 200  # stations whose test rows are forecast by one task
TEST_COLUMNS = ["station", "date", "step", "target_date", "temp_today", *BASELINE_COLUMNS, SPREAD_COLUMN,
                *FEATURES]
FLAG_COLUMNS = ["station", "date", "observed", "flag"]
TRUTH_FILE_COLUMNS = ["date", *storage.TRUTH_COLUMNS]


def load_verified(paths: Paths) -> tuple:
    """The scaler and model, after checking both against the manifest, their signatures and each other."""
    manifest.verify_outputs_of(paths, "model_preprocessing",
                               [paths.test_features, paths.test_flags, paths.flagged, paths.scaler])
    manifest.verify_outputs_of(paths, "model_preparation", [paths.model, paths.model_record])
    record = storage.read_json(paths.model_record)
    if not isinstance(record, dict) or record.get("scaler_sha256") != storage.sha256_file(paths.scaler):
        raise PipelineError(f"{paths.model}: was trained with another scaler than {paths.scaler}; "
                            "rerun model_preparation.py")
    scaler = manifest.load_output(paths, "model_preprocessing", paths.scaler)
    bundle = manifest.load_output(paths, "model_preparation", paths.model)
    if list(getattr(scaler, "feature_names_in_", [])) != FEATURES or not isinstance(bundle, dict) \
            or bundle.get("features") != FEATURES or not isinstance(bundle.get("steps"), list):
        raise PipelineError(f"{paths.model}: built for other features than this code's; rerun the pipeline")
    return scaler, bundle, record


def load_truth(truth_dir, stations) -> pd.DataFrame | None:
    """Clean temperature, fault and weather event per station and day, or None without ground truth.

    Truth for some stations but not all is refused: scoring only part of the
    stations against it would silently change what the scores mean.
    """
    files = [truth_dir / f"{station}.csv" for station in stations]
    present = [f.exists() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = files[present.index(False)]
        raise PipelineError(f"{missing}: missing, while other stations have ground truth; rerun data_creation.py")
    together = storage.read_tables(files, TRUTH_FILE_COLUMNS)
    if together is not None:  # every file at once; a damaged one is found and named file by file
        table, rows = together
        table["station"] = pd.Series(np.repeat(np.array([f.stem for f in files], dtype=object), rows), dtype=str)
        if _truth_problem(table) is None:
            return table
    return pd.concat([_truth_file(f) for f in files], ignore_index=True)


def _truth_file(path) -> pd.DataFrame:
    table = storage.read_table(path, TRUTH_FILE_COLUMNS)
    problem = _truth_problem(table.assign(station=path.stem))
    if problem:
        raise PipelineError(f"{path}: damaged ground truth ({problem}); rerun data_creation.py")
    return table.assign(station=path.stem)


def _truth_problem(table: pd.DataFrame) -> str | None:
    """What is wrong with ground truth read from files (one station's days or several), or None."""
    allowed = {"anomaly": {"none", *INJECTED}, "event": {"none", "cold_snap", "heat_wave"}}
    if not pd.api.types.is_numeric_dtype(table["clean_temperature"]):
        return "clean_temperature is not numeric"
    days = pd.to_datetime(table["date"], format="%Y-%m-%d", errors="coerce")
    if days.isna().any() or _repeats_a_day(table["station"], days.to_numpy().view("i8")):
        return "dates are not unique YYYY-MM-DD days"
    for column, values in allowed.items():
        unknown = set(table[column].unique()) - values
        if unknown:
            return f"unknown {column} label {sorted(map(str, unknown))[0]!r}"
    return None


def _repeats_a_day(station: pd.Series, days: np.ndarray) -> bool:
    """Whether some station has a day twice. Where each station's rows are one block in date order, as
    data_creation.py writes them, one pass over the rows tells (a network's truth: 1 s less at 1,000
    stations than comparing all rows); otherwise all rows are compared."""
    codes, names = pd.factorize(station)
    starts = np.r_[True, codes[1:] != codes[:-1]]
    if starts.sum() == len(names) and (np.diff(days)[~starts[1:]] > 0).all():
        return False
    return bool(pd.DataFrame({"station": codes, "day": days}).duplicated().any())


def score(actual: np.ndarray, predicted: np.ndarray) -> dict:
    error = predicted - actual
    total = np.sum((actual - actual.mean()) ** 2)
    return {
        "n": len(actual),
        "mae": round(float(np.mean(np.abs(error))), 4),
        "rmse": round(float(np.sqrt(np.mean(error**2))), 4),
        "r2": round(float(1 - np.sum(error**2) / total), 4) if total > 0 else None,
    }


def forecast_scores(frame: pd.DataFrame, actual: str) -> dict:
    """Scores of every predictor against ``actual``: overall, by station group, per station.

    Within a group every predictor is scored on the same rows; climatology only
    where it exists (stations seen in training), so its group leaves the others out.
    """
    rows = frame.dropna(subset=[actual])
    result = {group: {p: score(part[actual].to_numpy(), part[p].to_numpy()) for p in predictors}
              for group, (part, predictors) in station_groups(rows).items() if len(part)}
    result["per_station"] = {
        station: {p: score(part[actual], part[p]) for p in PREDICTORS if not np.isnan(part[p]).any()}
        for station, part in by_station(rows, [actual, *PREDICTORS])
    }
    return result


def station_groups(rows: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, list[str]]]:
    """The groups of rows scored, each with the predictors scored on it. Climatology and drift exist only for
    stations seen in training: with held-out stations, all stations are scored on model and persistence,
    and the trained and held-out ones apart; without, all stations on every predictor (a trained group
    would repeat it)."""
    trained = rows[BASELINE_COLUMNS].notna().all(axis=1)
    if trained.all():
        return {"all_stations": (rows, PREDICTORS)}
    return {"all_stations": (rows, ["model", "persistence"]), "trained_stations": (rows[trained], PREDICTORS),
            "holdout_stations": (rows[~trained], ["model", "persistence"])}


def by_station(rows: pd.DataFrame, columns: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Each station's values of ``columns`` as arrays, stations by name, rows in their order: what
    ``groupby("station")`` gives, without making a table per station (most of the scoring time at a
    thousand stations)."""
    codes, names = pd.factorize(rows["station"], sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    arrays = {column: rows[column].to_numpy(dtype=float)[order] for column in columns}
    for i, name in enumerate(names):
        yield name, {column: values[bounds[i]:bounds[i + 1]] for column, values in arrays.items()}


def pinball_loss(actual: np.ndarray, quantile: np.ndarray, alpha: float) -> float:
    """The mean quantile (pinball) loss of forecasting the ``alpha`` quantile; scikit-learn's
    ``mean_pinball_loss``, without its input checks, which cost more than the sum at a thousand stations."""
    diff = actual - quantile
    above = (diff >= 0).astype(diff.dtype)
    return float(np.mean(alpha * above * diff - (1 - alpha) * (1 - above) * diff))


def interval_score(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float) -> dict:
    """Coverage, mean width and pinball loss of a central ``level`` interval.

    The pinball loss is the mean of the two bounds' quantile losses; lower is
    better, and it punishes both a band that misses and one that is too wide.
    """
    tail = (1 - level) / 2
    pinball = (pinball_loss(actual, lower, tail) + pinball_loss(actual, upper, 1 - tail)) / 2
    return {
        "n": len(actual),
        "coverage": round(float(np.mean((actual >= lower) & (actual <= upper))), 4),
        "below": round(float(np.mean(actual < lower)), 4),
        "above": round(float(np.mean(actual > upper)), 4),
        "width": round(float(np.mean(upper - lower)), 4),
        "pinball": round(float(pinball), 4),
    }


def interval_scores(frame: pd.DataFrame, actual: str, level: float) -> dict:
    """Interval scores of the model's and persistence's bands, overall, by group and per station."""
    rows = frame.dropna(subset=[actual])

    def both(part: pd.DataFrame) -> dict:
        y = part[actual].to_numpy()
        return {p: interval_score(y, part[f"{p}_lower"].to_numpy(), part[f"{p}_upper"].to_numpy(), level)
                for p in ("model", "persistence")}

    result = {group: both(part) for group, (part, _) in station_groups(rows).items() if len(part)}
    result["per_station"] = {
        station: interval_score(part[actual], part["model_lower"], part["model_upper"], level)
        for station, part in by_station(rows, [actual, "model_lower", "model_upper"])
    }
    return result


def detector_scores(flags: pd.DataFrame) -> dict:
    """Point-wise precision, recall and F1 of the flags against the injected labels.

    Missing days are left out (they are known, not detected). For one kind,
    precision counts only flags on days of that kind or on normal days, so other
    kinds' anomalies neither help nor hurt it.
    """
    days = flags[flags["anomaly"] != "missing"]
    flagged = days["flag"].isin(FAULTS).to_numpy()

    def prf(positive: np.ndarray, considered: np.ndarray) -> dict:
        tp = int((flagged & positive & considered).sum())
        n_flagged, n_positive = int((flagged & considered).sum()), int((positive & considered).sum())
        precision = tp / n_flagged if n_flagged else None
        recall = tp / n_positive if n_positive else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        return {"days": n_positive, "flagged": n_flagged, "precision": _round(precision),
                "recall": _round(recall), "f1": _round(f1)}

    label = days["anomaly"].to_numpy()
    normal = label == "none"
    result = {"any": prf(~normal, np.ones_like(normal))}
    for kind in INJECTED:
        if kind != "missing":
            result[kind] = prf(label == kind, normal | (label == kind))
    weather = normal & (days["event"] != "none").to_numpy()
    result["weather_events"] = {"days": int(weather.sum()), "flagged": int((flagged & weather).sum()),
                                "share": _round(float((flagged & weather).mean() / weather.mean()))
                                if weather.any() else None}
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def predictions(test: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame | None, bundle: dict,
                pool: compute.Pool | None = None) -> pd.DataFrame:
    """Every test row with the forecasts of the model and the baselines, the model's and persistence's
    bands, the reading and its flag, and, with ground truth, the clean value and the injected anomaly.

    Each row is forecast by the model of its step ahead, with that step's band.
    Baselines: persistence (the last reading), climatology (the training-years
    seasonal mean) and drift (the last reading plus the station's mean change
    per step in training, times the step). The model's forecasts are made in
    blocks of stations on ``pool``.
    """
    frame = test.assign(model=np.nan, persistence=test["temp_today"],
                        drift=test["temp_today"] + test["step"] * test["drift"])
    for band in ("model_lower", "model_upper", "persistence_lower", "persistence_upper"):
        frame[band] = np.nan
    by_step = {entry["step"]: entry for entry in bundle["steps"]}
    unknown = sorted(set(frame["step"].astype(int)) - set(by_step))
    if unknown:
        raise PipelineError(f"test rows {unknown[0]} steps ahead, but the model has no forecaster for that step; "
                            "rerun the pipeline")
    frame["model"] = model_forecasts(frame, bundle, pool or runtime.Threads())
    for step, rows in frame.groupby("step").groups.items():
        entry = by_step[int(step)]
        part = frame.loc[rows]
        bands = {"model": entry["interval"], **entry["baseline_intervals"]}
        for predictor, band in bands.items():
            frame.loc[rows, f"{predictor}_lower"] = frame.loc[rows, predictor] + band["lower"] * part[SPREAD_COLUMN]
            frame.loc[rows, f"{predictor}_upper"] = frame.loc[rows, predictor] + band["upper"] * part[SPREAD_COLUMN]
    observed = flags.rename(columns={"date": "target_date"})[["station", "target_date", "observed", "flag"]]
    frame = frame.merge(observed, on=["station", "target_date"], how="left", validate="many_to_one")
    if truth is not None:
        truth = truth.rename(columns={"date": "target_date"})
        frame = frame.merge(truth, on=["station", "target_date"], how="left", validate="many_to_one")
    frame["observed_accepted"] = frame["observed"].where(frame["flag"] == Flag.NONE)
    return frame


def model_forecasts(test: pd.DataFrame, bundle: dict, pool: compute.Pool) -> np.ndarray:
    """The model's forecast of every test row, by the model of its step, ``STATION_BLOCK`` stations at a time."""
    block = pd.factorize(test["station"])[0] // STATION_BLOCK
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(block.max(initial=-1) + 2))
    rows = [order[begin:end] for begin, end in itertools.pairwise(bounds)]
    columns = test.columns.get_indexer(["step", "temp_today", *FEATURES])
    done = pool.map(forecast_block, runtime.OnDemand(lambda i: test.iloc[rows[i], columns], len(rows)),
                    what="forecast blocks",
                    estimators={entry["step"]: entry["estimator"] for entry in bundle["steps"]})
    forecasts = np.full(len(test), np.nan)
    for r, values in zip(rows, done, strict=True):
        forecasts[r] = values
    return forecasts


def forecast_block(rows: pd.DataFrame, estimators: dict) -> np.ndarray:
    """``features.forecast`` of each row by the estimator of its step."""
    step = rows["step"].to_numpy()
    forecasts = np.full(len(rows), np.nan)
    for ahead, estimator in estimators.items():
        chosen = step == ahead
        if chosen.any():
            forecasts[chosen] = features.forecast(estimator, rows[chosen])
    return forecasts


def evaluate(frame: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame | None, level: float) -> dict:
    metrics: dict = {"forecast": {}, "interval": {"level": level}, "stations": int(frame["station"].nunique())}
    references = ["truth", "observed", "accepted"] if truth is not None else ["observed", "accepted"]
    if truth is not None:
        labelled = flags.merge(truth, on=["station", "date"], how="left")
        metrics["detector"] = detector_scores(labelled)
    else:
        metrics["detector"] = {"skipped": "no ground-truth labels for these stations"}
    for reference in references:
        column = report.REFERENCE_COLUMNS[reference]
        metrics["forecast"][reference] = forecast_scores(frame, column)
        metrics["interval"][reference] = interval_scores(frame, column, level)
    metrics["gate_reference"] = "truth" if truth is not None else "observed"
    metrics["by_step"] = step_scores(frame, metrics["gate_reference"], level)
    return metrics


def step_scores(frame: pd.DataFrame, reference: str, level: float) -> dict:
    """Per step ahead, against ``reference``: the scores of the model and every baseline on the same rows
    (stations seen in training, where every baseline exists), and the model's and persistence's bands."""
    column = report.REFERENCE_COLUMNS[reference]
    rows = frame.dropna(subset=[column])
    rows = rows[rows[BASELINE_COLUMNS].notna().all(axis=1).to_numpy()]
    result = {}
    for step, part in rows.groupby("step"):
        actual = part[column].to_numpy()
        result[str(int(step))] = {
            "forecast": {p: score(actual, part[p].to_numpy()) for p in PREDICTORS},
            "interval": {p: interval_score(actual, part[f"{p}_lower"].to_numpy(), part[f"{p}_upper"].to_numpy(),
                                           level) for p in ("model", "persistence")},
        }
    return result


def gate(metrics: dict, min_improvement: float) -> tuple[bool, str]:
    overall = metrics["forecast"][metrics["gate_reference"]]["all_stations"]
    model, persistence = overall["model"]["mae"], overall["persistence"]["mae"]
    limit = persistence * (1 - min_improvement)
    verdict = (f"model MAE {model:.3f} vs persistence {persistence:.3f} "
               f"({metrics['gate_reference']} reference; must be below {limit:.3f})")
    return model < limit, verdict


def write_report(paths: Paths, frame: pd.DataFrame, metrics: dict, source: dict, evaluation: dict,
                 flagged: pd.DataFrame) -> None:
    """reports/: summary.md, predictions.csv and the figures, swapped in as one folder."""
    staged = paths.reports.with_name(".reports.new")
    storage.remove_tree(staged)
    staged.mkdir(parents=True)
    try:
        names = report.figure_names(frame, evaluation["report_stations"])
        report.write_figures(staged, frame, metrics, names)
        storage.write_csv(staged / "predictions.csv", report.predictions_table(frame))
        summary = report.summary_markdown(metrics, source, names, evaluation["interval_tolerance"],
                                          report.largest_flags(flagged, evaluation["report_flags"]))
        storage.write_bytes(staged / "summary.md", summary.encode())
        storage.replace_folder(staged, paths.reports)
    finally:
        storage.remove_tree(staged)
    log.info("wrote %s (summary.md, predictions.csv, %d figures)", paths.reports, len(names))


def main(args) -> None:
    paths = Paths(args.root)
    if args.restore:
        registry.restore_previous(paths)
        return
    params: Params = load_params(args.params)
    with compute.pool(params["compute"]["scheduler"], paths.root) as pool:
        _, bundle, record = load_verified(paths)
        test = storage.read_table(paths.test_features, TEST_COLUMNS)
        flags = storage.read_table(paths.test_flags, FLAG_COLUMNS)
        manifest.verify_outputs_of(paths, "data_creation", storage.station_files(paths.truth))
        truth = load_truth(paths.truth, sorted(test["station"].unique()))
        if truth is not None:  # checked whole; only the test period's days are scored
            truth = truth[(truth["date"] >= flags["date"].min()).to_numpy()].reset_index(drop=True)
        frame = predictions(test, flags, truth, bundle, pool)
    source = storage.read_json(paths.source_record) if paths.source_record.exists() else {}
    metrics = evaluate(frame, flags, truth, bundle["steps"][0]["interval"]["level"])
    metrics.update(frequency=source.get("frequency", "daily"), horizon=len(bundle["steps"]))
    passed, verdict = gate(metrics, params["evaluation"]["gate_min_improvement"])
    metrics.update(model=record["chosen"], gate={"passed": passed, "verdict": verdict},
                   model_sha256=storage.sha256_file(paths.model))
    storage.write_json(paths.metrics, metrics)
    flagged = storage.read_table(paths.flagged, report.FLAGGED_COLUMNS, allow_empty=True)
    write_report(paths, frame, metrics, source, params["evaluation"], flagged)
    print(report.console_table(metrics, source))
    inputs = [paths.test_features, paths.test_flags, paths.flagged, paths.scaler, paths.model, paths.model_record,
              *storage.station_files(paths.truth)]
    outputs = [paths.metrics, *sorted(paths.reports.iterdir())]
    if not passed:
        manifest.record_stage(paths, STAGE, params, inputs, outputs, gate_passed=False)
        raise errors.GateFailed(f"quality gate failed: {verdict}; {paths.accepted} keeps the last accepted model")
    signatures = {**manifest.stage_entry(paths, "model_preprocessing")["signatures"],
                  **manifest.stage_entry(paths, "model_preparation")["signatures"]}
    registry.accept(paths, {path: signatures.get(manifest.relative(paths, path))
                            for path in (paths.scaler, paths.model)})
    links = [paths.accepted, paths.previous]  # the sets they point to: what is accepted is an output too
    sets = [paths.sets / name for name in (registry.set_of(paths, link) for link in links) if name]
    manifest.record_stage(paths, STAGE, params, inputs,
                          [*outputs, *(file for folder in sets for file in sorted(folder.iterdir()))],
                          gate_passed=True, folders=[paths.truth, paths.reports, paths.sets, *sets], links=links)
    log.info("quality gate passed: %s; accepted into %s", verdict, paths.accepted)


def parser():
    parser = cli.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--restore", action="store_true",
                        help="swap models/accepted with models/previous (undo the last acceptance) and exit")
    return parser


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, parser(), imports=IMPORTS))
