"""Stage 1: make the raw station files: simulate stations, or import your own.

Simulation (data.source = "simulation"): stations stand at random places in a
region, each with its own climate (annual mean, seasonal amplitude and phase,
slow trend). Day-to-day weather is mostly regional: neighbours share it, the
more the closer they are; it persists from day to day, varies more in winter and
has heavy tails, and regional cold snaps and heat waves come on top. Measurement
noise, then five kinds of station-local sensor fault are added at the rates in
params.toml, and readings are rounded as real ones are. Observations are split
in time: the last ``test_steps`` go to data/test, the earlier days to data/train;
held-out stations go wholly to data/test. The ground truth (clean value, fault
and weather event per day) goes only to data/truth, which no training stage reads.

Import (data.source = a folder): each <station>.csv (or .csv.gz) there is read with the column
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
STATIONS_PER_CHUNK = 50  # stations whose files one task writes
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


def regional_weather(rng: np.random.Generator, climates: pd.DataFrame, n_days: int, sim: dict,
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
    n_features = 512
    xy = climates[["x_km", "y_km"]].to_numpy()
    # The spectral density of the Gaussian kernel is itself Gaussian.
    frequency = rng.normal(size=(n_features, 2)) / sim["correlation_km"]
    phase = rng.uniform(0.0, 2 * np.pi, n_features)
    basis = np.cos(frequency @ xy.T + phase[:, None])
    basis /= np.linalg.norm(basis, axis=0)  # unit variance at every station

    coef = rng.uniform(0.6, 0.8)
    burn = ar1_burn_in(coef)
    tails = 6.0  # degrees of freedom of the day's storminess: heavier tails than a normal distribution
    storminess = np.sqrt((tails - 2.0) / rng.chisquare(tails, n_days + burn))
    innovation = rng.normal(size=(n_features, n_days + burn)) * storminess * np.sqrt(1 - coef**2)
    shared = basis.T @ ar1(innovation, np.full(n_features, coef))
    # Local effects (cloud, wind, inversions at one site) persist less than the regional weather.
    own_coef = 0.4
    own = ar1(rng.normal(size=(len(climates), n_days + ar1_burn_in(own_coef))) * np.sqrt(1 - own_coef**2),
              np.full(len(climates), own_coef))
    share = sim["shared_weather"]
    season = 1.0 + 0.3 * np.cos(2 * np.pi * (day_of_year - 15) / 365.25)  # more variable in winter
    sd = climates["weather_sd"].to_numpy()[:, None]
    return sd * season * (np.sqrt(share) * shared + np.sqrt(1 - share) * own)


def weather_events(rng: np.random.Generator, climates: pd.DataFrame, n_days: int, sim: dict
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Regional cold snaps and heat waves: their effect (°C, stations x days) and labels.

    Each event has a centre in or near the region, a radius, a length in days and
    a size at its centre; its effect fades with distance (Gaussian footprint) and
    rises and falls over its days. A station-day is labelled with the event where
    the effect is at least 2 °C: that is weather a detector must leave alone.
    """
    region = sim["region_km"]
    n_events = rng.poisson(sim["events_per_year"] * n_days / 365.25)
    start = rng.integers(0, n_days, n_events)
    length = rng.integers(sim["event_days"][0], sim["event_days"][1] + 1, n_events)
    centre = rng.uniform(-0.25 * region, 1.25 * region, (n_events, 2))
    radius = rng.uniform(*sim["event_radius_km"], n_events)
    size = rng.uniform(*sim["event_size"], n_events) * rng.choice([-1.0, 1.0], n_events)
    xy = climates[["x_km", "y_km"]].to_numpy()
    effect = np.zeros((len(climates), n_days))
    for i in range(n_events):  # a handful of events a year: a short loop over events, not days
        distance = np.linalg.norm(xy - centre[i], axis=1)
        days = np.arange(start[i], min(start[i] + length[i], n_days))
        shape = np.sin(np.pi * (days - start[i] + 1) / (length[i] + 1))
        effect[:, days] += size[i] * np.exp(-((distance / radius[i]) ** 2))[:, None] * shape
    events = np.where(effect <= -2.0, "cold_snap", np.where(effect >= 2.0, "heat_wave", "none"))
    return effect, events.astype(object)


