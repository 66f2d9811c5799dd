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
from typing import Any

from station_forecast import (
    cli,
    compute,
    errors,
    features,
    manifest,
    registry,
    report,
    runtime,
    scoring,
    spill,
    storage,
)
from station_forecast.errors import PipelineError
from station_forecast.features import BASELINE_COLUMNS, FEATURES, SPREAD_COLUMN
from station_forecast.flags import INJECTED, Flag
from station_forecast.params import Params, load_params
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


TRUTH_FILES_PER_BATCH = 256  # truth files parsed at a time: a large network's whole truth is never held at once


def load_truth(truth_dir, stations, since: str | None = None) -> pd.DataFrame | None:
    """Clean temperature, fault and weather event per station and day from ``since`` on (every day without it),
    or None without ground truth. Every file is checked whole.

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
    return pd.concat([_truth_batch(files[begin:begin + TRUTH_FILES_PER_BATCH], since)
                      for begin in range(0, len(files), TRUTH_FILES_PER_BATCH)], ignore_index=True)


def _truth_batch(files: list, since: str | None) -> pd.DataFrame:
    together = storage.read_tables(files, TRUTH_FILE_COLUMNS)
    table = None
    if together is not None:  # the batch's files at once; a damaged one is found and named file by file
        table, rows = together
        table["station"] = pd.Series(np.repeat(np.array([f.stem for f in files], dtype=object), rows), dtype=str)
        table = table if _truth_problem(table) is None else None
    if table is None:
        table = pd.concat([_truth_file(f) for f in files], ignore_index=True)
    return table if since is None else table[(table["date"] >= since).to_numpy()]


def _truth_file(path) -> pd.DataFrame:
    table = storage.read_table(path, TRUTH_FILE_COLUMNS)
    problem = _truth_problem(table.assign(station=path.stem))
    if problem:
        raise PipelineError(f"{path}: damaged ground truth ({problem}); rerun data_creation.py")
    return table.assign(station=path.stem)


def _truth_problem(table: pd.DataFrame) -> str | None:
    """What is wrong with ground truth read from files (one station's days or several), or None."""
    allowed = {"anomaly": {"none", *INJECTED}, "event": {"none", "cold_snap", "heat_wave", "front"}}
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



# Test rows read, forecast and scored at a time (whole stations), then let go: about 700 stations x 365 days. At
# 1,000 x 10 the stage's peak was the same as scoring all the rows in one piece (567 against 559 MB); in blocks
# of 2^19 rows (one block there) it was 636 MB.
TEST_BATCH_ROWS = 1 << 18
SPILL_BYTES = spill.LIMIT_BYTES  # the predictions table's blocks are kept on disk past this size
SPILL_FOLDER = ".predictions.spill"  # in data/, removed when the stage ends


def forecasts_by_stations(path, bundle: dict, pool: compute.Pool) -> Iterator[pd.DataFrame]:
    """The test rows of ``path`` about ``TEST_BATCH_ROWS`` at a time, whole stations each time, every row without
    its features and with the model's forecast ("model"): the test table is never held whole."""
    none = True
    for batch in storage.read_station_batches(path, TEST_COLUMNS, TEST_BATCH_ROWS):
        unknown = sorted(set(batch["step"].astype(int)) - {entry["step"] for entry in bundle["steps"]})
        if unknown:
            raise PipelineError(f"test rows {unknown[0]} steps ahead, but the model has no forecaster for that "
                                "step; rerun the pipeline")
        batch["model"] = model_forecasts(batch, bundle, pool)
        none = False
        yield batch.drop(columns=FEATURES)
    if none:
        raise PipelineError(f"{path}: no data rows")


class FlagsByStation:
    """The test days' flags of ``path`` (rows station by station, in name order, as the features are), handed
    out a block of stations at a time."""

    def __init__(self, path) -> None:
        self.path = path
        self._batches = storage.read_station_batches(path, FLAG_COLUMNS, TEST_BATCH_ROWS)
        self._held: pd.DataFrame | None = None
        self.rows = 0

    def up_to(self, last: str | None) -> pd.DataFrame:
        """The rows not handed out yet of the stations up to ``last`` by name; with None, all that are left."""
        taken = []
        while True:
            if self._held is None:
                self._held = next(self._batches, None)
                if self._held is None:
                    break
            station = self._held["station"].to_numpy(dtype=object)
            within = len(station) if last is None else int(np.searchsorted(station, last, side="right"))
            taken.append(self._held.iloc[:within])
            if within < len(station):
                self._held = self._held.iloc[within:]
                break
            self._held = None
        flags = pd.concat(taken, ignore_index=True) if taken else pd.DataFrame(
            {"station": pd.Series(dtype=object), "date": pd.Series(dtype=object), "observed": pd.Series(dtype=float),
             "flag": pd.Series(dtype=object)})
        self.rows += len(flags)
        return flags


def score_test_period(paths: Paths, bundle: dict, pool: compute.Pool, evaluation: dict
                      ) -> tuple[dict, report.FigureRows, spill.Blocks]:
    """Forecast and score the test period a block of whole stations at a time: its metrics, what the figures
    are drawn from, and the predictions table in its blocks (on disk past ``SPILL_BYTES``; the caller
    closes them). The flags of a station without test rows are scored with the block before them."""
    level = bundle["steps"][0]["interval"]["level"]
    flags = FlagsByStation(paths.test_flags)
    kept = spill.Blocks(paths.data / SPILL_FOLDER, SPILL_BYTES)
    tally = figures = None
    try:
        for forecasts in forecasts_by_stations(paths.test_features, bundle, pool):
            block_flags = flags.up_to(forecasts["station"].iat[-1])
            truth = _block_truth(paths, forecasts["station"].unique(), block_flags, tally)
            if tally is None:
                tally = scoring.Tally(level, truth is not None)
                figures = report.FigureRows(evaluation["report_stations"], tally.gate_reference)
            frame = predictions(forecasts, block_flags, truth, bundle)
            tally.add_forecasts(frame)
            tally.add_detector(block_flags, truth)
            figures.add(frame)
            kept.add(_kept_columns(report.predictions_table(frame)))
        rest = flags.up_to(None)
        if len(rest):
            tally.add_detector(rest, _block_truth(paths, [], rest, tally))
        if not flags.rows:
            raise PipelineError(f"{paths.test_flags}: no data rows")
    except BaseException:
        kept.close()
        raise
    return tally.metrics(), figures, kept


def _kept_columns(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """A block of the predictions table as ``spill.Blocks`` keeps it: numbers copied out of the block's frame
    (a view would keep all of it), text as codes (a string object per row cost more than the numbers)."""
    columns: dict[str, np.ndarray] = {}
    for name, values in table.items():
        numeric = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values)
        columns.update({name: values.to_numpy(copy=True)} if numeric else spill.coded(name, values))
    return columns


def _block_truth(paths: Paths, forecast: Any, flags: pd.DataFrame, tally: scoring.Tally | None
                 ) -> pd.DataFrame | None:
    """The ground truth of a block's stations (those ``forecast`` and those flagged) from its first test day on,
    or None without ground truth; refused where some blocks have it and others not."""
    stations = sorted({*forecast, *flags["station"].unique()})
    truth = load_truth(paths.truth, stations, since=flags["date"].min() if len(flags) else None)
    if tally is not None and (truth is not None) != tally.truth:
        missing = paths.truth / f"{stations[0]}.csv" if truth is None else paths.truth
        raise PipelineError(f"{missing}: missing for some stations while others have ground truth; rerun "
                            "data_creation.py")
    return truth


def predictions(forecasts: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame | None, bundle: dict
                ) -> pd.DataFrame:
    """Every test row with the forecasts of the model (``forecasts_by_stations``) and the baselines, the model's and
    persistence's bands, the reading and its flag, and, with ground truth, the clean value and the injected
    anomaly.

    Each row is forecast by the model of its step ahead, with that step's band.
    Baselines: persistence (the last reading), climatology (the training-years
    seasonal mean) and drift (the last reading plus the station's mean change
    per step in training, times the step).
    """
    frame = forecasts.assign(persistence=forecasts["temp_today"],
                             drift=forecasts["temp_today"] + forecasts["step"] * forecasts["drift"])
    for band in ("model_lower", "model_upper", "persistence_lower", "persistence_upper"):
        frame[band] = np.nan
    by_step = {entry["step"]: entry for entry in bundle["steps"]}
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



def write_report(paths: Paths, figures: report.FigureRows, predicted: spill.Blocks, metrics: dict, source: dict,
                 evaluation: dict) -> None:
    """reports/: summary.md, predictions.csv and the figures, swapped in as one folder."""
    staged = paths.reports.with_name(".reports.new")
    storage.remove_tree(staged)
    staged.mkdir(parents=True)
    try:
        names = report.figure_names(figures.stations, figures.steps)
        report.write_figures(staged, figures, metrics, names)
        storage.write_csv_batches(staged / "predictions.csv",
                                  lambda: (pd.DataFrame(spill.decoded(block)) for block in predicted))
        summary = report.summary_markdown(metrics, source, names, evaluation["interval_tolerance"],
                                          largest_flags(paths.flagged, evaluation["report_flags"]))
        storage.write_bytes(staged / "summary.md", summary.encode())
        storage.replace_folder(staged, paths.reports, paths.replaced_whole[paths.reports])
    finally:
        storage.remove_tree(staged)
    log.info("wrote %s (summary.md, predictions.csv, %d figures)", paths.reports, len(names))


def largest_flags(path, n: int) -> pd.DataFrame:
    """``report.largest_flags`` of the table of flagged readings at ``path``, read a batch of rows at a time."""
    parts = [report.largest_flags(batch, n)
             for batch in storage.read_table_batches(path, report.FLAGGED_COLUMNS, TEST_BATCH_ROWS)]
    if not parts:
        return report.largest_flags(storage.read_table(path, report.FLAGGED_COLUMNS, allow_empty=True), n)
    return report.largest_flags(pd.concat(parts) if len(parts) > 1 else parts[0], n)


def main(args) -> None:
    """Evaluate, gate, and accept the model on passing; with ``--restore``, only ``restore``."""
    if args.restore:
        restore(args)
        return
    paths = Paths(args.root)
    params: Params = load_params(args.params)
    with compute.pool(params["compute"]["scheduler"], paths.root) as pool:
        _, bundle, record = load_verified(paths)
        manifest.verify_outputs_of(paths, "data_creation", storage.station_files(paths.truth))
        metrics, figures, predicted = score_test_period(paths, bundle, pool, params["evaluation"])
    try:
        source = storage.read_json(paths.source_record) if paths.source_record.exists() else {}
        metrics.update(frequency=source.get("frequency", "daily"), horizon=len(bundle["steps"]))
        passed, verdict = scoring.gate(metrics, params["evaluation"]["gate_min_improvement"])
        metrics.update(model=record["chosen"], gate={"passed": passed, "verdict": verdict},
                       model_sha256=storage.sha256_file(paths.model))
        storage.write_json(paths.metrics, metrics)
        write_report(paths, figures, predicted, metrics, source, params["evaluation"])
    finally:
        predicted.close()
    print(report.console_table(metrics, source))
    log_untrained(metrics, params["data"]["holdout_stations"])
    log_behind_climatology(metrics)
    inputs = [paths.test_features, paths.test_flags, paths.flagged, paths.scaler, paths.model, paths.model_record,
              *storage.station_files(paths.truth)]
    outputs = [paths.metrics, *sorted(paths.reports.iterdir())]
    if not passed:
        manifest.record_stage(paths, STAGE, params, inputs, outputs, gate_passed=False)
        aside = scoring.flagged_aside(metrics)
        raise errors.GateFailed(f"quality gate failed: {verdict}; {aside + '; ' if aside else ''}"
                                f"{paths.accepted} keeps the last accepted model")
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


def log_untrained(metrics: dict, holdout_stations: int) -> None:
    """Name the stations scored on the holdout_stations rows although none was held out (``holdout_stations``
    0): stations with no training rows, whose days all fall in the test period or were all flagged."""
    per_station = metrics["forecast"][metrics["gate_reference"]].get("per_station", {})
    untrained = sorted(station for station, scores in per_station.items() if "climatology" not in scores)
    if holdout_stations == 0 and untrained:
        log.warning("%d station(s) never trained on, though data.holdout_stations = 0: %s%s (no training rows: "
                    "their days all fall in the test period, or were all flagged); they are the holdout_stations "
                    "rows", len(untrained), ", ".join(untrained[:5]), ", ..." if len(untrained) > 5 else "")


def log_behind_climatology(metrics: dict) -> None:
    """Warn where the stations' own seasons forecast the test period better than the model: the gate asks only
    for persistence to be beaten, which at monthly steps any seasonal forecast does (a monthly record of 17
    training years: model 1.670, climatology 1.575, persistence 4.280)."""
    scores = metrics["forecast"][metrics["gate_reference"]]
    group = next((name for name in ("trained_stations", "all_stations") if "climatology" in scores.get(name, {})),
                 None)
    if group is None:
        return
    model, climatology = (scores[group][name]["mae"] for name in ("model", "climatology"))
    if climatology < model:
        log.warning("the stations' climatology forecast the test period better than the model (%s, %s reference: "
                    "MAE %.3f against %.3f): the seasons alone beat what was learned from the recent readings; "
                    "with few training years, or at monthly steps, that can happen, and the gate asks only that "
                    "persistence be beaten", group.replace("_", " "), metrics["gate_reference"], climatology, model)


def restore(args) -> None:
    """The stage's second command, ``--restore``: swap models/accepted with models/previous (undo the last
    acceptance). Nothing is evaluated, and the parameters are not read."""
    registry.restore_previous(Paths(args.root))


def parser():
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--restore", action="store_true",
                        help="swap models/accepted with models/previous (undo the last acceptance) and exit")
    return parser


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, parser(), imports=IMPORTS))
