"""Stage 4: evaluate the saved model on the test period, against baselines, with a gate.

Nothing is fitted here. Forecasts are scored against two references, named in
every output: ``truth``, the simulated clean temperature of every test day, and
``observed``, the reading itself on days that have one and carry no anomaly.
Two baselines are scored on the same days: persistence (tomorrow = today's
repaired reading) and the station's climatology from its training years (stations
never trained on have none). The anomaly detector's flags on test days are scored
against the injected labels.

Inputs:  data/test/features.csv, data/test/flags.csv, data/truth/*.csv,
         models/scaler.joblib, models/model.joblib, models/model.json
Outputs: models/metrics.json, and a table on stdout; on passing the gate, a copy of
         the scaler, detector, model and metrics in models/accepted/ (the set
         accepted before moves to models/previous/).
Exit 3 when the model's MAE does not beat persistence's (the quality gate); the
accepted model is then left as it was.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

import common
from common import ANOMALY_KINDS, FEATURES, Params, Paths, PipelineError, log

STAGE = "model_testing"
TEST_COLUMNS = ["station", "target_date", "temp_today", "climatology", *FEATURES]
FLAG_COLUMNS = ["station", "date", "observed", "flag"]
PREDICTORS = ["model", "persistence", "climatology"]


def load_verified(paths: Paths) -> tuple:
    """The scaler and model, after checking both against the manifest and each other."""
    import joblib

    common.verify_outputs_of(paths, "model_preprocessing", [paths.test_features, paths.test_flags, paths.scaler])
    common.verify_outputs_of(paths, "model_preparation", [paths.model, paths.model_record])
    record = common.read_json(paths.model_record)
    if record.get("scaler_sha256") != common.sha256_file(paths.scaler):
        raise PipelineError(f"{paths.model}: was trained with another scaler than {paths.scaler}; "
                            "rerun model_preparation.py")
    scaler = _load(joblib, paths.scaler, "model_preprocessing")
    bundle = _load(joblib, paths.model, "model_preparation")
    if list(getattr(scaler, "feature_names_in_", [])) != FEATURES or bundle.get("features") != FEATURES:
        raise PipelineError(f"{paths.model}: built for other features than this code's; rerun the pipeline")
    return scaler, bundle, record


def _load(joblib, path, stage: str):
    try:
        return joblib.load(path)
    except Exception as exc:  # a file the manifest vouches for but that does not unpickle
        raise PipelineError(f"{path}: cannot be loaded ({type(exc).__name__}); rerun {stage}.py") from None


def load_truth(truth_dir, stations) -> pd.DataFrame | None:
    """Clean temperature and anomaly label per station and day, or None without ground truth."""
    files = [truth_dir / f"{station}.csv" for station in stations]
    if not all(f.exists() for f in files):
        return None
    parts = [common.read_table(f, ["date", "clean_temperature", "anomaly"]).assign(station=f.stem) for f in files]
    return pd.concat(parts, ignore_index=True)


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
    trained = rows["climatology"].notna()
    groups = {
        "all_stations": (rows, ["model", "persistence"]),
        "trained_stations": (rows[trained], PREDICTORS),
        "holdout_stations": (rows[~trained], ["model", "persistence"]),
    }
    result = {group: {p: score(part[actual].to_numpy(), part[p].to_numpy()) for p in predictors}
              for group, (part, predictors) in groups.items() if len(part)}
    result["per_station"] = {
        station: {p: score(part[actual].to_numpy(), part[p].to_numpy())
                  for p in PREDICTORS if part[p].notna().all()}
        for station, part in rows.groupby("station")
    }
    return result


def detector_scores(flags: pd.DataFrame) -> dict:
    """Point-wise precision, recall and F1 of the flags against the injected labels.

    Missing days are left out (they are known, not detected). For one kind,
    precision counts only flags on days of that kind or on normal days, so other
    kinds' anomalies neither help nor hurt it.
    """
    days = flags[flags["anomaly"] != "missing"]
    flagged = (days["flag"] != "none").to_numpy()

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
    for kind in ANOMALY_KINDS:
        if kind != "missing":
            result[kind] = prf(label == kind, normal | (label == kind))
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def evaluate(test: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame | None, bundle: dict) -> dict:
    frame = test.assign(model=common.forecast(bundle["estimator"], test), persistence=test["temp_today"])
    observed = flags.rename(columns={"date": "target_date"})[["station", "target_date", "observed", "flag"]]
    frame = frame.merge(observed, on=["station", "target_date"], how="left", validate="one_to_one")
    metrics: dict = {"forecast": {}, "stations": int(frame["station"].nunique())}
    if truth is not None:
        truth = truth.rename(columns={"date": "target_date"})
        frame = frame.merge(truth, on=["station", "target_date"], how="left", validate="one_to_one")
        metrics["forecast"]["truth"] = forecast_scores(frame, "clean_temperature")
        normal = frame["anomaly"] == "none"
        labelled = flags.merge(truth.rename(columns={"target_date": "date"}), on=["station", "date"], how="left")
        metrics["detector"] = detector_scores(labelled)
    else:
        normal = frame["flag"] == "none"
        metrics["detector"] = {"skipped": "no ground-truth labels for these stations"}
    metrics["forecast"]["observed"] = forecast_scores(frame.assign(observed=frame["observed"].where(normal)),
                                                      "observed")
    metrics["gate_reference"] = "truth" if truth is not None else "observed"
    return metrics


def gate(metrics: dict, min_improvement: float) -> tuple[bool, str]:
    overall = metrics["forecast"][metrics["gate_reference"]]["all_stations"]
    model, persistence = overall["model"]["mae"], overall["persistence"]["mae"]
    limit = persistence * (1 - min_improvement)
    verdict = (f"model MAE {model:.3f} vs persistence {persistence:.3f} "
               f"({metrics['gate_reference']} reference; must be below {limit:.3f})")
    return model < limit, verdict


def format_table(metrics: dict) -> str:
    lines = []
    for reference, scores in metrics["forecast"].items():
        lines.append(f"Test MAE / RMSE in °C against the {reference} temperature"
                     + (" (clean simulated value)" if reference == "truth" else " (readings on normal days)"))
        lines.append(f"  {'':28}" + "".join(f"{p:>20}" for p in PREDICTORS))
        for group in ("all_stations", "trained_stations", "holdout_stations"):
            if group in scores:
                cells = [f"{s['mae']:.3f} / {s['rmse']:.3f}" if (s := scores[group].get(p)) else "-"
                         for p in PREDICTORS]
                n = scores[group]["model"]["n"]
                lines.append(f"  {group + f' (n={n})':28}" + "".join(f"{c:>20}" for c in cells))
    detector = metrics["detector"]
    if "skipped" in detector:
        lines.append(f"Anomaly detector: not scored ({detector['skipped']})")
    else:
        lines.append("Anomaly detector on test days    precision  recall     F1   days")
        for kind, s in detector.items():
            cells = [f"{v:.2f}" if v is not None else "-" for v in (s["precision"], s["recall"], s["f1"])]
            lines.append(f"  {kind:30}" + "".join(f"{c:>9}" for c in cells) + f"{s['days']:>7}")
    return "\n".join(lines)


def accepted_files(paths: Paths) -> list:
    return [paths.scaler, paths.detector, paths.model, paths.model_record, paths.metrics]


def accept(paths: Paths) -> None:
    """Copy the model set that just passed the gate to models/accepted/.

    The set accepted before it becomes models/previous/. A model that fails the
    gate, or a run that dies before this point, never touches either folder.
    """
    staged = paths.models / ".accepted.new"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    sums = {}
    for path in accepted_files(paths):
        common.write_bytes(staged / path.name, path.read_bytes())
        sums[path.name] = common.sha256_file(staged / path.name)
    common.write_json(staged / "SHA256SUMS.json", sums)
    common.replace_folder(staged, paths.accepted, backup=paths.previous)


def restore_previous(paths: Paths) -> None:
    """Swap models/accepted and models/previous, after checking the backup is intact."""
    sums = common.read_json(paths.previous / "SHA256SUMS.json")
    for name, digest in sums.items():
        path = paths.previous / name
        if not path.exists() or common.sha256_file(path) != digest:
            raise PipelineError(f"{path}: missing or damaged; the backup cannot be restored")
    swap = paths.models / ".accepted.swap"
    shutil.rmtree(swap, ignore_errors=True)
    paths.previous.rename(swap)
    common.replace_folder(swap, paths.accepted, backup=paths.previous)
    log.info("restored: %s now holds the previously accepted model (the replaced one is in %s)",
             paths.accepted, paths.previous)


def main(args) -> None:
    paths = Paths(args.root)
    if args.restore:
        restore_previous(paths)
        return
    params: Params = common.load_params(args.params)
    _, bundle, record = load_verified(paths)
    test = common.read_table(paths.test_features, TEST_COLUMNS)
    flags = common.read_table(paths.test_flags, FLAG_COLUMNS)
    truth = load_truth(paths.truth, sorted(test["station"].unique()))

    metrics = evaluate(test, flags, truth, bundle)
    passed, verdict = gate(metrics, params["evaluation"]["gate_min_improvement"])
    metrics.update(model=record["chosen"], gate={"passed": passed, "verdict": verdict},
                   model_sha256=common.sha256_file(paths.model))
    common.write_json(paths.metrics, metrics)
    common.record_stage(paths, STAGE, params, [paths.test_features, paths.test_flags, paths.model], [paths.metrics])

    print(format_table(metrics))
    if not passed:
        raise common.GateFailed(f"quality gate failed: {verdict}; {paths.accepted} keeps the last accepted model")
    accept(paths)
    log.info("quality gate passed: %s; accepted into %s", verdict, paths.accepted)


def parser():
    parser = common.stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--restore", action="store_true",
                        help="swap models/accepted with models/previous (undo the last acceptance) and exit")
    return parser


if __name__ == "__main__":
    raise SystemExit(common.run(STAGE, main, parser()))
