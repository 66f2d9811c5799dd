"""Quality control of station readings that tells sensor faults from weather, using the network.

Weather is shared by neighbouring stations; a sensor fault is not. So every
reading is compared with what its neighbours say it should be:

* **Neighbours** are learned on the days before the test period: the stations
  whose daily anomalies (reading minus the station's seasonal climatology)
  correlate best with this one's, at least ``min_correlation``. No coordinates
  are needed, so this works on a user's own files. The **expected value** of a
  reading is the climatology plus the neighbours' anomalies that day combined by
  a regression fitted on those days (or, on days some neighbour is missing or
  suspect, the median of each neighbour's own straight-line prediction).
* The **departure** (reading minus expected value) persists from day to day, as
  local weather does; its **innovation** is the part yesterday's departure does
  not explain. Both are scaled by their robust spread on the learning days, and
  the innovation also by the day's storminess across the network. A large
  innovation that today's reading still carries is a ``spike``, unless
  the reading lies between its neighbours' single lines or near one of them (a
  front that has passed some neighbours and not others is weather). A departure that
  stepped away from zero some days ago and stays there is a ``level_shift``; one
  that ramps away is a ``drift``: generalised likelihood-ratio tests for a step
  or a ramp in a persistent series, from candidate starts within the last 30 or
  60 days (every day of the first week, then about 15 % apart); it stays
  flagged only while today's reading and the last week's mean departure still
  carry the offset, so a fault that ended is let go, and only while the last
  week's mean departure is beyond ``LEAST_SHIFT`` robust standard deviations of
  the daily departure (less is local weather on a real network). A run of
  identical readings is ``stuck`` when the neighbours moved while the sensor
  did not, or when it is longer than the station's own resolution makes likely
  (learned from how often its learning days repeat: whole-degree °F records
  repeat often).
* **Gross checks** run everywhere, and are all a station with no usable
  neighbour gets: a jump from the median of the ``window`` days before beyond
  ``gross_margin`` times the 99.9th percentile of the station's own learning
  days (so its own weather is almost never flagged), and over-long repeats.
  The percentile is learned from readings plausible by climate only (a
  missing-value code read as a temperature would otherwise teach the check
  that 80 °C jumps are weather), and for temperatures it is capped at a
  ``JUMP_CEILING`` no weather reaches. A reading further than
  ``climate_margin`` robust standard deviations of the station's anomalies
  from its climatology is gross whatever its neighbours read: no weather is
  that far out, however many stations share it (a code written by every
  station on the same day), and such a reading neither speaks for its
  neighbours nor makes the day look stormy.

Every flag carries its kind and a confidence: 0.5 at its threshold, the odds
multiplied by e² for each unit of evidence beyond it (a heuristic, not a
calibrated probability). Only flags with at least ``repair_confidence`` are
repaired: a spike, stuck or gross reading by its expected value, a level shift
or drift by removing the offset the test estimated. A missing day gets the
expected value, so features stay defined. Flags of day *t* use readings of days
up to *t* only. The neighbours are checked in two passes, the second leaving out
readings the first flagged, so a faulty neighbour does not make a station look
faulty. Even the first pass leaves out a reading beyond any weather (further
than ``BEYOND_WEATHER`` standard deviations from the nearest of its neighbours'
lines, so one faulty neighbour cannot put a good reading there): a joint
regression moves by a neighbour's weight times its fault, so a sensor 25 °C
off would make all its neighbours look faulty, be left without a reference in
the second pass and go unflagged. In the second pass, a reading the first found stuck or gross, or a
spike the next day's reading returned from, adds nothing to the shift and drift
tests, so a burst of spikes is not taken for a shift. (Learning's rounds run
the first pass only, without that look beyond the weather.) And learning is
repeated without the readings the previous round flagged (a shift or drift
from the day the test says it began, not only from the day it was found), so
faults in the training years do not blur what is learned. A fault missed in
some season would still bend that season's climatology; the departures from
the neighbours show it, so their own seasonal mean, fitted robustly (Tukey's
biweight), is folded into the climatology.

A station whose learning days do not reach into every calendar month (one that
started less than a year before the test period) cannot fit its own seasons:
harmonics fitted to a few months swing wildly in the others. It takes the
seasons of its neighbours that cover the year, scaled to its own level and
swing (its level alone where no station has seen a whole year: the regression
on the neighbours then carries the seasons they share); its repeat share is
shrunk towards the network's; and in the months it never saw, slow departures
are not flagged as shifts or drifts (spikes, stuck and gross readings still
are), since there its borrowed climatology may be off by a degree or two for
weeks.
"""

from __future__ import annotations

import statistics

from station_forecast import runtime
from station_forecast.compute import Pool
from station_forecast.runtime import Progress, lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")

KINDS = ["gross", "spike", "level_shift", "drift", "stuck"]
NO_FLAG, MISSING = "none", "missing"
LABELS = [NO_FLAG, MISSING, "stuck", "gross", "spike", "drift", "level_shift"]  # the verdict's codes 0-6
MAD_TO_SD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
HARMONICS = 3  # yearly harmonics of the seasonal climatology
MONTH_SHARE = 0.2  # a calendar month counts as seen with at least this share of an average month's readings
# A station seeing part of the year takes its neighbours' seasons scaled to its own swing, when the seasons
# it saw vary by at least SEASONS_SEEN °C (standard deviation) and within this ratio either way.
SEASONS_SEEN = 2.0
MAX_AMPLITUDE_RATIO = 2.0
ROBUST_ITERATIONS = 5
BIWEIGHT_C = 4.685  # Tukey's biweight constant: 95 % efficiency on normal data
MIN_OVERLAP_DAYS = 90  # a neighbour must share at least this many learning days
GROSS_QUANTILE = 0.999
# Of a station's days, at most this share may be natural repeats flagged stuck by the neighbours' test.
NATURAL_REPEATS_FLAGGED = 0.0005
ORDINARY_RUN = 0.05  # a run of repeats at least this likely by chance is no evidence of a stuck sensor
REPEAT_PRIOR_PAIRS = 180  # pairs of days at the network's repeat share every station starts from
CONFIDENCE_SLOPE = 2.0
LEARNING_ROUNDS = 2
PROVISIONAL_CORRELATION = 0.5


def lag_grid(first: int, last: int, daily_until: int = 8, ratio: float = 1.15) -> tuple[int, ...]:
    """Candidate days back for the start of a change: each day up to ``daily_until``, then each about
    ``ratio`` times the one before, up to ``last``. A change between two candidates is tested from the
    next one, a few days later at most; on eight simulated networks every fault kind's F1 stayed within
    0.01 of testing every day, for less than half the work."""
    lags = list(range(first, min(daily_until, last) + 1))
    while lags[-1] < last:
        lags.append(min(last, max(lags[-1] + 1, round(lags[-1] * ratio))))
    return tuple(lags)


# The step test looks back 1-30 days for the day a level shift began, the ramp test
# 7-60 days for the day a drift began; one day's innovation counts at most
# INNOVATION_CAP robust standard deviations.
STEP_LAGS = lag_grid(1, 30)
RAMP_LAGS = lag_grid(7, 60)
INNOVATION_CAP = 4.0
SPLIT_SHARE = 0.5  # a spike lies beyond all its neighbours' lines by at least this share of spike_threshold
RETURN_SHARE = 0.5  # a spike returned when the next day's departure is within this share of it
# A reading further than this many robust standard deviations of its departure from the nearest of its
# neighbours' lines is beyond any weather: on twelve simulated networks (380,000 fault-free station-days,
# regional cold snaps and heat waves included) none was further than 8.3. A joint regression weight of 0.3
# passes a fault on to a neighbour at 0.3 times its size, which makes a false shift from about 15.
BEYOND_WEATHER = 12.0
# A shift or drift is flagged only while the mean departure of the last RECENT_DAYS days still
# carries it, at least RECENT_Z standard deviations of such a mean from zero.
RECENT_DAYS = 7
RECENT_Z = 2.5
# A shift or drift is flagged only while the last week's mean departure from the neighbours is beyond this many
# robust standard deviations of the (daily) departure: on real networks the departure wanders that far for days
# or weeks with the local weather (snow cover, a lake breeze, cold air pooling in one valley), which a test for
# a step or ramp cannot tell from a fault; a fault that small costs a forecast little.
LEAST_SHIFT = 2.0
STATION_BLOCK = 16  # stations per block of the step and ramp tests
EXPECTED_BLOCK = 64  # stations per block of the neighbours' expected values and of the persistences
VERDICT_BLOCK = 256  # stations per task of the verdict on a cluster
# What the verdict reads, per station and overall (the order of STATION_KEYS is how verdict() unpacks them).
STATION_KEYS = ["departure_scale", "persistence", "innovation_scale", "jump_scale", "gross_threshold", "repeat_share",
                "seen_months"]
