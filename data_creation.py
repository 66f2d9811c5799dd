"""Stage 1: make the raw station files: simulate stations, or import your own.

Simulation (data.source = "simulation"): stations stand at random places in a
region, each with its own climate (annual mean, seasonal amplitude and phase,
slow trend). Day-to-day weather is mostly regional: neighbours share it, the
more the closer they are; it persists from day to day, varies more in winter and
has heavy tails, and regional cold snaps and heat waves come on top. Measurement
noise, then five kinds of station-local sensor fault are added at the rates in
params.toml, and readings are rounded as real ones are. Stations are simulated
and written a block at a time, so no process holds the whole network's days.
Observations are split in time: the last ``test_steps`` go to data/test, the
earlier days to data/train; held-out stations go wholly to data/test. The ground
truth (clean value, fault and weather event per day) goes only to data/truth,
which no training stage reads.

Import (data.source = a folder): each <station>.csv (or .csv.gz, or GHCN-Daily .dly) there is read with the column
names, date format, delimiter and unit in [import]; rows without a usable date or
reading, impossible readings and conflicting duplicate dates are dropped and
counted, and the rest is split in time by the same rules. There is no ground
truth, so data/truth is left empty.

Outputs:
    data/train/raw/<station>.csv   date, temperature in °C (missing days absent)
    data/test/raw/<station>.csv    date, temperature
    data/truth/<station>.csv       date, clean_temperature, anomaly, event (simulation only)
    data/truth/stations.csv        each station's position, climate and role (simulation only)
    data/stations.csv              station, latitude, longitude (and elevation): the simulated network's,
                                   or an imported one's where its folder or rows give them
    data/source.json               where the data came from, the first test day; per imported file,
                                   what was dropped
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from station_forecast import cli, compute, importing, manifest, runtime, storage
from station_forecast.errors import PipelineError, cannot_write
from station_forecast.flags import INJECTED, Flag
from station_forecast.params import SIMULATION, Params, load_params
from station_forecast.runtime import log
from station_forecast.storage import Paths

np = runtime.lazy_import("numpy")
pd = runtime.lazy_import("pandas")

STAGE = "data_creation"
# What the stage loads when it runs: imported ahead by --wait-for-go, and its import floor in benchmark.py.
IMPORTS = ["numpy", "pandas"]
STATIONS_PER_CHUNK = 50  # stations one task simulates and writes
N_MODES = 512  # random Fourier features of the regional weather
OWN_COEF = 0.4  # day-to-day persistence of a station's own weather, less than the regional weather's
# A front's air mass is modified towards the region's weather with this time scale (days).
FRONT_DAYS = 1.5
FRONT_STREAM = 1  # the fronts' random stream beside the simulation's main one
OFFSET_STREAM = 2  # ... and the date offsets' (added later: every earlier draw stays as it was)
# The simulated region's south-west corner on the globe (latitude, longitude): the station list gives
# positions as a real network's does, for the choice of neighbours' candidates at scale.
SIMULATED_CORNER = (50.0, 10.0)
KM_PER_DEGREE = 111.195  # of latitude; of longitude, times the cosine of the latitude
# Later kinds win where events overlap: a spike on a drifting sensor is a spike.
_EFFECT_ORDER = [Flag.DATE_OFFSET, Flag.LEVEL_SHIFT, Flag.DRIFT, Flag.STUCK, Flag.SPIKE, Flag.MISSING]


class Simulation(NamedTuple):
    """Every simulated station: climates and positions, and per station and day (rows x days)
    the clean temperature, the reading (NaN on missing days), the fault label and the weather event."""

    climates: pd.DataFrame
    dates: np.ndarray
    clean: np.ndarray
    observed: np.ndarray
    labels: np.ndarray
    events: np.ndarray


def station_climates(rng: np.random.Generator, sim: dict, holdout_stations: int) -> pd.DataFrame:
    """Draw each station's position and climate, and decide its role and contamination."""
    n = sim["n_stations"]
    contamination = np.ones(n)
    contamination[: sim["clean_stations"]] = 0.0
    contamination[sim["clean_stations"]: sim["clean_stations"] + sim["heavy_stations"]] = sim["heavy_factor"]
    role = np.where(np.arange(n) >= n - holdout_stations, "holdout", "train")
    width = max(3, len(str(n)))
    return pd.DataFrame({
        "station": [f"ST{i + 1:0{width}d}" for i in range(n)],
        "role": role,
        "x_km": rng.uniform(0.0, sim["region_km"], n),
        "y_km": rng.uniform(0.0, sim["region_km"], n),
        "annual_mean": rng.uniform(-2.0, 18.0, n),
        "amplitude": rng.uniform(5.0, 14.0, n),
        "warmest_doy": rng.uniform(190.0, 215.0, n),
        "trend_per_year": rng.uniform(-0.02, 0.06, n),
        "weather_sd": rng.uniform(2.0, 4.0, n),
        "noise_sd": rng.uniform(0.1, 0.3, n),
        "contamination": contamination,
    })


