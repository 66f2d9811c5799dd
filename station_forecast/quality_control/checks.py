"""The tests each reading faces, on date x station tables: the jump from the days before, runs of repeated readings
(stuck), and the step and ramp tests of a departure that left zero (level shift, drift).
"""

from __future__ import annotations

from station_forecast import runtime
from station_forecast.compute import Pool
from station_forecast.flags import CODE, Flag
from station_forecast.quality_control.robust import MAD_TO_SD, robust_scale, season_rows
from station_forecast.runtime import lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")
# Of a station's days, at most this share may be natural repeats flagged stuck by the neighbours' test.
NATURAL_REPEATS_FLAGGED = 0.0005
ORDINARY_RUN = 0.05  # a run of repeats at least this likely by chance is no evidence of a stuck sensor
REPEAT_PRIOR_PAIRS = 180  # pairs of days at the network's repeat share every station starts from
# Pairs of days at the station's repeat share each calendar month's share starts from. At whole degrees a
# steady season repeats far more than the year does (Gulf-coast summers in whole °C: most of the stuck flags of
# a whole-degree network with the year's share alone).
MONTH_PRIOR_PAIRS = 30
RESOLUTION_FLOOR = 1e-6  # °C: a change smaller than this is a repeat written with rounding noise


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
STATION_BLOCK = 16  # stations per block of the step and ramp tests
RETURN_SHARE = 0.5  # a spike returned when the next day's departure is within this share of it
# The date-offset test weighs each day's change against the neighbours' as Student-t residuals with
# OFFSET_TAILS degrees of freedom (a front that reaches a station a few hours after its neighbours is common
# and must not weigh like a normal residual), one day's evidence counting at most OFFSET_DAY_CAP, so that it
# takes four days that tell to flag a stretch (at 3, three: on two real networks of 16 stations three times and
# twice the false flags, 13 and 41 against 4 and 21, for date-offset F1 0.01-0.02 higher on four simulated
# ones). Evidence beyond the threshold is kept up to OFFSET_MEMORY only, so the day after a stretch ends with
# weather that tells is enough to let it go. A station is tested only where its learning days put it on the
# same dates as its neighbours by at least OFFSET_LEAST_ALIGNMENT a day on average (their evidence for the right
# date over the nearer of the wrong ones): 0.85-1.48 at each station of two real networks of one observation
# hour, 0.68-1.17 on four simulated ones; 0.40 at a station of a real network mixing observation hours (a
# morning reading's maximum is the afternoon before's) whose neighbours read at other hours for years (tested,
# it was flagged on 220 more days, in whole seasons); below 0 at one keyed a day apart throughout (the tests).
# It is tested only in the months whose learning days (with a month either side) put it there too: in summer a
# station's day-to-day changes are its own (showers, sea breezes) more than the weather it shares, so which day
# they follow is not clear (on two real networks of 17 and 19 stations, the mean evidence at coastal stations
# fell from about 1 in winter to 0.2 in July, and most date-offset flags were summer days).
OFFSET_TAILS = 2.0
OFFSET_DAY_CAP = 2.0
OFFSET_MEMORY = 1.0
OFFSET_LEAST_ALIGNMENT = 0.5
# A stretch keyed a day early ends with one day's temperature read twice: its last reading already held the day
# after it. Where the station's resolution makes an exact repeat rare (its learned repeat share below this), a
# repeat ends the test for an early stretch at once, instead of the one to four days the weather takes to tell.
OFFSET_ORDINARY_REPEAT = 0.05
# A fault that lasts (a date offset, a level shift, a drift) is blamed on a station only on days at least this many
# of its neighbours read (for a date offset, that day and the day before): with one, which of the two stations is
# wrong cannot be told, and each would be flagged for the other's fault.
LEAST_NEIGHBOURS = 2
SHARED_ROWS = 512  # days of the network looked at together for values its stations share
COARSE_RESOLUTION = 0.5  # °C: a station that reads in whole degrees (°F: 0.56, °C: 1), whose values repeat more
SHARED_LEAST = 3  # stations reading one value far from their neighbours on a day that make it a code
SHARED_LEAST_COARSE = 5  # ... where any of them reads in whole degrees


