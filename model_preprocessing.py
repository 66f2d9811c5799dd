"""Stage 2: validate the station files, quality-control the readings, build scaled features.

Quality control (station_forecast/quality_control/) compares every reading with what its
neighbouring stations say it should be, so a cold snap that every station sees
stays weather while a fault at one station stands out. It learns on the days
before the test period only, flags spikes, level shifts, drifts, stuck runs,
stretches keyed a day apart (date offsets) and gross errors with a kind and a
confidence, and repairs only confident faults: a spike or stuck reading by its
expected value, a shift or drift by removing its estimated offset, a reading
keyed a day early by the one before it. Everything is causal: a day's flag, repair and features use
only that day and earlier ones, never the next day that is being forecast.

Inputs:  data/train/raw/*.csv, data/test/raw/*.csv (date, temperature), data/source.json (test_start, frequency)
Outputs: data/{train,test}/features.csv  one row per station, forecast origin and step ahead
         data/{train,test}/flags.csv     the detector's verdict on every calendar day
         data/flagged.csv                every flagged reading, training and test period
         models/scaler.joblib            StandardScaler fitted on training features
         models/detector.json            what the detector learned on the days before the test period
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

from station_forecast import (
    cli,
    compute,
    features,
    manifest,
    quality_control,
    runtime,
    spill,
    station_files,
    storage,
    units,
)
from station_forecast.errors import PipelineError
from station_forecast.features import BASELINE_COLUMNS, FEATURES, SPREAD_COLUMN
from station_forecast.flags import FAULTS, Flag
from station_forecast.params import Params, load_params
from station_forecast.runtime import log
from station_forecast.steps import FREQUENCIES
from station_forecast.storage import Paths

np = runtime.lazy_import("numpy")
pd = runtime.lazy_import("pandas")

STAGE = "model_preprocessing"
# What the stage loads when it runs: imported ahead by --wait-for-go, and its import floor in benchmark.py.
IMPORTS = ["numpy", "pandas", "sklearn.preprocessing", "joblib"]
# Stations whose features are built at a time, one step ahead: bounds the memory at scale. A block holds a row
# per station-step and step ahead, so forecasting further ahead builds fewer stations at a time.
STATION_BLOCK = 100
PROBABLE_CODES = 3  # values shared by stations on a day and flagged gross that the log names
# Training rows past this many bytes of columns wait on disk, a block of stations at a time, until they are
# written (about 300 stations x 10 years; the default run's stay in memory). At 1,000 x 10 that took the
# stage's peak from 1.52 to 1.29 GB at no measurable cost in time.
SPILL_BYTES = spill.LIMIT_BYTES
SPILL_FOLDER = ".features.spill"  # in data/, removed when the stage ends
FLAGS_BLOCK = 256  # stations whose rows of the flag tables are made at a time
# A step's period as a code: outside the station's record, training, test, or a held-out station's days before
# the test period ("history"). A days x stations table of codes is an eighth of one of text, and comparing it
# (which the stage does some hundred times) is fifty times faster. PERIOD_NAMES[code]: as flagged.csv writes it.
OUTSIDE, TRAIN, TEST, HISTORY = range(4)
PERIOD_NAMES = ("", "train", "test", "history")


# ------------------------------------------------------------------------ loading


def load_stations(train_dir: Path, test_dir: Path, pre: dict, pool: compute.Pool | None = None) -> pd.DataFrame:
    """All raw files as one long table: station, date, temperature, split (files read on ``pool``)."""
    if not test_dir.is_dir():
        raise PipelineError(f"{test_dir}: input folder not found; run data_creation.py first")
    if not train_dir.is_dir():
        raise PipelineError(f"{train_dir}: input folder not found; run data_creation.py first")
    files = [(split, path) for split, folder in (("train", train_dir), ("test", test_dir))
             for path in storage.station_files(folder)]
    if not any(split == "train" for split, _ in files):
        raise PipelineError(f"{train_dir}: no station CSVs to train on")
    parts = (pool or runtime.Threads()).map(station_files.read_station_files,
                                            runtime.chunks([path for _, path in files], station_files.FILES_PER_CHUNK),
                                            what="station files read (chunks)",
                                            min_temp=pre["min_temp"], max_temp=pre["max_temp"])
    readings = [file for chunk in parts for file in chunk]
    _check_station_periods(files, readings, pre["min_steps"])
    # One column at a time, the text columns from one shared object per file, not one string per row.
    rows = np.array([len(dates) for dates, _ in readings])

    def per_file(values: list[str]) -> np.ndarray:
        return np.repeat(np.array(values, dtype=object), rows)

    return pd.DataFrame({
        "date": np.concatenate([dates for dates, _ in readings]),
        "temperature": np.concatenate([values for _, values in readings]),
        "station": pd.Series(per_file([path.stem for _, path in files]), dtype=object),
        "split": pd.Series(per_file([split for split, _ in files]), dtype=object)})


def _check_station_periods(files: list[tuple[str, Path]], readings: list[tuple[np.ndarray, np.ndarray]],
                           min_steps: int) -> None:
    """Refuse a station whose training dates reach into its test period, or with too few readings.
    ``files``: (split, path) of every file; ``readings``: its dates, in order, and readings."""
    first_day, last_day, counts, source = {}, {}, {}, {}
    for (split, path), (dates, values) in zip(files, readings, strict=True):
        station = path.stem
        source.setdefault(station, str(path))
        counts[station] = counts.get(station, 0) + int(np.count_nonzero(~np.isnan(values)))
        first_day[station, split], last_day[station, split] = dates[0], dates[-1]
    for station in source:
        if (station, "train") in last_day and (station, "test") in first_day \
                and last_day[station, "train"] >= first_day[station, "test"]:
            raise PipelineError(f"station {station}: training dates reach into its test period; "
                                "the split must be in time order")
    station = min(source, key=lambda name: counts[name])
    if counts[station] < min_steps:
        raise PipelineError(f"{source[station]}: station {station} has only {counts[station]} observed steps; "
                            f"at least preprocessing.min_steps = {min_steps} are needed to build features")


# ------------------------------------------------------------------------- calendar


def to_calendar(frame: pd.DataFrame, test_start: pd.Timestamp, frequency: str = "daily"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide tables (date x station) of observed temperature and of period (codes, ``PERIOD_NAMES``).

    Every station gets a complete calendar of ``frequency`` steps from its first
    to its last step; missing steps are NaN. The period is TRAIN or TEST as the raw files say,
    except that a held-out station's days before the test period are HISTORY:
    they give its features a past and its detector something to learn from, but
    are neither trained on nor scored. Outside a station's own days it is OUTSIDE.
    """
    # Placed straight into arrays (each reading's row and column found once): the files were checked to hold
    # every station-day at most once, so nothing is overwritten. The rows come station by station, so they are
    # placed station by day (each station's days contiguous) and turned date x station once: at 10,000
    # stations x 10 years, placing and filling the periods the other way round took 10 s.
    dates = frame["date"].to_numpy()
    calendar = pd.date_range(dates.min(), dates.max(), freq=FREQUENCIES[frequency], name="date")
    codes, names = pd.factorize(frame["station"])  # by hashing; the columns in name order, as pivot gives them
    order = np.argsort(names.to_numpy(dtype=object))
    stations, column = names.to_numpy(dtype=object)[order], np.argsort(order)[codes]
    row = calendar.get_indexer(dates)
    on = row >= 0  # a date off the calendar's steps has no place (as pivoting to the calendar would drop it)
    by_station = np.full((len(stations), len(calendar)), np.nan)
    by_station[column[on], row[on]] = frame["temperature"].to_numpy()[on]
    observed = np.ascontiguousarray(by_station.T)
    split = np.full(by_station.shape, -1, dtype=np.int8)  # -1 no reading, 0 train, 1 test
    split[column[on], row[on]] = (frame["split"] == "test").to_numpy()[on]
    del by_station
    # A missing day belongs to the period of the day before it, and from the test period's first day on to the
    # test period (a gap begun in training is not training: no row with a test day's features may reach the
    # scaler); days before a station's first or after its last day belong to none.
    step = np.arange(len(calendar))
    last = np.maximum.accumulate(np.where(split >= 0, step, -1), axis=1)  # the last day read, up to each day
    after = np.minimum.accumulate(np.where(split >= 0, step, len(step))[:, ::-1], axis=1)[:, ::-1]
    period = np.where((np.take_along_axis(split, np.maximum(last, 0), axis=1) == 1)
                      | np.asarray(calendar >= test_start)[None, :], TEST, TRAIN).astype(np.int8)
    period[(last < 0) | (after >= len(step))] = OUTSIDE
    period[(period == TEST) & np.asarray(calendar < test_start)[None, :]] = HISTORY
    columns = pd.Index(stations, dtype=object, name="station")
    return (pd.DataFrame(observed, index=calendar, columns=columns, copy=False),
            pd.DataFrame(np.ascontiguousarray(period.T), index=calendar, columns=columns, copy=False))


