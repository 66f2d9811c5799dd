"""Stage 3: choose and train the next-day temperature forecaster.

Candidates are compared by time-ordered cross-validation on the training dates:
every fold trains on earlier dates and validates on later ones, never shuffled.
Rule: the lowest mean validation MAE wins; a candidate within ``tie_tolerance`` of
the best counts as tied, and among tied candidates the simplest (listed first)
wins. The winner is refitted on all training rows.

Inputs:  data/train/features.csv, models/scaler.joblib (for its hash)
The validation residuals of the chosen candidate also calibrate its prediction
interval (split-conformal in time, scaled by each row's recent spread of
day-to-day changes), so the band's width comes from forecasts on dates the model
was not fitted on.

Outputs: models/model.joblib  the fitted estimator with its feature list and interval
         models/model.json    parameters, CV scores of every candidate and of
                              persistence, library versions, training-data hash
"""

from __future__ import annotations

import os

import threadpoolctl

import cli
import features
import manifest
import storage
from cli import log
from errors import PipelineError
from features import FEATURES, SPREAD_COLUMN
from params import Params, load_params
from storage import Paths

np = cli.lazy_import("numpy")
pd = cli.lazy_import("pandas")

STAGE = "model_preparation"
TRAIN_COLUMNS = ["station", "target_date", "temp_today", "target", "target_ok", SPREAD_COLUMN, *FEATURES]


def candidates(model: dict) -> dict:
    """The estimators to compare, simplest first."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge

    return {
        "ridge": Ridge(alpha=model["ridge_alpha"]),
        "gradient_boosting": HistGradientBoostingRegressor(
            max_iter=model["gbr_max_iter"], learning_rate=model["gbr_learning_rate"],
            max_leaf_nodes=model["gbr_max_leaf_nodes"], early_stopping=False, random_state=model["random_state"]),
    }


def training_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose next-day target was really observed and not flagged, in date order."""
    rows = table[table["target_ok"] == 1]
    return rows.sort_values(["target_date", "station"], ignore_index=True)


