"""What the detector learns from the training days: climatologies, neighbours, scales and thresholds, in rounds that
leave out what the previous round flagged.
"""

from __future__ import annotations

from station_forecast import runtime
from station_forecast.compute import Pool
from station_forecast.quality_control.checks import (
    departure_innovation,
    offset_alignment,
    reading_facts,
    reading_resolution,
    repeat_share,
    repeat_share_by_month,
    trailing_median,
    written_codes,
)
from station_forecast.quality_control.climatology import (
    borrow_seasons,
    climatology_at,
    fit_climatology,
    months_seen,
    robust_seasonal_fit,
    within_climate,
)
from station_forecast.quality_control.neighbours import (
    EXPECTED_BLOCK,
    expected_anomaly,
    learn_neighbours,
    network_departures,
    reporting_neighbours,
)
from station_forecast.quality_control.robust import robust_scale, seasonal_scale
from station_forecast.quality_control.verdict import detect, local_threads
from station_forecast.runtime import Progress, lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")
GROSS_QUANTILE = 0.999
# A station whose file is in °C while the others are in °F (or the reverse), all read with one import.unit: its
# mean lies tens of degrees from its neighbours' (10 °C read as °F is -12.2 °C; stations of one network differ
# by at most a few, 3.7 °C at most on nine real ones) and its anomalies swing 5/9 (or 9/5) times theirs.
UNIT_LEVEL_GAP = 15.0
# Read in the other unit, a mean of t °C reads as 9/5 t + 32 (°F numbers read as °C) and swings 9/5 times as far,
# or as (t - 32) 5/9 (°C numbers read as °F) and swings 5/9 times as far: warmer with the one ratio, colder with
# the other (above -40 °C). A station colder than its neighbours whose weather swings more (a mountain top among
# valleys), or warmer and swinging less, is no unit mix-up.
UNIT_RATIOS = (5 / 9, 9 / 5)
# Stations of one network differ in how far their weather swings (0.72-1.32 times their neighbours' on nine real
# networks), so a station in another unit swings that much either side of 5/9 or 9/5 of theirs.
UNIT_TOLERANCE = 0.35
# One provisional round, then the final fit. A second provisional round (as there was) moved pooled F1 on eight
# simulated networks by at most 0.006 per kind (drift on single networks by up to 0.02) and flagged 78 fault-free
# days where one round flags 70; on nine real networks it flagged as many readings or more; and it cost a fit and
# a verdict more (about 4 s of stage 2 at 1,000 stations x 10 years).
LEARNING_ROUNDS = 1
PROVISIONAL_CORRELATION = 0.5
# °C: no day's temperature is further than this from the median of the days before it (the largest day-to-day
# changes on record are 30-50 °C in hourly readings, less in daily values); the gross check never allows more.
JUMP_CEILING = 50.0