def weather_fronts(rng: np.random.Generator, climates: pd.DataFrame, n_days: int, sim: dict) -> np.ndarray:
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
    n_fronts = rng.poisson(sim["fronts_per_year"] * n_days / 365.25)
    angle = rng.uniform(0.0, 2 * np.pi, n_fronts)
    speed = rng.uniform(*sim["front_speed_km"], n_fronts)
    size = rng.uniform(*sim["front_size"], n_fronts) * rng.choice([-1.0, 1.0], n_fronts)
    centre_day = rng.uniform(0.0, n_days, n_fronts)  # when the front crosses the region's centre
    xy = climates[["x_km", "y_km"]].to_numpy() - sim["region_km"] / 2
    effect = np.zeros((len(climates), n_days))
    span = int(np.ceil(12 * FRONT_DAYS))  # days after its arrival a front's air mass still counts
    for i in range(n_fronts):  # a few fronts a month: a loop over fronts, each over its few days only
        arrival = centre_day[i] + xy @ np.array([np.cos(angle[i]), np.sin(angle[i])]) / speed[i]
        first = max(0, int(np.floor(arrival.min())))
        days = np.arange(first, min(n_days, int(np.ceil(arrival.max())) + span))
        if len(days) == 0:
            continue
        # The mean over day d of size * exp(-(t - arrival) / FRONT_DAYS) for t after the arrival.
        begin = np.maximum(days[None, :] - arrival[:, None], 0.0)
        end = np.maximum(days[None, :] + 1.0 - arrival[:, None], 0.0)
        effect[:, days] += size[i] * FRONT_DAYS * (np.exp(-begin / FRONT_DAYS) - np.exp(-end / FRONT_DAYS))
    return effect