MEDIAN_BLOCK = 128  # stations per task of trailing_median


def trailing_median(observed: pd.DataFrame, window: int, threads: int = 1) -> pd.DataFrame:
    """The median of the ``window`` days before each day (at least half of them observed); the stations in
    blocks of ``MEDIAN_BLOCK`` on ``threads`` threads (pandas' rolling median releases the interpreter), the
    same values as in one piece."""
    blocks = [observed.iloc[:, begin:begin + MEDIAN_BLOCK] for begin in range(0, observed.shape[1], MEDIAN_BLOCK)]
    if len(blocks) < 2:
        return _trailing_median_block(observed, window)
    medians = runtime.Threads(threads).map(_trailing_median_block, blocks, window=window)
    return pd.DataFrame(np.concatenate([median.to_numpy() for median in medians], axis=1), index=observed.index,
                        columns=observed.columns, copy=False)


def _trailing_median_block(observed: pd.DataFrame, window: int) -> pd.DataFrame:
    return observed.shift(1).rolling(window, min_periods=max(1, window // 2)).median()


def repeat_runs(observed: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How many readings in a row equal today's (1 for a reading unlike yesterday's), and the row index
    where that run of identical readings began."""
    same = observed.diff().eq(0)
    count = same.cumsum()
    run = count - count.where(~same).ffill().fillna(0)
    start = np.arange(len(observed))[:, None] - run.to_numpy().astype(int)
    return run + 1, pd.DataFrame(start, index=observed.index, columns=observed.columns, copy=False)


# A value a station's learning days hold exactly, far more often than any temperature is read to the last digit,
# and far outside all its other readings, is a missing-value code written as a reading (an archive that writes
# -99 on the days of a years-long outage). Learned from those readings the station's climatology would sit at the
# code, its real readings would look far outside its climate, and the code would pass as weather.
CODE_LEAST_SHARE = 0.01  # of the station's learning readings (a whole-°F record's commonest value: 3-4 %, inside)
CODE_LEAST_READINGS = 10
CODE_MARGIN = 3.0  # robust standard deviations of the other readings beyond their 0.1 and 99.9 percentiles
MOST_CODES = 3  # codes sought per station


def written_codes(values: pd.DataFrame) -> dict[str, list[float]]:
    """Per station (only those with any), the values of its readings ``values`` that are missing-value codes
    by the rule above, commonest first."""
    codes = {}
    for station in values.columns:
        readings = values[station].to_numpy()
        readings = readings[~np.isnan(readings)]
        found = []
        for _ in range(MOST_CODES):
            if len(readings) == 0:
                break
            distinct, counts = np.unique(readings, return_counts=True)
            commonest = int(np.argmax(counts))
            value, count = distinct[commonest], counts[commonest]
            others = readings[readings != value]
            if count < max(CODE_LEAST_READINGS, CODE_LEAST_SHARE * len(readings)) or len(others) < CODE_LEAST_READINGS:
                break
            low, high = np.quantile(others, [0.001, 0.999])
            spread = MAD_TO_SD * np.median(np.abs(others - np.median(others)))
            if low - CODE_MARGIN * spread <= value <= high + CODE_MARGIN * spread:
                break
            found.append(float(value))
            readings = others
        if found:
            codes[station] = found
    return codes


def shared_far_values(observed: pd.DataFrame, departure: pd.DataFrame, scale: pd.Series, resolution: pd.Series,
                      records: np.ndarray, threshold: float, rows: int = SHARED_ROWS) -> pd.DataFrame:
    """Where stations read exactly the same value on a day, each at least ``threshold`` times its ``scale``
    from what its neighbours say (its ``departure``): a code an archive wrote for the stations its feed lost
    that day: ``SHARED_LEAST`` stations, or ``SHARED_LEAST_COARSE`` where any of them reads in whole degrees
    (its ``resolution`` at least ``COARSE_RESOLUTION``). Weather rarely does it, and then at two stations: on
    seven real networks of 9-19 stations over 26 years, no two readings that far from their neighbours on one
    day were the same at 0.1 degree F or whole degrees C, one pair at whole degrees F (Jacksonville and
    Greensboro); on the 324 cities of the same archive, two pairs at 0.1 degree F, each two nearby cities on
    the same side of a front (Montreal and Ottawa; Buffalo and Grand Rapids, both by a lake). Without this, a
    code read by some of a station's neighbours too drew the lines it lay between, as a front's split does.
    ``records``: per station, a number it shares with the stations that hold its record under another name,
    which count as one."""
    found = np.zeros(observed.shape, dtype=bool)
    least = np.where(resolution.to_numpy() >= COARSE_RESOLUTION, SHARED_LEAST_COARSE, SHARED_LEAST)
    for begin in range(0, len(observed), rows):  # the far readings are few: never a second table of floats
        with np.errstate(invalid="ignore"):
            far = np.abs(departure.to_numpy()[begin:begin + rows]) >= threshold * scale.to_numpy()[None, :]
        day, station = np.nonzero(far)
        if len(day) < 2:
            continue
        value = np.round(observed.to_numpy()[begin:begin + rows][day, station], 2)
        _, group = np.unique(np.stack([day, value]), axis=1, return_inverse=True)
        group = group.ravel()
        distinct = np.bincount(np.unique(np.stack([group, records[station]]), axis=1)[0], minlength=group.max() + 1)
        needed = np.zeros(len(distinct), dtype=int)
        np.maximum.at(needed, group, least[station])
        shared = distinct[group] >= needed[group]
        found[begin + day[shared], station[shared]] = True
    return pd.DataFrame(found, index=observed.index, columns=observed.columns, copy=False)


def reading_facts(observed: pd.DataFrame, window: int, threads: int = 1) -> dict[str, pd.DataFrame]:
    """What the verdict needs from the readings alone (not from the neighbours), so that every pass over
    the same readings computes it once: the trailing median and the runs of repeated readings."""
    run, start = repeat_runs(observed)
    return {"reference": trailing_median(observed, window, threads), "run": run, "start": start}


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


def repeat_share_by_month(observed: pd.DataFrame, share: pd.Series) -> pd.DataFrame:
    """``repeat_share`` in each calendar month (month x station), each shrunk towards the station's ``share``
    as if it had MONTH_PRIOR_PAIRS more pairs at that rate."""
    values = observed.to_numpy()
    pairs = ~np.isnan(values[1:]) & ~np.isnan(values[:-1])
    repeats = pairs & (values[1:] == values[:-1])
    month = observed.index.month.to_numpy()[1:]  # a pair's month is its second day's
    months = range(1, 13)
    pairs = pd.DataFrame([pairs[month == m].sum(axis=0) for m in months], index=months, columns=observed.columns)
    repeats = pd.DataFrame([repeats[month == m].sum(axis=0) for m in months], index=months, columns=observed.columns)
    found = (repeats + MONTH_PRIOR_PAIRS * share) / (pairs + MONTH_PRIOR_PAIRS)
    return found.fillna(share).clip(lower=1e-4, upper=0.9)


def reading_resolution(observed: pd.DataFrame) -> pd.Series:
    """Per station, the smallest step its readings change by: the 1st percentile of its day-to-day changes
    that are not zero (1 at whole degrees C, 0.56 at whole degrees F; NaN without any)."""
    changes = observed.diff().abs()
    return changes.where(changes > RESOLUTION_FLOOR).quantile(0.01)


def stuck_test(run: pd.DataFrame, start: pd.DataFrame, z: pd.DataFrame, share: pd.DataFrame, least: float,
               hidden: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which readings are a stuck sensor repeating itself, and by how much evidence.

    A run of ``m`` identical readings happens naturally with probability about
    p^(m-1), where ``p`` (``share``, date x station) is the station's share of days repeating the day before
    in that day's calendar month, never less than its year's (learned: whole-degree readings repeat far more
    often than 0.1 °C ones, and in steady summer weather more than in winter's). A repeated reading may
    have moved by up to the station's resolution without showing it (``hidden``, per station, in departure
    scales), so the neighbours' distance counts only beyond that.
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
    from scipy.special import ndtri

    length, start = run.to_numpy().astype(int), start.to_numpy()
    natural = np.exp((length - 1) * np.log(share.to_numpy()))
    tail = NATURAL_REPEATS_FLAGGED / (2 * np.maximum(natural, 1e-300))  # a long run: no chance at all
    needed = np.where(tail < 0.5, np.maximum(least, ndtri(1 - np.minimum(tail, 0.5))), least)
    # Standard deviations of the difference of two independent departures: what neighbours show
    # around a sensor that really did not change. A reading that repeats may have moved by up to the
    # station's resolution (``hidden``, in departure scales) without showing it.
    values = z.to_numpy() / np.sqrt(2)
    moved = np.abs(values - np.take_along_axis(values, start, axis=0))
    moved = np.maximum(moved - np.nan_to_num(hidden.to_numpy())[None, :] / np.sqrt(2), 0.0)
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
    best = pd.DataFrame(best, index=run.index, columns=run.columns, copy=False)
    return pd.DataFrame(stuck, index=run.index, columns=run.columns, copy=False), best


def day_before(values: np.ndarray, fill: float | bool = float("nan")) -> np.ndarray:
    """Each row's value of the row before (``fill`` in the first): a days x stations array moved down a day."""
    return np.vstack([np.full((1, values.shape[1]), fill, dtype=values.dtype), values[:-1]])


def offset_day_evidence(observed: pd.DataFrame, expected: pd.DataFrame, scale: pd.Series, reporting: pd.DataFrame
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each day's evidence (a log-likelihood ratio, capped) that a station's readings are keyed a day late or a
    day early against its neighbours, rather than on the right date.

    A reading keyed a day late (day t holds day t - 1's temperature) changes from
    yesterday as the neighbours' ``expected`` values did the day before; one keyed
    a day early (day t holds day t + 1's) as they will tomorrow, which shows on
    day t for yesterday's reading. Changes, not levels: a level shift or a
    persistent local departure cancels out. ``scale``: the robust spread of the
    station's change less its neighbours' on the learning days; ``reporting``:
    how many of its neighbours read each day (``reporting_neighbours``).
    Returns (late, early, judged) as days x stations arrays: 0 evidence on days
    not judged (a reading missing, or fewer than ``LEAST_NEIGHBOURS``
    neighbours reading that day and the day before).
    """
    change = observed.diff().to_numpy()
    neighbours = expected.diff().to_numpy()
    spread = np.where(scale.to_numpy() > 0, scale.to_numpy(), np.nan)[None, :]  # 0: a station its neighbours copy

    def surprise(residual: np.ndarray) -> np.ndarray:  # a Student-t residual's negative log-likelihood, plus a constant
        with np.errstate(invalid="ignore"):
            return (OFFSET_TAILS + 1) / 2 * np.log1p((residual / spread) ** 2 / OFFSET_TAILS)

    def capped(evidence: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.clip(evidence, -OFFSET_DAY_CAP, OFFSET_DAY_CAP), nan=0.0)

    right = change - neighbours
    enough = reporting.to_numpy() >= LEAST_NEIGHBOURS
    judged = enough & day_before(enough, fill=False) & ~np.isnan(right) & ~np.isnan(spread)
    on_the_day = surprise(right)
    late = capped(on_the_day - surprise(change - day_before(neighbours)))
    early = capped(day_before(on_the_day) - surprise(day_before(change) - neighbours))
    return np.where(judged, late, 0.0), np.where(judged, early, 0.0), judged


def offset_evidence(evidence: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential tests (CUSUM) of one kind of date offset from each day's ``evidence`` (days x stations).

    Returns the statistic kept within [0, threshold + OFFSET_MEMORY] (a
    stretch is flagged while it is above ``threshold``), the evidence summed
    since the statistic last was 0 (not bounded: how sure a flag is), and the
    row where the stretch began (after the last day the statistic was 0).
    """
    ceiling = threshold + OFFSET_MEMORY
    bounded = np.empty_like(evidence)
    level = np.zeros(evidence.shape[1])
    for day, row in enumerate(evidence):  # a recursion in time, vectorised over stations
        level += row
        np.clip(level, 0.0, ceiling, out=level)
        bounded[day] = level
    total = np.cumsum(evidence, axis=0)
    summed = total - np.minimum(np.minimum.accumulate(total, axis=0), 0.0)
    rows = np.arange(len(evidence))[:, None]
    onset = np.maximum.accumulate(np.where(bounded == 0.0, rows, -1), axis=0) + 1
    return bounded, summed, onset


def offset_alignment(observed: pd.DataFrame, expected: pd.DataFrame, reporting: pd.DataFrame,
                     learning: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.DataFrame]:
    """Per station, the spread of its day-to-day change less its neighbours' (on ``learning`` days), and how
    clearly its learning days are on its neighbours' dates: the mean daily evidence (``offset_day_evidence``)
    for the right date over a day late or early, whichever is nearer, on the days judged (NaN without); and
    the same for each calendar month (rows 1-12) from the days of its season (``robust.season_rows``)."""
    scale = robust_scale((observed.diff() - expected.diff()).where(learning))
    late, early, judged = offset_day_evidence(observed, expected, scale, reporting)
    judged = judged & learning.to_numpy()
    late, early = late * judged, early * judged

    def alignment(rows: np.ndarray | slice) -> np.ndarray:
        days = judged[rows].sum(axis=0)
        nearer = np.maximum(late[rows].sum(axis=0), early[rows].sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(days > 0, -nearer / days, np.nan)

    by_month = [alignment(rows) for rows in season_rows(observed.index)]
    return (scale, pd.Series(alignment(slice(None)), index=observed.columns),
            pd.DataFrame(by_month, index=pd.RangeIndex(1, 13, name="month"), columns=observed.columns))


def departure_innovation(departure: pd.DataFrame, persistence: pd.Series, scale: pd.Series) -> pd.DataFrame:
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
    return pd.DataFrame(best, index=innovation_z.index, columns=innovation_z.columns, copy=False), best_lag


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
    return pd.DataFrame(mean, index=values.index, columns=values.columns, copy=False)


def held(start: pd.DataFrame, hold: pd.DataFrame) -> pd.DataFrame:
    """True on days ``hold`` has held without a break since a day ``start`` was true (causal hysteresis)."""
    rows = np.arange(len(start))[:, None]
    last_start = np.maximum.accumulate(np.where(start.to_numpy(), rows, -1), axis=0)
    last_break = np.maximum.accumulate(np.where(hold.to_numpy(), -1, rows), axis=0)
    return pd.DataFrame((last_start > last_break) & hold.to_numpy(), index=start.index, columns=start.columns,
                        copy=False)


def explained_readings(verdict: pd.DataFrame, departure: pd.DataFrame) -> pd.DataFrame:
    """Readings whose departure a first pass's ``verdict`` (its codes: a flag's position in ``VERDICT_CODES``)
    explains as a fault of the day, not the start of a lasting change: 1 for a stuck or gross reading (known
    on its day), 2 for a spike whose next day's ``departure`` is back within ``RETURN_SHARE`` of it (known a
    day later; a spike the next day does not return from may be a level shift's first day), 0 for the
    others."""
    code = verdict.to_numpy()
    returned = (departure.shift(-1).abs() < RETURN_SHARE * departure.abs()).to_numpy()
    codes = np.select([np.isin(code, [CODE[Flag.STUCK], CODE[Flag.GROSS]]), (code == CODE[Flag.SPIKE]) & returned],
                      [1, 2], 0).astype(np.int8)
    return pd.DataFrame(codes, index=verdict.index, columns=verdict.columns, copy=False)


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
