"""The verdict on every reading (a kind of fault or none, with a confidence) and the repair of confident faults, from
what learning found.
"""

from __future__ import annotations

from typing import NamedTuple

from station_forecast import runtime
from station_forecast.compute import Pool
from station_forecast.flags import CODE, FAULT_CODES, FAULTS, VERDICT_CODES, Flag
from station_forecast.quality_control.checks import (
    LEAST_NEIGHBOURS,
    OFFSET_DAY_CAP,
    OFFSET_LEAST_ALIGNMENT,
    OFFSET_MEMORY,
    OFFSET_ORDINARY_REPEAT,
    RAMP_LAGS,
    STEP_LAGS,
    change_evidence,
    day_before,
    departure_innovation,
    explained_innovations,
    explained_readings,
    held,
    mean_since,
    offset_day_evidence,
    offset_evidence,
    reading_facts,
    recent_evidence,
    shared_far_values,
    storminess,
    stuck_test,
    trailing_median,
)
from station_forecast.quality_control.climatology import ALL_MONTHS, climatology_at
from station_forecast.quality_control.neighbours import (
    nearest_line_distance,
    network_departures,
    outside_the_lines,
    reporting_neighbours,
)
from station_forecast.runtime import lazy_import

np = lazy_import("numpy")
pd = lazy_import("pandas")
CONFIDENCE_SLOPE = 2.0
SPLIT_SHARE = 0.5  # a spike lies beyond all its neighbours' lines by at least this share of spike_threshold
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
# a step or ramp cannot tell from a fault; a fault that small costs a forecast little. 2, 2.1, 2.25 and 2.5 flagged
# 0.27, 0.25, 0.21 and 0.16 % of the readings of eight real networks (most of the change drift flags) against
# level-shift F1 0.871, 0.869, 0.860 and 0.841 and drift F1 0.618, 0.617, 0.612 and 0.591 on eight simulated
# ones; the forecasts on the real networks moved by at most 0.003 °C.
LEAST_SHIFT = 2.25
VERDICT_BLOCK = 256  # stations per task of the verdict on a cluster or one thread
# A station with at least this share of its readings flagged is not a temperature record as read (a dead
# sensor, a fill value, another column): the most of any station is 16 % on the simulation's default run
# (its heavily faulty station), 22 % at 1,000 stations, 0.5 % on the real Ohio valley network.
MOSTLY_FLAGGED = 0.5


class StationValues(NamedTuple):
    """What the verdict reads of each station, as learned: one value per station in each field."""

    departure_scale: pd.Series
    persistence: pd.Series
    innovation_scale: pd.Series
    jump_scale: pd.Series
    gross_threshold: pd.Series
    repeat_share: pd.Series
    repeat_share_by_month: pd.DataFrame  # month x station: the only field with more than one value per station
    resolution: pd.Series
    seen_months: pd.Series
    change_scale: pd.Series


VERDICT_SETTINGS = ["window", "shift_threshold", "spike_threshold", "stuck_threshold", "offset_threshold",
                    "repair_confidence", "climate_margin", "onsets"]


def confidence(excess: pd.DataFrame | np.ndarray) -> np.ndarray:
    """0.5 at a flag's threshold (``excess`` 0), towards 1 beyond it: odds times e^CONFIDENCE_SLOPE per unit."""
    return 1.0 / (1.0 + np.exp(-CONFIDENCE_SLOPE * np.clip(np.asarray(excess, dtype=float), -30, 30)))


def local_threads(pool: Pool | None) -> int:
    """Threads of this process for the work that stays here (all of it when ``pool`` is a cluster's, whose
    workers get only the verdict's blocks and wait meanwhile): the pool's threads, or a cluster's own
    ``threads``; one without a pool."""
    return pool.threads if pool is not None else 1