def ar1(innovations: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Stationary AR(1) series per row: x[t] = coef * x[t-1] + e[t], vectorised.

    Convolves each row with its impulse response coef**k by FFT, truncated where
    coef**k < 1e-12; rows start already in their stationary state because the
    first ``k`` innovations are a burn-in that is dropped.
    """
    n_total = innovations.shape[1]
    burn = ar1_burn_in(coef.max())
    n_out = n_total - burn
    if n_out <= 0:
        raise ValueError("ar1: fewer innovations than the burn-in")
    kernel = coef[:, None] ** np.arange(burn + 1)
    size = n_total + burn + 1
    full = np.fft.irfft(np.fft.rfft(innovations, size) * np.fft.rfft(kernel, size), size)
    return full[:, burn:n_total]


def ar1_burn_in(coef: float) -> int:
    return int(np.ceil(np.log(1e-12) / np.log(coef)))


# --------------------------------------------------------------------------- the network's draws


class Network(NamedTuple):
    """What each block of stations is simulated from, small beside the stations' days: the stations'
    positions and climates, the days, the regional weather's modes, the weather events and fronts, and
    for every draw made per station, the random stream's state at each block's first station."""

    climates: pd.DataFrame
    dates: np.ndarray
    regional: dict
    events: dict
    fronts: dict
    blocks: list[tuple[int, int]]
    starts: dict[str, list[dict]]


def station_draws(n_days: int, anomalies: dict) -> dict[str, Callable[[np.random.Generator, int], np.ndarray]]:
    """Every random draw made per station and day: name -> the draw of ``rows`` stations' values.

    Each is drawn for all stations before the next (so each block of stations
    starts where its stream stood after the blocks before it: see ``plan``).
    """
    draws = {
        # Local effects (cloud, wind, inversions at one site): innovations of an AR(1) with a burn-in.
        "own_weather": lambda g, rows: g.normal(size=(rows, n_days + ar1_burn_in(OWN_COEF))),
        "noise": lambda g, rows: g.normal(0.0, 1.0, (rows, n_days)),
    }
    for kind in _EFFECT_ORDER:
        low, high = anomalies[f"{kind}_days"]
        lead = high - 1  # runs may begin before the first day (see ``fault_runs``)
        draws |= {
            f"{kind}.starts": lambda g, rows, lead=lead: g.random((rows, n_days + lead)),
            f"{kind}.lengths": lambda g, rows, lead=lead, low=low, high=high: g.integers(
                low, high + 1, size=(rows, n_days + lead)),
            f"{kind}.sign": lambda g, rows: g.choice([-1.0, 1.0], size=(rows, n_days)),
            f"{kind}.size": lambda g, rows: g.uniform(0.0, 1.0, size=(rows, n_days)),
        }
    return draws


def plan(sim: dict, holdout_stations: int, anomalies: dict, block_stations: int | None = None) -> Network:
    """Draw everything the network shares (climates, the regional weather's modes, events, fronts) and walk
    each per-station draw through the stations a block at a time, keeping where each block starts.

    The draws are those of each per-station table drawn whole, so the faults,
    their places and the weather events are the same whatever the block size,
    and the temperatures differ at most by the rounding of a matrix product's
    sums (a test holds both).
    """
    block_stations = block_stations or STATIONS_PER_CHUNK
    rng = np.random.default_rng(sim["seed"])
    climates = station_climates(rng, sim, holdout_stations)
    dates = simulated_days(sim)
    n_days, n_stations = len(dates), len(climates)
    blocks = [(begin, min(begin + block_stations, n_stations)) for begin in range(0, n_stations, block_stations)]
    draws = station_draws(n_days, anomalies)

    def walk(generator: np.random.Generator, name: str) -> list[dict]:
        starts = []
        for begin, end in blocks:
            starts.append(generator.bit_generator.state)
            draws[name](generator, end - begin)
        return starts

    regional = regional_modes(rng, n_days, sim)
    starts = {"own_weather": walk(rng, "own_weather")}
    events = event_draws(rng, n_days, sim)
    starts["noise"] = walk(rng, "noise")
    # Date offsets draw from a stream of their own (added later: every earlier draw stays as it was).
    offsets = np.random.default_rng([sim["seed"], OFFSET_STREAM])
    for name in [name for name in draws if name not in starts]:  # the faults' draws, kind after kind
        starts[name] = walk(offsets if name.startswith(f"{Flag.DATE_OFFSET}.") else rng, name)
    # Fronts draw from a stream of their own, so with or without them every other draw is the same.
    fronts = front_draws(np.random.default_rng([sim["seed"], FRONT_STREAM]), climates, n_days, sim)
    return Network(climates, dates, regional, events, fronts, blocks, starts)


def simulated_days(sim: dict) -> np.ndarray:
    """The simulated days: ``n_years`` from ``start_date``, to the day (a start on 29 February ends on
    1 March of a common year)."""
    first = dt.date.fromisoformat(sim["start_date"])
    year = first.year + sim["n_years"]
    last = first.replace(year=year) if calendar.isleap(year) or (first.month, first.day) != (2, 29) \
        else dt.date(year, 3, 1)
    return np.arange(np.datetime64(first, "D"), np.datetime64(last, "D"))


def regional_modes(rng: np.random.Generator, n_days: int, sim: dict) -> dict:
    """The regional weather's random Fourier features and their daily values (features x days), AR(1) in
    time with a common storminess per day (see ``regional_weather``)."""
    frequency = rng.normal(size=(N_MODES, 2)) / sim["correlation_km"]
    phase = rng.uniform(0.0, 2 * np.pi, N_MODES)
    coef = rng.uniform(0.6, 0.8)
    burn = ar1_burn_in(coef)
    tails = 6.0  # degrees of freedom of the day's storminess: heavier tails than a normal distribution
    storminess = np.sqrt((tails - 2.0) / rng.chisquare(tails, n_days + burn))
    innovation = rng.normal(size=(N_MODES, n_days + burn)) * storminess * np.sqrt(1 - coef**2)
    return {"frequency": frequency, "phase": phase, "modes": ar1(innovation, np.full(N_MODES, coef))}


def event_draws(rng: np.random.Generator, n_days: int, sim: dict) -> dict:
    """The regional cold snaps and heat waves: start, length, centre, radius and size of each."""
    region = sim["region_km"]
    n_events = rng.poisson(sim["events_per_year"] * n_days / 365.25)
    return {"start": rng.integers(0, n_days, n_events),
            "length": rng.integers(sim["event_days"][0], sim["event_days"][1] + 1, n_events),
            "centre": rng.uniform(-0.25 * region, 1.25 * region, (n_events, 2)),
            "radius": rng.uniform(*sim["event_radius_km"], n_events),
            "size": rng.uniform(*sim["event_size"], n_events) * rng.choice([-1.0, 1.0], n_events)}


def front_draws(rng: np.random.Generator, climates: pd.DataFrame, n_days: int, sim: dict) -> dict:
    """The fronts: direction, speed, size, the day each crosses the region's centre, and the days it
    touches some station of the network (its arrival at the first to its air mass's end at the last)."""
    n_fronts = rng.poisson(sim["fronts_per_year"] * n_days / 365.25)
    fronts = {"angle": rng.uniform(0.0, 2 * np.pi, n_fronts),
              "speed": rng.uniform(*sim["front_speed_km"], n_fronts),
              "size": rng.uniform(*sim["front_size"], n_fronts) * rng.choice([-1.0, 1.0], n_fronts),
              "centre_day": rng.uniform(0.0, n_days, n_fronts)}
    xy = centred(climates, sim)
    span = int(np.ceil(12 * FRONT_DAYS))  # days after its arrival a front's air mass still counts
    first, end = np.zeros(n_fronts, dtype=int), np.zeros(n_fronts, dtype=int)
    for i in range(n_fronts):
        arrival = front_arrival(fronts, i, xy)
        first[i] = max(0, int(np.floor(arrival.min())))
        end[i] = min(n_days, int(np.ceil(arrival.max())) + span)
    return fronts | {"first": first, "end": end}


def centred(climates: pd.DataFrame, sim: dict) -> np.ndarray:
    """The stations' positions (km) from the region's centre."""
    return climates[["x_km", "y_km"]].to_numpy() - sim["region_km"] / 2


def front_arrival(fronts: dict, i: int, xy: np.ndarray) -> np.ndarray:
    """When (days, fractional) front ``i`` reaches each station at ``xy`` (from the region's centre)."""
    angle = fronts["angle"][i]
    return fronts["centre_day"][i] + xy @ np.array([np.cos(angle), np.sin(angle)]) / fronts["speed"][i]


# --------------------------------------------------------------------------- a block of stations


def regional_weather(network: Network, climates: pd.DataFrame, sim: dict, own_innovations: np.ndarray,
                     day_of_year: np.ndarray) -> np.ndarray:
    """Day-to-day weather (stations x days, °C): shared by neighbours, seasonal in spread, heavy-tailed.

    A smooth regional field, correlated between two places as
    exp(-(distance / correlation_km)^2 / 2), is drawn with random Fourier features
    (cost linear in stations, so a national network needs no stations x stations
    matrix); each station adds a weather of its own (local cloud, wind, cold-air
    pools) that persists less. The regional field persists from day to day
    (AR(1)); every day's regional innovation is scaled by a common random factor
    (a Student-t scale mixture), so calm and stormy days hit the whole region
    together; winter weather varies more than summer weather.
    """
    regional = network.regional
    xy = climates[["x_km", "y_km"]].to_numpy()
    # The spectral density of the Gaussian kernel is itself Gaussian.
    basis = np.cos(regional["frequency"] @ xy.T + regional["phase"][:, None])
    basis /= np.linalg.norm(basis, axis=0)  # unit variance at every station
    shared = basis.T @ regional["modes"]
    own = ar1(own_innovations * np.sqrt(1 - OWN_COEF**2), np.full(len(climates), OWN_COEF))
    share = sim["shared_weather"]
    season = 1.0 + 0.3 * np.cos(2 * np.pi * (day_of_year - 15) / 365.25)  # more variable in winter
    sd = climates["weather_sd"].to_numpy()[:, None]
    return sd * season * (np.sqrt(share) * shared + np.sqrt(1 - share) * own)


def weather_events(events: dict, climates: pd.DataFrame, n_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Regional cold snaps and heat waves: their effect (°C, stations x days) and labels.

    Each event has a centre in or near the region, a radius, a length in days and
    a size at its centre; its effect fades with distance (Gaussian footprint) and
    rises and falls over its days. A station-day is labelled with the event where
    the effect is at least 2 °C: that is weather a detector must leave alone.
    """
    start, length, size = events["start"], events["length"], events["size"]
    xy = climates[["x_km", "y_km"]].to_numpy()
    effect = np.zeros((len(climates), n_days))
    for i in range(len(start)):  # a handful of events a year: a short loop over events, not days
        distance = np.linalg.norm(xy - events["centre"][i], axis=1)
        days = np.arange(start[i], min(start[i] + length[i], n_days))
        shape = np.sin(np.pi * (days - start[i] + 1) / (length[i] + 1))
        effect[:, days] += size[i] * np.exp(-((distance / events["radius"][i]) ** 2))[:, None] * shape
    labels = np.where(effect <= -2.0, "cold_snap", np.where(effect >= 2.0, "heat_wave", "none"))
    return effect, labels.astype(object)


def weather_fronts(fronts: dict, climates: pd.DataFrame, n_days: int, sim: dict) -> np.ndarray:
    """Fronts crossing the region: their effect (°C, stations x days).

    A front is a straight line between two air masses moving across the region
    in a random direction at ``front_speed_km`` a day. A station reads the new
    air mass (``front_size`` colder, or warmer) from the moment the front
    reaches it, fading as the air mass is modified (over ``FRONT_DAYS`` days),
    and its daily mean holds the part of the day after the front's arrival. So
    on the day a front crosses, the stations it has passed read several degrees
    off those it has not: weather that splits the neighbours, as real fronts,
    sea breezes and cold air dammed by a ridge do.
    """
    xy = centred(climates, sim)
    effect = np.zeros((len(climates), n_days))
    for i in range(len(fronts["size"])):  # a few fronts a month: a loop over fronts, each over its few days only
        days = np.arange(fronts["first"][i], fronts["end"][i])
        if len(days) == 0:
            continue
        arrival = front_arrival(fronts, i, xy)
        # The mean over day d of size * exp(-(t - arrival) / FRONT_DAYS) for t after the arrival.
        begin = np.maximum(days[None, :] - arrival[:, None], 0.0)
        end = np.maximum(days[None, :] + 1.0 - arrival[:, None], 0.0)
        effect[:, days] += fronts["size"][i] * FRONT_DAYS * (np.exp(-begin / FRONT_DAYS) - np.exp(-end / FRONT_DAYS))
    return effect


def fault_runs(starts: np.ndarray, lengths: np.ndarray, rate: np.ndarray, days: list[int], n_days: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random runs of anomalous days covering about ``rate`` of each row's days, from uniform draws
    (``starts``) and run lengths drawn in ``days`` for every day from ``high - 1`` days before the first.

    Returns the covered mask, each covered day's run start (-1 where none; it may
    be negative for a run begun before day 0) and its progress through the run
    in [0, 1), all of shape (stations, days).
    """
    low, high = days
    start_prob = np.clip(rate / ((low + high) / 2), 0.0, 1.0)
    # Runs may begin before the first day, so the first days are as likely to be
    # covered as any other and the realised fraction matches ``rate``.
    lead = high - 1
    begins = starts < start_prob[:, None]
    day = np.arange(n_days + lead)
    run_start = np.maximum.accumulate(np.where(begins, day, -1), axis=1)
    run_length = np.take_along_axis(lengths, np.maximum(run_start, 0), axis=1)
    position = day - run_start
    covered = ((run_start >= 0) & (position < run_length))[:, lead:]
    progress = np.where(covered, (position / np.maximum(run_length, 1))[:, lead:], 0.0)
    run_start = np.where(covered, run_start[:, lead:] - lead, -1)
    return covered, run_start, progress


def quantise(values: np.ndarray, resolution: str) -> np.ndarray:
    """Readings as a real station reports them: to 0.1 °C, or to whole °F (converted back to °C)."""
    if resolution == "1F":
        return np.round((np.round(values * 9 / 5 + 32) - 32) * 5 / 9, 2)
    return np.round(values, 1)


def simulate_block(network: Network, block: int, sim: dict, anomalies: dict) -> Simulation:
    """Simulate one block of the network's stations: climate, shared weather and its extremes, noise,
    faults, quantisation."""
    begin, end = network.blocks[block]
    climates, dates = network.climates.iloc[begin:end], network.dates
    n_days, n_stations = len(dates), end - begin
    draws = station_draws(n_days, anomalies)

    def draw(name: str) -> np.ndarray:
        generator = np.random.Generator(np.random.PCG64())
        generator.bit_generator.state = network.starts[name][block]
        return draws[name](generator, n_stations)

    day_of_year = (dates - dates.astype("datetime64[Y]")).astype(int) + 1
    years = np.arange(n_days) / 365.25
    c = {col: climates[col].to_numpy()[:, None] for col in climates.columns if col not in ("station", "role")}
    seasonal = c["amplitude"] * np.cos(2 * np.pi * (day_of_year - c["warmest_doy"]) / 365.25)
    weather = regional_weather(network, climates, sim, draw("own_weather"), day_of_year)
    extremes, events = weather_events(network.events, climates, n_days)
    fronts = weather_fronts(network.fronts, climates, n_days, sim)
    events[(events == "none") & (np.abs(fronts) >= 2.0)] = "front"
    clean = c["annual_mean"] + c["trend_per_year"] * years + seasonal + weather + extremes + fronts
    observed = clean + draw("noise") * c["noise_sd"]

    labels = np.full(clean.shape, Flag.NONE.value, dtype=object)
    rows = np.arange(n_stations)[:, None]
    for kind in _EFFECT_ORDER:
        rate = anomalies[f"{kind}_rate"] * c["contamination"][:, 0]
        covered, run_start, progress = fault_runs(draw(f"{kind}.starts"), draw(f"{kind}.lengths"), rate,
                                                  anomalies[f"{kind}_days"], n_days)
        sign, size = draw(f"{kind}.sign"), draw(f"{kind}.size")
        at_start = np.maximum(run_start, 0)
        if kind == "date_offset":  # each reading is the one of the day before (or after) it
            step = np.take_along_axis(sign, at_start, axis=1).astype(int)
            other_day = np.clip(np.arange(n_days)[None, :] + step, 0, n_days - 1)
            observed = np.where(covered, observed[rows, other_day], observed)
        elif kind == "level_shift":
            offset = np.take_along_axis(sign * (2.5 + 3.5 * size), at_start, axis=1)
            observed = np.where(covered, observed + offset, observed)
        elif kind == "drift":
            final = np.take_along_axis(sign * (3.0 + 5.0 * size), at_start, axis=1)
            observed = np.where(covered, observed + final * progress, observed)
        elif kind == "stuck":  # the sensor repeats its last good reading
            frozen = observed[rows, np.maximum(at_start - 1, 0)]
            observed = np.where(covered, frozen, observed)
        elif kind == "spike":
            observed = np.where(covered, observed + sign * (6.0 + 9.0 * size), observed)
        else:
            observed = np.where(covered, np.nan, observed)
        labels[covered] = kind.value
    return Simulation(climates, dates, clean, quantise(observed, sim["resolution"]), labels, events)


def simulate(sim: dict, holdout_stations: int, anomalies: dict, block_stations: int | None = None) -> Simulation:
    """Simulate every station, a block at a time, as one table of stations x days."""
    network = plan(sim, holdout_stations, anomalies, block_stations)
    parts = [simulate_block(network, block, sim, anomalies) for block in range(len(network.blocks))]
    return Simulation(network.climates, network.dates,
                      *(np.concatenate([getattr(part, name) for part in parts])
                        for name in ("clean", "observed", "labels", "events")))


def training_days(climates: pd.DataFrame, n_days: int, test_steps: int) -> np.ndarray:
    """Per station, how many leading days go to training; none for held-out stations."""
    return np.where(climates["role"] == "holdout", 0, n_days - test_steps)


def station_tables(dates: np.ndarray, clean: np.ndarray, observed: np.ndarray, labels: np.ndarray,
                   events: np.ndarray, train_end: np.ndarray) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """The three files of some stations (a row each: clean, observed, labels, events; training days per
    station): train and test observations, and the truth, each as one table of every station's rows in
    station order and how many rows each station has."""
    n_stations, n_days = observed.shape
    present = ~np.isnan(observed)
    in_train = np.arange(n_days)[None, :] < np.asarray(train_end)[:, None]
    days = dates.astype("datetime64[ns]")
    tables = {}
    for folder, rows in (("train", present & in_train), ("test", present & ~in_train)):
        station_row, day = np.nonzero(rows)  # station by station, days in order
        tables[folder] = (pd.DataFrame({"date": days[day], "temperature": observed[station_row, day]}),
                          rows.sum(axis=1))
    # Labels stay object columns: a pandas string column costs more to make than the file to write.
    tables["truth"] = (pd.DataFrame({"date": np.tile(days, n_stations), "clean_temperature": clean.ravel(),
                                     "anomaly": pd.Series(labels.ravel(), dtype=object),
                                     "event": pd.Series(events.ravel(), dtype=object)}),
                       np.full(n_stations, n_days))
    return tables


def write_station_files(staging: Path, network: Network, params: Params, pool: compute.Pool) -> dict[str, int]:
    """Simulate every station and write its train, test and truth files into ``staging``, a block of
    ``STATIONS_PER_CHUNK`` stations per task of ``pool`` (on a cluster the workers do it: the folder is on
    shared storage), so no process holds more than a block's days. Returns the days of each fault kind and
    the station-days of weather events."""
    counts = pool.map(write_block, list(range(len(network.blocks))), what="station blocks simulated and written",
                      network=pool.share(network), staging=staging, params=params)
    network.climates.round(4).to_csv(staging / "truth" / "stations.csv", index=False, lineterminator="\n")
    if not counts:
        return {}
    lowest, highest = min(count.pop("lowest") for count in counts), max(count.pop("highest") for count in counts)
    _check_possible_range(lowest, highest, params)
    return {key: sum(count[key] for count in counts) for key in counts[0]}


def write_block(block: int, network: Network, staging: Path, params: Params) -> dict[str, int]:
    """Simulate block ``block`` of the network and write its stations' files; the days of each fault kind
    and the station-days of weather events in it."""
    sim = params["simulation"]
    simulation = simulate_block(network, block, sim, params["anomalies"])
    train_end = training_days(simulation.climates, len(simulation.dates), params["data"]["test_steps"])
    tables = station_tables(simulation.dates, simulation.clean, simulation.observed, simulation.labels,
                            simulation.events, train_end)
    places = {"temperature": 2 if sim["resolution"] == "1F" else 1, "clean_temperature": 2}
    for folder, (table, sizes) in tables.items():
        storage.write_csv_parts([staging / folder / f"{station}.csv" for station in simulation.climates["station"]],
                                table, sizes, fixed={k: v for k, v in places.items() if k in table})
    observed = np.round(simulation.observed[~np.isnan(simulation.observed)], 2)  # as the files write them
    return {**{kind: int((simulation.labels == kind).sum()) for kind in INJECTED},
            "weather": int((simulation.events != "none").sum()),
            "lowest": float(observed.min(initial=np.inf)), "highest": float(observed.max(initial=-np.inf))}


def _check_possible_range(lowest: float, highest: float, params: Params) -> None:
    """PipelineError, naming the parameters, if a simulated reading lies outside the range stage 2 accepts as
    possible: it would refuse the raw files this stage wrote, naming a line of one as if it were the user's."""
    pre = params["preprocessing"]
    if lowest < pre["min_temp"] or highest > pre["max_temp"]:
        beyond = lowest if lowest < pre["min_temp"] else highest
        raise PipelineError(f"{params.path}: the simulated readings reach {beyond:.1f} °C, outside "
                            f"preprocessing.min_temp .. max_temp = [{pre['min_temp']:g}, {pre['max_temp']:g}], "
                            "which stage 2 would refuse as impossible; widen the range (it bounds what a sensor "
                            "can read, not the climate) or simulate a milder climate")


def _chunks(stations: int) -> int:
    """How many tasks of ``STATIONS_PER_CHUNK`` stations simulate ``stations`` stations."""
    return -(-stations // STATIONS_PER_CHUNK)


# --------------------------------------------------------------------------- main


def station_list(climates: pd.DataFrame) -> pd.DataFrame:
    """The simulated stations' latitudes and longitudes: the region's kilometres from ``SIMULATED_CORNER``."""
    latitude, longitude = SIMULATED_CORNER
    return pd.DataFrame({
        "station": climates["station"],
        "latitude": (latitude + climates["y_km"] / KM_PER_DEGREE).round(5),
        "longitude": (longitude + climates["x_km"] / (KM_PER_DEGREE * np.cos(np.radians(latitude)))).round(5),
    })


def simulated_files(staging: Path, params: Params, pool: compute.Pool) -> tuple[list[Path], dict, str]:
    """Simulate the network into ``staging``; returns the inputs (none), the source record and a summary."""
    data, sim = params["data"], params["simulation"]
    network = plan(sim, data["holdout_stations"], params["anomalies"])
    counts = write_station_files(staging, network, params, pool if pool.cluster else
                                 runtime.Threads(runtime.work_threads(_chunks(sim["n_stations"]))))
    storage.write_csv(staging / importing.STATION_LIST, station_list(network.climates), staged=True)
    dates, n = network.dates, len(network.climates)
    source = {"source": SIMULATION, "quantity": "mean", "unit": "C", "frequency": "daily", "stations": n,
              "test_start": str(dates[len(dates) - data["test_steps"]]), "coordinates": n}
    summary = (f"{n} stations x {len(dates)} days ({dates[0]} to {dates[-1]}); anomalous days: "
               + ", ".join(f"{kind} {counts[kind]}" for kind in INJECTED)
               + f"; station-days in regional cold snaps or heat waves: {counts['weather']}")
    return [], source, summary


def imported_files(staging: Path, folder: Path, params: Params, pool: compute.Pool, paths: Paths
                   ) -> tuple[list[Path], dict, str]:
    """Import the user's files from ``folder`` into ``staging`` (never from the folders of ``paths`` the
    pipeline writes); returns them, the source record and a summary."""
    parts, report, test_start = importing.import_stations(folder, params["data"], params["import"],
                                                          params["preprocessing"], pool, skip=paths.owns)
    importing.write_imported_files(staging, parts)
    # data.source is a folder of files (the station list among them), or one file: a station's or many's
    base = folder if folder.is_dir() else folder.parent
    inputs = sorted({base / file for entry in report.values() for file in entry.get("files", [entry["file"]])})
    listed = next((path for path in storage.station_files(folder) if path.name.lower() == importing.STATION_LIST),
                  None) if folder.is_dir() else None
    in_rows = pd.DataFrame([{"station": name, **entry["coordinates"]} for name, entry in sorted(report.items())
                            if "coordinates" in entry], columns=["station", *importing.COORDINATE_LIMITS])
    coordinates = None
    if listed is not None:  # the list's coordinates first; a station it lacks takes those of its rows
        own = importing.station_columns(params["import"])  # the list names a station as the files do, if by one
        coordinates = importing.read_station_list(listed, params["import"]["delimiter"], set(parts),
                                                  own[0] if len(own) == 1 else "")
        coordinates = coordinates.set_index("station").combine_first(in_rows.set_index("station")) \
            .reindex(columns=coordinates.columns[1:]).reset_index()
        inputs.append(listed)
    elif len(in_rows):
        coordinates = pd.DataFrame({"station": sorted(parts)}).merge(in_rows, on="station", how="left") \
            .dropna(axis=1, how="all")
    if coordinates is not None:
        storage.write_csv(staging / importing.STATION_LIST, coordinates, staged=True)
    source = {"source": str(folder), "quantity": params["import"]["quantity"], "unit": params["import"]["unit"],
              "frequency": next(iter(report.values()))["frequency"], "stations": len(parts),
              "test_start": test_start, "files": report,
              "coordinates": 0 if coordinates is None else int(coordinates["latitude"].notna().sum())}
    summary = f"imported {len(parts)} stations from {folder}; no ground truth, so anomaly scores will be skipped"
    return sorted(inputs), source, summary


def main(args) -> None:
    params: Params = load_params(args.params)
    paths = Paths(args.root)
    folder = params.source_folder
    if folder is not None and paths.owns(folder):  # the swap below would replace the user's files with ours
        raise PipelineError(f"data.source = {params['data']['source']!r} is {folder}, inside a folder the pipeline "
                            "writes and replaces; keep your station files elsewhere (e.g. own/ beside params.toml)")
    if folder is None:  # an imported network is sized once its files are read
        sim = params["simulation"]
        runtime.check_memory(sim["n_stations"] * (sim["n_years"] * 365 + sim["n_years"] // 4),
                         f"simulation.n_stations = {sim['n_stations']} x simulation.n_years = {sim['n_years']}")

    staging = paths.data / ".staging"
    storage.remove_tree(staging)
    with compute.pool(params["compute"]["scheduler"], paths.root) as pool:
        try:
            for name in ("train", "test", "truth"):
                (staging / name).mkdir(parents=True)
            if folder is None:
                inputs, source, summary = simulated_files(staging, params, pool)
            else:
                inputs, source, summary = imported_files(staging, folder, params, pool, paths)
            for name, target in (("train", paths.train_raw), ("test", paths.test_raw), ("truth", paths.truth)):
                target.parent.mkdir(parents=True, exist_ok=True)
                storage.replace_folder(staging / name, target, paths.replaced_whole[target])
            if (staging / importing.STATION_LIST).exists():
                os.replace(staging / importing.STATION_LIST, paths.station_list)
            else:  # an earlier import's list describes other stations
                paths.station_list.unlink(missing_ok=True)
        except OSError as exc:  # the staged files are written straight, not each through a temporary file
            ours = exc.filename is None or paths.owns(Path(exc.filename))  # not the user's folder or file it read
            raise (cannot_write(exc, exc.filename or staging) if ours else None) or exc from None
        finally:
            storage.remove_tree(staging)
    storage.write_json(paths.source_record, source)
    outputs = sorted(p for folder in (paths.train_raw, paths.test_raw, paths.truth) for p in folder.glob("*.csv"))
    outputs += [paths.station_list] if paths.station_list.exists() else []
    # A folder of the user's (and each folder inside it that its files came from) is listed: a file added or
    # removed makes the stage stale.
    read_from = sorted({folder, *(path.parent for path in inputs)}) if folder is not None and folder.is_dir() else []
    manifest.record_stage(paths, STAGE, params, inputs, [*outputs, paths.source_record],
                          folders=[*read_from, paths.train_raw, paths.test_raw, paths.truth])

    log.info("%s", summary)
    log.info("wrote %s, %s, %s", paths.train_raw, paths.test_raw, paths.source_record)


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, cli.stage_parser(__doc__), imports=IMPORTS))
