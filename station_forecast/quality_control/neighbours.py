"""Who a station's neighbours are (the stations whose anomalies best predict its own), and what they say its reading
should be.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from station_forecast import runtime
from station_forecast.quality_control.robust import nanmedian
from station_forecast.runtime import lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")
MIN_OVERLAP_DAYS = 90  # a neighbour must share at least this many learning days
EXPECTED_BLOCK = 64  # stations per block of the neighbours' expected values and of the persistences
# Up to this many stations every pair is compared (six stations x stations matrices, and their products). At 3,000
# stations x 10 years those made stage 2's peak (2,321 MB of its own memory on one thread); from candidates it was
# 1,852 MB, with the same test MAE against the truth (1.744) and each kind's detector F1 within 0.003.
ALL_PAIRS_STATIONS = 2000
CANDIDATES = 256  # above it, the stations each station is compared with: those its anomalies resemble most
CANDIDATES_PER_NEIGHBOUR = 32  # ... or this many per neighbour wanted, if more
PAIR_BLOCK = 256  # stations whose candidates are compared at a time
# Two stations that read the same, to within SAME_RECORD_TOLERANCE, on most days both read are one record under
# two names: archives list some stations twice, one copy perhaps in whole °F and the other in tenths, and a
# gridded product's cities can share a cell. Each would be the other's perfect neighbour, so a fault in the
# record, being in both, would pass as weather: neither is the other's neighbour. No two real stations agree that
# often: the nearest pairs of seven regional networks of the Dayton archive read within 0.3 °C on at most 34 % of
# their days, a simulated network's on 11 %; the two pairs of one gridded product's cities on 97 and 100 %.
SAME_RECORD_SHARE = 0.9
SAME_RECORD_TOLERANCE = 0.3  # °C: half a whole °F (0.28 °C), so a whole-°F copy of a record in tenths agrees
SAME_RECORD_PAIRS = 4096  # pairs compared at a time (pairs x days arrays)


def pair_statistics(anomaly: np.ndarray, lead: int = 0, wanted: int = 1, positions: np.ndarray | None = None,
                    by_position: bool = True) -> tuple[np.ndarray, ...]:
    """For each station, the stations it is compared with (``index``: station x slot, ascending) and, per
    slot, the correlation, slope and intercept of predicting the station, ``lead`` days later, from that one,
    and the days they share.

    Up to ``ALL_PAIRS_STATIONS`` stations every pair is compared (the slots are all stations). Above, the
    stations x stations matrices would not fit in memory, and comparing every pair's readings would take
    most of the stage: each station is compared with ``CANDIDATES`` others (or ``CANDIDATES_PER_NEIGHBOUR``
    times the ``wanted`` neighbours if more), block by block. Where every station's ``positions`` (latitude
    and longitude, degrees) are known, the blocks are stations near each other, so a block's candidates
    have more in common and the pairs compared are fewer; with ``by_position`` the candidates are the
    nearest stations (one call at 10,000 stations x 10 years: 12-13 s against 68-162 s). Otherwise they
    are the stations whose standardised anomalies (missing days as 0) correlate best with its own, a
    sketch of the pairwise-complete correlation. A station's best neighbours are among them (tests check
    the choice is the all-pairs one). Without positions the blocks are stations alike in the network's
    leading weather patterns (``_weather_order``), near each other on the map as a rule: at 10,000 x 10, one
    call 59 -> 35 s for same-day pairs and 68 -> 42 s a day ahead, with the same candidates.
    """
    target, predictor = (anomaly[lead:], anomaly[:len(anomaly) - lead]) if lead else (anomaly, anomaly)
    stations = anomaly.shape[1]
    if stations <= ALL_PAIRS_STATIONS:
        index = np.broadcast_to(np.arange(stations), (stations, stations))
        return index, *_pair_sums(target, predictor, symmetric=not lead)
    width = min(max(CANDIDATES, CANDIDATES_PER_NEIGHBOUR * wanted), stations - 1)
    located = positions is not None and np.isfinite(positions).all()
    if located and by_position:
        units = _unit_vectors(positions)

        def likeness(rows: np.ndarray) -> np.ndarray:  # the cosine of the angle between stations: nearer is larger
            return units[rows] @ units.T
    else:
        sketch_t, sketch_p = _standardised(target), _standardised(predictor)

        def likeness(rows: np.ndarray) -> np.ndarray:
            return sketch_t[:, rows].T @ sketch_p
    order = _spatial_order(positions) if located else _weather_order(sketch_p)
    index = np.empty((stations, width), dtype=int)
    statistics = [np.empty((stations, width)) for _ in range(4)]
    for begin in range(0, stations, PAIR_BLOCK):
        rows = order[begin:begin + PAIR_BLOCK]
        similar = likeness(rows)
        similar[np.arange(len(rows)), rows] = -np.inf  # never itself
        chosen = np.sort(np.argpartition(-similar, width - 1, axis=1)[:, :width], axis=1)
        union = np.unique(chosen)
        position = np.searchsorted(union, chosen)
        index[rows] = chosen
        for whole, block in zip(statistics, _pair_sums(target[:, rows], predictor[:, union]), strict=True):
            whole[rows] = np.take_along_axis(block, position, axis=1)
    return index, *statistics


def _unit_vectors(positions: np.ndarray) -> np.ndarray:
    """Latitude and longitude (degrees; stations x 2) as points on the unit sphere (stations x 3)."""
    latitude, longitude = np.radians(positions[:, 0]), np.radians(positions[:, 1])
    return np.column_stack([np.cos(latitude) * np.cos(longitude), np.cos(latitude) * np.sin(longitude),
                            np.sin(latitude)])


def _spatial_order(positions: np.ndarray) -> np.ndarray:
    """The stations along a Z-order curve over latitude and longitude: consecutive ones are near each other."""
    return _z_order(np.column_stack([(positions[:, 0] + 90.0) / 180.0, (positions[:, 1] + 180.0) / 360.0]), 16)


def _weather_order(sketch: np.ndarray, patterns: int = 3) -> np.ndarray:
    """Stations without positions along a Z-order curve over their loadings on the ``patterns`` leading
    patterns of the network's weather (``sketch``: ``_standardised`` anomalies, days x stations): stations that
    share weather are near each other there, as on the map, so a block of them has more candidates in common.
    The loadings come from a few rounds of subspace iteration from a fixed start (a truncated SVD)."""
    stations = sketch.shape[1]
    if min(sketch.shape) <= patterns:
        return np.arange(stations)
    basis = np.random.default_rng(0).standard_normal((stations, patterns + 8))
    for _ in range(3):
        basis = np.linalg.qr(sketch.T @ (sketch @ basis))[0]
    loadings = basis @ np.linalg.svd(sketch @ basis, full_matrices=False)[2].T[:, :patterns]
    low, high = loadings.min(axis=0), loadings.max(axis=0)
    return _z_order((loadings - low) / np.where(high > low, high - low, 1.0), 64 // patterns)


def _z_order(unit: np.ndarray, bits: int) -> np.ndarray:
    """The order of points in the unit cube (rows of ``unit``, one column per dimension) along a Z-order curve of
    ``bits`` bits per dimension: each coordinate's bits interleaved with the others', the first column's lowest."""
    cells = np.round(np.clip(unit, 0.0, 1.0) * ((1 << bits) - 1)).astype(np.uint64)
    key, dimensions = np.zeros(len(unit), dtype=np.uint64), unit.shape[1]
    for bit in range(bits):
        for dimension in range(dimensions):
            key |= ((cells[:, dimension] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(bit * dimensions + dimension)
    return np.argsort(key, kind="stable")


def _standardised(values: np.ndarray) -> np.ndarray:
    """Each column less its mean, over its standard deviation times the square root of the rows; missing
    values 0: so that one column's products with another sum to about their correlation."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a station with no reading there: its column is 0
        centred = values - np.nanmean(values, axis=0)
        scaled = centred / (np.nanstd(values, axis=0) * np.sqrt(len(values)))
    return np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)


def _pair_sums(target: np.ndarray, predictor: np.ndarray, symmetric: bool = False) -> tuple[np.ndarray, ...]:
    """Correlation, slope and intercept of every target column on every predictor column, and the days they
    share: pairwise-complete sums by matrix products (no loop over pairs). Row i, column j describe
    predicting target i from predictor j on days both have. ``symmetric``: the two are the same table."""
    present_t, present_p = ~np.isnan(target), ~np.isnan(predictor)
    values_t, values_p = np.where(present_t, target, 0.0), np.where(present_p, predictor, 0.0)
    mask_t, mask_p = present_t.astype(float), present_p.astype(float)
    shared = mask_t.T @ mask_p
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(shared > 0, shared, np.nan)
        mean = (values_t.T @ mask_p) / n  # mean of i over days j is present too
        var = (values_t.T**2 @ mask_p) / n - mean**2
        if symmetric:  # the same sums with i and j swapped: the transposes, not two more products
            mean_p, var_p = mean.T, var.T
        else:  # mean and variance of j over days i is present too
            mean_p = (values_p.T @ mask_t).T / n
            var_p = (values_p.T**2 @ mask_t).T / n - mean_p**2
        cov = (values_t.T @ values_p) / n - mean * mean_p
        corr = cov / np.sqrt(var * var_p)
        slope = cov / var_p
        intercept = mean - slope * mean_p
    return corr, slope, intercept, shared


def _ranked(index: np.ndarray, corr: np.ndarray, usable: np.ndarray, n_neighbours: int) -> list[list[int]]:
    """Per station, the slots of its ``n_neighbours`` best usable stations by correlation (ties: the station
    first in order), never itself."""
    usable = usable & (index != np.arange(len(index))[:, None])
    ranked = np.argsort(-np.where(usable, corr, -np.inf), axis=1, kind="stable")[:, :n_neighbours]
    return [[k for k in ranked[i] if usable[i, k]] for i in range(len(index))]


def forecast_neighbours(anomaly: pd.DataFrame, n_neighbours: int, min_correlation: float,
                        same_record: dict[str, list[str]] | None = None, positions: np.ndarray | None = None
                        ) -> dict[str, list[str]]:
    """For each station, the stations whose anomaly on a day best predicts its anomaly the next day (at least
    ``min_correlation``, on the learning days): upwind stations, where today's weather is the station's
    tomorrow, rank above same-day look-alikes. Their candidates at scale come from the readings, never from
    positions: the best upwind stations can be further away than many others (on a simulated network of 120,
    some stations' were not among their 64 nearest); ``positions``, where known, only make the blocks of
    stations compared at a time (``pair_statistics``) stations near each other: at 10,000 stations x 10 years
    the pairs a block compares went from 5,505 to 2,954 stations' worth, the call from 53 to 30 s.
    ``same_record``: the stations that hold each station's own record under another name
    (``learn_neighbours``), never its neighbours."""
    index, corr, _, _, shared = pair_statistics(anomaly.to_numpy(), lead=1, wanted=n_neighbours, positions=positions,
                                                by_position=False)
    stations = list(anomaly.columns)
    usable = (shared >= MIN_OVERLAP_DAYS) & (corr >= min_correlation)
    position = {station: i for i, station in enumerate(stations)}
    for station, others in (same_record or {}).items():
        if station in position:
            i = position[station]
            usable[i] &= ~np.isin(index[i], [position[other] for other in others if other in position])
    slots = _ranked(index, corr, usable, n_neighbours)
    return {station: [stations[index[i, k]] for k in slots[i]] for i, station in enumerate(stations)}


def learn_neighbours(anomaly: pd.DataFrame, n_neighbours: int, min_correlation: float,
                     positions: np.ndarray | None = None, readings: pd.DataFrame | None = None, threads: int = 1
                     ) -> dict[str, dict]:
    """For each station, its best-correlated stations on the learning days and how they predict it.

    Each neighbour gets a straight line predicting the station from it alone; the
    chosen neighbours together get a multiple regression, used on days all of
    them report (more precise than any one line), with the median of the single
    lines as the fallback on other days. ``positions``: see ``pair_statistics``.
    ``readings``: the readings the anomalies come from; a station that reads the
    same as this one on ``SAME_RECORD_SHARE`` of the days both read is listed
    under "same_record" (with that share and those days), not as a neighbour. The regressions run in
    blocks of ``EXPECTED_BLOCK`` stations on ``threads`` threads.
    """
    values = anomaly.to_numpy()
    index, corr, slope, intercept, shared = pair_statistics(values, wanted=n_neighbours, positions=positions)
    stations = list(anomaly.columns)
    usable = (shared >= MIN_OVERLAP_DAYS) & (corr >= min_correlation) & np.isfinite(slope)
    copies = {} if readings is None else _same_records(readings.to_numpy(), index, corr, usable, n_neighbours)
    for (i, k) in copies:
        usable[i, k] = False
    ranked = _ranked(index, corr, usable, n_neighbours)
    chosen = [[index[i, k] for k in slots] for i, slots in enumerate(ranked)]
    by_station = np.ascontiguousarray(values.T)  # a station's days in one row: its neighbours are whole rows
    blocks = runtime.chunks(range(len(stations)), EXPECTED_BLOCK)
    regressions = [fit for block in runtime.Threads(threads).map(_joint_regressions, blocks, by_station=by_station,
                                                                 chosen=chosen) for fit in block]
    neighbours = {}
    for i, (station, slots, (weights, constant)) in enumerate(zip(stations, ranked, regressions, strict=True)):
        neighbours[station] = {
            "constant": constant,
            "buddies": [{"station": stations[index[i, k]], "correlation": round(float(corr[i, k]), 4),
                         "slope": round(float(slope[i, k]), 6), "intercept": round(float(intercept[i, k]), 6),
                         "weight": weight} for k, weight in zip(slots, weights, strict=True)],
        }
        same = sorted((stations[index[i, k]], share, days) for (j, k), (share, days) in copies.items() if j == i)
        if same:
            neighbours[station]["same_record"] = [{"station": other, "share": share, "days": days}
                                                  for other, share, days in same]
        if not slots:  # how near the best candidate came, for the stage to say (``without_neighbours``)
            near = np.where((index[i] != i) & (shared[i] >= MIN_OVERLAP_DAYS) & np.isfinite(corr[i]), corr[i], -np.inf)
            near[[k for (j, k) in copies if j == i]] = -np.inf
            if np.isfinite(near.max(initial=-np.inf)):
                k = int(np.argmax(near))
                neighbours[station]["nearest"] = {"station": stations[index[i, k]],
                                                  "correlation": round(float(corr[i, k]), 4)}
    return neighbours


def _same_records(readings: np.ndarray, index: np.ndarray, corr: np.ndarray, usable: np.ndarray,
                  n_neighbours: int) -> dict[tuple[int, int], tuple[float, int]]:
    """The (station, slot) pairs whose readings are the same (within ``SAME_RECORD_TOLERANCE``) on at least
    ``SAME_RECORD_SHARE`` of the days both read (at least ``MIN_OVERLAP_DAYS``), with that share and those
    days. A copy correlates best of all, so only the slots that would be chosen are compared, again after each
    copy is set aside."""
    usable, checked, copies = usable.copy(), np.zeros(index.shape, dtype=bool), {}
    by_station = np.ascontiguousarray(readings.T)  # a station's days in one row: pairs are gathered by rows
    while True:
        pairs = np.array([(i, k) for i, slots in enumerate(_ranked(index, corr, usable, n_neighbours))
                          for k in slots if not checked[i, k]], dtype=int).reshape(-1, 2)
        if not len(pairs):
            return copies
        checked[pairs[:, 0], pairs[:, 1]] = True
        for begin in range(0, len(pairs), SAME_RECORD_PAIRS):
            rows, slots = pairs[begin:begin + SAME_RECORD_PAIRS].T
            own, other = by_station[rows], by_station[index[rows, slots]]
            days = (~np.isnan(own) & ~np.isnan(other)).sum(axis=1)
            same = np.round(np.abs(own - other), 6) <= SAME_RECORD_TOLERANCE  # False where either is missing
            share = same.sum(axis=1) / np.maximum(days, 1)
            for n in np.nonzero((share >= SAME_RECORD_SHARE) & (days >= MIN_OVERLAP_DAYS))[0]:
                copies[rows[n], slots[n]] = (round(float(share[n]), 4), int(days[n]))
                usable[rows[n], slots[n]] = False


def same_records(detector: dict) -> dict[str, list[dict]]:
    """Per station of the ``detector``, the stations found to hold its record under another name, each with
    the share of days they read the same and the days both read (``learn_neighbours``); only stations with
    any."""
    return {station: entry["neighbours"]["same_record"] for station, entry in detector.get("stations", {}).items()
            if "same_record" in entry.get("neighbours", {})}


def without_neighbours(detector: dict) -> dict[str, dict]:
    """Per station of the ``detector`` with no neighbour, its best-correlated other station and that
    correlation ({} where no other shares enough learning days with it)."""
    return {station: entry["neighbours"].get("nearest", {}) for station, entry in detector.get("stations", {}).items()
            if "neighbours" in entry and not entry["neighbours"].get("buddies")}


def _joint_regressions(stations: range, by_station: np.ndarray, chosen: list[list[int]]
                       ) -> list[tuple[list[float | None], float | None]]:
    """``_joint_regression`` of each of ``stations`` on its ``chosen`` neighbours (station x day readings)."""
    return [_joint_regression(by_station[i], by_station[chosen[i]].T) for i in stations]


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
    runtime.Threads(threads).map(_expected_rows, _station_rows(anomaly.shape[1]), padded=padded, lines=lines,
                                 out=joint)
    return pd.DataFrame(joint.T, index=anomaly.index, columns=anomaly.columns, copy=False)


def nearest_line_distance(anomaly: pd.DataFrame, neighbours: dict[str, dict], threads: int = 1) -> pd.DataFrame:
    """How far each station's anomaly is from the nearest of its neighbours' single lines that day (NaN
    where none of them reports): small for a reading that agrees with any one neighbour, large only for
    one at odds with them all, which one faulty neighbour cannot make it."""
    return _by_lines(_nearest_line_rows, anomaly, neighbours, threads)


def outside_the_lines(anomaly: pd.DataFrame, neighbours: dict[str, dict], threads: int = 1) -> pd.DataFrame:
    """How far each station's anomaly lies beyond the range its neighbours' single lines span that day: 0
    for a reading between them (a front that split the neighbours, the station on one side of it or in
    the middle), the distance to the nearest line for one beyond them all; NaN where none reports."""
    return _by_lines(_outside_rows, anomaly, neighbours, threads)


def _by_lines(rows_of: Callable[..., None], anomaly: pd.DataFrame, neighbours: dict[str, dict], threads: int
              ) -> pd.DataFrame:
    """A date x station table of what ``rows_of`` makes of the neighbours' single lines, in blocks of
    ``EXPECTED_BLOCK`` stations on ``threads`` threads (each value the same wherever it was computed); NaN
    everywhere if no station has a neighbour."""
    lines = neighbour_lines(list(anomaly.columns), neighbours)
    if lines is None:
        return pd.DataFrame(np.nan, index=anomaly.index, columns=anomaly.columns)
    # Station by day, as in expected_anomaly: a neighbour's readings are one whole row; the last row is an
    # empty slot's.
    padded = np.vstack([anomaly.to_numpy().T, np.full((1, len(anomaly)), np.nan)])
    out = np.empty((anomaly.shape[1], len(anomaly)))
    runtime.Threads(threads).map(rows_of, _station_rows(anomaly.shape[1]), padded=padded, lines=lines, out=out)
    return pd.DataFrame(out.T, index=anomaly.index, columns=anomaly.columns, copy=False)


def _station_rows(stations: int) -> list[slice]:
    """The blocks of ``EXPECTED_BLOCK`` stations (rows of a station x day array) the neighbours' work runs in."""
    return [slice(begin, min(begin + EXPECTED_BLOCK, stations)) for begin in range(0, stations, EXPECTED_BLOCK)]


def _nearest_line_rows(rows: slice, padded: np.ndarray, lines: dict[str, np.ndarray], out: np.ndarray) -> None:
    own = padded[rows]
    nearest = np.full(own.shape, np.nan)
    for m in range(lines["index"].shape[1]):
        predicted = padded[lines["index"][rows, m]]
        predicted *= lines["slope"][rows, m, None]
        predicted += lines["intercept"][rows, m, None]
        np.fmin(nearest, np.abs(np.subtract(own, predicted, out=predicted), out=predicted), out=nearest)
    out[rows] = nearest


def _outside_rows(rows: slice, padded: np.ndarray, lines: dict[str, np.ndarray], out: np.ndarray) -> None:
    own = padded[rows]
    lowest, highest = (np.full(own.shape, np.nan) for _ in range(2))
    for m in range(lines["index"].shape[1]):
        predicted = padded[lines["index"][rows, m]] * lines["slope"][rows, m, None] + lines["intercept"][rows, m, None]
        np.fmin(lowest, predicted, out=lowest)
        np.fmax(highest, predicted, out=highest)
    beyond = np.fmax(np.fmax(own - highest, lowest - own), 0.0)
    beyond[np.isnan(lowest) | np.isnan(own)] = np.nan
    out[rows] = beyond


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


def reporting_neighbours(observed: pd.DataFrame, neighbours: dict[str, dict]) -> pd.DataFrame:
    """How many of each station's neighbours have a reading each day (date x station, small integers)."""
    lines = neighbour_lines(list(observed.columns), neighbours)
    count = np.zeros((observed.shape[1], len(observed)), dtype=np.int8)
    if lines is not None:
        present = np.vstack([observed.notna().to_numpy().T, np.zeros((1, len(observed)), dtype=bool)])
        for m in range(lines["index"].shape[1]):
            count += present[lines["index"][:, m]]
    return pd.DataFrame(count.T, index=observed.index, columns=observed.columns, copy=False)


def network_departures(observed: pd.DataFrame, climatology: pd.DataFrame, neighbours: dict[str, dict],
                        leave_out: pd.DataFrame | None, threads: int = 1) -> dict:
    """Expected value and departure of every reading (its ``climatology`` plus the anomaly its
    ``neighbours`` predict), from the neighbours' readings (less ``leave_out``)."""
    anomaly = observed - climatology
    buddies = anomaly if leave_out is None else anomaly.mask(leave_out)
    expected = climatology + expected_anomaly(buddies, neighbours, threads)
    return {"expected": expected, "departure": observed - expected}