def cv_sample(rows: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most about ``max_rows`` of the training rows for model selection, so its cost stays bounded.

    Whole stations are kept (every k-th by name, all their dates), so every
    fold still validates on dates after all it trains on, and the sample is the
    same on every run. All rows when there are no more than ``max_rows``.
    """
    if len(rows) <= max_rows:
        return rows
    stations = sorted(rows["station"].unique())
    step = -(-len(rows) // max_rows)  # ceiling division
    kept = rows[rows["station"].isin(stations[::step])]
    return kept.reset_index(drop=True)


def time_folds(dates: pd.Series, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Expanding-window folds over whole dates: each validates on dates after all it trains on."""
    from sklearn.model_selection import TimeSeriesSplit

    unique = np.sort(dates.unique())
    if len(unique) < 2 * (n_folds + 1):
        raise PipelineError(f"only {len(unique)} training dates for model.cv_folds = {n_folds} folds")
    position = np.searchsorted(unique, dates.to_numpy())
    folds = []
    for train_dates, valid_dates in TimeSeriesSplit(n_splits=n_folds).split(unique):
        folds.append((np.flatnonzero(np.isin(position, train_dates)), np.flatnonzero(np.isin(position, valid_dates))))
    return folds


def cross_validate(estimators: dict, rows: pd.DataFrame, folds: list
                   ) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Validation MAE per fold of every candidate and of persistence on the same rows,
    and each one's validation residuals (actual minus forecast) over all folds,
    divided by each row's recent spread (``change_sd60``).
    """
    from sklearn.base import clone

    change = rows["target"] - rows["temp_today"]
    scores: dict[str, list[float]] = {"persistence": [], **{name: [] for name in estimators}}
    residuals: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    progress = cli.Progress("cross-validation fits", len(folds) * len(estimators))
    for fit_idx, valid_idx in folds:
        fit, valid = rows.iloc[fit_idx], rows.iloc[valid_idx]
        forecasts = {"persistence": valid["temp_today"].to_numpy()}
        for name, estimator in estimators.items():
            fitted = clone(estimator).fit(fit[FEATURES], change.iloc[fit_idx])
            forecasts[name] = features.forecast(fitted, valid)
            progress.step()
        for name, predicted in forecasts.items():
            residual = valid["target"].to_numpy() - predicted
            scores[name].append(float(np.mean(np.abs(residual))))
            residuals[name].append(residual / valid[SPREAD_COLUMN].to_numpy())
    return scores, {name: np.concatenate(parts) for name, parts in residuals.items()}


def calibrate_interval(scaled_residuals: np.ndarray, level: float) -> dict:
    """A central ``level`` band from residuals of forecasts on dates the model was not fitted on.

    Split-conformal in time, scaled: the band is forecast + [lower, upper] times
    the row's ``change_sd60``, with lower and upper the quantiles of the
    validation residuals divided by their rows' ``change_sd60``. The validation
    folds were never fitted on, so the quantiles say how far off the refitted
    model will be on new days; the scaling keeps that true station by station.
    """
    lower, upper = np.quantile(scaled_residuals, [(1 - level) / 2, (1 + level) / 2])
    return {"level": level, "lower": round(float(lower), 4), "upper": round(float(upper), 4),
            "scale": SPREAD_COLUMN, "residuals": len(scaled_residuals)}


def choose(scores: dict[str, list[float]], names: list[str], tie_tolerance: float) -> str:
    """The first candidate (simplest) whose mean CV MAE is within tie_tolerance of the best."""
    means = {name: float(np.mean(scores[name])) for name in names}
    best = min(means.values())
    return next(name for name in names if means[name] <= best * (1 + tie_tolerance))


def main(args) -> None:
    params: Params = load_params(args.params)
    paths = Paths(args.root)
    model_params = params["model"]
    inputs = [paths.train_features, paths.scaler]
    manifest.verify_outputs_of(paths, "model_preprocessing", inputs)
    rows = training_rows(storage.read_table(paths.train_features, TRAIN_COLUMNS))

    threads, why = cli.thread_budget()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # read when scikit-learn's OpenMP code loads
    log.info("using %d thread(s) (%s)", threads, why)
    sample = cv_sample(rows, model_params["cv_max_rows"])
    if len(sample) < len(rows):
        log.info("cross-validation on %d of %d training rows (every station's rows of %d of %d stations); the "
                 "chosen model is then fitted on all rows", len(sample), len(rows), sample["station"].nunique(),
                 rows["station"].nunique())
    with threadpoolctl.threadpool_limits(limits=threads):  # BLAS, already loaded with numpy
        estimators = candidates(model_params)
        folds = time_folds(sample["target_date"], model_params["cv_folds"])
        scores, residuals = cross_validate(estimators, sample, folds)
        chosen = choose(scores, list(estimators), model_params["tie_tolerance"])
        final = estimators[chosen].fit(rows[FEATURES], rows["target"] - rows["temp_today"])
    level = model_params["interval_level"]
    intervals = {"model": calibrate_interval(residuals[chosen], level),
                 "persistence": calibrate_interval(residuals["persistence"], level)}

    record = {
        "chosen": chosen,
        "rule": f"lowest mean CV MAE; within {model_params['tie_tolerance']:.0%} of it the simplest candidate wins",
        "target": "next-day temperature = temp_today + predicted change",
        "features": FEATURES,
        "estimator_params": {name: {k: repr(v) for k, v in est.get_params().items()}
                             for name, est in estimators.items()},
        "cv": {
            "folds": len(folds),
            "rows": len(sample),
            "stations": int(sample["station"].nunique()),
            "validation_dates": [[str(sample["target_date"].iloc[v].min()),
                                  str(sample["target_date"].iloc[v].max())] for _, v in folds],
            "mae": {name: [round(s, 4) for s in fold_scores] for name, fold_scores in scores.items()},
            "mean_mae": {name: round(float(np.mean(s)), 4) for name, s in scores.items()},
        },
        "interval": {**intervals, "method": "split-conformal: quantiles of the validation-fold residuals "
                                            f"divided by {SPREAD_COLUMN}; band = forecast + [lower, upper] x "
                                            f"{SPREAD_COLUMN}"},
        "training_rows": len(rows),
        "training_data_sha256": storage.sha256_file(paths.train_features),
        "scaler_sha256": storage.sha256_file(paths.scaler),
        "params_sha256": params.sha256,
        "libraries": manifest.library_versions(),
    }
    storage.write_joblib(paths.model, {"estimator": final, "name": chosen, "features": FEATURES,
                                      "interval": intervals["model"]})
    storage.write_json(paths.model_record, record)
    manifest.record_stage(paths, STAGE, params, inputs, [paths.model, paths.model_record])

    for name, mean in record["cv"]["mean_mae"].items():
        log.info("CV MAE %-18s %.3f%s", name, mean, "  <- chosen" if name == chosen else "")
    if record["cv"]["mean_mae"][chosen] >= record["cv"]["mean_mae"]["persistence"]:
        log.warning("no candidate beats persistence in cross-validation; the quality gate on the test period "
                    "decides whether %s is accepted", chosen)
    band = intervals["model"]
    log.info("%.0f%% interval: forecast %+.2f to %+.2f times change_sd60 (from %d validation residuals)",
             100 * level, band["lower"], band["upper"], band["residuals"])
    log.info("wrote %s (%s, %d training rows)", paths.model, chosen, len(rows))


if __name__ == "__main__":
    raise SystemExit(cli.run(STAGE, main, cli.stage_parser(__doc__.splitlines()[0])))
