"""Quality control of station readings that tells sensor faults from weather, using the network.

Weather is shared by neighbouring stations; a sensor fault is not. So every
reading is compared with what its neighbours say it should be:

* **Neighbours** are learned on the days before the test period: the stations
  whose daily anomalies (reading minus the station's seasonal climatology)
  correlate best with this one's, at least ``min_correlation``. No coordinates are
  needed, so this works on a user's own files. Each neighbour predicts the
  station's anomaly by a straight line fitted on those days; the **expected
  value** of a reading is the climatology plus the median of its neighbours'
  predictions that day (a median, so one faulty neighbour cannot move it).
* The **departure** (reading minus expected value) is scaled by its robust spread
  on the learning days. A large isolated departure is a ``spike``; a departure
  whose median over the last ``shift_window`` days is large is persistent: a
  ``level_shift``, or a ``drift`` where it keeps growing. A run of identical
  readings is ``stuck`` when the neighbours moved while the sensor did not, or
  when it is longer than the station's own resolution makes likely (learned from
  how often its learning days repeat: whole-degree °F records repeat often).
* **Gross checks** run everywhere, and are all a station with no usable
  neighbour gets: a departure from the median of the ``window`` days before it
  beyond ``gross_margin`` times the 99.9th percentile of the station's own
  learning days (so its own weather is almost never flagged), and runs of
  repeats beyond what its resolution makes likely.

Every flag carries its kind and a confidence: 0.5 at the flag's threshold, odds
multiplied by e² for each robust standard deviation beyond it. Only flags with at
least ``repair_confidence`` are repaired: a spike, stuck or gross reading by its
expected value, a level shift or drift by removing the estimated offset (the
median departure of the last ``shift_window`` days). A missing day gets the
expected value, so features stay defined. Flags of day *t* use readings of days
up to *t* only; the neighbours are checked in two passes, the second leaving out
readings the first flagged, so a faulty neighbour does not make a station look
faulty.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

KINDS = ["gross", "spike", "level_shift", "drift", "stuck"]
NO_FLAG, MISSING = "none", "missing"
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
HARMONICS = 3  # yearly harmonics of the seasonal climatology
MIN_OVERLAP_DAYS = 90  # a neighbour must share at least this many learning days
GROSS_QUANTILE = 0.999
# Natural runs of identical readings longer than the stuck check allows happen at
# most this often per station and year.
NATURAL_RUNS_PER_YEAR = 0.5
CONFIDENCE_SLOPE = 2.0
# The level-shift CUSUM: innovations count beyond this allowance, each at most the cap,
# and evidence older than the window is forgotten.
CUSUM_ALLOWANCE = 0.5
CUSUM_CAP = 4.0
CUSUM_WINDOW = 45


def harmonic_design(dates: pd.DatetimeIndex) -> np.ndarray:
    """A constant and ``HARMONICS`` yearly sine/cosine pairs at each date."""
    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    terms = [np.ones(len(dates))]
    for k in range(1, HARMONICS + 1):
        terms += [np.sin(k * angle), np.cos(k * angle)]
    return np.column_stack(terms)


def fit_climatology(values: pd.DataFrame) -> pd.DataFrame:
    """Per station, least-squares coefficients of a mean plus yearly harmonics (stations with too few
    readings are left out)."""
    design = harmonic_design(values.index)
    coefs = {}
    for station in values.columns:  # one small least-squares fit per station, not per row
        ok = values[station].notna().to_numpy()
        if ok.sum() >= 10 * design.shape[1]:
            coefs[station] = np.linalg.lstsq(design[ok], values[station].to_numpy()[ok], rcond=None)[0]
    return pd.DataFrame(coefs, columns=pd.Index(list(coefs), dtype=object))


def climatology_at(coefs: pd.DataFrame, dates: pd.DatetimeIndex, stations: pd.Index) -> pd.DataFrame:
    """The seasonal mean of every station at ``dates``; NaN for stations without coefficients."""
    table = pd.DataFrame(harmonic_design(dates) @ coefs.to_numpy(), index=dates, columns=coefs.columns)
    return table.reindex(columns=stations)


def _robust_scale(values: pd.DataFrame) -> pd.Series:
    centred = values - values.median()
    return MAD_TO_SD * centred.abs().median()


def _pair_statistics(anomaly: np.ndarray) -> tuple[np.ndarray, ...]:
    """Correlation, slope and intercept of every station on every other, and the days they share.

    Pairwise-complete sums by matrix products (no loop over pairs): row i,
    column j describe predicting station i from station j on days both have.
    """
    present = ~np.isnan(anomaly)
    values = np.where(present, anomaly, 0.0)
    mask = present.astype(float)
    shared = mask.T @ mask
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(shared > 0, shared, np.nan)
        mean = (values.T @ mask) / n  # mean of i over days j is present too
        var = (values.T**2 @ mask) / n - mean**2
        cov = (values.T @ values) / n - mean * mean.T
        corr = cov / np.sqrt(var * var.T)
        slope = cov / var.T
        intercept = mean - slope * mean.T
    return corr, slope, intercept, shared


def learn_neighbours(anomaly: pd.DataFrame, n_neighbours: int, min_correlation: float) -> dict[str, list]:
    """For each station, its best-correlated stations on the learning days with a line predicting it."""
    corr, slope, intercept, shared = _pair_statistics(anomaly.to_numpy())
    stations = list(anomaly.columns)
    usable = (shared >= MIN_OVERLAP_DAYS) & (corr >= min_correlation) & np.isfinite(slope)
    np.fill_diagonal(usable, False)
    ranked = np.argsort(-np.where(usable, corr, -np.inf), axis=1, kind="stable")[:, :n_neighbours]
    neighbours = {}
    for i, station in enumerate(stations):  # one short list per station
        chosen = [j for j in ranked[i] if usable[i, j]]
        neighbours[station] = [{"station": stations[j], "correlation": round(float(corr[i, j]), 4),
                                "slope": round(float(slope[i, j]), 6), "intercept": round(float(intercept[i, j]), 6)}
                               for j in chosen]
    return neighbours


def expected_anomaly(anomaly: pd.DataFrame, neighbours: dict[str, list]) -> pd.DataFrame:
    """Each station's anomaly as its neighbours predict it: the median of their straight-line predictions
    on the same day (NaN where no neighbour has a reading)."""
    stations = list(anomaly.columns)
    position = {station: i for i, station in enumerate(stations)}
    width = max((len(v) for v in neighbours.values()), default=0)
    if width == 0:
        return pd.DataFrame(np.nan, index=anomaly.index, columns=anomaly.columns)
    index = np.full((len(stations), width), len(stations))  # points at an all-NaN column
    slope = np.zeros((len(stations), width))
    intercept = np.zeros((len(stations), width))
    for station, found in neighbours.items():
        if station not in position:
            continue
        i = position[station]
        for m, neighbour in enumerate(n for n in found if n["station"] in position):
            index[i, m] = position[neighbour["station"]]
            slope[i, m], intercept[i, m] = neighbour["slope"], neighbour["intercept"]
    padded = np.column_stack([anomaly.to_numpy(), np.full(len(anomaly), np.nan)])
    predictions = intercept + slope * padded[:, index]  # days x stations x neighbours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # days when no neighbour has a reading
        median = np.nanmedian(predictions, axis=2)
    return pd.DataFrame(median, index=anomaly.index, columns=anomaly.columns)


def trailing_median(observed: pd.DataFrame, window: int) -> pd.DataFrame:
    """The median of the ``window`` days before each day (at least half of them observed)."""
    return observed.shift(1).rolling(window, min_periods=max(1, window // 2)).median()


def offset_estimate(departure: pd.DataFrame, window: int) -> pd.DataFrame:
    """The persistent part of the departure: its median over the last ``window`` days, today included."""
    return departure.rolling(window, min_periods=window // 2 + 1).median()


def repeat_runs(observed: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """How many readings in a row equal today's (1 for a reading unlike yesterday's), and the row index
    where that run of identical readings began."""
    same = observed.diff().eq(0)
    count = same.cumsum()
    run = count - count.where(~same).ffill().fillna(0)
    start = np.arange(len(observed))[:, None] - run.to_numpy().astype(int)
    return run + 1, start


def natural_run_length(observed: pd.DataFrame) -> pd.Series:
    """Per station, the shortest run of identical readings its resolution makes rare enough to call stuck.

    With a share ``p`` of days repeating the day before, runs of ``k`` identical
    readings occur about 365 p^(k-1) times a year; the answer is the smallest
    ``k >= 3`` for which that is at most ``NATURAL_RUNS_PER_YEAR``.
    """
    pairs = observed.notna() & observed.shift(1).notna()
    repeat_share = (observed.diff().eq(0) & pairs).sum() / pairs.sum().clip(lower=1)
    p = repeat_share.clip(lower=1e-4, upper=0.9)
    k = 1 + np.ceil(np.log(NATURAL_RUNS_PER_YEAR / 365.0) / np.log(p))
    return k.clip(lower=3).astype(int)


def confidence(score: pd.DataFrame | np.ndarray, threshold: float | pd.Series) -> np.ndarray:
    """0.5 at the threshold, towards 1 beyond it: odds times e^CONFIDENCE_SLOPE per unit of score."""
    excess = np.asarray(score - threshold, dtype=float)
    return 1.0 / (1.0 + np.exp(-CONFIDENCE_SLOPE * np.clip(excess, -30, 30)))


def learn(observed: pd.DataFrame, learning: pd.DataFrame, qc: dict) -> dict:
    """Everything the detector needs, learned from readings on ``learning`` days only.

    Returns a JSON-ready dict: settings, per-station climatology coefficients,
    neighbours with their prediction lines, robust scales and gross thresholds.
    """
    values = observed.where(learning)
    coefs = fit_climatology(values)
    anomaly = values - climatology_at(coefs, observed.index, observed.columns)
    neighbours = learn_neighbours(anomaly, qc["neighbours"], qc["min_correlation"])
    settings = {key: qc[key] for key in ("window", "shift_window", "spike_threshold", "shift_threshold",
                                         "stuck_threshold", "repair_confidence")}
    detector = {**settings, "stations": {}}
    first_pass = _network_departures(observed, {"climatology": coefs, "neighbours": neighbours}, None)
    departure = first_pass["departure"].where(learning)
    persistence = _lag_one_correlation(departure)
    innovation = _innovation(first_pass["departure"], persistence).where(learning)
    jump = observed - trailing_median(observed, qc["window"])
    jump_scale = _robust_scale(jump.where(learning))
    jump_z = (jump.where(learning) / jump_scale).abs()
    gross = qc["gross_margin"] * jump_z.quantile(GROSS_QUANTILE)
    scales = {"departure_scale": _robust_scale(departure), "persistence": persistence,
              "innovation_scale": _robust_scale(innovation), "jump_scale": jump_scale, "gross_threshold": gross}
    run_length = natural_run_length(values)
    for station in observed.columns:
        entry = {"neighbours": neighbours.get(station, []), "stuck_run": int(run_length[station])}
        if station in coefs:
            entry["climatology"] = [round(float(c), 6) for c in coefs[station]]
        for name, series in scales.items():
            value = series.get(station, np.nan)
            if np.isfinite(value) and value > 0:
                entry[name] = round(float(value), 6)
        detector["stations"][station] = entry
    return detector


def _lag_one_correlation(departure: pd.DataFrame) -> pd.Series:
    """How much of a station's departure from its neighbours carries over to the next day, from a
    winsorised lag-one correlation (so a few faults do not decide it), kept in [0, 0.95]."""
    scale = _robust_scale(departure)
    clipped = departure.clip(lower=-4 * scale, upper=4 * scale, axis=1)
    return clipped.corrwith(clipped.shift(1)).clip(lower=0.0, upper=0.95)


def _innovation(departure: pd.DataFrame, persistence: pd.Series) -> pd.DataFrame:
    """The part of today's departure that the last days' departures do not explain.

    The prediction is the persistence times the median of the three days
    before, so a single faulty day does not disturb the next days' innovations.
    """
    recent = departure.shift(1).rolling(3, min_periods=1).median().fillna(0.0)
    return departure - recent * persistence


def _windowed_cusum(z: pd.DataFrame, allowance: float, cap: float, window: int) -> pd.DataFrame:
    """The largest sum of (clipped z - allowance) over any run of days ending today within ``window``:
    a CUSUM that forgets evidence older than the window, computed with cumulative sums (no loop)."""
    step = z.clip(lower=-cap, upper=cap).fillna(0.0) - allowance
    total = step.cumsum()
    earlier = total.shift(1).fillna(0.0).rolling(window, min_periods=1).min().clip(upper=0.0)
    return (total - earlier).clip(lower=0.0)


def _network_departures(observed: pd.DataFrame, model: dict, leave_out: pd.DataFrame | None) -> dict:
    """Expected value and departure of every reading, from the neighbours' readings (less ``leave_out``)."""
    climatology = climatology_at(model["climatology"], observed.index, observed.columns)
    anomaly = observed - climatology
    buddies = anomaly if leave_out is None else anomaly.mask(leave_out)
    expected = climatology + expected_anomaly(buddies, model["neighbours"])
    return {"expected": expected, "departure": observed - expected}


