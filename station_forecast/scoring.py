"""How forecasts, intervals and the detector are scored: every predictor on the same rows, against each
reference a user has (the truth where simulated, every observed reading, and apart from those the readings
the detector accepted), overall, by group of stations, per station and per step ahead; and the quality gate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from station_forecast.features import BASELINE_COLUMNS
from station_forecast.flags import FAULTS, SCORED, Flag
from station_forecast.report import PREDICTORS, REFERENCE_COLUMNS
from station_forecast.runtime import lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")


class ErrorSums(NamedTuple):
    """What a forecast's scores are made of, summed over its rows: the sums of blocks of rows add up (``+``)
    to those of all the rows, so a network too large to hold is scored a block of stations at a time.
    ``spread`` is the sum of squared deviations of the actual values from their ``mean`` (merged by Chan
    et al.'s pairwise rule). One block's scores are, bit for bit, what the same rows score in one piece."""

    n: int
    abs_error: float
    squared_error: float
    mean: float
    spread: float

    @classmethod
    def of(cls, actual: np.ndarray, predicted: np.ndarray) -> ErrorSums:
        if not len(actual):
            return NO_ERRORS
        error = predicted - actual
        mean = actual.mean()
        return cls(len(actual), np.sum(np.abs(error)), np.sum(error**2), mean, np.sum((actual - mean) ** 2))

    def __add__(self, other: ErrorSums) -> ErrorSums:  # type: ignore[override]
        if not other.n or not self.n:
            return other if self.n == 0 else self
        n = self.n + other.n
        delta = other.mean - self.mean
        return ErrorSums(n, self.abs_error + other.abs_error, self.squared_error + other.squared_error,
                         self.mean + delta * other.n / n, self.spread + other.spread + delta**2 * self.n * other.n / n)

    def scores(self) -> dict:
        return {
            "n": self.n,
            "mae": round(float(self.abs_error / self.n), 4),
            "rmse": round(float(np.sqrt(self.squared_error / self.n)), 4),
            "r2": round(float(1 - self.squared_error / self.spread), 4) if self.spread > 0 else None,
        }


def score(actual: np.ndarray, predicted: np.ndarray) -> dict:
    return ErrorSums.of(actual, predicted).scores()


BANDED = ("model", "persistence")  # the predictors whose bands are scored
BANDS = [f"{p}_{bound}" for p in BANDED for bound in ("lower", "upper")]


def scored_rows(frame: pd.DataFrame, actual: str, columns: list[str]) -> pd.DataFrame:
    """The rows with a value of ``actual``, in their order, and only the columns a score reads (``actual``,
    the station and ``columns``), not a copy of the whole frame per reference: at 3,000 stations x 10 years
    stage 4's peak fell from 1.20 to 0.99 GB, with the same bytes."""
    kept = frame[actual].notna().to_numpy()
    return frame.loc[kept, list(dict.fromkeys([actual, "station", *columns]))]


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
    return float(_pinball_sum(actual, quantile, alpha) / len(actual))


def _pinball_sum(actual: np.ndarray, quantile: np.ndarray, alpha: float) -> float:
    diff = actual - quantile
    above = (diff >= 0).astype(diff.dtype)
    return np.sum(alpha * above * diff - (1 - alpha) * (1 - above) * diff)


class IntervalSums(NamedTuple):
    """What a band's scores are made of, summed over its rows (added up as ``ErrorSums`` are): how many rows
    it covers, misses below and above, its widths and its bounds' quantile losses."""

    n: int
    covered: int
    below: int
    above: int
    width: float
    lower_loss: float
    upper_loss: float

    @classmethod
    def of(cls, actual: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float) -> IntervalSums:
        tail = (1 - level) / 2
        return cls(len(actual), int(((actual >= lower) & (actual <= upper)).sum()), int((actual < lower).sum()),
                   int((actual > upper).sum()), np.sum(upper - lower), _pinball_sum(actual, lower, tail),
                   _pinball_sum(actual, upper, 1 - tail))

    def __add__(self, other: IntervalSums) -> IntervalSums:  # type: ignore[override]
        return IntervalSums(*(mine + theirs for mine, theirs in zip(self, other, strict=True)))

    def scores(self) -> dict:
        """Coverage, mean width and pinball loss (the mean of the two bounds' quantile losses; lower is
        better, and it punishes both a band that misses and one that is too wide)."""
        pinball = (float(self.lower_loss / self.n) + float(self.upper_loss / self.n)) / 2
        return {
            "n": self.n,
            "coverage": round(self.covered / self.n, 4),
            "below": round(self.below / self.n, 4),
            "above": round(self.above / self.n, 4),
            "width": round(float(self.width / self.n), 4),
            "pinball": round(pinball, 4),
        }


NO_ERRORS = ErrorSums(0, 0.0, 0.0, 0.0, 0.0)  # the sums of no rows: where adding up starts
NO_INTERVALS = IntervalSums(0, 0, 0, 0, 0.0, 0.0, 0.0)


def interval_score(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float) -> dict:
    """Coverage, mean width and pinball loss of a central ``level`` interval."""
    return IntervalSums.of(actual, lower, upper, level).scores()


# The groups of rows scored, each with the predictors scored on it. Climatology and drift exist only for
# stations seen in training: with held-out stations, all stations are scored on model and persistence, and
# the trained and held-out ones apart; without, all stations on every predictor (a trained group would repeat
# it). Within a group every predictor is scored on the same rows.
GROUP_PREDICTORS = {"all_stations": list(BANDED), "trained_stations": PREDICTORS, "holdout_stations": list(BANDED)}


def _trained(rows: pd.DataFrame) -> np.ndarray:
    """The rows of stations seen in training: every baseline exists."""
    return rows[BASELINE_COLUMNS].notna().all(axis=1).to_numpy()


def _finished_groups(sums: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """The scores of the groups ``GROUP_PREDICTORS`` names, from their sums: without held-out rows, one
    group of all stations on every predictor (the trained rows are then all the rows)."""
    if not sums["holdout_stations"]["model"].n:
        trained = sums["trained_stations"]
        return {"all_stations": {p: s.scores() for p, s in trained.items()}} if trained["model"].n else {}
    return {group: {p: s.scores() for p, s in sums[group].items()} for group in GROUP_PREDICTORS
            if sums[group]["model"].n}


class Tally:
    """The scores of a test period, added up a block of stations at a time (``add_forecasts`` and
    ``add_detector``) and finished once (``metrics``): the same metrics as scoring all the rows in one piece, which
    one block is, bit for bit; more blocks differ from it only by the rounding of sums."""

    def __init__(self, level: float, truth: bool) -> None:
        self.level = level
        self.references = ["truth", "observed", "accepted"] if truth else ["observed", "accepted"]
        self.gate_reference = "truth" if truth else "observed"
        self.stations = 0
        self.forecast = {ref: {group: {p: NO_ERRORS for p in predictors}
                               for group, predictors in GROUP_PREDICTORS.items()} for ref in self.references}
        self.interval = {ref: {group: {p: NO_INTERVALS for p in BANDED}
                               for group in GROUP_PREDICTORS} for ref in self.references}
        self.per_station: dict[str, dict[str, dict]] = {ref: {} for ref in self.references}
        self.interval_per_station: dict[str, dict[str, dict]] = {ref: {} for ref in self.references}
        self.by_step: dict[int, dict[str, dict]] = {}
        self.truth = truth
        self.detector: DetectorCounts | None = None

    def add_forecasts(self, frame: pd.DataFrame) -> None:
        """Score a block's predictions (``model_testing.predictions``; every station's rows in one block)."""
        self.stations += int(frame["station"].nunique())
        for reference in self.references:
            column = REFERENCE_COLUMNS[reference]
            rows = scored_rows(frame, column, ["step", *PREDICTORS, *BANDS])
            trained = _trained(rows)
            parts = {"all_stations": rows, "trained_stations": rows[trained], "holdout_stations": rows[~trained]}
            for group, predictors in GROUP_PREDICTORS.items():
                part = parts[group]
                y = part[column].to_numpy()
                sums = self.forecast[reference][group]
                for p in predictors:
                    sums[p] = sums[p] + ErrorSums.of(y, part[p].to_numpy())
                bands = self.interval[reference][group]
                for p in BANDED:
                    bands[p] = bands[p] + IntervalSums.of(y, part[f"{p}_lower"].to_numpy(),
                                                          part[f"{p}_upper"].to_numpy(), self.level)
            for station, values in by_station(rows, [column, *PREDICTORS, "model_lower", "model_upper"]):
                y = values[column]
                self.per_station[reference][station] = {p: score(y, values[p]) for p in PREDICTORS
                                                        if not np.isnan(values[p]).any()}
                self.interval_per_station[reference][station] = interval_score(
                    y, values["model_lower"], values["model_upper"], self.level)
            if reference == self.gate_reference:
                self._add_steps(rows[trained], column)

    def add_detector(self, flags: pd.DataFrame, truth: pd.DataFrame | None) -> None:
        """Count a block's test days' flags against its ground truth (none without it)."""
        if (truth is not None) != self.truth:
            raise ValueError("ground truth for some blocks of stations and not for others")
        if truth is not None:
            counts = DetectorCounts.of(flags.merge(truth, on=["station", "date"], how="left"))
            self.detector = counts if self.detector is None else self.detector + counts

    def _add_steps(self, rows: pd.DataFrame, column: str) -> None:
        """Per step ahead, on the rows of stations seen in training (where every baseline exists)."""
        for step, part in rows.groupby("step"):
            y = part[column].to_numpy()
            sums = self.by_step.setdefault(int(step), {
                "forecast": {p: NO_ERRORS for p in PREDICTORS},
                "interval": {p: NO_INTERVALS for p in BANDED}})
            for p in PREDICTORS:
                sums["forecast"][p] = sums["forecast"][p] + ErrorSums.of(y, part[p].to_numpy())
            for p in BANDED:
                sums["interval"][p] = sums["interval"][p] + IntervalSums.of(
                    y, part[f"{p}_lower"].to_numpy(), part[f"{p}_upper"].to_numpy(), self.level)

    def metrics(self) -> dict:
        metrics: dict = {"forecast": {}, "interval": {"level": self.level}, "stations": self.stations,
                         "gate_reference": self.gate_reference}
        metrics["detector"] = self.detector.scores() if self.detector is not None \
            else {"skipped": "no ground-truth labels for these stations"}
        for reference in self.references:
            metrics["forecast"][reference] = {**_finished_groups(self.forecast[reference]),
                                              "per_station": dict(sorted(self.per_station[reference].items()))}
            metrics["interval"][reference] = {**_finished_groups(self.interval[reference]), "per_station": dict(
                sorted(self.interval_per_station[reference].items()))}
        metrics["by_step"] = {str(step): {kind: {p: s.scores() for p, s in sums[kind].items()}
                                          for kind in ("forecast", "interval")}
                              for step, sums in sorted(self.by_step.items())}
        return metrics


class DetectorCounts(NamedTuple):
    """Days counted for the detector's scores (``scores``), added up block by block: per kind (``"any"`` and
    each scored kind) the fault days, the flags and the right flags; per kind of weather its fault-free days
    and the flagged ones; and how many days were counted."""

    kinds: dict[str, tuple[int, int, int]]
    weather: dict[str, tuple[int, int]]
    days: int

    @classmethod
    def of(cls, flags: pd.DataFrame) -> DetectorCounts:
        """Missing days are left out (they are known, not detected). For one kind, precision counts only
        flags on days of that kind or on normal days, so other kinds' anomalies neither help nor hurt it."""
        days = flags[flags["anomaly"] != Flag.MISSING]
        flagged = days["flag"].isin(FAULTS).to_numpy()
        label = days["anomaly"].to_numpy()
        normal = label == Flag.NONE

        def counted(positive: np.ndarray, considered: np.ndarray) -> tuple[int, int, int]:
            return (int((positive & considered).sum()), int((flagged & considered).sum()),
                    int((flagged & positive & considered).sum()))

        kinds = {"any": counted(~normal, np.ones_like(normal))}
        kinds.update({kind: counted(label == kind, normal | (label == kind)) for kind in SCORED})
        event = days["event"].to_numpy()
        weather = {"weather_events": normal & (event != "none"),  # cold snaps, heat waves and fronts
                   "fronts": normal & (event == "front")}
        return cls(kinds, {name: (int(w.sum()), int((flagged & w).sum())) for name, w in weather.items()},
                   len(days))

    def __add__(self, other: DetectorCounts) -> DetectorCounts:  # type: ignore[override]
        return DetectorCounts({k: tuple(a + b for a, b in zip(v, other.kinds[k], strict=True))
                               for k, v in self.kinds.items()},
                              {k: tuple(a + b for a, b in zip(v, other.weather[k], strict=True))
                               for k, v in self.weather.items()}, self.days + other.days)

    def scores(self) -> dict:
        """Point-wise precision, recall and F1 of the flags against the injected labels."""
        def prf(n_positive: int, n_flagged: int, tp: int) -> dict:
            precision = tp / n_flagged if n_flagged else None
            recall = tp / n_positive if n_positive else None
            f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
            return {"days": n_positive, "flagged": n_flagged, "precision": _round(precision),
                    "recall": _round(recall), "f1": _round(f1)}

        def share(days: int, flagged: int) -> dict:  # as shares of all days, then their ratio
            return {"days": days, "flagged": flagged,
                    "share": _round(float((flagged / self.days) / (days / self.days))) if days else None}

        return {**{kind: prf(*counts) for kind, counts in self.kinds.items()},
                **{name: share(*counts) for name, counts in self.weather.items()}}


def detector_scores(flags: pd.DataFrame) -> dict:
    """Point-wise precision, recall and F1 of the flags against the injected labels (``DetectorCounts``)."""
    return DetectorCounts.of(flags).scores()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def evaluate(frame: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame | None, level: float) -> dict:
    """Every score of a test period held in one piece (``Tally`` of one block)."""
    tally = Tally(level, truth is not None)
    tally.add_forecasts(frame)
    tally.add_detector(flags, truth)
    return tally.metrics()


def gate(metrics: dict, min_improvement: float) -> tuple[bool, str]:
    overall = metrics["forecast"][metrics["gate_reference"]]["all_stations"]
    model, persistence = overall["model"]["mae"], overall["persistence"]["mae"]
    limit = persistence * (1 - min_improvement)
    verdict = (f"model MAE {model:.3f} vs persistence {persistence:.3f} "
               f"({metrics['gate_reference']} reference; must be below {limit:.3f})")
    return model < limit, verdict


def flagged_aside(metrics: dict) -> str:
    """Beside a failed gate on the ``observed`` reference, when the detector flagged some of the readings it
    scored: how many, and the model and persistence against the others (``accepted``). A stuck sensor in the
    test period makes persistence look perfect on its readings; the gate still judges every reading, and this
    only says where to look. Empty where no scored reading was flagged or the reference is the truth."""
    if metrics["gate_reference"] != "observed" or "accepted" not in metrics["forecast"]:
        return ""
    every, accepted = (metrics["forecast"][name]["all_stations"] for name in ("observed", "accepted"))
    rows, kept = every["model"]["n"], accepted.get("model", {}).get("n", 0)
    if kept >= rows:
        return ""
    aside = f"{rows - kept:,} of the {rows:,} readings scored were flagged by the detector"
    if kept:
        aside += (f"; against the other {kept:,} (accepted, a reference beside the gate) model MAE "
                  f"{accepted['model']['mae']:.3f} vs persistence {accepted['persistence']['mae']:.3f}")
    return aside + ": check the flags (reports/summary.md) before trusting either"
