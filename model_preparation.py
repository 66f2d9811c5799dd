"""Stage 3: choose and train the forecaster of every step ahead (the next day, by default).

Candidates are compared by time-ordered cross-validation on the training dates:
every fold trains on earlier dates and validates on later ones, never shuffled.
Rule: the lowest mean validation MAE wins; a candidate within ``tie_tolerance`` of
the best counts as tied, and among tied candidates the simplest (listed first)
wins. The winner is refitted on all training rows. Gradient boosting grows trees
until its error on the latest tenth of a fold's training dates stops improving
(at most ``gbr_max_iter``), and its final fit grows the median number of trees
the folds grew: a bounded cost, and no more trees than new dates support.

Inputs:  data/train/features.csv, models/scaler.joblib (for its hash)
The validation residuals of the chosen candidate also calibrate its prediction
interval (split-conformal in time, scaled by each row's recent spread of
day-to-day changes), so the band's width comes from forecasts on dates the model
was not fitted on.

With ``forecast.horizon`` = H, this is done for each step 1..H on its own
rows (direct models: the model of step h learns the change from t to t+h).

Outputs: models/model.joblib  per step: the fitted estimator and its interval; the feature list
         models/model.json    parameters, CV scores of every candidate and of
                              persistence (per step), library versions, training-data hash
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import threadpoolctl

from station_forecast import cli, compute, features, manifest, runtime, storage
from station_forecast.errors import PipelineError
from station_forecast.features import FALLBACK_FEATURES, FEATURES, FULL_FEATURES, RIDGE_FEATURE, SPREAD_COLUMN
from station_forecast.params import Params, load_params
from station_forecast.runtime import log
from station_forecast.storage import Paths

np = runtime.lazy_import("numpy")
pd = runtime.lazy_import("pandas")

STAGE = "model_preparation"
# What the stage loads when it runs: imported ahead by --wait-for-go, and its import floor in benchmark.py.
IMPORTS = ["numpy", "pandas", "sklearn.ensemble", "sklearn.linear_model", "sklearn.model_selection",
           "joblib"]
MIN_FOLD_ROWS = 30  # a fold trains on at least this many rows, or it is not used
# Gradient boosting stops adding trees once its error on the latest tenth of a fold's training rows (by
# date) has not improved for ten trees; the final fit on all rows grows the median number the folds grew.
STOPPING_SHARE = 0.1
STOPPING_ROUNDS = 10
TEXT_COLUMNS = ["station", "date", "target_date"]
TRAIN_COLUMNS = ["station", "date", "step", "target_date", "temp_today", "target", "target_ok", SPREAD_COLUMN,
                 *FEATURES]
# A features table larger than this is never held whole (a national network's): it is read in batches of
# STREAM_BATCH_ROWS, first for each step's training rows per station, then (once per group of steps, far ahead)
# for the cross-validation sample (the same whole stations as ``cv_sample`` takes), the Ridge's normal equations
# summed over every training row, and every k-th training row for gradient boosting, at most BOOSTING_MAX_ROWS.
STREAM_BYTES = 1 << 30
STREAM_BATCH_ROWS = 1 << 19
BOOSTING_MAX_ROWS = 1_500_000
# The rows the second reading keeps (each step's sample and boosting rows) are held for at most this many bytes
# of steps at a time: further ahead, the table is read again for the next steps, so the stage's memory does not
# grow with the horizon. A row held takes about ROW_BYTES (8 per column, and the station's name as text).
STEP_GROUP_BYTES = 1 << 30
ROW_BYTES = 8 * len(TRAIN_COLUMNS) + 64


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
    """Rows whose next-day target was really observed and not flagged, in date order. Text columns come
    back as ordered categoricals (the same values, compared and sorted as the text is)."""
    kept = np.flatnonzero((table["target_ok"] == 1).to_numpy())
    # Codes in name order and in date order (ISO dates sort as text): integers sort, and are taken, far
    # faster than text (taking three text columns was 2.6 s of the stage at 1,000 stations x 10 years).
    text = {name: pd.factorize(table[name], sort=True) for name in TEXT_COLUMNS}
    order = kept[np.lexsort((text["station"][0][kept], text["target_date"][0][kept]))]
    rows = table.drop(columns=list(text)).take(order).reset_index(drop=True)  # one copy, however large
    for name, (codes, values) in text.items():
        rows[name] = pd.Categorical.from_codes(codes[order], categories=values, ordered=True)
    return rows[table.columns]


def cv_sample(rows: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most about ``max_rows`` of the training rows for model selection, so its cost stays bounded.

    Whole stations are kept (every k-th by name, all their dates), so every
    fold still validates on dates after all it trains on, and the sample is the
    same on every run. All rows when there are no more than ``max_rows``.
    """
    if len(rows) <= max_rows:
        return rows
    kept = rows[rows["station"].isin(sampled_stations(sorted(rows["station"].unique()), len(rows), max_rows))]
    return kept.reset_index(drop=True)