def record_numbers(detector: dict, stations: pd.Index) -> np.ndarray:
    """Per station, the position of the first of ``stations`` that holds its record (itself, or a station
    listed among its ``same_record``, or theirs): one number for one record under several names."""
    position = {station: i for i, station in enumerate(stations)}
    number = np.arange(len(stations))

    def root(i: int) -> int:  # the record's first station
        while number[i] != i:
            i = number[i]
        return i

    for station, entry in detector["stations"].items():
        for copy in entry.get("neighbours", {}).get("same_record", []):
            if station in position and copy["station"] in position:
                low, high = sorted((root(position[station]), root(position[copy["station"]])))
                number[high] = low
    return np.array([root(i) for i in range(len(stations))])


def _station_table(detector: dict, stations: pd.Index, key: str) -> pd.Series:
    return pd.Series({s: detector["stations"].get(s, {}).get(key, np.nan) for s in stations}, dtype=float)


def detect(observed: pd.DataFrame, detector: dict, pool: Pool | None = None, second_pass: bool = True,
           onsets: bool = False, facts: dict[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """Flag every reading and repair the confident faults (date x station tables).

    Returns ``flag`` (none, missing, or a kind of fault), ``confidence`` (of
    flags only), ``score`` (the robust z-score of the departure from the
    expected value; of the jump from the days before where a station has no
    neighbours), ``expected`` and ``repaired``. With ``onsets`` (what learning
    needs), only ``fault`` (a fault flagged: boolean) and ``onset``: for a level
    shift or drift, the row where the test estimates it began; -1 elsewhere.
    ``facts``: ``reading_facts`` of ``observed``, if already known.
    """
    stations = observed.columns
    coefs = pd.DataFrame({s: e["climatology"] for s, e in detector["stations"].items()
                          if "climatology" in e and s in stations})
    climatology = climatology_at(coefs.reindex(columns=[s for s in stations if s in coefs]), observed.index,
                                 stations)
    neighbours = {s: e["neighbours"] for s, e in detector["stations"].items()}
    detector = {**detector, "onsets": onsets}
    threads = local_threads(pool)
    facts = facts if facts is not None else reading_facts(observed, detector["window"], threads)
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
        reference[affected] = trailing_median(observed[affected].mask(left_out[affected]), detector["window"],
                                             threads)
        facts["reference"] = reference
    # In departure scales, how far each reading lies beyond all its neighbours' lines (0 between them).
    facts["outside_z"] = outside_the_lines(anomaly.mask(left_out), neighbours, threads) \
        / _station_table(detector, stations, "departure_scale")
    facts["reporting"] = reporting_neighbours(observed, neighbours)
    facts["offset_tested"] = offset_tested(detector, observed)
    facts["season_scale"] = season_departure_scale(detector, observed)
    if second_pass:  # a reading beyond any weather does not speak for its neighbours even in the first pass
        left_out = left_out | (nearest_line_distance(anomaly, neighbours, threads)
                               > BEYOND_WEATHER * _station_table(detector, stations, "departure_scale"))
    del anomaly  # each days x stations table let go once used: at scale they are the stage's peak
    result = _classify(observed, facts, detector,
                       network_departures(observed, climatology, neighbours, left_out, threads), pool)
    if second_pass:  # readings the first pass flagged do not speak for their neighbours
        first_code = result["code"]
        del result, left_out
        faulty = pd.DataFrame(np.isin(first_code.to_numpy(), FAULT_CODES), index=observed.index, columns=stations)
        network = network_departures(observed, climatology, neighbours, faulty, threads)
        explained = explained_readings(first_code, network["departure"])
        del first_code, faulty
        result = _classify(observed, {**facts, "explained": explained}, detector, network, pool)
    result.pop("code", None)  # the verdict's integer codes served the second pass; the flags say it in words
    return result


def _classify(observed: pd.DataFrame, facts: dict[str, pd.DataFrame], detector: dict, network: dict,
              pool: Pool | None) -> dict[str, pd.DataFrame]:
    """The verdict on every reading, given the departures from the neighbours. Only the day's storminess
    needs the whole network; the rest is station by station, so above ``VERDICT_BLOCK`` stations it runs
    in blocks on the pool's threads or workers, or one after the other on one thread (the same values as in
    one piece)."""
    stations = observed.columns
    learned = {key: _station_table(detector, stations, key) for key in StationValues._fields
               if key != "repeat_share_by_month"}
    # A station with no learning days at all gets the checks of the typical station.
    for key in ("jump_scale", "gross_threshold", "repeat_share"):
        learned[key] = learned[key].fillna(learned[key].median())
    learned["repeat_share_by_month"] = season_repeat_share(detector, stations, learned["repeat_share"])
    learned["seen_months"] = learned["seen_months"].fillna(ALL_MONTHS)
    per_station = StationValues(**learned)
    innovation = departure_innovation(network["departure"], per_station.persistence, per_station.departure_scale)
    tables = {"observed": observed, "departure": network["departure"], "expected": network["expected"],
              "innovation": innovation, **facts}
    # A code needs the whole network, as the day's storminess does: the stations reading it may be in two blocks.
    tables["shared_code"] = shared_far_values(observed, network["departure"], per_station.departure_scale,
                                              per_station.resolution, record_numbers(detector, stations),
                                              detector["spike_threshold"])
    beyond_climate = facts["climate_z"] > detector["climate_margin"]  # no weather: not the day's storminess
    day = storminess((innovation / per_station.innovation_scale).mask(beyond_climate))
    settings = {key: detector[key] for key in VERDICT_SETTINGS}
    if pool is None or len(stations) <= VERDICT_BLOCK:
        return verdict((tables, per_station), day, settings, pool)
    # Every step of the verdict runs block by block, not only the change tests: in parallel on threads or
    # workers, one block after the other on one thread (a busy machine). Blocks of VERDICT_BLOCK bound its
    # tables: at 3,000 stations x 10 years the stage's peak was 3.9 GB with the verdict whole on one thread,
    # 2.8 GB in two blocks per thread (an earlier rule) on two, 2.4 GB in blocks of 256 on two, 2.1 GB on one.
    blocks = runtime.chunks(stations, VERDICT_BLOCK)
    parts = pool.map(verdict, runtime.OnDemand(
        lambda i: ({key: table[blocks[i]] for key, table in tables.items()},
                   StationValues(*(values[blocks[i]] for values in per_station))), len(blocks)),
        day=pool.share(day), settings=settings)
    return {key: pd.concat([part[key] for part in parts], axis=1) for key in parts[0]}


def verdict(block: tuple[dict[str, pd.DataFrame], StationValues], day: pd.Series, settings: dict,
            pool: Pool | None = None) -> dict[str, pd.DataFrame]:
    """``_classify`` for some stations: (their date x station tables, their learned values), the day's
    storminess over the whole network, and the detector's thresholds; ``pool`` runs the change tests."""
    tables, per_station = block
    observed, departure, expected, innovation = (tables[key] for key in ("observed", "departure", "expected",
                                                                         "innovation"))
    stations = observed.columns
    scale, persistence, innovation_scale = (per_station.departure_scale, per_station.persistence,
                                            per_station.innovation_scale)
    jump_scale, gross_threshold = per_station.jump_scale, per_station.gross_threshold
    share, seen_months = per_station.repeat_share, per_station.seen_months
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
        & ((departure / tables["season_scale"]).rolling(RECENT_DAYS, min_periods=(RECENT_DAYS + 1) // 2)
           .mean().abs() > LEAST_SHIFT)
    # In a month a station never saw while learning, its climatology is taken from its neighbours and
    # may be off by a degree or two for weeks: a slow departure there is no evidence of a fault.
    month_bit = 1 << (observed.index.month.to_numpy() - 1)
    unseen = (seen_months.to_numpy().astype(int)[None, :] & month_bit[:, None]) == 0
    carries &= ~unseen
    # With one neighbour reading, a departure that lasts is either station's: Valdez's archive as shipped, most of
    # whose century has one or two stations, had 164 shift and drift flags, all on such days.
    carries &= tables["reporting"] >= LEAST_NEIGHBOURS
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
    gross = (jump_z.abs() > gross_threshold) | (climate_excess > 0) | tables["shared_code"]

    share_by_day = pd.DataFrame(per_station.repeat_share_by_month.to_numpy()[observed.index.month.to_numpy() - 1],
                                index=observed.index, columns=stations, copy=False)
    stuck, stuck_score = stuck_test(tables["run"], tables["start"], z, share_by_day, settings["stuck_threshold"],
                                    per_station.resolution / scale)
    # A stuck or gross reading's change says nothing of its date; a spike's may (on a stormy day a reading
    # keyed a day apart is one), so it stays: leaving spikes out too cost date-offset F1 0.02-0.08 on four
    # simulated networks.
    apart = date_offsets(observed.mask(gross | stuck), expected, tables["reporting"], tables["offset_tested"],
                         tables["run"].to_numpy() >= 2, per_station, settings["offset_threshold"])
    # A stretch keyed a day early ends with the right day's temperature read twice (the stretch's last reading
    # held it already): where repeats are rare that repeat ends the stretch, and it is no stuck sensor either.
    closing = (tables["run"].to_numpy() == 2) & day_before(apart.found & apart.early, fill=False) \
        & (share < OFFSET_ORDINARY_REPEAT).to_numpy()[None, :]
    stuck = stuck & ~closing

    # The verdict as a code per reading (integer comparisons, not text, from here on): VERDICT_CODES[code].
    missing = observed.isna().to_numpy()
    persistent = persistent.to_numpy()
    # Gross before stuck: a missing-value code written on several days in a row is a code, not a sensor.
    # A date offset before a spike: on a stormy day a reading keyed a day apart looks like one.
    code = np.select([missing, gross.to_numpy(), stuck.to_numpy(), apart.found, spike.to_numpy(),
                      persistent & drifting.to_numpy(), persistent],
                     [CODE[Flag.MISSING], CODE[Flag.GROSS], CODE[Flag.STUCK], CODE[Flag.DATE_OFFSET], CODE[Flag.SPIKE],
                      CODE[Flag.DRIFT], CODE[Flag.LEVEL_SHIFT]], CODE[Flag.NONE])

    def frame(values: np.ndarray) -> pd.DataFrame:  # text stays object: a string column costs 5x to make
        return pd.DataFrame(values, index=observed.index, columns=stations, dtype=values.dtype, copy=False)

    fault = np.isin(code, FAULT_CODES)
    if settings["onsets"]:  # learning needs only which readings to trust, and since when
        began = np.arange(len(observed))[:, None] - np.where(drifting, ramp_lag, step_lag)
        began = np.where(code == CODE[Flag.DATE_OFFSET], apart.onset, np.where(persistent, began, -1))
        return {"fault": frame(fault), "onset": frame(began)}

    flag = frame(np.array([kind.value for kind in VERDICT_CODES], dtype=object)[code])
    shifted = np.isin(code, [CODE[Flag.LEVEL_SHIFT], CODE[Flag.DRIFT]])
    excess = np.select(
        [code == CODE[Flag.SPIKE], shifted, code == CODE[Flag.GROSS], code == CODE[Flag.STUCK],
         code == CODE[Flag.DATE_OFFSET]],
        [innovation_z.abs().to_numpy() - settings["spike_threshold"],
         shift_z.to_numpy() - settings["shift_threshold"],
         np.fmax(jump_z.abs().to_numpy() - gross_threshold.to_numpy(), climate_excess.to_numpy()),
         stuck_score.to_numpy(), (apart.evidence - settings["offset_threshold"]) / OFFSET_DAY_CAP], np.nan)
    # A reading that far from what its neighbours say is a confident fault, whatever its kind.
    excess = np.fmax(excess, np.where(fault, z.abs().to_numpy() - settings["spike_threshold"], np.nan))
    sure = np.where(fault, confidence(excess), np.nan)

    fallback = expected.fillna(reference).to_numpy()
    confident = sure >= settings["repair_confidence"]
    values = observed.to_numpy()
    # A stuck reading between its neighbours' lines is as close to them as a repair could put it: repairing it
    # could only move it away from them (its flag stands; a repeat is not a wrong value by itself).
    between = (code == CODE[Flag.STUCK]) & (tables["outside_z"].to_numpy() == 0)
    keyed = code == CODE[Flag.DATE_OFFSET]  # the right reading is another day's, not what the neighbours say
    repaired = np.where(confident & fault & ~shifted & ~between & ~keyed, fallback, values)
    repaired = np.where(confident & shifted, values - offset.to_numpy(), repaired)
    # A reading keyed a day early is yesterday's reading's day: yesterday's, from within the stretch, is
    # today's temperature. One keyed a day late is tomorrow's, not known yet: it stays as read.
    rows = np.arange(len(observed))[:, None]
    yesterday = day_before(values)
    known = confident & keyed & apart.early & (rows > apart.onset) & ~np.isnan(yesterday)
    repaired = np.where(known, yesterday, repaired)
    repaired = np.where(missing, fallback, repaired)
    score = z.abs().fillna(jump_z.abs())
    return {"flag": flag, "code": frame(code.astype(np.int8)), "confidence": frame(sure), "score": score,
            "expected": frame(fallback), "repaired": frame(repaired)}


class DateOffsets(NamedTuple):
    """Where the date-offset test finds a station keyed a day apart from its neighbours (days x stations)."""

    found: np.ndarray  # a stretch flagged
    early: np.ndarray  # ... keyed a day early (else late)
    evidence: np.ndarray  # the evidence summed since the stretch began
    onset: np.ndarray  # the row where it began


def offset_tested(detector: dict, observed: pd.DataFrame) -> pd.DataFrame:
    """Where the date-offset test runs (date x station): at stations whose learning days are clearly on their
    neighbours' dates (``offset_alignment`` at least ``OFFSET_LEAST_ALIGNMENT``), in the months where they are
    too (its value by month; the station's own where a detector learned none by month)."""
    overall, by_day = _by_month(detector, observed, "offset_alignment")
    return pd.DataFrame((by_day >= OFFSET_LEAST_ALIGNMENT) & (overall >= OFFSET_LEAST_ALIGNMENT),
                        index=observed.index, columns=observed.columns, copy=False)


def season_departure_scale(detector: dict, observed: pd.DataFrame) -> pd.DataFrame:
    """The spread of each station's departure in each day's season, never less than the year's (date x station;
    the year's where a detector learned none by month, NaN where it learned none at all)."""
    overall, by_day = _by_month(detector, observed, "departure_scale")
    return pd.DataFrame(np.maximum(by_day, overall), index=observed.index, columns=observed.columns, copy=False)


def season_repeat_share(detector: dict, stations: pd.Index, share: pd.Series) -> pd.DataFrame:
    """Each station's share of readings repeating the day before in each calendar month (month x station),
    never less than its ``share`` for the year (the one to use where it learned none by month)."""
    _, months = _month_table(detector, stations, "repeat_share")
    return pd.DataFrame(np.fmax(months, share.to_numpy()[None, :]), index=pd.RangeIndex(1, 13, name="month"),
                        columns=stations, copy=False)


def _by_month(detector: dict, observed: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A learned value of each station (``key``; NaN where not learned) and, at each day of ``observed``, its
    value for the day's calendar month (``key``_by_month; the station's own where none was learned by month)."""
    overall, months = _month_table(detector, observed.columns, key)
    return overall[None, :], months[observed.index.month.to_numpy() - 1]


def _month_table(detector: dict, stations: pd.Index, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A learned value of each station (``key``; NaN where not learned) and its value in each calendar month,
    month x station (``key``_by_month; the station's own where none was learned by month)."""
    entries = [detector["stations"].get(station, {}) for station in stations]
    overall = np.array([entry.get(key, np.nan) for entry in entries], dtype=float)
    by_month = [entry.get(f"{key}_by_month", [value] * 12) for entry, value in zip(entries, overall, strict=True)]
    return overall, np.array(by_month, dtype=float).reshape(len(entries), 12).T


def date_offsets(observed: pd.DataFrame, expected: pd.DataFrame, reporting: pd.DataFrame, tested: pd.DataFrame,
                 repeated: np.ndarray, per_station: StationValues, threshold: float) -> DateOffsets:
    """Stretches a station's readings are keyed a day late or early against its neighbours' ``expected``
    values, found by two sequential tests (one per direction; the stronger wins), where it is ``tested``
    (``offset_tested``: a day it is not starts the tests afresh), on the days the test can judge (the
    evidence of a stretch carries over the others, which are not flagged). ``repeated``: where a reading
    equals the day before's, which starts the test for an early stretch afresh at a station whose repeats are
    rare (``OFFSET_ORDINARY_REPEAT``)."""
    late, early, judged = offset_day_evidence(observed, expected, per_station.change_scale, reporting)
    tested = tested.to_numpy()
    afresh = -(threshold + OFFSET_MEMORY)  # takes the statistic and the evidence summed back to 0
    early = np.where(repeated & (per_station.repeat_share < OFFSET_ORDINARY_REPEAT).to_numpy()[None, :],
                     afresh, early)
    (late_level, late_sum, late_onset), (early_level, early_sum, early_onset) = (
        offset_evidence(np.where(tested, evidence, afresh), threshold) for evidence in (late, early))
    is_early = early_level > late_level
    found = tested & judged & (np.where(is_early, early_level, late_level) > threshold)
    return DateOffsets(found, is_early, np.where(is_early, early_sum, late_sum),
                       np.where(is_early, early_onset, late_onset))


def shared_values(observed: pd.DataFrame, flag: pd.DataFrame, least_stations: int = 2) -> pd.DataFrame:
    """Values flagged gross that at least ``least_stations`` stations read exactly on the same day: probable
    missing-value codes an archive writes. Per value (rounded to 0.01), the most stations that read it on one
    day, its readings and days flagged gross, and its readings and days in all (flagged or not: the value may
    also be an ordinary reading in another season, which declaring it missing would lose), most readings
    first."""
    gross = flag.eq(Flag.GROSS).to_numpy()
    rows, columns = np.nonzero(gross)
    found = pd.DataFrame({"value": np.round(observed.to_numpy()[rows, columns], 2), "row": rows})
    per_day = found.groupby(["value", "row"]).size()
    shared = per_day[per_day >= least_stations]
    if shared.empty:
        return pd.DataFrame(columns=["most_stations", "flagged", "flagged_days", "readings", "days"])
    values = shared.index.get_level_values("value").unique()
    rounded = np.round(observed.to_numpy(), 2)
    every = {value: np.nonzero(rounded == value) for value in values}
    return pd.DataFrame({
        "most_stations": shared.groupby(level="value").max(),
        "flagged": found.groupby("value").size().reindex(values),
        "flagged_days": found.groupby("value")["row"].nunique().reindex(values),
        "readings": pd.Series({value: len(where[0]) for value, where in every.items()}),
        "days": pd.Series({value: len(np.unique(where[0])) for value, where in every.items()}),
    }).sort_values(["readings", "most_stations"], ascending=False)


def mostly_flagged(observed: pd.DataFrame, flag: pd.DataFrame, share: float = MOSTLY_FLAGGED) -> pd.DataFrame:
    """The stations with at least ``share`` of their readings flagged as faults: per station its readings,
    those flagged, and the count of each kind of fault (``FAULTS``), most flagged first."""
    read = observed.notna().to_numpy()
    faulty = flag.isin(FAULTS).to_numpy() & read
    readings, flagged = read.sum(axis=0), faulty.sum(axis=0)
    chosen = np.flatnonzero((readings > 0) & (flagged >= share * readings))
    found = pd.DataFrame({"readings": readings[chosen], "flagged": flagged[chosen]}, index=observed.columns[chosen])
    for kind in FAULTS:
        found[kind.value] = (flag.iloc[:, chosen].to_numpy() == kind).sum(axis=0)
    return found.sort_values("flagged", ascending=False, kind="stable")


def no_detection(observed: pd.DataFrame, window: int) -> dict[str, pd.DataFrame]:
    """The verdict with quality control switched off: nothing flagged, missing days filled with the
    median of the days before them so the features stay defined."""
    reference = trailing_median(observed, window)
    flag = pd.DataFrame(np.where(observed.isna(), Flag.MISSING.value, Flag.NONE.value), index=observed.index,
                        columns=observed.columns)
    empty = pd.DataFrame(np.nan, index=observed.index, columns=observed.columns)
    return {"flag": flag, "confidence": empty, "score": empty, "expected": reference,
            "repaired": observed.fillna(reference)}