ALL_MONTHS = 2**12 - 1  # seen_months: bit m - 1 set when calendar month m was seen in the learning days
VERDICT_SETTINGS = ["window", "shift_threshold", "spike_threshold", "stuck_threshold", "repair_confidence",
                    "climate_margin", "onsets"]
# °C: no day's temperature is further than this from the median of the days before it (the largest day-to-day
# changes on record are 30-50 °C in hourly readings, less in daily values); the gross check never allows more.
JUMP_CEILING = 50.0


def harmonic_design(dates: pd.DatetimeIndex, harmonics: int = HARMONICS) -> np.ndarray:
    """A constant and ``harmonics`` yearly sine/cosine pairs at each date."""
    angle = 2 * np.pi * (dates.day_of_year.to_numpy() - 1) / 365.25
    terms = [np.ones(len(dates))]
    for k in range(1, harmonics + 1):
        terms += [np.sin(k * angle), np.cos(k * angle)]
    return np.column_stack(terms)


def months_seen(values: pd.DataFrame) -> pd.DataFrame:
    """Calendar month (1-12) x station: whether the station's readings reach into that month (at least
    ``MONTH_SHARE`` of an average month's readings)."""
    present = values.notna()
    per_month = present.groupby(values.index.month).sum().reindex(range(1, 13), fill_value=0)
    least = np.maximum(1.0, MONTH_SHARE * present.sum() / 12)
    return (per_month >= least) & present.any()


def covers_the_year(values: pd.DataFrame) -> pd.Series:
    """Per station, whether its readings reach into every calendar month: only then do yearly harmonics
    fitted to them say something about every season, instead of guessing the months never seen."""
    return months_seen(values).all()


def borrow_seasons(coefs: pd.DataFrame, values: pd.DataFrame, shapes: dict[str, np.ndarray | None]) -> pd.DataFrame:
    """Climatology coefficients for the stations in ``shapes`` (those whose readings do not cover the
    year): the seasonal shape given for each (an array of coefficients), fitted to the station's
    readings by its level and, where they span enough of the seasons to tell, its amplitude (a coastal
    station swings less than its inland neighbours); the level of its readings alone where no shape is
    given. The other stations keep ``coefs``."""
    coefs = coefs.copy()
    for station, shape in shapes.items():  # a handful of stations, two numbers each
        readings = values[station].dropna()
        if readings.empty:
            continue
        shape = np.zeros(1 + 2 * HARMONICS) if shape is None else np.asarray(shape, dtype=float).copy()
        seasons = harmonic_design(readings.index)[:, 1:] @ shape[1:]
        amplitude = 1.0
        if seasons.std() >= SEASONS_SEEN:
            centred = seasons - seasons.mean()
            fitted = float(centred @ (readings.to_numpy() - readings.mean()) / (centred @ centred))
            amplitude = min(max(fitted, 1 / MAX_AMPLITUDE_RATIO), MAX_AMPLITUDE_RATIO)
        shape[1:] *= amplitude
        shape[0] = float(np.median(readings.to_numpy() - amplitude * seasons))
        coefs[station] = shape
    return coefs