def learn(observed: pd.DataFrame, learning: pd.DataFrame, qc: dict, pool: Pool | None = None,
          jump_ceiling: float = float("inf"), positions: np.ndarray | None = None) -> dict:
    """Everything the detector needs, learned from readings on ``learning`` days only.

    Faults in the learning days would weaken the neighbours' correlations and
    widen the scales, so learning is repeated: after each round, the readings
    that round's detector flags are left out of the next (``LEARNING_ROUNDS``).
    Returns a JSON-ready dict: settings, per-station climatology coefficients,
    neighbours with their prediction lines, robust scales and thresholds. The
    gross threshold is learned from readings plausible by climate, and never
    allows a jump beyond ``jump_ceiling`` (``JUMP_CEILING`` for temperatures). ``positions``: the stations'
    latitudes and longitudes, where known (``neighbours.pair_statistics``).
    """
    settings = {key: qc[key] for key in ("window", "spike_threshold", "shift_threshold", "stuck_threshold",
                                         "offset_threshold", "repair_confidence", "climate_margin")}
    # Everything here is causal, so the days after the last learning day change nothing: leave them out.
    last = learning.any(axis=1)[::-1].idxmax() if learning.to_numpy().any() else observed.index[-1]
    observed, learning = observed.loc[:last], learning.loc[:last]
    threads = local_threads(pool)
    # A missing-value code written as a reading teaches nothing: every learned value comes from the rest (the
    # verdict then finds the code far outside the station's climate, a gross error).
    codes = written_codes(observed.where(learning))
    if codes:
        learning = learning & ~pd.DataFrame({station: observed[station].isin(codes.get(station, []))
                                             for station in observed.columns})
    plausible = observed.mask(learning & ~within_climate(observed.where(learning), qc["climate_margin"], threads))
    jump = plausible - trailing_median(plausible, qc["window"], threads)
    jump_scale = robust_scale(jump.where(learning), threads)
    jump_z = (jump.where(learning) / jump_scale).abs()
    threshold = np.minimum(qc["gross_margin"] * jump_z.quantile(GROSS_QUANTILE), jump_ceiling / jump_scale)
    gross = {"jump_scale": jump_scale, "gross_threshold": threshold}
    del plausible, jump, jump_z  # days x stations tables let go once used: at scale they are the stage's peak
    # The provisional rounds only decide which readings to trust, so they accept weaker neighbours: a
    # faulty station's correlations are low until its faults are left out.
    provisional = dict(qc, min_correlation=min(qc["min_correlation"], PROVISIONAL_CORRELATION))
    trusted = learning
    learning_readings = observed.where(learning)
    facts = reading_facts(learning_readings, qc["window"], threads)
    progress = Progress("quality control learning rounds", LEARNING_ROUNDS + 1)
    for _ in range(LEARNING_ROUNDS):
        detector = _fit(observed, learning, trusted, provisional, settings, gross, threads, final=False,
                        positions=positions)
        # One pass is enough to decide which readings to trust (the second changed F1 by at most 0.02 on
        # three simulated networks) and a third of the work.
        found = detect(learning_readings, detector, pool, second_pass=False, onsets=True, facts=facts)
        # Learning need not be causal: a shift or drift is left out from the day it began, not only
        # from the day it was found.
        trusted = learning & ~found["fault"] & ~since_onset(found["onset"])
        del found
        progress.step()
    detector = _fit(observed, learning, trusted, qc, settings, gross, threads, positions=positions)
    for station, values in codes.items():
        detector["stations"][station]["codes"] = values
    return detector