def draw_events(rng: np.random.Generator, rate: np.ndarray, days: list[int], n_days: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random runs of anomalous days covering about ``rate`` of each row's days.

    Returns the covered mask, each covered day's run start (-1 where none; it may
    be negative for a run begun before day 0) and its progress through the run
    in [0, 1), all of shape (stations, days).
    """
    low, high = days
    start_prob = np.clip(rate / ((low + high) / 2), 0.0, 1.0)
    # Runs may begin before the first day, so the first days are as likely to be
    # covered as any other and the realised fraction matches ``rate``.
    lead = high - 1
    starts = rng.random((len(rate), n_days + lead)) < start_prob[:, None]
    lengths = rng.integers(low, high + 1, size=starts.shape)
    day = np.arange(n_days + lead)
    run_start = np.maximum.accumulate(np.where(starts, day, -1), axis=1)
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


def simulate(sim: dict, holdout_stations: int, anomalies: dict) -> Simulation:
    """Simulate every station: climate, shared weather and its extremes, noise, faults, quantisation."""
    rng = np.random.default_rng(sim["seed"])
    climates = station_climates(rng, sim, holdout_stations)
    start = np.datetime64(sim["start_date"], "D")
    first = dt.date.fromisoformat(sim["start_date"])
    year = first.year + sim["n_years"]
    # n_years later, to the day; a start on 29 February ends on 1 March of a common year
    last = first.replace(year=year) if calendar.isleap(year) or (first.month, first.day) != (2, 29) \
        else dt.date(year, 3, 1)
    end = np.datetime64(last, "D")
    dates = np.arange(start, end)
    n_days, n_stations = len(dates), len(climates)

    day_of_year = (dates - dates.astype("datetime64[Y]")).astype(int) + 1
    years = np.arange(n_days) / 365.25
    c = {col: climates[col].to_numpy()[:, None] for col in climates.columns if col not in ("station", "role")}
    seasonal = c["amplitude"] * np.cos(2 * np.pi * (day_of_year - c["warmest_doy"]) / 365.25)
    weather = regional_weather(rng, climates, n_days, sim, day_of_year)
    extremes, events = weather_events(rng, climates, n_days, sim)
    # Fronts draw from a stream of their own, so with or without them every other draw is the same.
    fronts = weather_fronts(np.random.default_rng([sim["seed"], FRONT_STREAM]), climates, n_days, sim)
    events[(events == "none") & (np.abs(fronts) >= 2.0)] = "front"
    clean = c["annual_mean"] + c["trend_per_year"] * years + seasonal + weather + extremes + fronts
    observed = clean + rng.normal(0.0, 1.0, clean.shape) * c["noise_sd"]

    labels = np.full(clean.shape, Flag.NONE.value, dtype=object)
    rows = np.arange(n_stations)[:, None]
    for kind in _EFFECT_ORDER:
        draws = np.random.default_rng([sim["seed"], OFFSET_STREAM]) if kind == Flag.DATE_OFFSET else rng
        rate = anomalies[f"{kind}_rate"] * c["contamination"][:, 0]
        covered, run_start, progress = draw_events(draws, rate, anomalies[f"{kind}_days"], n_days)
        sign = draws.choice([-1.0, 1.0], size=clean.shape)
        size = draws.uniform(0.0, 1.0, size=clean.shape)
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


def write_station_files(staging: Path, simulation: Simulation, test_steps: int, resolution: str,
                        pool: compute.Pool | None = None) -> None:
    """Every station's train, test and truth files into ``staging``, ``STATIONS_PER_CHUNK`` stations per
    task of ``pool`` (on a cluster the workers write them: the folder is on shared storage)."""
    climates = simulation.climates
    train_end = training_days(climates, len(simulation.dates), test_steps)
    # The label tables travel as small integer codes: text columns of millions of cells are slow to send.
    (label_codes, label_names), (event_codes, event_names) = (
        _codes(simulation.labels), _codes(simulation.events))
    chunks = [(climates["station"].to_numpy()[b], simulation.clean[b], simulation.observed[b], label_codes[b],
               event_codes[b], train_end[b])
              for b in (slice(i, i + STATIONS_PER_CHUNK) for i in range(0, len(climates), STATIONS_PER_CHUNK))]
    (pool or runtime.Threads()).map(write_station_chunk, chunks, what="station files written (chunks)",
                                    staging=staging, dates=simulation.dates, resolution=resolution,
                                    names=(label_names, event_names))
    climates.round(4).to_csv(staging / "truth" / "stations.csv", index=False, lineterminator="\n")


def _chunks(stations: int) -> int:
    """How many tasks of ``STATIONS_PER_CHUNK`` stations write ``stations`` stations' files."""
    return -(-stations // STATIONS_PER_CHUNK)


def _codes(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, names = pd.factorize(table.ravel())
    return codes.astype(np.int8).reshape(table.shape), np.asarray(names, dtype=object)


def write_station_chunk(chunk: tuple, staging: Path, dates: np.ndarray, resolution: str,
                        names: tuple[np.ndarray, np.ndarray]) -> None:
    """The files of a few stations: (names, clean, observed, label codes, event codes, training days), one row
    each; ``names`` turns the codes back into labels and events."""
    places = {"temperature": 2 if resolution == "1F" else 1, "clean_temperature": 2}
    stations, clean, observed, labels, events, train_end = chunk
    label_names, event_names = names
    tables = station_tables(dates, clean, observed, label_names[labels], event_names[events], train_end)
    for folder, (table, sizes) in tables.items():
        storage.write_csv_parts([staging / folder / f"{station}.csv" for station in stations], table, sizes,
                                fixed={k: v for k, v in places.items() if k in table})


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
    simulation = simulate(sim, data["holdout_stations"], params["anomalies"])
    write_station_files(staging, simulation, data["test_steps"], sim["resolution"],
                        pool if pool.cluster else runtime.Threads(runtime.work_threads(_chunks(sim["n_stations"]))))
    storage.write_csv(staging / importing.STATION_LIST, station_list(simulation.climates), staged=True)
    dates, labels, n = simulation.dates, simulation.labels, len(simulation.climates)
    source = {"source": SIMULATION, "quantity": "mean", "unit": "C", "frequency": "daily", "stations": n,
              "test_start": str(dates[len(dates) - data["test_steps"]]), "coordinates": n}
    counts = {kind: int((labels == kind).sum()) for kind in INJECTED}
    weather = int((simulation.events != "none").sum())
    summary = (f"{n} stations x {len(dates)} days ({dates[0]} to {dates[-1]}); anomalous days: "
               + ", ".join(f"{k} {v}" for k, v in counts.items())
               + f"; station-days in regional cold snaps or heat waves: {weather}")
    return [], source, summary


def imported_files(staging: Path, folder: Path, params: Params, pool: compute.Pool) -> tuple[list[Path], dict, str]:
    """Import the user's files from ``folder`` into ``staging``; returns them, the source record and a summary."""
    parts, report, test_start = importing.import_stations(folder, params["data"], params["import"],
                                                          params["preprocessing"], pool)
    importing.write_imported_files(staging, parts)
    inputs = sorted({folder / file for entry in report.values() for file in entry.get("files", [entry["file"]])})
    listed = next((path for path in storage.station_files(folder) if path.name.lower() == importing.STATION_LIST), None)
    in_rows = pd.DataFrame([{"station": name, **entry["coordinates"]} for name, entry in sorted(report.items())
                            if "coordinates" in entry], columns=["station", *importing.COORDINATE_LIMITS])
    coordinates = None
    if listed is not None:  # the list's coordinates first; a station it lacks takes those of its rows
        coordinates = importing.read_station_list(listed, params["import"]["delimiter"], set(parts))
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
                inputs, source, summary = imported_files(staging, folder, params, pool)
            for name, target in (("train", paths.train_raw), ("test", paths.test_raw), ("truth", paths.truth)):
                target.parent.mkdir(parents=True, exist_ok=True)
                storage.replace_folder(staging / name, target)
            if (staging / importing.STATION_LIST).exists():
                os.replace(staging / importing.STATION_LIST, paths.station_list)
            else:  # an earlier import's list describes other stations
                paths.station_list.unlink(missing_ok=True)
        except OSError as exc:  # the staged files are written straight, not each through a temporary file
            raise cannot_write(exc, exc.filename or staging) or exc from None
        finally:
            storage.remove_tree(staging)
    storage.write_json(paths.source_record, source)
    outputs = sorted(p for folder in (paths.train_raw, paths.test_raw, paths.truth) for p in folder.glob("*.csv"))
    outputs += [paths.station_list] if paths.station_list.exists() else []
    manifest.record_stage(paths, STAGE, params, inputs, [*outputs, paths.source_record],
                          folders=[*([folder] if folder is not None else []), paths.train_raw, paths.test_raw,
                                   paths.truth])

    log.info("%s", summary)
    log.info("wrote %s, %s, %s", paths.train_raw, paths.test_raw, paths.source_record)


if __name__ == "__main__":
    cli.exit_now(cli.run(STAGE, main, cli.stage_parser(__doc__.splitlines()[0]), imports=IMPORTS))