def fit_climatology(values: pd.DataFrame) -> pd.DataFrame:
    """Per station, least-squares coefficients of a mean plus yearly harmonics (stations with too few
    readings are left out).

    Stations whose readings reach into every month are fitted all at once, by their normal equations
    (two matrix products for the whole network instead of a factorisation per station: 20 times
    faster at 1,000 stations, the same coefficients to 1e-13); a station that saw part of the year,
    whose harmonics its readings barely tell apart, by a least-squares solver that copes with that.
    """
    design = harmonic_design(values.index)
    terms = design.shape[1]
    present = values.notna().to_numpy()
    enough = present.sum(axis=0) >= 10 * terms
    whole_year = enough & covers_the_year(values).to_numpy()
    data = np.where(present[:, whole_year], values.to_numpy()[:, whole_year], 0.0)
    gram = (_outer_products(design) @ present[:, whole_year]).T.reshape(-1, terms, terms)
    try:
        together = np.linalg.solve(gram, (design.T @ data).T[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:  # not seen with readings in every month; then every station on its own
        whole_year[:] = False
        together = np.empty((0, terms))
    coefs = dict(zip(values.columns[whole_year], together, strict=True))
    for station in values.columns[enough & ~whole_year]:  # a few stations: one fit each
        ok = present[:, values.columns.get_loc(station)]
        coefs[station] = np.linalg.lstsq(design[ok], values[station].to_numpy()[ok], rcond=None)[0]
    order = [station for station in values.columns if station in coefs]
    return pd.DataFrame({station: coefs[station] for station in order}, columns=pd.Index(order, dtype=object))


def _outer_products(design: np.ndarray) -> np.ndarray:
    """(terms², days): each day's outer product of its design row with itself, flattened, so that one
    matrix product with a days x stations weight table gives every station's weighted normal matrix."""
    return (design[:, :, None] * design[:, None, :]).reshape(len(design), -1).T


def robust_seasonal_fit(values: pd.DataFrame, harmonics: int = HARMONICS, iterations: int = ROBUST_ITERATIONS
                        ) -> pd.DataFrame:
    """Per station, yearly harmonics fitted to ``values`` by iteratively reweighted least squares with
    Tukey's biweight: days further than BIWEIGHT_C robust standard deviations (of the least-squares
    residuals) from the fit get no weight, so a few weeks of a sensor fault do not move it. Stations
    with too few values are left out. With fewer ``harmonics`` than the climatology's, the missing
    coefficients are 0."""
    design = harmonic_design(values.index, harmonics)
    terms = design.shape[1]
    present = values.notna().to_numpy()
    keep = present.sum(axis=0) >= 10 * terms
    present = present[:, keep]
    data = np.where(present, values.to_numpy()[:, keep], 0.0)
    products = _outer_products(design)
    weight, scale = present.astype(float), None
    for _ in range(iterations):  # a few whole-network steps, each a batch of small solves, in place
        gram = (products @ weight).T.reshape(-1, terms, terms) + 1e-9 * np.eye(terms)
        weight *= data
        fit = np.linalg.solve(gram, (design.T @ weight).T[:, :, None])[:, :, 0].T
        u = np.subtract(data, design @ fit, out=weight)
        if scale is None:
            scale = np.maximum(_robust_scale(pd.DataFrame(np.where(present, u, np.nan))).to_numpy(), 1e-9)
        u /= BIWEIGHT_C * scale
        np.square(u, out=u)
        np.subtract(1.0, u, out=u)
        np.clip(u, 0.0, None, out=u)
        np.square(u, out=u)  # (1 - u²)² inside the biweight's reach, 0 beyond
        weight = np.multiply(u, present, out=u)
    fit = np.vstack([fit, np.zeros((2 * (HARMONICS - harmonics), fit.shape[1]))])
    return pd.DataFrame(fit, columns=values.columns[keep])


def climatology_at(coefs: pd.DataFrame, dates: pd.DatetimeIndex, stations: pd.Index) -> pd.DataFrame:
    """The seasonal mean of every station at ``dates``; NaN for stations without coefficients."""
    table = pd.DataFrame(harmonic_design(dates) @ coefs.to_numpy(), index=dates, columns=coefs.columns)
    return table.reindex(columns=stations)


def nanmedian(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """The median along ``axis`` leaving NaN out (NaN where nothing is left): the values of
    ``np.nanmedian``, by one sort instead of a selection per row (several times faster on the
    date x station tables and on the many short rows of neighbours' predictions)."""
    if values.shape[axis] == 0:
        return np.full(np.delete(values.shape, axis), np.nan)
    ordered = np.sort(values, axis=axis)  # NaN sort last
    count = np.expand_dims((~np.isnan(ordered)).sum(axis=axis), axis)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=axis)
    high = np.take_along_axis(ordered, count // 2 - (count == 0), axis=axis)
    median = np.where(count % 2 == 1, low, (low + high) / 2)  # np.median averages the middle two
    return np.where(count > 0, median, np.nan).squeeze(axis)


def _robust_scale(values: pd.DataFrame) -> pd.Series:
    array = values.to_numpy(dtype=float)
    centred = np.abs(array - nanmedian(array))
    return pd.Series(MAD_TO_SD * nanmedian(centred), index=values.columns)


def _pair_statistics(anomaly: np.ndarray, lead: int = 0) -> tuple[np.ndarray, ...]:
    """Correlation, slope and intercept of every station on every other, and the days they share.

    Pairwise-complete sums by matrix products (no loop over pairs): row i,
    column j describe predicting station i, ``lead`` days later, from station j
    on days both have.
    """
    target, predictor = (anomaly[lead:], anomaly[:len(anomaly) - lead]) if lead else (anomaly, anomaly)
    present_t, present_p = ~np.isnan(target), ~np.isnan(predictor)
    values_t, values_p = np.where(present_t, target, 0.0), np.where(present_p, predictor, 0.0)
    mask_t, mask_p = present_t.astype(float), present_p.astype(float)
    shared = mask_t.T @ mask_p
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(shared > 0, shared, np.nan)
        mean = (values_t.T @ mask_p) / n  # mean of i over days j is present too
        var = (values_t.T**2 @ mask_p) / n - mean**2
        if lead:  # mean and variance of j over days i is present too
            mean_p = (values_p.T @ mask_t).T / n
            var_p = (values_p.T**2 @ mask_t).T / n - mean_p**2
        else:  # the same sums with i and j swapped: the transposes, not two more products
            mean_p, var_p = mean.T, var.T
        cov = (values_t.T @ values_p) / n - mean * mean_p
        corr = cov / np.sqrt(var * var_p)
        slope = cov / var_p
        intercept = mean - slope * mean_p
    return corr, slope, intercept, shared


def forecast_neighbours(anomaly: pd.DataFrame, n_neighbours: int, min_correlation: float) -> dict[str, list[str]]:
    """For each station, the stations whose anomaly on a day best predicts its anomaly the next day (at least
    ``min_correlation``, on the learning days): upwind stations, where today's weather is the station's
    tomorrow, rank above same-day look-alikes."""
    corr, _, _, shared = _pair_statistics(anomaly.to_numpy(), lead=1)
    stations = list(anomaly.columns)
    usable = (shared >= MIN_OVERLAP_DAYS) & (corr >= min_correlation)
    np.fill_diagonal(usable, False)
    ranked = np.argsort(-np.where(usable, corr, -np.inf), axis=1, kind="stable")[:, :n_neighbours]
    return {station: [stations[j] for j in ranked[i] if usable[i, j]] for i, station in enumerate(stations)}


def learn_neighbours(anomaly: pd.DataFrame, n_neighbours: int, min_correlation: float) -> dict[str, dict]:
    """For each station, its best-correlated stations on the learning days and how they predict it.

    Each neighbour gets a straight line predicting the station from it alone; the
    chosen neighbours together get a multiple regression, used on days all of
    them report (more precise than any one line), with the median of the single
    lines as the fallback on other days.
    """
    values = anomaly.to_numpy()
    corr, slope, intercept, shared = _pair_statistics(values)
    stations = list(anomaly.columns)
    usable = (shared >= MIN_OVERLAP_DAYS) & (corr >= min_correlation) & np.isfinite(slope)
    np.fill_diagonal(usable, False)
    ranked = np.argsort(-np.where(usable, corr, -np.inf), axis=1, kind="stable")[:, :n_neighbours]
    neighbours = {}
    for i, station in enumerate(stations):  # one short list and one small regression per station
        chosen = [j for j in ranked[i] if usable[i, j]]
        weights, constant = _joint_regression(values[:, i], values[:, chosen])
        neighbours[station] = {
            "constant": constant,
            "buddies": [{"station": stations[j], "correlation": round(float(corr[i, j]), 4),
                         "slope": round(float(slope[i, j]), 6), "intercept": round(float(intercept[i, j]), 6),
                         "weight": weight} for j, weight in zip(chosen, weights, strict=True)],
        }
    return neighbours


def _joint_regression(target: np.ndarray, predictors: np.ndarray) -> tuple[list[float | None], float | None]:
    """Least-squares weights of the predictors and a constant, on days all of them and the target have;
    None where there are too few such days."""
    both = ~np.isnan(target) & ~np.isnan(predictors).any(axis=1)
    if predictors.shape[1] == 0 or both.sum() < MIN_OVERLAP_DAYS:
        return [None] * predictors.shape[1], None
    design = np.column_stack([np.ones(both.sum()), predictors[both]])
    coefs = np.linalg.lstsq(design, target[both], rcond=None)[0]
    return [round(float(c), 6) for c in coefs[1:]], round(float(coefs[0]), 6)


def neighbour_lines(stations: list[str], neighbours: dict[str, dict]) -> dict[str, np.ndarray] | None:
    """The neighbours' lines of ``stations`` as arrays, station x neighbour slot: ``index`` (into
    ``stations``; ``len(stations)`` for an empty slot), ``slope``, ``intercept`` and ``weight`` (0 unless
    all the station's neighbours are among ``stations``, when its joint regression holds), and per
    station the joint regression's ``constant`` (NaN where it does not hold). None if no station has a
    neighbour."""
    position = {station: i for i, station in enumerate(stations)}
    width = max((len(v["buddies"]) for v in neighbours.values()), default=0)
    if width == 0:
        return None
    index = np.full((len(stations), width), len(stations))
    slope, intercept, weight = (np.zeros((len(stations), width)) for _ in range(3))
    constant = np.full(len(stations), np.nan)
    for station, found in neighbours.items():
        if station not in position:
            continue
        i = position[station]
        buddies = [b for b in found["buddies"] if b["station"] in position]
        complete = found["constant"] is not None and len(buddies) == len(found["buddies"])
        constant[i] = found["constant"] if complete else np.nan
        for m, buddy in enumerate(buddies):
            index[i, m] = position[buddy["station"]]
            slope[i, m], intercept[i, m] = buddy["slope"], buddy["intercept"]
            weight[i, m] = buddy["weight"] if complete else 0.0
    return {"index": index, "slope": slope, "intercept": intercept, "weight": weight, "constant": constant}


def expected_anomaly(anomaly: pd.DataFrame, neighbours: dict[str, dict], threads: int = 1) -> pd.DataFrame:
    """Each station's anomaly as its neighbours predict it (NaN where none of them has a reading).

    The joint regression where every neighbour reports, else the median of the
    single-neighbour lines of those that do (a median, so one odd neighbour
    cannot move it far). Stations are worked through in blocks of
    ``EXPECTED_BLOCK`` on ``threads`` threads; each value is the same wherever
    and with whatever else it was computed.
    """
    lines = neighbour_lines(list(anomaly.columns), neighbours)
    if lines is None:
        return pd.DataFrame(np.nan, index=anomaly.index, columns=anomaly.columns)
    # Station by day (each station's days contiguous), so gathering a neighbour's readings copies whole
    # rows; below them an all-NaN row (an empty slot of a median) and an all-zero row (of the joint sum).
    days = len(anomaly)
    padded = np.vstack([anomaly.to_numpy().T, np.full((1, days), np.nan), np.zeros((1, days))])
    joint = np.empty((anomaly.shape[1], days))
    rows = [slice(begin, begin + EXPECTED_BLOCK) for begin in range(0, anomaly.shape[1], EXPECTED_BLOCK)]
    runtime.Threads(threads).map(_expected_rows, rows, padded=padded, lines=lines, out=joint)
    return pd.DataFrame(joint.T, index=anomaly.index, columns=anomaly.columns)


def nearest_line_distance(anomaly: pd.DataFrame, neighbours: dict[str, dict]) -> pd.DataFrame:
    """How far each station's anomaly is from the nearest of its neighbours' single lines that day (NaN
    where none of them reports): small for a reading that agrees with any one neighbour, large only for
    one at odds with them all, which one faulty neighbour cannot make it."""
    lines = neighbour_lines(list(anomaly.columns), neighbours)
    if lines is None:
        return pd.DataFrame(np.nan, index=anomaly.index, columns=anomaly.columns)
    # Station by day, as in expected_anomaly: a neighbour's readings are one whole row; the last row is an
    # empty slot's.
    padded = np.vstack([anomaly.to_numpy().T, np.full((1, len(anomaly)), np.nan)])
    own, nearest = padded[:-1], np.full((anomaly.shape[1], len(anomaly)), np.nan)
    for m in range(lines["index"].shape[1]):
        predicted = padded[lines["index"][:, m]]
        predicted *= lines["slope"][:, m, None]
        predicted += lines["intercept"][:, m, None]
        np.fmin(nearest, np.abs(np.subtract(own, predicted, out=predicted), out=predicted), out=nearest)
    return pd.DataFrame(nearest.T, index=anomaly.index, columns=anomaly.columns)


def outside_the_lines(anomaly: pd.DataFrame, neighbours: dict[str, dict]) -> pd.DataFrame:
    """How far each station's anomaly lies beyond the range its neighbours' single lines span that day: 0
    for a reading between them (a front that split the neighbours, the station on one side of it or in
    the middle), the distance to the nearest line for one beyond them all; NaN where none reports."""
    lines = neighbour_lines(list(anomaly.columns), neighbours)
    if lines is None:
        return pd.DataFrame(np.nan, index=anomaly.index, columns=anomaly.columns)
    padded = np.vstack([anomaly.to_numpy().T, np.full((1, len(anomaly)), np.nan)])
    own = padded[:-1]
    lowest, highest = (np.full((anomaly.shape[1], len(anomaly)), np.nan) for _ in range(2))
    for m in range(lines["index"].shape[1]):
        predicted = padded[lines["index"][:, m]] * lines["slope"][:, m, None] + lines["intercept"][:, m, None]
        np.fmin(lowest, predicted, out=lowest)
        np.fmax(highest, predicted, out=highest)
    beyond = np.fmax(np.fmax(own - highest, lowest - own), 0.0)
    beyond[np.isnan(lowest) | np.isnan(own)] = np.nan
    return pd.DataFrame(beyond.T, index=anomaly.index, columns=anomaly.columns)


def _expected_rows(rows: slice, padded: np.ndarray, lines: dict[str, np.ndarray], out: np.ndarray) -> None:
    """``expected_anomaly`` of the stations ``rows`` into ``out[rows]``: one neighbour slot at a time (not a
    station x neighbour x day array), the same sums in the same order, a fraction of the memory traffic."""
    index, weight = lines["index"][rows], lines["weight"][rows]
    empty = len(padded) - 2
    summed = np.where(index == empty, empty + 1, index)  # an empty slot adds 0 (its weight is 0)
    total, missing = None, np.zeros((len(index), padded.shape[1]), dtype=bool)
    for m in range(index.shape[1]):
        readings = padded[summed[:, m]]
        missing |= np.isnan(readings)
        readings *= weight[:, m, None]
        total = readings if total is None else np.add(total, readings, out=total)
    joint = np.add(lines["constant"][rows, None], total, out=total)
    joint[missing] = np.nan
    fallback = np.isnan(joint)  # the median is needed on these station-days only: usually a few
    if fallback.any():
        station = np.nonzero(fallback)[0]  # of each such station-day, in row order as below
        single = np.empty((len(station), index.shape[1]))
        for m in range(index.shape[1]):
            single[:, m] = padded[index[:, m]][fallback]
        single *= lines["slope"][rows][station]
        single += lines["intercept"][rows][station]
        joint[fallback] = nanmedian(single, axis=1)  # NaN on days when no neighbour has a reading
    out[rows] = joint


def trailing_median(observed: pd.DataFrame, window: int) -> pd.DataFrame:
    """The median of the ``window`` days before each day (at least half of them observed)."""
    return observed.shift(1).rolling(window, min_periods=max(1, window // 2)).median()


def repeat_runs(observed: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How many readings in a row equal today's (1 for a reading unlike yesterday's), and the row index
    where that run of identical readings began."""
    same = observed.diff().eq(0)
    count = same.cumsum()
    run = count - count.where(~same).ffill().fillna(0)
    start = np.arange(len(observed))[:, None] - run.to_numpy().astype(int)
    return run + 1, pd.DataFrame(start, index=observed.index, columns=observed.columns)


def reading_facts(observed: pd.DataFrame, window: int) -> dict[str, pd.DataFrame]:
    """What the verdict needs from the readings alone (not from the neighbours), so that every pass over
    the same readings computes it once: the trailing median and the runs of repeated readings."""
    run, start = repeat_runs(observed)
    return {"reference": trailing_median(observed, window), "run": run, "start": start}


def repeat_share(observed: pd.DataFrame) -> pd.Series:
    """Per station, the share of readings equal to the day before's (of days both were read).

    A station with few such pairs of days (one that started recently) would
    learn a share of 0 from a few months without a repeat, and then take any
    natural repeat for a stuck sensor; so each share is shrunk towards the
    network's as if the station had REPEAT_PRIOR_PAIRS more pairs at the
    network's rate.
    """
    pairs = (observed.notna() & observed.shift(1).notna()).sum()
    repeats = (observed.diff().eq(0) & observed.shift(1).notna()).sum()
    network = float(repeats.sum() / pairs.sum()) if pairs.sum() else 0.0
    share = (repeats + REPEAT_PRIOR_PAIRS * network) / (pairs + REPEAT_PRIOR_PAIRS)
    return share.clip(lower=1e-4, upper=0.9)


def stuck_test(run: pd.DataFrame, start: pd.DataFrame, z: pd.DataFrame, share: pd.Series, least: float
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which readings are a stuck sensor repeating itself, and by how much evidence.

    A run of ``m`` identical readings happens naturally with probability about
    p^(m-1), where ``p`` is the station's share of days repeating the day before
    (learned: whole-degree °F readings repeat far more often than 0.1 °C ones).
    While the sensor repeats, its neighbours keep moving: ``z`` (the departure
    from them in robust standard deviations) changes since the run began. A
    repeat is stuck when natural runs that long, and that far from what the
    neighbours say, would be flagged on at most ``NATURAL_REPEATS_FLAGGED`` of
    the days: a long enough run needs no neighbour at all (the only stuck check
    a station without neighbours gets), a short one needs the neighbours to have
    moved at least ``least`` standard deviations. Once stuck, the rest of the run
    is stuck too. The evidence is the log of how much rarer than allowed the run
    is, or the distance moved beyond the threshold, whichever is larger. ``run`` and ``start`` are
    ``repeat_runs`` of the readings.
    """
    length, start = run.to_numpy().astype(int), start.to_numpy()
    natural = np.exp((length - 1) * np.log(share.to_numpy())[None, :])
    # The distance needed depends on the station and the run's length only: a small table, looked up.
    longest = min(int(length.max(initial=1)), 60)
    table_natural = np.exp(np.arange(longest)[:, None] * np.log(share.to_numpy())[None, :])
    normal = statistics.NormalDist()
    table = np.array([[max(least, normal.inv_cdf(1 - t)) if t < 0.5 else least for t in row]
                      for row in NATURAL_REPEATS_FLAGGED / (2 * table_natural)])
    needed = np.take_along_axis(table, np.minimum(length, longest) - 1, axis=0)
    # Standard deviations of the difference of two independent departures: what neighbours show
    # around a sensor that really did not change.
    values = z.to_numpy() / np.sqrt(2)
    moved = np.abs(values - np.take_along_axis(values, start, axis=0))
    by_length = np.where(natural <= NATURAL_REPEATS_FLAGGED,
                         np.log(NATURAL_REPEATS_FLAGGED / np.maximum(natural, 1e-300)), -np.inf)
    # A repeat the station's resolution makes ordinary is no evidence, however the neighbours moved: at whole
    # degrees F one day in ten repeats the day before, so only a longer run can speak.
    moved = np.where(natural <= ORDINARY_RUN, moved, np.nan)
    evidence = np.maximum(np.where(np.isnan(moved), -np.inf, moved - needed), by_length)
    evidence = np.where(length > 1, evidence, -np.inf)
    rows = np.arange(len(run))[:, None]
    last_found = np.maximum.accumulate(np.where(evidence >= 0, rows, -1), axis=0)
    stuck = (length > 1) & (last_found >= start)
    # A day later in a stuck run keeps the strongest evidence the run has shown so far (up to a month back).
    days, columns = np.nonzero(stuck)  # a few station-days: look back from those only
    strongest = evidence[days, columns]
    for lag in range(1, 31):
        within = days - lag >= start[days, columns]
        strongest[within] = np.maximum(strongest[within], evidence[days[within] - lag, columns[within]])
    best = np.full(evidence.shape, np.nan)
    best[days, columns] = np.maximum(strongest, 0.0)
    best = pd.DataFrame(best, index=run.index, columns=run.columns)
    return pd.DataFrame(stuck, index=run.index, columns=run.columns), best


def confidence(excess: pd.DataFrame | np.ndarray) -> np.ndarray:
    """0.5 at a flag's threshold (``excess`` 0), towards 1 beyond it: odds times e^CONFIDENCE_SLOPE per unit."""
    return 1.0 / (1.0 + np.exp(-CONFIDENCE_SLOPE * np.clip(np.asarray(excess, dtype=float), -30, 30)))


def local_threads(pool: Pool | None) -> int:
    """Threads of this process for the work that stays here (all of it when ``pool`` is a cluster's, whose
    workers get only the verdict's blocks): the pool's own when it is threads, else one."""
    return pool.threads if pool is not None and not pool.cluster else 1


def within_climate(values: pd.DataFrame, margin: float) -> pd.DataFrame:
    """False where a reading is further than ``margin`` robust standard deviations of the station's anomalies
    from its climatology, fitted robustly to ``values`` (so the readings in question do not move it); True
    elsewhere, and for stations with too few readings to fit one."""
    coefs = robust_seasonal_fit(values)
    known = values.columns[values.columns.isin(coefs.columns)]
    anomaly = values[known] - climatology_at(coefs, values.index, known)
    far = anomaly.abs() > margin * _robust_scale(anomaly)
    return ~far.reindex(columns=values.columns, fill_value=False)


def learn(observed: pd.DataFrame, learning: pd.DataFrame, qc: dict, pool: Pool | None = None,
          jump_ceiling: float = float("inf")) -> dict:
    """Everything the detector needs, learned from readings on ``learning`` days only.

    Faults in the learning days would weaken the neighbours' correlations and
    widen the scales, so learning is repeated: after each round, the readings
    that round's detector flags are left out of the next (``LEARNING_ROUNDS``).
    Returns a JSON-ready dict: settings, per-station climatology coefficients,
    neighbours with their prediction lines, robust scales and thresholds. The
    gross threshold is learned from readings plausible by climate, and never
    allows a jump beyond ``jump_ceiling`` (``JUMP_CEILING`` for temperatures).
    """
    settings = {key: qc[key] for key in ("window", "spike_threshold", "shift_threshold", "stuck_threshold",
                                         "repair_confidence", "climate_margin")}
    # Everything here is causal, so the days after the last learning day change nothing: leave them out.
    last = learning.any(axis=1)[::-1].idxmax() if learning.to_numpy().any() else observed.index[-1]
    observed, learning = observed.loc[:last], learning.loc[:last]
    plausible = observed.mask(learning & ~within_climate(observed.where(learning), qc["climate_margin"]))
    jump = plausible - trailing_median(plausible, qc["window"])
    jump_scale = _robust_scale(jump.where(learning))
    jump_z = (jump.where(learning) / jump_scale).abs()
    threshold = np.minimum(qc["gross_margin"] * jump_z.quantile(GROSS_QUANTILE), jump_ceiling / jump_scale)
    gross = {"jump_scale": jump_scale, "gross_threshold": threshold}
    # The provisional rounds only decide which readings to trust, so they accept weaker neighbours: a
    # faulty station's correlations are low until its faults are left out.
    provisional = dict(qc, min_correlation=min(qc["min_correlation"], PROVISIONAL_CORRELATION))
    trusted = learning
    learning_readings = observed.where(learning)
    facts = reading_facts(learning_readings, qc["window"])
    progress = Progress("quality control learning rounds", LEARNING_ROUNDS + 1)
    for _ in range(LEARNING_ROUNDS):
        detector = _fit(observed, learning, trusted, provisional, settings, gross, local_threads(pool))
        # One pass is enough to decide which readings to trust (the second changed F1 by at most 0.02 on
        # three simulated networks) and a third of the work.
        found = detect(learning_readings, detector, pool, second_pass=False, onsets=True, facts=facts)
        # Learning need not be causal: a shift or drift is left out from the day it began, not only
        # from the day it was found.
        trusted = learning & ~found["flag"].isin(KINDS) & ~since_onset(found["onset"])
        progress.step()
    return _fit(observed, learning, trusted, qc, settings, gross, local_threads(pool))


def _fit(observed: pd.DataFrame, learning: pd.DataFrame, trusted: pd.DataFrame, qc: dict, settings: dict,
         gross: dict[str, pd.Series], threads: int = 1) -> dict:
    """One round of learning: climatology, neighbours and scales from the ``trusted`` readings (on
    ``threads`` threads where the work is station by station)."""
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
    neighbours = learn_neighbours(anomaly, qc["neighbours"], qc["min_correlation"])
    if short:  # the readings less the weather the neighbours share: mostly the station's own climatology
        weather = expected_anomaly(anomaly, {station: neighbours[station] for station in short}, threads)[short]
        coefs = borrow_seasons(coefs, values[short] - weather.fillna(0.0),
                               {station: _neighbours_shape(coefs, neighbours[station], seen, typical)
                                for station in short})
    departure = _network_departures(values, climatology_at(coefs, values.index, values.columns), neighbours,
                                    None, threads)["departure"]
    # A fault the detector missed in some season biases that season's climatology; against the
    # neighbours it stands out, so the departures' own seasonal mean, fitted robustly, corrects it
    # (only its level where the station has not seen the whole year).
    correction = pd.concat([robust_seasonal_fit(departure.loc[:, seen]),
                            robust_seasonal_fit(departure.loc[:, ~seen], harmonics=0)], axis=1)
    del departure
    coefs = coefs + correction.reindex(columns=coefs.columns, fill_value=0.0)
    climatology = climatology_at(coefs, values.index, values.columns)
    departure = _network_departures(values, climatology, neighbours, None, threads)["departure"]
    departure_scale = _robust_scale(departure)
    persistence = _lag_one_correlation(departure, departure_scale, threads)
    innovation = _innovation(departure, persistence, departure_scale)
    scales = {"departure_scale": departure_scale, "persistence": persistence,
              "innovation_scale": _robust_scale(innovation), **gross,
              "anomaly_scale": _robust_scale(values - climatology)}
    share = repeat_share(values)

    detector = {**settings, "stations": {}}
    for station in observed.columns:
        entry = {"neighbours": neighbours[station], "repeat_share": round(float(share[station]), 6)}
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


def _innovation(departure: pd.DataFrame, persistence: pd.Series, scale: pd.Series) -> pd.DataFrame:
    """The part of today's departure that yesterday's does not explain (departures persist, as weather does).

    Yesterday's departure is clipped at three robust standard deviations, so a
    spike yesterday does not make today look like the opposite spike.
    """
    yesterday = departure.shift(1).clip(lower=-3 * scale, upper=3 * scale, axis=1).fillna(0.0)
    return departure - yesterday * persistence


def storminess(innovation_z: pd.DataFrame) -> pd.Series:
    """How unsettled each day is across the network: the root mean square of all stations' (capped)
    innovations that day, at least 0.75 (1 where fewer than three stations report).

    Weather that differs more between stations on stormy days than on calm ones
    is common to the region, so dividing by it makes a stormy day's departures
    as comparable as a calm day's; the cap keeps one faulty station from
    deciding it.
    """
    typical = np.sqrt((innovation_z.clip(lower=-INNOVATION_CAP, upper=INNOVATION_CAP) ** 2).mean(axis=1))
    reporting = innovation_z.notna().sum(axis=1)
    return typical.where(reporting >= 3, 1.0).clip(lower=0.75).fillna(1.0)


def change_evidence(innovation_z: pd.DataFrame, persistence: pd.Series, lags: tuple[int, ...], shape: str,
                    pool: Pool | None = None, latest: pd.DataFrame | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Evidence that the departure left zero some days ago, by a step or a ramp, and since when.

    A departure that persists with coefficient phi and carries an offset m(u)
    from day s on has innovations m(u) - phi m(u-1): for a step of size D, D on
    day s and (1 - phi) D after; for a ramp growing by r a day, r ((1 - phi) k + 1)
    on the k-th day. The test statistic for a change that began ``lag`` days ago
    is the sum of the innovations (each capped, so one spike cannot pass for a
    change) weighted by that pattern, over its standard deviation: a
    generalised likelihood ratio test. Returns the statistic of the best lag in
    ``lags``, signed, and that lag.

    ``latest``, if given, holds each day's innovation as known on that day,
    where ``innovation_z`` holds it as known a day later (``explained_innovations``):
    the test on a day takes that day's own innovation from ``latest``, so it
    never uses a later reading.

    Stations are independent here, so they are worked through in blocks of
    ``STATION_BLOCK`` columns (small enough to stay in the CPU cache, which
    makes the many passes over them about twice as fast), on ``pool``'s threads
    or workers; the result does not depend on where they ran.
    """
    def capped(table: pd.DataFrame) -> np.ndarray:
        return table.clip(lower=-INNOVATION_CAP, upper=INNOVATION_CAP).fillna(0.0).to_numpy()

    values = capped(innovation_z)
    correction = None if latest is None else capped(latest) - values
    carry = (1.0 - persistence).to_numpy()[None, :]
    blocks = [(values[:, begin:begin + STATION_BLOCK], carry[:, begin:begin + STATION_BLOCK],
               None if correction is None else correction[:, begin:begin + STATION_BLOCK])
              for begin in range(0, values.shape[1], STATION_BLOCK)]
    done = (pool or runtime.Threads()).map(change_block, blocks, lags=lags, shape=shape)
    best = np.hstack([b for b, _ in done]) if done else np.zeros_like(values)
    best_lag = np.hstack([lag for _, lag in done]) if done else np.zeros(values.shape, dtype=int)
    return pd.DataFrame(best, index=innovation_z.index, columns=innovation_z.columns), best_lag


def change_block(block: tuple[np.ndarray, np.ndarray, np.ndarray | None], lags: tuple[int, ...], shape: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``change_evidence`` for one block of stations (capped innovations, 1 - persistence, and what the
    last day of a window adds or takes away when its innovation is taken as known that day, or None),
    on plain arrays, reusing its work buffers."""
    values, carry = np.ascontiguousarray(block[0]), block[1]  # a block of columns is a strided view
    correction = None if block[2] is None else np.ascontiguousarray(block[2])
    n, width = values.shape
    day = np.arange(n, dtype=float)[:, None]
    plain = np.vstack([np.zeros((1, width)), np.cumsum(values, axis=0)])
    timed = np.vstack([np.zeros((1, width)), np.cumsum(values * day, axis=0)]) if shape == "ramp" else None
    best, best_size = np.zeros_like(values), np.zeros_like(values)
    best_lag = np.zeros(values.shape, dtype=np.int16)  # a quarter of the memory traffic of int64
    window_buffer, weighted_buffer, product_buffer = np.empty_like(values), np.empty_like(values), np.empty_like(values)
    better_buffer, lag_buffer = np.empty(values.shape, dtype=bool), np.empty_like(best_lag)
    for lag in lags:  # one whole-block step per candidate start, not per day; slices are views, not copies
        if lag >= n:
            continue
        rows = n - lag
        window = np.subtract(plain[lag + 1:], plain[:rows], out=window_buffer[:rows])  # days t - lag .. t
        weighted = weighted_buffer[:rows]
        if shape == "step":  # the first day weighs 1, the later ones (1 - phi)
            first = values[:rows]
            np.subtract(window, first, out=weighted)
            weighted *= carry
            weighted += first
            norm = 1.0 + lag * carry**2
        else:  # the k-th day weighs (1 - phi) k + 1
            np.subtract(timed[lag + 1:], timed[:rows], out=weighted)
            weighted -= np.multiply(day[lag:] - lag, window, out=product_buffer[:rows])
            weighted *= carry
            weighted += window
            k = np.arange(lag + 1)
            norm = (carry**2) * (k**2).sum() + 2 * carry * k.sum() + (lag + 1)
        if correction is not None:  # the window's last day, days t - lag .. t, weighs carry (step) or carry lag + 1
            last = carry if shape == "step" else carry * lag + 1.0
            weighted += np.multiply(correction[lag:], last, out=product_buffer[:rows])
        weighted /= np.sqrt(norm)
        size = np.abs(weighted, out=window_buffer[:rows])
        better = np.greater(size, best_size[lag:], out=better_buffer[:rows])
        # putmask and integer arithmetic: the same values as masked copies, in a fraction of the time.
        np.putmask(best[lag:], better, weighted)
        np.maximum(best_size[lag:], size, out=best_size[lag:])
        moved = np.subtract(lag, best_lag[lag:], out=lag_buffer[:rows])
        moved *= better
        best_lag[lag:] += moved  # lag where better, unchanged elsewhere
    return best, best_lag.astype(int)


def recent_evidence(z: pd.DataFrame, persistence: pd.Series, days: int) -> pd.DataFrame:
    """The mean of the last ``days`` values of ``z`` (departures in standard deviations, persisting from
    day to day with lag-one correlation ``persistence``), in standard deviations of such a mean."""
    phi = persistence.clip(upper=0.95)
    # The variance of the mean of n AR(1) values of unit variance.
    variance = ((1 + phi) / (1 - phi) - 2 * phi * (1 - phi**days) / (days * (1 - phi) ** 2)) / days
    mean = z.rolling(days, min_periods=(days + 1) // 2).mean()
    return mean / np.sqrt(variance)


def mean_since(values: pd.DataFrame, lag: np.ndarray) -> pd.DataFrame:
    """The mean of each column's values over the last ``lag + 1`` days (NaN days left out)."""
    present = values.notna().to_numpy()
    filled = np.where(present, values.to_numpy(), 0.0)
    total = np.vstack([np.zeros((1, filled.shape[1])), np.cumsum(filled, axis=0)])
    count = np.vstack([np.zeros((1, filled.shape[1])), np.cumsum(present, axis=0)])
    end = np.arange(len(filled))[:, None] + 1
    begin = np.maximum(end - lag - 1, 0)
    n = np.take_along_axis(count, end, axis=0) - np.take_along_axis(count, begin, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (np.take_along_axis(total, end, axis=0) - np.take_along_axis(total, begin, axis=0)) / n
    return pd.DataFrame(mean, index=values.index, columns=values.columns)


def _network_departures(observed: pd.DataFrame, climatology: pd.DataFrame, neighbours: dict[str, dict],
                        leave_out: pd.DataFrame | None, threads: int = 1) -> dict:
    """Expected value and departure of every reading (its ``climatology`` plus the anomaly its
    ``neighbours`` predict), from the neighbours' readings (less ``leave_out``)."""
    anomaly = observed - climatology
    buddies = anomaly if leave_out is None else anomaly.mask(leave_out)
    expected = climatology + expected_anomaly(buddies, neighbours, threads)
    return {"expected": expected, "departure": observed - expected}


def held(start: pd.DataFrame, hold: pd.DataFrame) -> pd.DataFrame:
    """True on days ``hold`` has held without a break since a day ``start`` was true (causal hysteresis)."""
    rows = np.arange(len(start))[:, None]
    last_start = np.maximum.accumulate(np.where(start.to_numpy(), rows, -1), axis=0)
    last_break = np.maximum.accumulate(np.where(hold.to_numpy(), -1, rows), axis=0)
    return pd.DataFrame((last_start > last_break) & hold.to_numpy(), index=start.index, columns=start.columns)


def _station_table(detector: dict, stations: pd.Index, key: str) -> pd.Series:
    return pd.Series({s: detector["stations"].get(s, {}).get(key, np.nan) for s in stations}, dtype=float)


def detect(observed: pd.DataFrame, detector: dict, pool: Pool | None = None, second_pass: bool = True,
           onsets: bool = False, facts: dict[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """Flag every reading and repair the confident faults (date x station tables).

    Returns ``flag`` (none, missing, or a kind of fault), ``confidence`` (of
    flags only), ``score`` (the robust z-score of the departure from the
    expected value; of the jump from the days before where a station has no
    neighbours), ``expected`` and ``repaired``. With ``onsets`` (what learning
    needs), only ``flag`` and ``onset``: for a level shift or drift, the row
    where the test estimates it began; -1 elsewhere. ``facts``: ``reading_facts`` of ``observed``, if
    already known.
    """
    stations = observed.columns
    coefs = pd.DataFrame({s: e["climatology"] for s, e in detector["stations"].items()
                          if "climatology" in e and s in stations})
    climatology = climatology_at(coefs.reindex(columns=[s for s in stations if s in coefs]), observed.index,
                                 stations)
    neighbours = {s: e["neighbours"] for s, e in detector["stations"].items()}
    detector = {**detector, "onsets": onsets}
    facts = facts if facts is not None else reading_facts(observed, detector["window"])
    threads = local_threads(pool)
    # How far each reading is from its climatology, in robust standard deviations of the station's anomalies
    # (NaN without a learned scale); a reading beyond any climate speaks for no neighbour, in any pass.
    anomaly = observed - climatology
    climate_z = anomaly.abs() / _station_table(detector, stations, "anomaly_scale")
    left_out = climate_z > detector["climate_margin"]
    facts = {**facts, "climate_z": climate_z}
    affected = observed.columns[left_out.to_numpy().any(axis=0)]
    if len(affected):  # a jump is measured from the days before that were weather, not codes
        # Column by column, so only the few stations with such readings need their median again.
        reference = facts["reference"].copy()
        reference[affected] = trailing_median(observed[affected].mask(left_out[affected]), detector["window"])
        facts["reference"] = reference
    # In departure scales, how far each reading lies beyond all its neighbours' lines (0 between them).
    facts["outside_z"] = outside_the_lines(anomaly.mask(left_out), neighbours) \
        / _station_table(detector, stations, "departure_scale")
    if second_pass:  # a reading beyond any weather does not speak for its neighbours even in the first pass
        left_out = left_out | (nearest_line_distance(anomaly, neighbours)
                               > BEYOND_WEATHER * _station_table(detector, stations, "departure_scale"))
    result = _classify(observed, facts, detector,
                       _network_departures(observed, climatology, neighbours, left_out, threads), pool)
    if second_pass:  # readings the first pass flagged do not speak for their neighbours
        network = _network_departures(observed, climatology, neighbours, result["flag"].isin(KINDS), threads)
        explained = explained_readings(result["flag"], network["departure"])
        result = _classify(observed, {**facts, "explained": explained}, detector, network, pool)
    return result


def explained_readings(flag: pd.DataFrame, departure: pd.DataFrame) -> pd.DataFrame:
    """Readings whose departure a first pass's ``flag`` explains as a fault of the day, not the start of a
    lasting change: 1 for a stuck or gross reading (known on its day), 2 for a spike whose next day's
    ``departure`` is back within ``RETURN_SHARE`` of it (known a day later; a spike the next day does not
    return from may be a level shift's first day), 0 for the others."""
    returned = departure.shift(-1).abs() < RETURN_SHARE * departure.abs()
    codes = np.select([flag.isin(["stuck", "gross"]).to_numpy(), (flag.eq("spike") & returned).to_numpy()],
                      [1, 2], 0).astype(np.int8)
    return pd.DataFrame(codes, index=flag.index, columns=flag.columns)


def explained_innovations(innovation: pd.DataFrame, departure: pd.DataFrame, explained: pd.DataFrame
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The innovations the shift and drift tests sum, given ``explained_readings``: an explained reading
    adds none, and the day after it takes its whole departure (yesterday's departure was the fault's, so
    it says nothing of today's). Returns them as known a day later, and as known on their own day (a
    spike's return is not known yet)."""
    settled, today = explained.to_numpy() > 0, explained.to_numpy() == 1
    after = np.vstack([np.zeros((1, settled.shape[1]), dtype=bool), settled[:-1]])
    known_later = innovation.mask(after & ~settled, departure).mask(settled, 0.0)
    known_today = innovation.mask(after & ~today, departure).mask(today, 0.0)
    return known_later, known_today


def _classify(observed: pd.DataFrame, facts: dict[str, pd.DataFrame], detector: dict, network: dict,
              pool: Pool | None) -> dict[str, pd.DataFrame]:
    """The verdict on every reading, given the departures from the neighbours. Only the day's storminess
    needs the whole network; the rest is station by station, so above ``VERDICT_BLOCK`` stations it runs
    in blocks on the pool's threads or workers (the same values as in one piece)."""
    stations = observed.columns
    per_station = {key: _station_table(detector, stations, key) for key in STATION_KEYS}
    # A station with no learning days at all gets the checks of the typical station.
    for key in ("jump_scale", "gross_threshold", "repeat_share"):
        per_station[key] = per_station[key].fillna(per_station[key].median())
    per_station["seen_months"] = per_station["seen_months"].fillna(ALL_MONTHS)
    innovation = _innovation(network["departure"], per_station["persistence"], per_station["departure_scale"])
    tables = {"observed": observed, "departure": network["departure"], "expected": network["expected"],
              "innovation": innovation, **facts}
    beyond_climate = facts["climate_z"] > detector["climate_margin"]  # no weather: not the day's storminess
    day = storminess((innovation / per_station["innovation_scale"]).mask(beyond_climate))
    settings = {key: detector[key] for key in VERDICT_SETTINGS}
    if pool is None or len(stations) <= VERDICT_BLOCK or not (pool.cluster or pool.threads > 1):
        return verdict((tables, per_station), day, settings, pool)
    # On threads, two blocks per thread: every step of the verdict runs in parallel, not only the change
    # tests, and the threads finish together.
    size = VERDICT_BLOCK if pool.cluster else -(-len(stations) // (2 * pool.threads))
    blocks = runtime.chunks(stations, size)
    parts = pool.map(verdict, runtime.OnDemand(
        lambda i: ({key: table[blocks[i]] for key, table in tables.items()},
                   {key: values[blocks[i]] for key, values in per_station.items()}), len(blocks)),
        day=pool.share(day), settings=settings)
    return {key: pd.concat([part[key] for part in parts], axis=1) for key in parts[0]}


def verdict(block: tuple[dict[str, pd.DataFrame], dict[str, pd.Series]], day: pd.Series, settings: dict,
            pool: Pool | None = None) -> dict[str, pd.DataFrame]:
    """``_classify`` for some stations: (their date x station tables, their learned values), the day's
    storminess over the whole network, and the detector's thresholds; ``pool`` runs the change tests."""
    tables, per_station = block
    observed, departure, expected, innovation = (tables[key] for key in ("observed", "departure", "expected",
                                                                         "innovation"))
    stations = observed.columns
    scale, persistence, innovation_scale, jump_scale, gross_threshold, share, seen_months = (
        per_station[key] for key in STATION_KEYS)
    z = departure / scale
    innovation_z = innovation / innovation_scale
    summed, latest = innovation, None
    if "explained" in tables:
        summed, latest = explained_innovations(innovation, departure, tables["explained"])
        latest = (latest / innovation_scale).div(day, axis=0)
    calm = (summed / innovation_scale).div(day, axis=0)
    step_z, step_lag = change_evidence(calm, persistence, STEP_LAGS, "step", pool, latest)
    ramp_z, ramp_lag = change_evidence(calm, persistence, RAMP_LAGS, "ramp", pool, latest)
    drifting = ramp_z.abs() > step_z.abs()
    # The offset to remove: the mean departure since a step began; twice it since a ramp began.
    since = mean_since(departure, np.where(drifting, ramp_lag, step_lag))
    offset = since.mask(drifting, 2 * since)
    reference = tables["reference"]
    jump_z = (observed - reference) / jump_scale

    shift_z = np.maximum(step_z.abs(), ramp_z.abs())
    # Persistent: strong evidence of a step or ramp that today's reading still carries; once
    # found, it stays flagged while the evidence stays above half the threshold.
    recent = recent_evidence(departure.div(day, axis=0) / scale, persistence, RECENT_DAYS)
    carries = (np.sign(departure) == np.sign(offset)) & (departure.abs() > 0.5 * offset.abs()) \
        & (np.sign(recent) == np.sign(offset)) & (recent.abs() > RECENT_Z) \
        & ((departure / scale).rolling(RECENT_DAYS, min_periods=(RECENT_DAYS + 1) // 2).mean().abs()
           > LEAST_SHIFT)
    # In a month a station never saw while learning, its climatology is taken from its neighbours and
    # may be off by a degree or two for weeks: a slow departure there is no evidence of a fault.
    month_bit = 1 << (observed.index.month.to_numpy() - 1)
    unseen = (seen_months.to_numpy().astype(int)[None, :] & month_bit[:, None]) == 0
    carries &= ~unseen
    persistent = held(carries & (shift_z > settings["shift_threshold"]),
                      carries & (shift_z > 0.5 * settings["shift_threshold"]))
    # A spike: a sudden departure that today's reading carries, alone or on top of a shift or drift.
    # Not a spike: a reading between its neighbours' lines, or near one of them (a front splits them, or
    # cold air pools on one side of a ridge: the station agrees with some neighbours and not others).
    split = tables["outside_z"] <= SPLIT_SHARE * settings["spike_threshold"]
    spike = (innovation_z.abs() > settings["spike_threshold"]) & (np.sign(innovation) == np.sign(departure)) \
        & (departure.abs() >= 0.5 * innovation.abs()) & ~split \
        & (~persistent | ((departure - offset).abs() > settings["spike_threshold"] * innovation_scale))
    # Gross: a jump no weather of the station makes, or a reading beyond its climate however many agree.
    climate_excess = tables["climate_z"] - settings["climate_margin"]
    gross = (jump_z.abs() > gross_threshold) | (climate_excess > 0)

    stuck, stuck_score = stuck_test(tables["run"], tables["start"], z, share, settings["stuck_threshold"])

    # The verdict as a code per reading (integer comparisons, not text, from here on); LABELS[code] is the flag.
    missing = observed.isna().to_numpy()
    persistent = persistent.to_numpy()
    # Gross before stuck: a missing-value code written on several days in a row is a code, not a sensor.
    code = np.select([missing, gross.to_numpy(), stuck.to_numpy(), spike.to_numpy(),
                      persistent & drifting.to_numpy(), persistent], [1, 3, 2, 4, 5, 6], 0)

    def frame(values: np.ndarray) -> pd.DataFrame:  # text stays object: a string column costs 5x to make
        return pd.DataFrame(values, index=observed.index, columns=stations, dtype=values.dtype)

    flag = frame(np.array(LABELS, dtype=object)[code])
    if settings["onsets"]:  # learning needs only which readings to trust, and since when
        began = np.arange(len(observed))[:, None] - np.where(drifting, ramp_lag, step_lag)
        return {"flag": flag, "onset": frame(np.where(persistent, began, -1))}

    fault, shifted = code >= 2, code >= 5
    excess = np.select(
        [code == 4, shifted, code == 3, code == 2],
        [innovation_z.abs().to_numpy() - settings["spike_threshold"],
         shift_z.to_numpy() - settings["shift_threshold"],
         np.fmax(jump_z.abs().to_numpy() - gross_threshold.to_numpy(), climate_excess.to_numpy()),
         stuck_score.to_numpy()], np.nan)
    # A reading that far from what its neighbours say is a confident fault, whatever its kind.
    excess = np.fmax(excess, np.where(fault, z.abs().to_numpy() - settings["spike_threshold"], np.nan))
    sure = np.where(fault, confidence(excess), np.nan)

    fallback = expected.fillna(reference).to_numpy()
    confident = sure >= settings["repair_confidence"]
    values = observed.to_numpy()
    repaired = np.where(confident & fault & ~shifted, fallback, values)
    repaired = np.where(confident & shifted, values - offset.to_numpy(), repaired)
    repaired = np.where(missing, fallback, repaired)
    score = z.abs().fillna(jump_z.abs())
    return {"flag": flag, "confidence": frame(sure), "score": score, "expected": frame(fallback),
            "repaired": frame(repaired)}


def shared_values(observed: pd.DataFrame, flag: pd.DataFrame, least_stations: int = 2) -> pd.DataFrame:
    """Values flagged gross that at least ``least_stations`` stations read exactly on the same day: probable
    missing-value codes an archive writes. Per value (rounded to 0.01), the most stations that read it on one
    day, and its readings and days in all (flagged or not), most readings first."""
    gross = flag.eq("gross").to_numpy()
    rows, columns = np.nonzero(gross)
    found = pd.DataFrame({"value": np.round(observed.to_numpy()[rows, columns], 2), "row": rows})
    per_day = found.groupby(["value", "row"]).size()
    shared = per_day[per_day >= least_stations]
    if shared.empty:
        return pd.DataFrame(columns=["most_stations", "readings", "days"])
    values = shared.index.get_level_values("value").unique()
    rounded = np.round(observed.to_numpy(), 2)
    every = {value: np.nonzero(rounded == value) for value in values}
    return pd.DataFrame({
        "most_stations": shared.groupby(level="value").max(),
        "readings": pd.Series({value: len(where[0]) for value, where in every.items()}),
        "days": pd.Series({value: len(np.unique(where[0])) for value, where in every.items()}),
    }).sort_values(["readings", "most_stations"], ascending=False)


def since_onset(onset: pd.DataFrame) -> pd.DataFrame:
    """True on every day from the onset of a flagged shift or drift to the day it was flagged (``onset``:
    the row where the change began, on its flagged days; -1 elsewhere)."""
    rows = np.arange(len(onset))[:, None]
    began = np.where(onset.to_numpy() >= 0, onset.to_numpy(), len(onset))
    earliest_later = np.minimum.accumulate(began[::-1], axis=0)[::-1]
    return pd.DataFrame(earliest_later <= rows, index=onset.index, columns=onset.columns)


def no_detection(observed: pd.DataFrame, window: int) -> dict[str, pd.DataFrame]:
    """The verdict with quality control switched off: nothing flagged, missing days filled with the
    median of the days before them so the features stay defined."""
    reference = trailing_median(observed, window)
    flag = pd.DataFrame(np.where(observed.isna(), MISSING, NO_FLAG), index=observed.index, columns=observed.columns)
    empty = pd.DataFrame(np.nan, index=observed.index, columns=observed.columns)
    return {"flag": flag, "confidence": empty, "score": empty, "expected": reference,
            "repaired": observed.fillna(reference)}