def _station_table(detector: dict, stations: pd.Index, key: str) -> pd.Series:
    return pd.Series({s: detector["stations"].get(s, {}).get(key, np.nan) for s in stations}, dtype=float)


def detect(observed: pd.DataFrame, detector: dict) -> dict[str, pd.DataFrame]:
    """Flag every reading and repair the confident faults (date x station tables).

    Returns ``flag`` (none, missing, or a kind of fault), ``confidence``,
    ``score`` (the robust z-score that decided it), ``expected`` and ``repaired``.
    """
    stations = observed.columns
    coefs = pd.DataFrame({s: e["climatology"] for s, e in detector["stations"].items()
                          if "climatology" in e and s in stations})
    model = {"climatology": coefs.reindex(columns=[s for s in stations if s in coefs]),
             "neighbours": {s: e["neighbours"] for s, e in detector["stations"].items()}}
    first = _classify(observed, detector, _network_departures(observed, model, None))
    # Second pass: readings the first pass flagged do not speak for their neighbours.
    suspect = first["flag"].isin(KINDS)
    result = _classify(observed, detector, _network_departures(observed, model, suspect))
    return result


def _classify(observed: pd.DataFrame, detector: dict, network: dict) -> dict[str, pd.DataFrame]:
    stations = observed.columns
    scale = _station_table(detector, stations, "departure_scale")
    persistence = _station_table(detector, stations, "persistence")
    innovation_scale = _station_table(detector, stations, "innovation_scale")
    jump_scale = _station_table(detector, stations, "jump_scale")
    gross_threshold = _station_table(detector, stations, "gross_threshold")
    stuck_run = _station_table(detector, stations, "stuck_run").fillna(1e9)

    departure, expected = network["departure"], network["expected"]
    z = departure / scale
    innovation = _innovation(departure, persistence)
    innovation_z = innovation / innovation_scale
    offset = offset_estimate(departure, detector["shift_window"])
    reference = trailing_median(observed, detector["window"])
    jump_z = (observed - reference) / jump_scale

    up = _windowed_cusum(innovation_z, CUSUM_ALLOWANCE, CUSUM_CAP, CUSUM_WINDOW)
    down = _windowed_cusum(-innovation_z, CUSUM_ALLOWANCE, CUSUM_CAP, CUSUM_WINDOW)
    shift_z = up.where(departure > 0, down)
    # Persistent: the evidence for a changed level is strong and today's reading shares the offset.
    persistent = (shift_z > detector["shift_threshold"]) & (np.sign(departure) == np.sign(offset)) \
        & (departure.abs() > 0.5 * offset.abs())
    growing = (offset - offset.shift(detector["shift_window"])).abs() > 2 * scale
    spike = (innovation_z.abs() > detector["spike_threshold"]) & (np.sign(innovation) == np.sign(departure)) \
        & (departure.abs() >= 0.5 * innovation.abs()) & ~persistent
    gross = jump_z.abs() > gross_threshold

    run, start = repeat_runs(observed)
    z_values = z.to_numpy()
    moved = np.abs(z_values - np.take_along_axis(z_values, start, axis=0)) > detector["stuck_threshold"]
    moved &= (run > 1).to_numpy()
    # Once the neighbours have moved away from a run of repeats, the rest of the run is stuck too.
    rows = np.arange(len(observed))[:, None]
    last_moved = np.maximum.accumulate(np.where(moved, rows, -1), axis=0)
    stuck_by_network = (run > 1).to_numpy() & (last_moved >= start)
    streak = run.to_numpy() >= stuck_run.to_numpy()[None, :]
    stuck = pd.DataFrame(stuck_by_network | streak, index=observed.index, columns=stations)

    missing = observed.isna()
    flag = np.select(
        [missing.to_numpy(), stuck.to_numpy(), gross.to_numpy(), (persistent & growing).to_numpy(),
         persistent.to_numpy(), spike.to_numpy()],
        [MISSING, "stuck", "gross", "drift", "level_shift", "spike"], NO_FLAG)
    flag = pd.DataFrame(flag, index=observed.index, columns=stations)

    neighbour_score = (innovation_z.abs() - detector["spike_threshold"]).where(flag == "spike")
    shift_score = (shift_z - detector["shift_threshold"]).where(flag.isin(["level_shift", "drift"]))
    gross_score = (jump_z.abs() - gross_threshold).where(flag == "gross")
    stuck_natural = pd.DataFrame(np.where(streak, 1.0, 0.0), index=observed.index, columns=stations)
    stuck_score = (z - pd.DataFrame(np.take_along_axis(z_values, start, axis=0), index=observed.index,
                                    columns=stations)).abs() - detector["stuck_threshold"]
    stuck_score = np.maximum(stuck_score.fillna(-np.inf), stuck_natural * (run - stuck_run + 1)).where(
        flag == "stuck")
    excess = neighbour_score.fillna(shift_score).fillna(gross_score).fillna(stuck_score)
    sure = pd.DataFrame(confidence(excess, 0.0), index=observed.index, columns=stations).where(flag.isin(KINDS))

    fallback = expected.fillna(reference)
    confident = sure >= detector["repair_confidence"]
    repaired = observed.copy()
    repaired = repaired.mask(confident & flag.isin(["spike", "stuck", "gross"]), fallback)
    repaired = repaired.mask(confident & flag.isin(["level_shift", "drift"]), observed - offset)
    repaired = repaired.mask(missing, fallback)
    score = z.abs().where(flag != "gross", jump_z.abs())
    return {"flag": flag, "confidence": sure, "score": score, "expected": fallback, "repaired": repaired}


def no_detection(observed: pd.DataFrame, window: int) -> dict[str, pd.DataFrame]:
    """The verdict with quality control switched off: nothing flagged, missing days filled with the
    median of the days before them so the features stay defined."""
    reference = trailing_median(observed, window)
    flag = pd.DataFrame(np.where(observed.isna(), MISSING, NO_FLAG), index=observed.index, columns=observed.columns)
    empty = pd.DataFrame(np.nan, index=observed.index, columns=observed.columns)
    return {"flag": flag, "confidence": empty, "score": empty, "expected": reference,
            "repaired": observed.fillna(reference)}