def sampled_stations(stations: list[str], rows: int, max_rows: int) -> list[str]:
    """The stations ``cv_sample`` keeps of these (sorted by name) with ``rows`` training rows: every k-th, k the
    fewest that leaves at most about ``max_rows``."""
    return stations if rows <= max_rows else stations[::-(-rows // max_rows)]  # -(-a // b): a / b rounded up


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


def purged(folds: list[tuple[np.ndarray, np.ndarray]], rows: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds without training rows whose target comes after the first validation origin.

    Forecasting h steps ahead from origin t, only targets up to t are known; a
    fold that trained on later ones would validate with knowledge of the future.
    One step ahead nothing is left out (every training target is before the first
    validation target, so at or before its origin). Folds left with fewer than
    ``MIN_FOLD_ROWS`` training rows are dropped.
    """
    targets, origins = rows["target_date"].to_numpy(), rows["date"].to_numpy()
    kept = [(fit[targets[fit] <= origins[valid].min()], valid) for fit, valid in folds]
    kept = [(fit, valid) for fit, valid in kept if len(fit) >= MIN_FOLD_ROWS]
    if not kept:
        step = int(rows["step"].iat[0])
        raise PipelineError(f"too few training steps to validate forecasts {step} steps ahead: every fold is left "
                            f"with fewer than {MIN_FOLD_ROWS} training rows once targets after its first forecast "
                            "origin are left out; lower forecast.horizon or data.test_steps, or add history")
    return kept


def cross_validate(estimators: dict, rows: pd.DataFrame, folds: list, pool: compute.Pool | None = None
                   ) -> tuple[dict[str, list[float]], dict[str, np.ndarray], dict[str, list[int]]]:
    """Validation MAE per fold of every candidate and of persistence on the same rows,
    each one's validation residuals (actual minus forecast) over all folds,
    divided by each row's recent spread (``change_sd60``), and the trees each
    fold's gradient boosting grew. The fits (candidates x folds) are
    independent and run on ``pool``.
    """
    pool = pool or runtime.Threads()
    fits = [(fold, name) for fold in range(len(folds)) for name in estimators]
    done = pool.map(fit_and_forecast, fits, what="cross-validation fits", rows=pool.share(rows),
                    folds=pool.share(folds), estimators=estimators)
    forecast_of = {fit: forecast for fit, (forecast, _) in zip(fits, done, strict=True)}
    trees = {name: [grown for (_, fitted), (_, grown) in zip(fits, done, strict=True) if fitted == name]
             for name in estimators if _is_boosting(estimators[name])}
    scores: dict[str, list[float]] = {"persistence": [], **{name: [] for name in estimators}}
    residuals: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for fold, (_, valid_idx) in enumerate(folds):
        valid = rows.iloc[valid_idx]
        predicted_by = {"persistence": valid["temp_today"].to_numpy(),
                        **{name: forecast_of[fold, name] for name in estimators}}
        for name, predicted in predicted_by.items():
            residual = valid["target"].to_numpy() - predicted
            scores[name].append(float(np.mean(np.abs(residual))))
            residuals[name].append(residual / valid[SPREAD_COLUMN].to_numpy())
    return scores, {name: np.concatenate(parts) for name, parts in residuals.items()}, trees


def fit_and_forecast(fit: tuple[int, str], rows: pd.DataFrame, folds: list, estimators: dict
                     ) -> tuple[np.ndarray, int | None]:
    """The forecasts for fold ``fit[0]``'s validation rows by candidate ``fit[1]`` fitted on its training rows
    (rows in date order), and the trees it grew if it is gradient boosting."""
    fold, name = fit
    fit_idx, valid_idx = folds[fold]
    valid = rows.iloc[valid_idx]
    forecaster = fit_forecaster(estimators[name], rows.iloc[fit_idx], early_stopping=True,
                                fallback=bool(valid[RIDGE_FEATURE].isna().any()))
    grown = forecaster.full if forecaster.full is not None else forecaster.fallback
    return features.forecast(forecaster, valid), int(grown.n_iter_) if _is_boosting(grown) else None


def fit_forecaster(estimator, rows: pd.DataFrame, early_stopping: bool = False, fallback: bool = True
                   ) -> features.Forecaster:
    """``estimator`` fitted on the ``rows`` (in date order) that have their ridge feature, and (if
    ``fallback``, or no row has it) a copy fitted on every row without that feature: a ``features.Forecaster``.
    With ``early_stopping``, gradient boosting stops when the rows' latest dates stop improving."""
    known = rows[RIDGE_FEATURE].notna().to_numpy()
    full = _fitted(estimator, rows[known], FULL_FEATURES, early_stopping) if known.any() else None
    spare = _fitted(estimator, rows, FALLBACK_FEATURES, early_stopping) if fallback or full is None else None
    return features.Forecaster(full, spare)


def _fitted(estimator, rows: pd.DataFrame, columns: list[str], early_stopping: bool):
    from sklearn.base import clone

    inputs, change = rows[columns], rows["target"] - rows["temp_today"]
    estimator = clone(estimator)
    if not (early_stopping and _is_boosting(estimator)):
        return estimator.fit(inputs, change)
    cut = len(inputs) - max(1, round(STOPPING_SHARE * len(inputs)))  # the latest dates judge the trees
    estimator.set_params(early_stopping=True, n_iter_no_change=STOPPING_ROUNDS, scoring="loss")
    return estimator.fit(inputs.iloc[:cut], change.iloc[:cut], X_val=inputs.iloc[cut:], y_val=change.iloc[cut:])


def _is_boosting(estimator) -> bool:
    return hasattr(estimator, "n_iter_no_change")


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


def fit_step(rows: pd.DataFrame, model_params: dict, pool: compute.Pool | None = None) -> dict:
    """Choose, calibrate and fit the forecaster of one step ahead, from that step's training rows
    (the cross-validation fits on ``pool``, the final fit here)."""
    return select_and_fit(cv_sample(rows, model_params["cv_max_rows"]), len(rows), model_params, pool,
                          lambda estimator: fit_forecaster(estimator, rows))


def select_and_fit(sample: pd.DataFrame, training_rows: int, model_params: dict, pool: compute.Pool | None,
                   final_fit: Callable[[Any], features.Forecaster], fit: dict | None = None) -> dict:
    """Choose the candidate by cross-validation on ``sample`` (rows in date order), calibrate its interval, and
    fit it by ``final_fit`` (on the step's ``training_rows`` rows; ``fit`` says how, where not on all of them
    at once)."""
    from sklearn.base import clone

    estimators = candidates(model_params)
    folds = purged(time_folds(sample["target_date"], model_params["cv_folds"]), sample)
    scores, residuals, trees = cross_validate(estimators, sample, folds, pool)
    chosen = choose(scores, list(estimators), model_params["tie_tolerance"])
    final = clone(estimators[chosen])
    if chosen in trees:  # on every row, as many trees as the folds grew before their latest dates stopped them
        final.set_params(max_iter=int(np.median(trees[chosen])))
    final = final_fit(final)
    level = model_params["interval_level"]
    intervals = {"model": calibrate_interval(residuals[chosen], level),
                 "persistence": calibrate_interval(residuals["persistence"], level)}
    record = {
        "chosen": chosen,
        "cv": {
            "folds": len(folds),
            "rows": len(sample),
            "stations": int(sample["station"].nunique()),
            "validation_dates": [[str(sample["target_date"].iloc[v].min()),
                                  str(sample["target_date"].iloc[v].max())] for _, v in folds],
            "mae": {name: [round(s, 4) for s in fold_scores] for name, fold_scores in scores.items()},
            "mean_mae": {name: round(float(np.mean(s)), 4) for name, s in scores.items()},
            "trees": trees,
        },
        "interval": intervals,
        "training_rows": training_rows,
        **({"fit": fit[chosen]} if fit else {}),
    }
    return {"estimator": final, "record": record, "estimators": estimators}


def fit_one_of(steps: list[int], step: int, rows: pd.DataFrame, model_params: dict, pool: compute.Pool) -> dict:
    """``fit_step`` for one of the direct models (one per step ahead, each with its own interval)."""
    step_rows = rows if len(steps) == 1 else rows[rows["step"] == step].reset_index(drop=True)
    fitted = fit_step(step_rows, model_params, pool)
    log_step(steps, step, fitted["record"])
    return fitted


def log_step(steps: list[int], step: int, record: dict) -> None:
    """With several steps ahead, one line per step: its choice and CV MAE beside persistence's."""
    if len(steps) > 1:
        log.info("step %d of %d: %s, CV MAE %.3f (persistence %.3f)", step, len(steps), record["chosen"],
                 record["cv"]["mean_mae"][record["chosen"]], record["cv"]["mean_mae"]["persistence"])


def fitted_steps(path: Path, model_params: dict, pool: compute.Pool) -> tuple[list[int], list[dict], int]:
    """``fit_one_of`` for every step of the features table, read whole; returns the steps, their fits and the
    training rows of all steps."""
    features = storage.read_table(path, TRAIN_COLUMNS, only=True)
    # The CSV parser's buffers, as large as the table, go back before its rows are copied in date order:
    # at 1,000 stations the stage's peak falls from 1,980 to 1,530 MiB.
    runtime.release_memory(collect=False)
    rows = training_rows(features)
    del features
    first = rows[rows["step"] == 1]
    sample_size = len(cv_sample(first, model_params["cv_max_rows"]))
    if sample_size < len(first):
        log.info("cross-validation on about %d of %d training rows per step (every station's rows of some "
                 "stations); the chosen model is then fitted on all rows", sample_size, len(first))
    steps = sorted(int(s) for s in rows["step"].unique())
    return steps, [fit_one_of(steps, step, rows, model_params, pool) for step in steps], len(rows)


def streamed_steps(path: Path, model_params: dict, pool: compute.Pool) -> tuple[list[int], list[dict], int]:
    """``fit_one_of`` for every step of a features table too large to hold (``STREAM_BYTES``), reading it in
    batches; returns the steps, their fits and the training rows of all steps. The same candidate is chosen as
    from the whole table (its cross-validation sample is the same rows); a Ridge is the same fit, up to the
    rounding of sums over batches; gradient boosting is fitted on every k-th training row in the table's order
    (stations, then dates), at most ``BOOSTING_MAX_ROWS``. The second reading is made once per group of steps
    whose rows kept fit in ``STEP_GROUP_BYTES`` (``step_groups``)."""
    counts: dict[int, pd.Series] = {}
    for batch in storage.read_table_batches(path, ["station", "step", "target_ok"], STREAM_BATCH_ROWS):
        for step, per_station in batch[batch["target_ok"] == 1].groupby("step")["station"]:
            counts[int(step)] = per_station.value_counts().add(counts.get(int(step), pd.Series(dtype=int)),
                                                               fill_value=0)
    if not counts:
        raise PipelineError(f"{path}: no training rows (target_ok = 1)")
    steps = sorted(counts)
    total = {step: int(counts[step].sum()) for step in steps}
    sampled = {step: set(sampled_stations(sorted(counts[step].index), total[step], model_params["cv_max_rows"]))
               for step in steps}
    stride = {step: -(-total[step] // BOOSTING_MAX_ROWS) for step in steps}
    held = {step: (-(-total[step] // stride[step]) + int(counts[step][list(sampled[step])].sum())) * ROW_BYTES
            for step in steps}
    groups = step_groups(steps, held, STEP_GROUP_BYTES)
    if len(groups) > 1:
        log.info("%d steps ahead: the table is read once for each of %d groups of steps, so that at most about "
                 "%d MiB of rows is held at a time", len(steps), len(groups), STEP_GROUP_BYTES >> 20)
    fitted = []
    for group in groups:
        fitted += _streamed_group(path, group, sampled, stride, total, model_params, pool, steps)
    return steps, fitted, sum(total.values())


def step_groups(steps: list[int], held: dict[int, int], budget: int) -> list[list[int]]:
    """``steps`` cut into runs of consecutive steps whose ``held`` bytes add up to at most ``budget`` (a step
    alone may hold more)."""
    groups: list[list[int]] = []
    used = 0
    for step in steps:
        if not groups or used + held[step] > budget:
            groups.append([])
            used = 0
        groups[-1].append(step)
        used += held[step]
    return groups


def _streamed_group(path: Path, group: list[int], sampled: dict, stride: dict, total: dict, model_params: dict,
                    pool: compute.Pool, steps: list[int]) -> list[dict]:
    """``streamed_steps``' second reading and fits for the steps of ``group``: each step's rows in the
    table's order, whatever the group, so the fits are those of one reading for all steps."""
    parts: dict[int, dict[str, list]] = {step: {"cv": [], "boosting": []} for step in group}
    sums = {step: {"full": NormalEquations(FULL_FEATURES), "fallback": NormalEquations(FALLBACK_FEATURES)}
            for step in group}
    seen = dict.fromkeys(group, 0)
    for batch in storage.read_table_batches(path, TRAIN_COLUMNS, STREAM_BATCH_ROWS):
        batch = batch[((batch["target_ok"] == 1) & batch["step"].isin(group)).to_numpy()]
        for step, rows in batch.groupby("step"):
            step = int(step)
            parts[step]["cv"].append(rows[rows["station"].isin(sampled[step])])
            order = seen[step] + np.arange(len(rows))
            seen[step] += len(rows)
            parts[step]["boosting"].append(rows[order % stride[step] == 0])
            known = rows[RIDGE_FEATURE].notna().to_numpy()
            sums[step]["full"].add(rows[known])
            sums[step]["fallback"].add(rows)
    fitted = []
    for step in group:
        sample = training_rows(pd.concat(parts[step].pop("cv"), ignore_index=True))
        boosting_rows = training_rows(pd.concat(parts[step].pop("boosting"), ignore_index=True))
        how = {"ridge": f"normal equations summed over all {total[step]} training rows, in batches",
               "gradient_boosting": f"one in {stride[step]} of the {total[step]} training rows, in the table's "
                                    f"order ({len(boosting_rows)} rows; at most {BOOSTING_MAX_ROWS})"}

        def final_fit(estimator, step=step, boosting_rows=boosting_rows):
            if _is_boosting(estimator):
                return fit_forecaster(estimator, boosting_rows)
            return features.Forecaster(sums[step]["full"].ridge(estimator), sums[step]["fallback"].ridge(estimator))

        fitted.append(select_and_fit(sample, total[step], model_params, pool, final_fit, fit=how))
        log_step(steps, step, fitted[-1]["record"])
    return fitted


class NormalEquations:
    """The sums a Ridge with an intercept is fitted from (the change from ``temp_today`` to ``target`` on
    ``columns``), added batch by batch: the same solution as scikit-learn's, without holding the rows."""

    def __init__(self, columns: list[str]) -> None:
        self.columns, self.rows = columns, 0
        self.total, self.target = np.zeros(len(columns)), 0.0
        self.gram, self.moment = np.zeros((len(columns), len(columns))), np.zeros(len(columns))

    def add(self, rows: pd.DataFrame) -> None:
        inputs = rows[self.columns].to_numpy(dtype=float)
        change = (rows["target"] - rows["temp_today"]).to_numpy(dtype=float)
        self.rows += len(rows)
        self.total += inputs.sum(axis=0)
        self.target += change.sum()
        self.gram += inputs.T @ inputs
        self.moment += inputs.T @ change

    def ridge(self, estimator: Any) -> Any:
        """``estimator`` (a Ridge) as fitted on the rows added (centred, the intercept unpenalised); None
        without rows."""
        from sklearn.base import clone

        if not self.rows:
            return None
        estimator = clone(estimator)
        mean, target_mean = self.total / self.rows, self.target / self.rows
        gram = self.gram - self.rows * np.outer(mean, mean)
        moment = self.moment - self.rows * mean * target_mean
        coef = np.linalg.solve(gram + estimator.alpha * np.eye(len(mean)), moment)
        estimator.coef_, estimator.intercept_ = coef, float(target_mean - mean @ coef)
        estimator.n_features_in_, estimator.feature_names_in_ = len(mean), np.asarray(self.columns, dtype=object)
        return estimator


def main(args) -> None:
    params: Params = load_params(args.params)
    paths = Paths(args.root)
    model_params = params["model"]
    inputs = [paths.train_features, paths.scaler]
    manifest.verify_outputs_of(paths, "model_preprocessing", inputs)
    with compute.pool(params["compute"]["scheduler"], paths.root) as pool:
        streamed = paths.train_features.exists() and paths.train_features.stat().st_size > STREAM_BYTES
        # Every fit on one thread, BLAS and OpenMP alike: BLAS splits the sum over rows between its threads, and
        # gradient boosting's OpenMP threads split its gradients' sums, so a model's last bits, and the model
        # file's bytes, followed the number of threads, which followed the machine's load (a boosted model fitted
        # on one thread and on two differed, its forecasts the same to six decimals); and OpenMP's threads spin
        # while they wait, so on a busy machine more of them were slower. A limit reaches only the libraries
        # loaded when it is set, and numpy (imported lazily), scipy and scikit-learn's OpenMP load on first use,
        # so everything the stage uses is loaded first (run alone, the stage gave BLAS as many threads as
        # OMP_NUM_THREADS said, and at 1,000 stations a Ridge's bytes differed between one thread and two).
        for name in IMPORTS:
            importlib.import_module(name)
        with threadpoolctl.threadpool_limits(limits={"openmp": 1, "blas": 1}):
            if streamed:
                log.info("%s is larger than %d MiB: read in batches of %d rows, never whole", paths.train_features,
                         STREAM_BYTES >> 20, STREAM_BATCH_ROWS)
                steps, fitted, n_rows = streamed_steps(paths.train_features, model_params, pool)
            else:
                steps, fitted, n_rows = fitted_steps(paths.train_features, model_params, pool)

    next_step = fitted[0]["record"]
    record = {
        **next_step,
        "rule": f"lowest mean CV MAE; within {model_params['tie_tolerance']:.0%} of it the simplest candidate wins",
        "target": "the value h steps ahead = temp_today + the change predicted by the model of step h",
        "horizon": len(steps),
        "steps": [{"step": step, **{k: f["record"][k] for k in ("chosen", "cv", "interval")}}
                  for step, f in zip(steps, fitted, strict=True)],
        "features": FEATURES,
        "estimator_params": {name: {k: repr(v) for k, v in est.get_params().items()}
                             for name, est in fitted[0]["estimators"].items()},
        "training_rows": n_rows,
        "training_data_sha256": storage.sha256_file(paths.train_features),
        "scaler_sha256": storage.sha256_file(paths.scaler),
        "params_sha256": params.sha256,
        "libraries": manifest.library_versions(),
    }
    record["interval"] = {**record["interval"], "method": "split-conformal: quantiles of the validation-fold "
                          f"residuals divided by {SPREAD_COLUMN}; band = forecast + [lower, upper] x {SPREAD_COLUMN}"}
    bundle = {"features": FEATURES,
              "steps": [{"step": step, "estimator": f["estimator"], "name": f["record"]["chosen"],
                         "interval": f["record"]["interval"]["model"],
                         "baseline_intervals": {"persistence": f["record"]["interval"]["persistence"]}}
                        for step, f in zip(steps, fitted, strict=True)]}
    storage.write_joblib(paths.model, bundle)
    storage.write_json(paths.model_record, record)
    manifest.record_stage(paths, STAGE, params, inputs, [paths.model, paths.model_record])

    chosen = record["chosen"]
    for name, mean in record["cv"]["mean_mae"].items():
        log.info("CV MAE %-18s %.3f%s", name, mean, "  <- chosen" if name == chosen else "")
    if record["cv"]["mean_mae"][chosen] >= record["cv"]["mean_mae"]["persistence"]:
        log.warning("no candidate beats persistence in cross-validation; the quality gate on the test period "
                    "decides whether %s is accepted", chosen)
    band = record["interval"]["model"]
    log.info("%.0f%% interval: forecast %+.2f to %+.2f times change_sd60 (from %d validation residuals)",
             100 * band["level"], band["lower"], band["upper"], band["residuals"])
    log.info("wrote %s (%s, %d training rows%s)", paths.model, chosen, n_rows,
             f", {len(steps)} steps ahead" if len(steps) > 1 else "")


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, cli.stage_parser(__doc__), imports=IMPORTS))