def quality_control_flags(observed: pd.DataFrame, period: pd.DataFrame, qc: dict,
                          pool: compute.Pool | None = None, threads: int = 1, temperature: bool = True,
                          positions: np.ndarray | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The detector learned on the days before the test period, and its verdict on every day (its station
    blocks on ``pool`` when that is a cluster, else on ``threads`` threads). For ``temperature`` readings
    (°C) no jump beyond ``quality_control.JUMP_CEILING`` is weather. ``positions``: ``station_positions``.

    With ``detector = "none"`` nothing is flagged and only missing days are
    filled (with the median of the days before), so the features stay defined.
    """
    if qc["detector"] == "none":
        return {"detector": "none"}, quality_control.no_detection(observed, qc["window"])
    learning = (period == TRAIN) | (period == HISTORY)
    if pool is None or not pool.cluster:
        pool = runtime.Threads(threads)
    else:  # the network-wide work stays in this process, the workers waiting: on this process's threads
        pool.threads = threads
    ceiling = quality_control.JUMP_CEILING if temperature else float("inf")
    detector = quality_control.learn(observed, learning, qc, pool, ceiling, positions)
    if not any("jump_scale" in entry for entry in detector["stations"].values()):
        raise PipelineError(why_no_scales(observed.where(learning)))
    return detector, quality_control.detect(observed, detector, pool)


def why_no_scales(learned: pd.DataFrame) -> str:
    """Why the quality control learned no station's scales from the ``learned`` readings (NaN elsewhere): they
    never change (a stuck sensor or a fill value read as the temperature), or there are too few of them."""
    readings = learned.notna().sum()
    if readings.max() > 1 and not (learned.diff().abs() > 0).to_numpy().any():
        named = ", ".join(f"{station}: {learned[station].dropna().iat[0]:g} at all {readings[station]:,} steps"
                          for station in readings.index[readings > 0][:3])
        return (f"no station's training readings ever change ({named}): a stuck sensor or a fill value, not a "
                "temperature record; check the files and import.temperature_column")
    return (f"the training period is too short to learn the quality control's scales (the most training readings "
            f"at one station: {readings.max():,}); lower data.test_steps, or add earlier readings")


# -------------------------------------------------------------------------- features


def to_long(wide: dict[str, pd.DataFrame], rows: np.ndarray | None = None) -> pd.DataFrame:
    """Date x station tables of one shape as one long table (station, date, one column per table), in
    station then date order, by flattening their arrays: no index alignment and no sort, so it costs
    little time or memory at scale. ``rows``: which of the flattened station-days to keep (all if None),
    taken column by column, so the whole long table is never made when only a part is wanted."""
    first = next(iter(wide.values()))
    n_dates, n_stations = first.shape
    keep = slice(None) if rows is None else rows
    station = first.columns.to_numpy(dtype=object)
    if rows is None:
        stations = np.repeat(station, n_dates)
    else:  # one station number per kept row, not one object per station-day
        stations = station[np.nonzero(rows)[0] // n_dates]
    return _frame({"station": stations, "date": np.tile(first.index.to_numpy(), n_stations)[keep],
                   **{name: table.to_numpy().T.ravel()[keep] for name, table in wide.items()}})


def _frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """A table of these arrays, text kept in object columns: pandas would make each a string column,
    which costs about five times as much to make as the object column, and as much again to take apart."""
    return pd.DataFrame({name: pd.Series(values, dtype=object, copy=False) if values.dtype == object else values
                         for name, values in columns.items()}, copy=False)


def baseline_climatology(observed: pd.DataFrame, period: pd.DataFrame, accepted: pd.DataFrame,
                         detector: dict | None = None) -> pd.DataFrame:
    """Each station's seasonal mean over its training steps that were not flagged (the climatology
    baseline's coefficients): yearly harmonics where those steps cover the year; else the seasons the
    detector took for it from its neighbours, moved to the station's own level, or that level alone
    (a station that started a few months ago has no seasons of its own to show)."""
    return _seasonal_means(observed.where((period == TRAIN) & accepted), detector)


def station_climatology(observed: pd.DataFrame, period: pd.DataFrame, accepted: pd.DataFrame, coefs: pd.DataFrame,
                        detector: dict | None = None) -> pd.DataFrame:
    """Every station's climatology coefficients, the climate ``features.CLIMATE_FEATURES`` leave out: the
    training climatology ``coefs`` (``baseline_climatology``) where it has one; for a station never trained on,
    the seasonal mean of its steps before the test period that were not flagged (made as
    ``baseline_climatology`` makes it); for a station without either, the network's typical climatology (the
    median of the others')."""
    untrained = [station for station in observed.columns if station not in coefs]
    if not untrained:
        return coefs
    own = _seasonal_means(observed[untrained].where((period[untrained] == HISTORY) & accepted[untrained]), detector)
    coefs = pd.concat([coefs, own], axis=1)
    others = [station for station in untrained if station not in coefs]
    if not others or coefs.empty:  # with no climatology anywhere, the climate features stay empty
        return coefs
    typical = coefs.median(axis=1).to_numpy()[:, None]
    return pd.concat([coefs, pd.DataFrame(np.repeat(typical, len(others), axis=1), index=coefs.index,
                                          columns=others)], axis=1)


def _seasonal_means(readings: pd.DataFrame, detector: dict | None) -> pd.DataFrame:
    """Each station's seasonal mean of ``readings`` (the steps to learn from; NaN elsewhere): yearly
    harmonics where they cover the year; else the ``detector``'s seasons for the station moved to its level,
    or that level alone."""
    coefs = quality_control.fit_climatology(readings)
    seen = quality_control.covers_the_year(readings)
    learned = (detector or {}).get("stations", {})
    shapes = {station: learned.get(station, {}).get("climatology") for station in seen.index[~seen]
              if station in coefs}
    return quality_control.borrow_seasons(coefs, readings, shapes)


# The neighbours-ridge baseline: per station, a Ridge on its own last readings, the target day's calendar
# terms and each neighbour's reading at the origin, all as departures from the station's training climatology.
# The model's feature ``features.RIDGE_FEATURE`` comes from the same Ridge given each neighbour's reading the
# step before the origin too (how the weather is moving): a station's own fitted weights carry what one pooled
# model cannot (which neighbour is upwind, how fast this station forgets), and with no neighbour it is the
# station's own autoregression.
RIDGE_LAGS = 7  # the station's readings at t, t-1, ..., t-6: lags 1-7 of the day t+1 forecast
RIDGE_ALPHA = 1.0  # on standardised inputs
RIDGE_LEAST_ROWS = 60  # fewer training rows: no baseline for that station
# The training dates fall in this many consecutive blocks; a training row's feature comes from the station's
# ridge fitted on the other blocks, so the model learns how far to trust the ridge from forecasts it was not
# fitted on, as on the test days (stacking; a ridge fitted on the row itself would look better than it is).
RIDGE_FOLDS = 5


def departures(repaired: pd.DataFrame, coefs: pd.DataFrame) -> pd.DataFrame:
    """Every station's repaired readings minus its training climatology (stations with one only): what the
    neighbours ridge reads, made once for the whole network."""
    known = pd.Index([station for station in repaired.columns if station in coefs])
    return repaired[known] - quality_control.climatology_at(coefs, repaired.index, known)


def neighbours_ridge(stations: list[str], departure: pd.DataFrame, observed: pd.DataFrame, period: pd.DataFrame,
                     accepted: pd.DataFrame, coefs: pd.DataFrame, neighbours: dict[str, list[str]], horizon: int,
                     in_gaps: pd.DataFrame | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The neighbours-ridge forecasts of t+h from every origin t, per step h: dates x ``stations`` arrays, NaN
    where the station has no ridge (never trained on, too few training rows) or lacks a reading among its last
    ``RIDGE_LAGS``. Fitted per station on its training targets that were observed and not flagged; a
    neighbour's missing reading counts as its climatology (a departure of 0). ``departure``: ``departures`` of
    the whole network. It is never fitted on a row whose readings ``in_gaps`` (``climate_in_gaps``) filled.

    Two forecasts: the baseline, and the feature's, which also reads the neighbours a step before the origin
    and forecasts each training block of dates from a fit on the others (``RIDGE_FOLDS``)."""
    dates = departure.index
    baseline = {step: np.full((len(dates), len(stations)), np.nan) for step in range(1, horizon + 1)}
    stacked = {step: np.full((len(dates), len(stations)), np.nan) for step in baseline}
    trained = [station for station in stations if station in departure]
    if not trained:
        return baseline, stacked
    normals = {step: quality_control.climatology_at(coefs, dates.shift(step), pd.Index(trained)).to_numpy()
               for step in baseline}
    targets = {step: (observed[trained].shift(-step).to_numpy() - normals[step],
                      ((period[trained].shift(-step, fill_value=OUTSIDE) == TRAIN)
                       & accepted[trained].shift(-step, fill_value=False)).to_numpy(),
                      np.column_stack(features.day_of_year_terms(dates.shift(step))))
               for step in baseline}
    column = {station: i for i, station in enumerate(departure.columns)}
    values = departure.to_numpy()
    for j, station in enumerate(trained):
        k = stations.index(station)
        own = values[:, column[station]]
        lags = np.column_stack([np.concatenate([np.full(lag, np.nan), own[:len(own) - lag]])
                                for lag in range(RIDGE_LAGS)])
        near = np.nan_to_num(values[:, [column[n] for n in neighbours.get(station, []) if n in column]])
        before = np.vstack([np.zeros((1, near.shape[1])), near[:-1]])
        known = ~np.isnan(lags).any(axis=1)
        learnable = known
        if in_gaps is not None and station in in_gaps:
            filled = in_gaps[station].to_numpy()
            learnable = known & ~np.column_stack([np.concatenate([np.zeros(lag, bool), filled[:len(filled) - lag]])
                                                  for lag in range(RIDGE_LAGS)]).any(axis=1)
        for step in baseline:
            target, usable, calendar = targets[step]
            fit = learnable & ~np.isnan(target[:, j]) & usable[:, j]
            if fit.sum() < RIDGE_LEAST_ROWS:
                continue
            # One design: the baseline's inputs are the stacked ridge's without the neighbours' step before.
            inputs = np.column_stack([lags, near, calendar, before])
            plain, crossed = _ridge_forecasts(inputs, target[:, j], fit, known,
                                              RIDGE_LAGS + near.shape[1] + calendar.shape[1])
            baseline[step][known, k] = normals[step][known, j] + plain
            stacked[step][known, k] = normals[step][known, j] + crossed
    return baseline, stacked


def _ridge_forecasts(inputs: np.ndarray, target: np.ndarray, fit: np.ndarray, known: np.ndarray, plain: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Two Ridges (each with an unpenalised intercept) fitted on the ``fit`` rows, and their forecasts of the
    ``known`` rows: one on the first ``plain`` inputs, fitted on every training row; one on all inputs, each
    of ``RIDGE_FOLDS`` consecutive blocks of dates (from the first to the last training row) forecast by the
    fit on the other blocks, and the dates outside them by the fit on all."""
    chosen = inputs[fit]
    mean, scale = chosen.mean(axis=0), chosen.std(axis=0)
    scale[scale == 0] = 1.0
    x = np.column_stack([(inputs - mean) / scale, np.ones(len(inputs))])
    penalty = RIDGE_ALPHA * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    rows = np.flatnonzero(fit)
    block = np.full(len(inputs), -1)
    span = rows[-1] - rows[0] + 1
    block[rows[0]:rows[-1] + 1] = np.arange(span) * RIDGE_FOLDS // span
    # The blocks are consecutive dates, so the training rows of each are one slice of them, in date order.
    fitted, aim = x[rows], target[rows]
    edges = np.searchsorted(block[rows], np.arange(RIDGE_FOLDS + 1))
    sums = [(fitted[a:b].T @ fitted[a:b], fitted[a:b].T @ aim[a:b]) for a, b in itertools.pairwise(edges)]
    gram, moment = sum(g for g, _ in sums), sum(m for _, m in sums)
    own = [*range(plain), x.shape[1] - 1]  # the plain inputs and the intercept
    weights = np.linalg.solve(gram[np.ix_(own, own)] + penalty[np.ix_(own, own)], moment[own])
    forecast_plain = x[known][:, own] @ weights
    crossed = x @ np.linalg.solve(gram + penalty, moment)
    for b, (g, m) in enumerate(sums):
        within = block == b
        if within.any():
            crossed[within] = x[within] @ np.linalg.solve(gram - g + penalty, moment - m)
    return forecast_plain, crossed[known]


def climate_in_gaps(repaired: pd.DataFrame, period: pd.DataFrame, climates: pd.DataFrame, test_start: pd.Timestamp
                    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The repaired readings with each station's climatology (``station_climatology``) in the steps the quality
    control left empty in its test period and in the ``features.HISTORY_STEPS`` steps before ``test_start``
    (which the first test rows' features read), and where it was put (None where none was). A step is empty
    where no neighbour reported and the station read too few of the days before it (a gap of over a week at a
    station alone): without a value there, no forecast could be made until weeks after the gap, and those
    readings went unscored (57 of Nairobi's 309 test readings). The climatology is the best guess of a step
    unread that long, and ``repaired_today`` tells a model the step was not read. The training rows are made
    without it (``block_rows``): filled in the training years too, the gaps of Valdez WSO's century-long record
    cost its model 0.08 °C on the test readings it forecast before."""
    # From test_start on a day of a record is a test day (to_calendar), so the steps the test rows read are a
    # station's training and test days from HISTORY_STEPS before it (HISTORY is a held-out station's past).
    first_read = repaired.index[max(0, repaired.index.searchsorted(test_start) - features.HISTORY_STEPS)]
    empty = repaired.isna() & period.isin([TRAIN, TEST]) & np.asarray(repaired.index >= first_read)[:, None]
    stations = [station for station in empty.columns[empty.to_numpy().any(axis=0)] if station in climates]
    if not stations:
        return repaired, None
    repaired = repaired.copy()
    normal = quality_control.climatology_at(climates[stations], repaired.index, pd.Index(stations))
    repaired[stations] = repaired[stations].mask(empty[stations], normal)
    return repaired, empty & repaired.notna()


def spread_beside_gaps(repaired: pd.DataFrame, in_gaps: pd.DataFrame, period: pd.DataFrame) -> pd.DataFrame:
    """``features.spread`` of the steps read or repaired, leaving out those ``climate_in_gaps`` filled: a
    climatology's smooth changes would shrink the interval just when a forecast knows least. Where too few
    steps are left in the window (weeks after a long gap), the station's median spread over its training
    steps."""
    spread = features.spread(repaired.mask(in_gaps))
    typical = spread.where(period == TRAIN).median()
    return spread.mask(spread.isna() & features.spread(repaired).notna(), typical, axis=1)


def compared_values(repaired: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What each of ``features.NETWORK_FEATURES`` compares, for the whole network, made once."""
    return {name: measure(repaired) for name, measure in features.NETWORK_FEATURES.items()}


def network_features(stations: list[str], compared: dict[str, pd.DataFrame], neighbours: dict[str, list[str]]
                     ) -> dict[str, pd.DataFrame]:
    """Each of ``features.NETWORK_FEATURES`` for ``stations`` (date x station tables) from ``compared_values``:
    the neighbours' mean of what it compares, over those that have it that day, minus the station's own; 0
    without neighbours."""
    tables = {}
    for name, values in compared.items():
        column = {station: i for i, station in enumerate(values.columns)}
        every = values.to_numpy()
        own = every[:, [column[station] for station in stations]]
        near = own.copy()  # a station without neighbours is its own: a difference of 0
        for k, station in enumerate(stations):
            chosen = [column[n] for n in neighbours.get(station, []) if n in column]
            if chosen:
                present = ~np.isnan(every[:, chosen])
                with np.errstate(invalid="ignore"):
                    near[:, k] = np.where(present, every[:, chosen], 0.0).sum(axis=1) / present.sum(axis=1)
        gap = np.where(np.isnan(near) & ~np.isnan(own), 0.0, near - own)
        tables[name] = pd.DataFrame(gap, index=values.index, columns=stations, copy=False)
    return tables


def forecast_neighbours(departure: pd.DataFrame, period: pd.DataFrame, forecast: dict, detector: dict | None = None,
                        positions: np.ndarray | None = None) -> dict[str, list[str]]:
    """Each station's neighbours for the network features and the neighbours ridge
    (``quality_control.forecast_neighbours`` on the training steps' ``departures``, with the ``[forecast]``
    settings), never a station the ``detector`` found to hold the same record. ``positions``:
    ``station_positions`` of ``departure``'s stations."""
    copies = {station: [copy["station"] for copy in found]
              for station, found in quality_control.same_records(detector or {}).items()}
    return quality_control.forecast_neighbours(departure.where(period[departure.columns] == TRAIN),
                                               forecast["neighbours"], forecast["min_correlation"], copies,
                                               positions)


def build_features(observed: pd.DataFrame, period: pd.DataFrame, repaired: pd.DataFrame, accepted: pd.DataFrame,
                   horizon: int = 1, climatology: pd.DataFrame | None = None,
                   ridge: tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None = None,
                   network: dict[str, pd.DataFrame] | None = None, climates: pd.DataFrame | None = None,
                   in_gaps: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows per station, forecast origin t and step h = 1..``horizon``: the features for forecasting t+h.

    Features use steps up to t only, from the ``repaired`` readings; the calendar
    terms describe the target t+h. ``accepted``: the readings the detector did not
    flag (date x station, boolean). ``target`` is the reading of t+h as observed
    (empty where there is none), the value every forecast is scored against;
    ``target_ok`` says it exists and the detector did not flag it (only such
    rows are trained on). ``climatology`` is the station's training-years
    seasonal mean at t+h (from the coefficients ``climatology``, or
    ``baseline_climatology`` without the detector's seasons) and ``drift`` its
    mean change per step over the training years (both empty for stations never
    trained on), and ``neighbours_ridge`` the baseline forecast ``ridge`` made for
    step h (``neighbours_ridge``; empty without it): baselines; the feature
    ``ridge_change`` is made from its stacked forecast. ``network`` holds the
    block's ``network_features`` (all 0 without it: no neighbours). ``climates``: the stations'
    ``station_climatology`` (made here if None), which ``features.CLIMATE_FEATURES`` read at t and t+h.
    ``change_sd60`` is the spread of recent step-to-step changes, which scales
    the prediction interval; ``in_gaps`` (``climate_in_gaps``) marks the steps that hold a climatology, which
    it leaves out. The ``period`` of a row is that of its target; from
    a station's last test steps, the steps beyond its record are test rows with
    no target: the forecast ahead.
    """
    dates, stations = repaired.index, repaired.columns

    def table(values) -> pd.DataFrame:  # a date x station table of these values (broadcast if need be)
        return pd.DataFrame(np.broadcast_to(values, repaired.shape), index=dates, columns=stations)

    repaired_today = (repaired != observed).astype(float).where(period != OUTSIDE)
    coefs = baseline_climatology(observed, period, accepted) if climatology is None else climatology
    climates = station_climatology(observed, period, accepted, coefs) if climates is None else climates
    normal = quality_control.climatology_at(climates, dates, stations)
    wide = {name: feature(repaired, repaired_today) for name, feature in features.STATION_FEATURES.items()}
    wide.update(network or {name: table(0.0) for name in features.NETWORK_FEATURES})
    wide[SPREAD_COLUMN] = features.spread(repaired) if in_gaps is None else spread_beside_gaps(repaired, in_gaps,
                                                                                             period)
    usable = table(np.logical_and.reduce([values.notna().to_numpy() for values in wide.values()]))
    trained = observed.where((period == TRAIN) & accepted)
    drift = features.mean_change(trained)
    last_test = period.eq(TEST) & period.shift(-1, fill_value=OUTSIDE).ne(TEST)
    parts = []
    for step in range(1, horizon + 1):
        target_dates = dates.shift(step)
        # Origins within ``step`` steps of a station's last test step forecast beyond its record.
        ahead = last_test.iloc[::-1].astype(float).rolling(step, min_periods=1).max().iloc[::-1].astype(bool)
        target_period = period.shift(-step, fill_value=OUTSIDE)
        target_normal = table(quality_control.climatology_at(climates, target_dates, stations).to_numpy())
        long = to_long({
            **wide,
            "temp_today": repaired,
            "usable": usable,
            "step": table(step),
            "target_date": table(target_dates.to_numpy()[:, None]),
            "target": observed.shift(-step),
            "target_ok": (observed.shift(-step).notna() & accepted.shift(-step, fill_value=False)).astype(float),
            "period": target_period.mask(ahead & target_period.ne(TEST), TEST),
            "climatology": table(quality_control.climatology_at(coefs, target_dates, stations).to_numpy()),
            **{name: feature(repaired, normal, target_normal) for name, feature in features.CLIMATE_FEATURES.items()},
            "neighbours_ridge": table(np.nan) if ridge is None else table(ridge[0][step]),
            features.RIDGE_FEATURE: table(np.nan) if ridge is None else table(ridge[1][step]) - repaired,
            "drift": table(drift.reindex(stations).to_numpy()),
        })
        parts.append(long[long.pop("usable") & long["period"].isin([TRAIN, TEST])])
    long = pd.concat(parts, ignore_index=True).sort_values(["station", "date", "step"], ignore_index=True) \
        if horizon > 1 else parts[0].reset_index(drop=True)
    long["doy_sin"], long["doy_cos"] = features.day_of_year_terms(pd.DatetimeIndex(long["target_date"]))
    return long[["station", "date", "step", "target_date", "period", "temp_today", "target", "target_ok",
                 *BASELINE_COLUMNS, SPREAD_COLUMN, *FEATURES]]


def training_and_test_rows(observed: pd.DataFrame, period: pd.DataFrame, verdict: dict[str, pd.DataFrame],
                           test_start: pd.Timestamp, spill_folder: Path, horizon: int = 1,
                           pool: compute.Pool | None = None, detector: dict | None = None,
                           forecast: dict | None = None, positions: np.ndarray | None = None
                           ) -> tuple[spill.Blocks, spill.Blocks, set[str]]:
    """The feature rows of the training period and of the test period (each in their blocks, unscaled, kept
    in ``spill_folder`` and ``test_spill(spill_folder)`` when large), built ``STATION_BLOCK // horizon`` stations at a
    time on ``pool``, and the stations with test rows; PipelineError when either is empty or no test station
    was trained on. What every block needs of the whole network is made once: the climatology baseline
    (``baseline_climatology``, with the ``detector``'s seasons) and every station's climate for the features
    (``station_climatology``), each station's neighbours (``forecast_neighbours``, with the ``[forecast]``
    settings ``forecast``; none without them; ``positions``: ``station_positions`` of ``observed``), the
    departures the neighbours ridge reads and the values the network features compare, and which readings the
    detector accepted (the flags' text compared once, not three times in every block: at 1,000 stations that
    took the stage about a second); a block takes its stations' columns and their neighbours' from them."""
    repaired, accepted = verdict["repaired"], verdict["flag"] == Flag.NONE
    coefs = baseline_climatology(observed, period, accepted, detector)
    if coefs.empty:  # then no station has a ridge or a climate either, and no model could learn from any row
        most = int(((period == TRAIN) & accepted & observed.notna()).sum().max())
        raise PipelineError(f"the training period (before {test_start.date()}) is too short to learn a forecast "
                            f"from: no station has the {quality_control.CLIMATOLOGY_LEAST_READINGS} accepted "
                            "training readings its climatology needs "
                            f"(the most: {most}); lower data.test_steps, or add earlier readings")
    climates = station_climatology(observed, period, accepted, coefs, detector)
    departure = departures(repaired, coefs)
    located = None if positions is None else positions[observed.columns.get_indexer(departure.columns)]
    # Neighbours are chosen on the days read (or filled from neighbours), not on a climatology put in gaps.
    near = forecast_neighbours(departure, period, forecast, detector, located) if forecast else {}
    filled, in_gaps = climate_in_gaps(repaired, period, climates, test_start)
    # Where the climatology went into training days (those the first test rows read), the training rows of the
    # stations that read them are made from the tables without it.
    touched = set() if in_gaps is None else set(in_gaps.columns[(in_gaps & (period == TRAIN)).to_numpy().any(axis=0)])
    as_read = (repaired, departure, compared_values(repaired)) if touched else None
    if in_gaps is not None:
        repaired, departure = filled, departures(filled, coefs)
    compared = compared_values(repaired)
    blocks = runtime.chunks(observed.columns, max(1, STATION_BLOCK // horizon))

    def block_input(i: int) -> tuple:  # a block's stations, and the departures and values of them and their neighbours
        stations = list(blocks[i])
        halo = list(dict.fromkeys([*stations, *(n for s in stations for n in near.get(s, []))]))

        def tables(repaired, departure, compared, in_gaps) -> tuple:
            return (observed[stations], period[stations], repaired[stations], accepted[stations],
                    coefs[[s for s in stations if s in coefs]], climates[[s for s in stations if s in climates]],
                    departure[[s for s in halo if s in departure]],
                    {name: values[halo] for name, values in compared.items()},
                    {s: near.get(s, []) for s in stations}, None if in_gaps is None else in_gaps[stations])

        return (tables(repaired, departure, compared, in_gaps),
                tables(*as_read, None) if as_read and touched.intersection(halo) else None)

    # The rows stay in their blocks (on disk past SPILL_BYTES) until they are written.
    train, test = spill.Blocks(spill_folder, SPILL_BYTES), spill.Blocks(test_spill(spill_folder), SPILL_BYTES)
    trained: set[str] = set()
    tested: set[str] = set()
    progress = runtime.Progress("feature blocks", len(blocks))
    try:
        for block in (pool or runtime.Threads()).imap(block_rows, runtime.OnDemand(block_input, len(blocks)),
                                                        horizon=horizon):
            train.add(block["train"])
            test.add(block["test"])
            trained.update(pd.unique(block["train"]["station"]))  # hashed: sorting text cost 1 s
            tested.update(pd.unique(block["test"]["station"]))
            progress.step()
        if not train.rows or not test.rows:
            which = "training" if not train.rows else "test"
            raise PipelineError(f"no {which} rows left after building features; the {which} period (test from "
                                f"{test_start.date()}) has too few readings with the history the features need "
                                "(30 steps)")
        if not tested & trained:
            raise PipelineError(f"no station trained on has readings in the test period (from {test_start.date()}); "
                                "the quality gate would judge the model on held-out stations only: check the "
                                "stations' last dates or lower data.test_steps")
    except BaseException:
        train.close()
        test.close()
        raise
    if train.spilled:
        log.info("training features: %.1f GB kept in %s a block at a time until written", train.bytes / 1e9,
                 spill_folder)
    return train, test, tested


def test_spill(spill_folder: Path) -> Path:
    """Where the test rows' blocks wait, beside the training rows' (its own folder: each is removed whole)."""
    return spill_folder.with_name(spill_folder.name + ".test")


def block_rows(tables: tuple, horizon: int) -> dict[str, dict[str, np.ndarray]]:
    """The feature columns of one block of stations, split into "train" and "test" (``block_features``).
    ``tables``: the block's tables, and None or, where a climatology went into training days its stations read
    (``climate_in_gaps``), the same tables without it: its training rows are made from those, as the readings
    alone make them."""
    with_gaps, as_read = tables
    rows = block_features(with_gaps, horizon)
    if as_read is not None:
        rows["train"] = block_features(as_read, horizon)["train"]
    return rows


def block_features(block: tuple, horizon: int) -> dict[str, dict[str, np.ndarray]]:
    """The feature columns of one block of stations (observed, period, repaired and accepted readings,
    climatology coefficients of the baseline and of the features, the departures, compared values and
    neighbours its ridges and network features read, and ``climate_in_gaps``'s marks), split into "train" and
    "test"."""
    observed, period, repaired, accepted, climatology, climates, departure, compared, near, in_gaps = block
    stations = list(observed.columns)
    ridge = neighbours_ridge(stations, departure, observed, period, accepted, climatology, near, horizon, in_gaps)
    network = network_features(stations, compared, near)
    rows = build_features(observed, period, repaired, accepted, horizon, climatology, ridge, network, climates,
                          in_gaps)
    train = (rows["period"] == TRAIN).to_numpy()  # build_features keeps training and test rows only
    return {name: {column: rows[column].to_numpy()[chosen] for column in rows.columns}
            for name, chosen in (("train", train), ("test", ~train))}


def fit_scaler(one_step_ahead: Callable[[str], np.ndarray], threads: int = 1):
    """StandardScaler on the training features only, of the rows one step ahead (each forecast origin once,
    so forecasting further ahead leaves the next-step forecasts exactly as they were); ``one_step_ahead(name)``
    gives one feature's values on those rows. The features are fitted on ``threads`` threads."""
    from sklearn.preprocessing import StandardScaler

    # A scaler's statistics are per feature: fitted one feature at a time they are the numbers a fit of all
    # of them at once gives (a test holds it), without a copy of every training feature beside the table
    # (0.37 GB at 1,000 stations x 10 years, the stage's peak). Each is handed over as an array: given a
    # table, scikit-learn spent ten times the fit putting its columns together.
    def fitted(name: str) -> StandardScaler:
        # A feature no training row has (one station with weeks of history: its ridge needs 60 rows) fits to
        # NaN; numpy's warnings about it would only bury stage 3's clear line about too little to train on.
        with np.errstate(invalid="ignore", divide="ignore"):
            return StandardScaler().fit(one_step_ahead(name)[:, None])

    fits = runtime.Threads(threads).map(fitted, FEATURES)
    seen = np.concatenate([np.atleast_1d(fit.n_samples_seen_) for fit in fits])
    scaler = StandardScaler()  # its attributes set in the order fit sets them: the same pickled bytes
    scaler.n_features_in_ = len(FEATURES)
    scaler.n_samples_seen_ = seen[0] if np.ptp(seen) == 0 else seen  # one count unless some feature is missing
    for name in ("mean_", "var_", "scale_"):
        setattr(scaler, name, np.concatenate([getattr(fit, name) for fit in fits]))
    scaler.feature_names_in_ = np.asarray(FEATURES, dtype=object)  # what stage 4 checks the features by
    return scaler


def one_step_ahead(train: spill.Blocks) -> Callable[[str], np.ndarray]:
    """``fit_scaler``'s reader of the training blocks: one feature's values on the rows one step ahead."""
    first = [step == 1 for step in train.column("step")]
    return lambda name: np.concatenate([values[chosen] for values, chosen in zip(train.column(name), first,
                                                                                  strict=True)])


def scaled_rows(block: dict[str, np.ndarray], scaler) -> pd.DataFrame:
    """One block of feature rows as written: scaled, without the period column (the block stays as it was)."""
    rows = _frame({name: values for name, values in block.items() if name != "period"})
    scale_features(rows, scaler)
    return rows


def scale_features(rows: pd.DataFrame, scaler) -> None:
    """Standardise the feature columns in place, one column at a time: what ``scaler.transform`` computes
    (minus the mean, over the scale), without a copy of the whole table."""
    for i, name in enumerate(FEATURES):
        rows[name] = (rows[name].to_numpy() - scaler.mean_[i]) / scaler.scale_[i]


FLAG_COLUMNS = ["station", "date", "period", "observed", "expected", "repaired", "flag", "confidence", "score"]


def flags_tables(observed: pd.DataFrame, period: pd.DataFrame, verdict: dict[str, pd.DataFrame]
                 ) -> dict[str, Callable[[], Iterator[pd.DataFrame]]]:
    """The detector's verdict, one row per station and day: each period's rows ("train", "test"), and every
    flagged row ("flagged"); each table as the batches of ``FLAGS_BLOCK`` stations it is written in, in
    station then date order (a table made whole was the stage's peak at 1,000 and 3,000 stations)."""
    blocks = runtime.chunks(list(observed.columns), FLAGS_BLOCK)

    def rows(stations: list[str], code: int | None) -> pd.DataFrame:  # None: the flagged rows of any period
        wide = {"observed": observed[stations], "expected": verdict["expected"][stations].round(2),
                "repaired": verdict["repaired"][stations].round(2), "flag": verdict["flag"][stations],
                "confidence": verdict["confidence"][stations].round(4), "score": verdict["score"][stations].round(3)}
        periods = period[stations].to_numpy().T.ravel()
        if code is not None:
            return to_long(wide, periods == code)
        table = to_long({**wide, "period": period[stations]}, flagged_cells(verdict["flag"][stations], periods))
        table["period"] = np.array(PERIOD_NAMES, dtype=object)[table["period"].to_numpy()]
        return table[FLAG_COLUMNS]

    return {part: lambda code=code: (rows(stations, code) for stations in blocks)
            for part, code in (("train", TRAIN), ("test", TEST), ("flagged", None))}


def flagged_cells(flag: pd.DataFrame, periods: np.ndarray) -> np.ndarray:
    """Which station-days (flattened station by station, as ``to_long`` does) hold a fault's flag inside a
    station's record; ``periods``: the period codes, flattened the same way."""
    return np.isin(flag.to_numpy().T.ravel(), FAULTS) & (periods != OUTSIDE)


def station_positions(path: Path, stations: list[str]) -> np.ndarray | None:
    """Each station's latitude and longitude (degrees; stations x 2, in ``stations`` order) from the station
    list data_creation.py wrote, or None without one or when a station has no position: the neighbours'
    candidates at scale then come from the readings alone (``quality_control.pair_statistics``)."""
    if not path.exists():
        return None
    listed = storage.read_table(path, ["station", "latitude", "longitude"]).set_index("station")
    positions = listed.reindex(stations)[["latitude", "longitude"]].to_numpy(dtype=float)
    return positions if np.isfinite(positions).all() else None


def read_source(path: Path) -> tuple[pd.Timestamp, str, str]:
    """The first step of the test period, the series' frequency and the unit its readings were written in
    ("C", "F" or "none"), as data_creation.py recorded them."""
    record = storage.read_json(path)
    try:
        test_start, frequency, unit = pd.Timestamp(record["test_start"]), record["frequency"], record["unit"]
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}: no valid test_start, frequency and unit; rerun data_creation.py") from None
    if frequency not in FREQUENCIES:
        raise PipelineError(f"{path}: unknown frequency {frequency!r}; rerun data_creation.py")
    return test_start, frequency, unit


def main(args) -> None:
    params: Params = load_params(args.params)
    paths = Paths(args.root)
    with compute.pool(params["compute"]["scheduler"], paths.root) as pool:
        frame = load_stations(paths.train_raw, paths.test_raw, params["preprocessing"], pool)
        raw_files = sorted([*storage.station_files(paths.train_raw), *storage.station_files(paths.test_raw)])
        inputs = [*raw_files, paths.source_record, *([paths.station_list] if paths.station_list.exists() else [])]
        manifest.verify_outputs_of(paths, "data_creation", inputs)
        test_start, frequency, unit = read_source(paths.source_record)
        observed, period = to_calendar(frame, test_start, frequency)
        del frame
        horizon = params["forecast"]["horizon"]
        # Up to STATION_BLOCK steps ahead a block can shrink to hold as many rows as one step ahead; beyond, not.
        network = f"{observed.shape[1]} stations x {observed.shape[0]} steps"
        runtime.check_memory(observed.size, network, horizon, bounded=horizon <= STATION_BLOCK)
        runtime.check_disk(int(np.count_nonzero(period.to_numpy() != OUTSIDE)), network, horizon, paths.data,
                           SPILL_BYTES)
        positions = station_positions(paths.station_list, list(observed.columns))
        threads = runtime.work_threads(-(-observed.shape[1] // quality_control.STATION_BLOCK))
        detector, verdict = quality_control_flags(observed, period, params["quality_control"], pool, threads,
                                                  temperature=unit != "none", positions=positions)
        runtime.release_memory()  # each phase's peak would otherwise add to the last one's
        train, test, tested = training_and_test_rows(observed, period, verdict, test_start, paths.data / SPILL_FOLDER,
                                             params["forecast"]["horizon"],
                                             pool if pool.cluster else runtime.Threads(threads), detector,
                                             params["forecast"], positions)
        runtime.release_memory()
    try:
        scaler = fit_scaler(one_step_ahead(train), threads)
        n_train, n_test = train.rows, test.rows
        # Text kept as objects: made into pandas' strings first, the flags took three times as long to count.
        counts = pd.Series(verdict["flag"].to_numpy()[period.to_numpy() != OUTSIDE], dtype=object).value_counts()
        probable_codes = quality_control.shared_values(observed, verdict["flag"]).head(PROBABLE_CODES)
        unusable = quality_control.mostly_flagged(observed, verdict["flag"])

        features_and_flags = {"features": [train, test], "verdict": [verdict]}
        del verdict  # handed over: each table is let go as soon as it is written
        outputs, repaired = write_tables(paths, features_and_flags, observed, period, scaler, threads)
    finally:
        train.close()
        test.close()
    storage.write_joblib(paths.scaler, scaler)
    storage.write_json(paths.detector, detector)
    manifest.record_stage(paths, STAGE, params, inputs, [*outputs, paths.scaler, paths.detector],
                          folders=[paths.train_raw, paths.test_raw])

    log.info("%d stations; flagged readings: %s (%d repaired); missing steps %d", observed.shape[1],
             ", ".join(f"{k} {counts.get(k, 0)}" for k in FAULTS), repaired, counts.get(Flag.MISSING, 0))
    log_probable_codes(probable_codes, unit)
    log_mostly_flagged(unusable)
    log_station_codes(detector, set(probable_codes.index), unit)
    log_same_records(detector)
    log_without_neighbours(detector, params["quality_control"]["min_correlation"])
    if unit != "none":
        log_other_units(detector, unit)
        log_unit_changes(quality_control.unit_changes(observed), unit)
    untested = sorted(set(observed.columns) - tested)
    if untested:
        log.warning("no test days for station(s) %s: they are not scored", ", ".join(map(str, untested)))
    log.info("features: %d training rows, %d test rows; scaler fitted on the training rows", n_train, n_test)


def write_tables(paths: Paths, handed: dict[str, list], observed: pd.DataFrame, period: pd.DataFrame, scaler,
                 threads: int) -> tuple[list[Path], int]:
    """Write the feature tables (``handed["features"]``: the training and the test blocks, scaled by ``scaler``
    a block at a time as they are written) and the detector's verdict as the flag tables
    (``handed["verdict"]``), each let go as soon as it is written (at scale they are large: the lists are
    emptied, so nothing else holds them). Returns the files written and how many flagged readings were
    repaired."""
    progress = runtime.Progress("tables written", 5)
    train, test = handed["features"]
    handed["features"].clear()
    storage.write_csv_batches(paths.train_features, lambda: (scaled_rows(block, scaler) for block in train),
                              threads=threads)
    train.close()
    progress.step()
    storage.write_csv_batches(paths.test_features, lambda: (scaled_rows(block, scaler) for block in test),
                              threads=threads)
    test.close()
    progress.step()
    verdict = handed["verdict"].pop()
    flag_paths = {"train": paths.train_flags, "test": paths.test_flags, "flagged": paths.flagged}
    tables = flags_tables(observed, period, verdict)
    repaired = 0

    def counted_flagged() -> Iterator[pd.DataFrame]:  # the repairs counted as the flagged rows are written
        nonlocal repaired
        repaired = 0  # a second pass (values that need quotes) counts them again
        for table in tables["flagged"]():
            repaired += int((table["repaired"] != table["observed"]).sum())
            yield table

    for part, batches in {**tables, "flagged": counted_flagged}.items():
        storage.write_csv_batches(flag_paths[part], batches, threads=threads)
        progress.step()
    return [paths.train_features, paths.test_features, *flag_paths.values()], repaired


def log_probable_codes(probable_codes: pd.DataFrame, unit: str) -> None:
    """Warn of each value several stations read on one day that is flagged gross (beyond every climate, or read
    by them all far from their neighbours: ``shared_far_values``), with the advice to declare it (as written in
    the files) a missing-value code."""
    for value, code in probable_codes.iterrows():
        written = units.as_written(value, unit)
        elsewhere = code["readings"] - code["flagged"]
        advice = f"{elsewhere} reading(s) of the same value on other days pass as weather: declaring it in [import] " \
                 "missing_values would drop those too, so check them first" if elsewhere else \
                 "declare it in [import] missing_values"
        log.warning("%g read by up to %d stations on the same day, each far from its neighbours' weather or beyond "
                    "its climate: probably a missing-value code (%s as written in the files); %d reading(s) on %d "
                    "day(s) flagged gross; %s",
                    value, code["most_stations"], written, code["flagged"], code["flagged_days"], advice)


def log_mostly_flagged(unusable: pd.DataFrame) -> None:
    """Warn of each station whose readings are mostly flagged (``quality_control.mostly_flagged``)."""
    for station, found in unusable.iterrows():
        kinds = ", ".join(f"{kind} {found[kind]}" for kind in FAULTS if found[kind])
        log.warning("station %s: %d of its %d readings flagged (%s): not a temperature record as read (a dead "
                    "sensor, a fill value, another column or unit?); its flagged days are not trained on, but its "
                    "readings are scored like every station's: check its file, or leave it out", station,
                    found["flagged"], found["readings"], kinds)


def log_station_codes(detector: dict, logged: set[float], unit: str) -> None:
    """Warn of each missing-value code the detector found written as readings at one station (``logged``: the
    values already named as codes several stations share)."""
    for station, entry in detector.get("stations", {}).items():
        for value in entry.get("codes", []):
            if round(value, 2) not in logged:
                log.warning("station %s: %g on many training days, far outside its other readings: probably a "
                            "missing-value code (%s as written in the files); left out of what the quality "
                            "control learns and flagged gross; declare it in [import] missing_values", station,
                            value, units.as_written(value, unit))


def log_other_units(detector: dict, unit: str) -> None:
    """Warn of each station whose readings look written in another unit than its neighbours' (all read as
    ``unit``)."""
    for found in quality_control.other_units(detector):
        log.warning("station %s: its mean (%.1f °C) lies %.0f °C from its neighbours' and its weather swings %.2f "
                    "times theirs: its file is probably in another unit than import.unit = %r says (°C among °F "
                    "files, or the reverse); convert it, or import it in a run of its own", found["station"],
                    found["mean"], abs(found["mean"] - found["neighbours_mean"]), found["ratio"], unit)


def log_unit_changes(changes: list[dict], unit: str) -> None:
    """Warn of each station whose record changes unit part of the way through (``quality_control.unit_changes``)."""
    for found in changes:
        log.warning("station %s: its readings from %s on lie %.0f °C %s those of the same months before, and swing "
                    "%.2f times as far from day to day: that part of its file is probably in another unit than "
                    "import.unit = %r says (°C after °F, or the reverse); convert it", found["station"],
                    found["from"].strftime("%Y-%m"), abs(found["change"]),
                    "below" if found["change"] < 0 else "above", found["ratio"], unit)


def log_same_records(detector: dict) -> None:
    """Warn of each pair of stations that read the same on most days both read: one record under two names,
    which the quality control cannot check one against the other."""
    for station, copies in quality_control.same_records(detector).items():
        for copy in copies:
            if station < copy["station"]:
                log.warning("stations %s and %s read the same (to within %g °C) on %.0f %% of the %d training days "
                            "both read: probably one station's record under two names (or a gridded product's "
                            "one cell); neither is used as the other's neighbour (its faults would look like shared "
                            "weather); keep one of the two files", station, copy["station"],
                            quality_control.SAME_RECORD_TOLERANCE, 100 * copy["share"], copy["days"])


def log_without_neighbours(detector: dict, min_correlation: float) -> None:
    """Warn of the stations of a network that have no neighbour: only the gross checks judge their readings."""
    lonely = quality_control.without_neighbours(detector)
    if not lonely or len(detector.get("stations", {})) < 2:  # a station alone has none to have
        return
    def best(nearest: dict) -> str:  # rounded down: 0.6996 under min_correlation = 0.7 reads 0.69, not 0.70
        return f"best {np.floor(nearest['correlation'] * 100) / 100:.2f}, {nearest['station']}"

    named = [f"{station}: {best(nearest)}" if nearest else
             f"{station}: none shares {quality_control.MIN_OVERLAP_DAYS} days with it"
             for station, nearest in list(lonely.items())[:3]]
    # Every station alone is the network's nature, not a record to check (an island's stations, each read at
    # its own hour: Oahu's best pair correlates 0.67).
    why = ("no station of the network has one: they share too little day-to-day weather (far apart, or read at "
           "different hours of the day); a lower min_correlation lets them check each other loosely"
           if len(lonely) == len(detector["stations"]) else
           "a record that changed unit, instrument or site partway correlates poorly with its neighbours (check "
           "it); so does a station far from the others or in weather of its own (a mountain top, a coast)")
    log.warning("%d station(s) with no neighbour whose daily anomalies correlate at least "
                "quality_control.min_correlation = %g with theirs on the training days (%s%s): only the gross "
                "checks judge their readings; %s", len(lonely),
                min_correlation, "; ".join(named), "; ..." if len(lonely) > 3 else "", why)


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, cli.stage_parser(__doc__), imports=IMPORTS))