def _fit(observed: pd.DataFrame, learning: pd.DataFrame, trusted: pd.DataFrame, qc: dict, settings: dict,
         gross: dict[str, pd.Series], threads: int = 1, final: bool = True, positions: np.ndarray | None = None
         ) -> dict:
    """One round of learning: climatology, neighbours and scales from the ``trusted`` readings (on
    ``threads`` threads where the work is station by station); the date-offset test's scales only if
    ``final``."""
    values = observed.where(trusted)
    coefs = fit_climatology(values)
    # A station whose readings miss some months (one that started less than a year ago) would have its
    # climatology guessed there, and harmonics fitted to a few months also soak up their weather, hiding
    # the neighbours that share it. So it takes the network's typical seasons until its neighbours are
    # known, then those of its neighbours that cover the year, each time at its own level.
    seen_months = months_seen(values)
    seen = seen_months.all()
    short = [station for station in seen.index[~seen] if station in coefs]
    full = [station for station in seen.index[seen] if station in coefs]
    typical = coefs[full].median(axis=1).to_numpy() if full else None
    coefs = borrow_seasons(coefs, values, dict.fromkeys(short, typical))
    anomaly = values - climatology_at(coefs, observed.index, observed.columns)
    neighbours = learn_neighbours(anomaly, qc["neighbours"], qc["min_correlation"], positions, readings=values,
                                  threads=threads)
    if short:  # the readings less the weather the neighbours share: mostly the station's own climatology
        weather = expected_anomaly(anomaly, {station: neighbours[station] for station in short}, threads)[short]
        coefs = borrow_seasons(coefs, values[short] - weather.fillna(0.0),
                               {station: _neighbours_shape(coefs, neighbours[station], seen, typical)
                                for station in short})
    del anomaly
    departure = network_departures(values, climatology_at(coefs, values.index, values.columns), neighbours,
                                    None, threads)["departure"]
    # A fault the detector missed in some season biases that season's climatology; against the
    # neighbours it stands out, so the departures' own seasonal mean, fitted robustly, corrects it
    # (only its level where the station has not seen the whole year).
    correction = pd.concat([robust_seasonal_fit(departure.loc[:, seen], threads=threads),
                            robust_seasonal_fit(departure.loc[:, ~seen], harmonics=0, threads=threads)], axis=1)
    del departure
    coefs = coefs + correction.reindex(columns=coefs.columns, fill_value=0.0)
    climatology = climatology_at(coefs, values.index, values.columns)
    network = network_departures(values, climatology, neighbours, None, threads)
    departure = network["departure"]
    departure_scale = robust_scale(departure, threads)
    # How far the departure wanders in each season (a sea breeze, a town's summer heat): the floor below
    # which a week's mean departure is local weather, not a shift (only the final fit uses it).
    season_scale = seasonal_scale(departure, threads) if final else None
    # On every learning day, not the trusted ones only: a station keyed a day apart from its neighbours for
    # years would otherwise have those years left out after the first round, and look aligned.
    # Only the final fit tests for date offsets: with the provisional rounds testing too, date-offset F1 on four
    # simulated networks moved by -0.05 to +0.01 (the other kinds' by as little either way), for about 2 s more
    # at 1,000 stations x 10 years.
    unknown = pd.Series(np.nan, index=observed.columns)
    change_scale, alignment, by_month = offset_alignment(observed.where(learning), network["expected"],
                                                         reporting_neighbours(values, neighbours), learning) \
        if final else (unknown, unknown, None)
    del network
    persistence = _lag_one_correlation(departure, departure_scale, threads)
    innovation = departure_innovation(departure, persistence, departure_scale)
    scales = {"departure_scale": departure_scale, "persistence": persistence,
              "innovation_scale": robust_scale(innovation, threads), **gross,
              "anomaly_scale": robust_scale(values - climatology, threads), "change_scale": change_scale}
    share = repeat_share(values)
    share_by_month, resolution = repeat_share_by_month(values, share), reading_resolution(values)

    detector = {**settings, "stations": {}}
    for station in observed.columns:
        entry = {"neighbours": neighbours[station], "repeat_share": round(float(share[station]), 6),
                 "repeat_share_by_month": _by_month(share_by_month[station], share[station])}
        if np.isfinite(resolution[station]):
            entry["resolution"] = round(float(resolution[station]), 6)
        if np.isfinite(alignment[station]):
            entry["offset_alignment"] = round(float(alignment[station]), 6)
            entry["offset_alignment_by_month"] = _by_month(by_month[station], alignment[station])
        if season_scale is not None and np.isfinite(departure_scale.get(station, np.nan)):
            entry["departure_scale_by_month"] = _by_month(season_scale[station], departure_scale[station])
        if station in short:
            entry["seen_months"] = int(seen_months[station].to_numpy() @ (1 << np.arange(12)))
        if station in coefs:
            entry["climatology"] = [round(float(c), 6) for c in coefs[station]]
        for name, series in scales.items():
            value = series.get(station, np.nan)
            if np.isfinite(value) and (value > 0 or name == "persistence"):
                entry[name] = round(float(value), 6)
        detector["stations"][station] = entry
    return detector


def _by_month(values: pd.Series, overall: float) -> list[float]:
    """A station's value for each calendar month, as stored: the station's own where a month had no days."""
    return [round(float(value), 6) for value in values.fillna(overall)]


def _neighbours_shape(coefs: pd.DataFrame, found: dict, seen: pd.Series, otherwise: np.ndarray | None
                      ) -> np.ndarray | None:
    """The mean climatology coefficients of a station's neighbours that have seen the whole year
    (``otherwise`` if it has none)."""
    usable = [b["station"] for b in found["buddies"] if b["station"] in coefs and seen.get(b["station"], False)]
    return coefs[usable].to_numpy().mean(axis=1) if usable else otherwise


def _lag_one_correlation(departure: pd.DataFrame, scale: pd.Series, threads: int = 1) -> pd.Series:
    """How much of a station's departure from its neighbours carries over to the next day, from a
    winsorised lag-one correlation (so a few faults do not decide it), kept in [0, 0.95]; ``scale``: the
    departure's robust spread. Station by station, so in blocks of ``EXPECTED_BLOCK`` on ``threads``
    threads (the same values as in one piece)."""
    blocks = runtime.chunks(departure.columns, EXPECTED_BLOCK)
    if not blocks:
        return pd.Series(dtype=float, index=departure.columns)
    return pd.concat(runtime.Threads(threads).map(
        _lag_one_block, runtime.OnDemand(lambda i: (departure[blocks[i]], scale[blocks[i]]), len(blocks))))


def _lag_one_block(block: tuple[pd.DataFrame, pd.Series]) -> pd.Series:
    departure, scale = block
    clipped = departure.clip(lower=-4 * scale, upper=4 * scale, axis=1)
    return clipped.corrwith(clipped.shift(1)).clip(lower=0.0, upper=0.95)


def since_onset(onset: pd.DataFrame) -> pd.DataFrame:
    """True on every day from the onset of a flagged shift or drift to the day it was flagged (``onset``:
    the row where the change began, on its flagged days; -1 elsewhere)."""
    rows = np.arange(len(onset))[:, None]
    began = np.where(onset.to_numpy() >= 0, onset.to_numpy(), len(onset))
    earliest_later = np.minimum.accumulate(began[::-1], axis=0)[::-1]
    return pd.DataFrame(earliest_later <= rows, index=onset.index, columns=onset.columns, copy=False)


def unit_changes(observed: pd.DataFrame, least_months: int = 12) -> list[dict]:
    """The stations whose record changes unit part of the way through (an export in °F joined to one in °C, all
    read with one import.unit), which no neighbour need show: from some month on, the station's monthly means lie
    more than ``UNIT_LEVEL_GAP`` from those of the same calendar months before, and its step-to-step changes swing
    5/9 (or 9/5) times as far, lower where they swing less and higher where more (``UNIT_RATIOS``,
    ``UNIT_TOLERANCE``). Each with the first month of the changed
    part, the change in level and that ratio. A month counts where at least half its steps were read; each side
    of the change holds at least ``least_months`` of them."""
    read, steps = observed.notna(), observed.index.to_series().resample("MS").size()
    monthly = observed.resample("MS").mean().where(read.resample("MS").sum().ge(steps / 2, axis=0)).to_numpy()
    counted = ~np.isnan(monthly)
    calendar = steps.index.month.to_numpy()[:, None]
    # For each month k as the last before a change: the mean over calendar months of (mean after k - mean up to
    # k) of that calendar month, so neither the seasons nor the changed part itself make the yardstick.
    total, pairs = np.zeros(monthly.shape), np.zeros(monthly.shape)
    for month in range(1, 13):
        chosen = counted & (calendar == month)
        sums, counts = np.cumsum(np.where(chosen, monthly, 0.0), axis=0), np.cumsum(chosen, axis=0)
        after_sums, after_counts = sums[-1] - sums, counts[-1] - counts
        both = (counts > 0) & (after_counts > 0)
        total += np.where(both, after_sums / np.maximum(after_counts, 1) - sums / np.maximum(counts, 1), 0.0)
        pairs += both
    before = np.cumsum(counted, axis=0)
    step = np.where((before >= least_months) & (before[-1] - before >= least_months),
                    total / np.maximum(pairs, 1), 0.0)
    found = []
    for column in np.flatnonzero(np.abs(step).max(axis=0) > UNIT_LEVEL_GAP):  # a few stations at most
        split = int(np.abs(step[:, column]).argmax())
        start = steps.index[split + 1]
        series = observed.iloc[:, column]
        after, before = (float(part.diff().std()) for part in (series[series.index >= start],
                                                                series[series.index < start]))
        ratio = after / before if before > 0 else float("inf")  # a part that never changes: a code, no unit
        change = step[split, column]
        if any(abs(ratio / r - 1) < UNIT_TOLERANCE and (change > 0) == (r > 1) for r in UNIT_RATIOS):
            found.append({"station": observed.columns[column], "from": start, "change": float(change),
                          "ratio": float(ratio)})
    return found


def other_units(detector: dict) -> list[dict]:
    """The stations whose learned mean and spread say their readings were written in another unit than their
    neighbours' (``UNIT_LEVEL_GAP``, ``UNIT_RATIOS``: warmer where it swings more): each with its mean, its neighbours'
    median mean and the ratio of its anomalies' spread to theirs."""
    stations, found = detector.get("stations", {}), []
    for station, entry in stations.items():
        known = [stations[b["station"]] for b in entry.get("neighbours", {}).get("buddies", [])
                 if {"climatology", "anomaly_scale"} <= stations.get(b["station"], {}).keys()]
        if not {"climatology", "anomaly_scale"} <= entry.keys() or len(known) < 2:
            continue
        level, theirs = entry["climatology"][0], float(np.median([k["climatology"][0] for k in known]))
        ratio = entry["anomaly_scale"] / float(np.median([k["anomaly_scale"] for k in known]))
        if abs(level - theirs) > UNIT_LEVEL_GAP and any(
                abs(ratio / r - 1) < UNIT_TOLERANCE and (level > theirs) == (r > 1) for r in UNIT_RATIOS):
            found.append({"station": station, "mean": level, "neighbours_mean": theirs, "ratio": ratio})
    return found
