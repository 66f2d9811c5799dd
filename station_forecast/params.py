"""The parameters: their schema (type and range of every key), and loading and checking params.toml.

Every key is required and an unknown key is an error, so a typo cannot silently
fall back to a default; the defaults live in params.toml only. Only the standard
library is imported, so ``--help`` and parameter errors answer at once.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from station_forecast.errors import PipelineError
from station_forecast.files import PROJECT, check_regular_file
from station_forecast.flags import INJECTED
from station_forecast.units import UNITS

DEFAULT_PARAMS = PROJECT / "params.toml"
# stage -> the parameter sections it reads, in the order pipeline.sh runs the stages (stages.txt)
STAGE_SECTIONS = {line.split()[0]: line.split()[1:]
                  for line in (PROJECT / "stages.txt").read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.startswith("#")}
STAGES = list(STAGE_SECTIONS)
MAX_PARAMS_BYTES = 1 << 20
MAX_MISSING_CODES = 100
# import.temperature_column of a wide table: beside the date's, a column per station, named by its header.
EVERY_COLUMN = "*"
# import.temperature_column of a table of a row per year and a column per month (Jan ... Dec), as monthly
# station series are often published; date_column names the year's column.
MONTH_COLUMNS = "months"
# The years a simulation may span. Its dates beyond pandas' time stamps (nanoseconds since 1970 end on
# 2262-04-11) were written as times of another day, and stage 2 refused its own raw files.
FIRST_YEAR, LAST_YEAR = 1800, 2261


LOCAL_CLUSTER = "local:"
MAX_LOCAL_WORKERS = 256
# tcp://host:port, the host a name or an IPv4 address or an IPv6 one in brackets; the port may be left out
# (Dask's 8786). TLS would need certificates this pipeline does not configure.
SCHEDULER_ADDRESS = r"tcp://([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"


def scheduler_problem(value: str) -> str | None:
    """What is wrong with a ``compute.scheduler`` value, or None: "" (this process),
    "local:N" (a LocalCluster of N worker processes) or a scheduler's address, tcp://host:port."""
    import re

    if value == "":
        return None
    if value.startswith(LOCAL_CLUSTER):
        count = value[len(LOCAL_CLUSTER):]
        if count.isascii() and count.isdigit() and 1 <= int(count) <= MAX_LOCAL_WORKERS:
            return None
        return f"{value!r}: local:N needs N, the number of worker processes, from 1 to {MAX_LOCAL_WORKERS}"
    match = re.fullmatch(SCHEDULER_ADDRESS, value)
    if match and (not match.group(3) or 1 <= int(match.group(3)[1:]) <= 65535):
        return None
    return (f"{value!r} must be empty (run here), 'local:N' (N worker processes on this machine) "
            "or a scheduler's address tcp://host:port, such as 'tcp://10.0.0.5:8786'")


# Each parameter: (type, minimum, maximum), (str, allowed values, None), (str, a function returning
# what is wrong with a value or None, None), (list, minimum, maximum) for a [min, max] pair, or (list, most
# entries, None) for a list of numbers.
SIMULATION = "simulation"
PARAM_SCHEMA: dict[str, dict[str, Any]] = {
    "data": {
        "source": (str, None, None),
        "frequency": (str, ("auto", "daily", "monthly"), None),
        "test_steps": (int, 2, 36_500),
        "holdout_stations": (int, 0, 100_000),
    },
    "simulation": {
        "seed": (int, 0, 2**32 - 1),
        "n_stations": (int, 1, 100_000),
        "start_date": (str, None, None),
        "n_years": (int, 2, 200),
        "clean_stations": (int, 0, 100_000),
        "heavy_stations": (int, 0, 100_000),
        "heavy_factor": (float, 1.0, 20.0),
        "region_km": (float, 1.0, 10_000.0),
        "correlation_km": (float, 10.0, 100_000.0),
        "shared_weather": (float, 0.0, 1.0),
        "events_per_year": (float, 0.0, 100.0),
        "event_days": (list, 1, 60),
        "event_size": (list, 0.0, 40.0),
        "event_radius_km": (list, 1.0, 10_000.0),
        "fronts_per_year": (float, 0.0, 365.0),
        "front_size": (list, 0.0, 40.0),
        "front_speed_km": (list, 1.0, 10_000.0),
        "resolution": (str, ("0.1C", "1F"), None),
    },
    "anomalies": {
        **{f"{kind}_rate": (float, 0.0, 0.2) for kind in INJECTED},
        **{f"{kind}_days": (list, 1, 365) for kind in INJECTED},
    },
    "import": {
        "date_column": ((str, list), lambda value: _date_columns_problem(value), None),
        "temperature_column": ((str, list), lambda value: _temperature_columns_problem(value), None),
        "date_format": (str, None, None),
        "delimiter": (str, (",", ";", "\t", "|", "whitespace"), None),
        "unit": (str, tuple(UNITS), None),
        "quantity": (str, ("mean", "max", "min"), None),
        "missing_values": (list, MAX_MISSING_CODES, None),
        # "" (one station per file), a column's name, or the columns whose values joined name the station
        "station_column": ((str, list), lambda value: _station_columns_problem(value), None),
        "element_column": (str, lambda value: None, None),  # "" (a column per quantity) or a column's name
        "value_column": (str, lambda value: None, None),  # with element_column: the column of the values
    },
    "quality_control": {
        "detector": (str, ("network", "none"), None),
        "neighbours": (int, 1, 50),
        "min_correlation": (float, 0.0, 0.99),
        "window": (int, 3, 90),
        "spike_threshold": (float, 1.0, 50.0),
        "shift_threshold": (float, 1.0, 200.0),
        "stuck_threshold": (float, 0.5, 50.0),
        "offset_threshold": (float, 1.0, 100.0),
        "gross_margin": (float, 1.0, 20.0),
        "climate_margin": (float, 3.0, 100.0),
        "repair_confidence": (float, 0.5, 1.0),
    },
    "preprocessing": {
        "min_temp": (float, -1e9, 1e9),
        "max_temp": (float, -1e9, 1e9),
        "min_steps": (int, 40, 100_000),
    },
    "forecast": {
        "horizon": (int, 1, 366),
        "neighbours": (int, 0, 100),
        "min_correlation": (float, -1.0, 1.0),
    },
    "model": {
        "cv_folds": (int, 2, 20),
        "cv_max_rows": (int, 1_000, 100_000_000),
        "ridge_alpha": (float, 0.0, 1e6),
        "gbr_max_iter": (int, 10, 5000),
        "gbr_learning_rate": (float, 1e-4, 1.0),
        "gbr_max_leaf_nodes": (int, 2, 1000),
        "tie_tolerance": (float, 0.0, 0.5),
        "random_state": (int, 0, 2**32 - 1),
        "interval_level": (float, 0.5, 0.99),
    },
    "compute": {
        "scheduler": (str, scheduler_problem, None),
    },
    "evaluation": {
        "gate_min_improvement": (float, -1.0, 0.9),
        "interval_tolerance": (float, 0.0, 0.5),
        "report_stations": (int, 0, 50),
        "report_flags": (int, 0, 1000),
    },
}


# Parameters an older parameters file may still use, and their names now.
RENAMED = {"data.test_days": "data.test_steps", "preprocessing.min_days": "preprocessing.min_steps"}


def params_text_with(overrides: dict[str, Any], base: Path = DEFAULT_PARAMS) -> str:
    """The text of a parameters file with some values replaced; keys are unique across sections."""
    import re

    text = base.read_text(encoding="utf-8")
    for key, value in overrides.items():
        rendered = f'"{value}"' if isinstance(value, str) else repr(value)
        text, count = re.subn(rf"^{key} = [^#\n]*", f"{key} = {rendered}  ", text, flags=re.M)
        if count != 1:
            raise PipelineError(f"{base}: no parameter {key}")
    return text


@dataclass(frozen=True)
class Params:
    """Validated parameters, one dict per section, plus where they came from."""

    sections: dict[str, dict[str, Any]]
    path: Path
    sha256: str

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def stage_hash(self, stage: str) -> str:
        """A hash of the parameters ``stage`` reads: its sections only, so editing another's reruns nothing."""
        import json

        read = {name: self.sections[name] for name in STAGE_SECTIONS[stage]}
        if stage == STAGES[0]:
            read["source_folder"] = str(self.source_folder)  # a relative folder moves with the file
        return hashlib.sha256(json.dumps(read, sort_keys=True).encode()).hexdigest()

    @property
    def source_folder(self) -> Path | None:
        """The folder of the user's station files (or the one file), or None to simulate.

        A relative folder is taken relative to the parameters file; ``~`` at its start is the user's home.
        """
        source = self.sections["data"]["source"]
        return None if source == SIMULATION else (self.path.parent / Path(source).expanduser()).resolve()


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate a TOML parameters file; every key is required, none unknown."""
    path = Path(path) if path else DEFAULT_PARAMS
    if not path.exists() and not path.is_symlink():
        raise PipelineError(f"{path}: parameters file not found")
    check_regular_file(path, limit=MAX_PARAMS_BYTES)  # a FIFO would block, a device never end
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read parameters file ({exc.strerror})") from None
    try:
        # An editor's byte-order mark is not an error, nor Windows Notepad's "Unicode" (UTF-16 with its mark).
        text = raw_bytes.decode("utf-16" if raw_bytes.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig")
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"{path}: malformed parameters file ({exc})") from None
    sections = {name: _check_section(path, name, raw.get(name), schema)
                for name, schema in PARAM_SCHEMA.items()}
    unknown = sorted(set(raw) - set(PARAM_SCHEMA))
    if unknown:
        raise PipelineError(f"{path}: unknown section [{unknown[0]}]")
    _check_cross_constraints(path, sections)
    return Params(sections, path, hashlib.sha256(raw_bytes).hexdigest())


# Keys that switch on a layout of the user's files, added after params files were first written: absent, they
# can only mean the layout is not used, so a file made before them still loads. Every other key is required.
ABSENT_MEANS_OFF: dict[str, Any] = {"import.missing_values": [], "import.station_column": "",
                                    "import.element_column": "", "import.value_column": ""}


def _check_section(path: Path, name: str, values: Any, schema: dict) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: missing section [{name}]")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        renamed = RENAMED.get(f"{name}.{unknown[0]}")
        hint = f"; it is now {renamed} (the same meaning, counted in steps of the series)" if renamed else ""
        raise PipelineError(f"{path}: unknown parameter {name}.{unknown[0]}{hint}")
    checked = {}
    for key, (kind, low, high) in schema.items():
        where = f"{path}: {name}.{key}"
        if key not in values and f"{name}.{key}" in ABSENT_MEANS_OFF:
            off = ABSENT_MEANS_OFF[f"{name}.{key}"]
            checked[key] = list(off) if isinstance(off, list) else off
            continue
        if key not in values:
            raise PipelineError(f"{where} is missing (every key is required; {DEFAULT_PARAMS} has each one with "
                                "its default, to copy from: a file made for an earlier version lacks the newer keys)")
        value = values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise PipelineError(f"{where} must be {names}, got {value!r}")
        if callable(low):
            problem = low(value)
            if problem:
                raise PipelineError(f"{where} = {problem}")
        elif kind is list and high is None:
            _check_numbers(where, value, low)
        elif kind is list:
            _check_length_range(where, value, low, high)
        elif kind is str:
            if low is not None and value not in low:
                raise PipelineError(f"{where} = {value!r} must be one of {', '.join(map(repr, low))}")
            if not value:
                raise PipelineError(f"{where} must not be empty")
        elif not (low <= value <= high):
            raise PipelineError(f"{where} = {value!r} is out of range [{low}, {high}]")
        checked[key] = value
    return checked


def _columns_problem(value: str | list, most: int, alternative: str) -> str | None:
    """What is wrong with a parameter that names one column, or up to ``most`` different ones
    (``alternative`` says what they are for)."""
    names = [value] if isinstance(value, str) else value
    if not 1 <= len(names) <= most or not all(isinstance(name, str) and name.strip() for name in names) \
            or len(set(names)) < len(names):
        return f"{value!r} must name a column, or {alternative}"
    return None


def _date_columns_problem(value: str | list) -> str | None:
    """``import.date_column``: one column's name, or the names of the columns whose values, joined by a space,
    make the date (archives that write the year, month and day apart)."""
    return _columns_problem(value, 6, '2 to 6 different columns whose values joined by a space make the date (and '
                                      'time), e.g. ["Year", "Month", "Day"] with date_format = "%Y %m %d"')


def _station_columns_problem(value: str | list) -> str | None:
    """``import.station_column``: "" (a station per file), one column's name, or the columns whose values, joined
    by a space, name each row's station (an archive whose names repeat: Portland, Maine and Portland, Oregon)."""
    if value == "":
        return None
    return _columns_problem(value, 4, '2 to 4 different columns whose values joined by a space name the station, '
                                      'e.g. ["City", "State"]')


def _temperature_columns_problem(value: str | list) -> str | None:
    """``import.temperature_column``: one column's name, ``EVERY_COLUMN`` (a wide table), ``MONTH_COLUMNS`` (a
    year to a row), or two different columns, a day's maximum and minimum, whose mean is the day's reading
    (archives that keep no daily mean)."""
    if isinstance(value, list) and {EVERY_COLUMN, MONTH_COLUMNS} & set(value):
        return (f'either "{EVERY_COLUMN}" (a wide table: every column but the date\'s is a station), '
                f'"{MONTH_COLUMNS}" (a row per year, a column per month) or column names, not both')
    return _columns_problem(value, 2, "two different columns whose mean is the day's reading, e.g. "
                                      '["TMAX", "TMIN"] with quantity = "mean"')


def _check_numbers(where: str, value: list, most: int) -> None:
    if len(value) > most or not all(isinstance(v, int | float) and not isinstance(v, bool) and v == v for v in value):
        raise PipelineError(f"{where} must be a list of at most {most} numbers, e.g. [-99, -9999, 999.9]")


def _check_length_range(where: str, value: list, low: float, high: float) -> None:
    """A [min, max] pair: whole numbers where the bounds are whole, else any numbers."""
    kinds = (int,) if isinstance(low, int) else (int, float)
    ok = (len(value) == 2 and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
          and low <= value[0] <= value[1] <= high)
    if not ok:
        what = "whole numbers" if kinds == (int,) else "numbers"
        raise PipelineError(f"{where} must be [min, max] {what} with {low} <= min <= max <= {high}")


def _check_source(path: Path, source: str) -> None:
    """A ``data.source`` that names no file as a web address or a file pattern would: said as what it is, where
    the folder it does not name would be "not found"."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source.strip()):
        raise PipelineError(f"{path}: data.source = {source!r} is a URL; the pipeline reads files on disk: "
                            "download them (e.g. curl -O, or wget -r for a folder of files) and point data.source "
                            "at the folder or the file")
    if re.search(r"[*?\[]", source) and not (path.parent / Path(source).expanduser()).exists():
        raise PipelineError(f"{path}: data.source = {source!r} is a pattern, which is not expanded: name the folder "
                            "that holds the station files (every .csv, .csv.gz and .dly there is read) or one file")


def _check_cross_constraints(path: Path, s: dict[str, dict[str, Any]]) -> None:
    data, sim, pre = s["data"], s["simulation"], s["preprocessing"]
    import datetime as dt

    try:
        start = dt.date.fromisoformat(sim["start_date"])
    except ValueError:
        raise PipelineError(f"{path}: simulation.start_date must be YYYY-MM-DD, got {sim['start_date']!r}") from None
    if not FIRST_YEAR <= start.year <= LAST_YEAR - sim["n_years"]:
        raise PipelineError(f"{path}: simulation.start_date {sim['start_date']!r} plus simulation.n_years = "
                            f"{sim['n_years']} must stay within the years {FIRST_YEAR} to {LAST_YEAR} (pandas' "
                            "time stamps end in April 2262)")
    if pre["min_temp"] >= pre["max_temp"]:
        raise PipelineError(f"{path}: preprocessing.min_temp must be below preprocessing.max_temp")
    imp = s["import"]
    if bool(imp["element_column"].strip()) != bool(imp["value_column"].strip()):
        raise PipelineError(f"{path}: import.element_column and import.value_column go together: a file with a row "
                            "per day and element (GHCN-Daily's by-station files) names both, e.g. "
                            'element_column = "#3", value_column = "#4"; any other file neither')
    dates = [imp["date_column"]] if isinstance(imp["date_column"], str) else imp["date_column"]
    by_position = all(name.startswith("#") for name in dates)  # a file without a header: no column is named
    if imp["temperature_column"] == MONTH_COLUMNS and (imp["date_format"] not in ("%Y", "%Y %d")
                                                       or imp["element_column"].strip()):
        raise PipelineError(f"{path}: import.temperature_column = \"{MONTH_COLUMNS}\" reads a row per year (or per "
                            "year and day of the month) and a column per month, Jan ... Dec in the header or, without "
                            "one, the twelve columns after the date's: date_column names the year's column, with "
                            'date_format = "%Y" (or the year\'s and the day\'s, with "%Y %d"), and element_column is '
                            '"" (a station_column may name each row\'s station)')
    if imp["temperature_column"] == EVERY_COLUMN and (imp["station_column"] or imp["element_column"].strip()
                                                      or by_position):
        raise PipelineError(f"{path}: import.temperature_column = \"{EVERY_COLUMN}\" reads a wide table, a column "
                            "per station named by its header beside the date's: it needs a header (date_column by "
                            "name), and neither station_column nor element_column")
    if data["source"] != SIMULATION:
        _check_source(path, data["source"])
        return  # the next checks are about the simulated stations; imported ones are checked when read
    if data["holdout_stations"] >= sim["n_stations"]:
        raise PipelineError(f"{path}: data.holdout_stations must leave at least one training station")
    if sim["clean_stations"] + sim["heavy_stations"] > sim["n_stations"]:
        raise PipelineError(f"{path}: simulation.clean_stations + simulation.heavy_stations exceed "
                            "simulation.n_stations")
    if data["test_steps"] >= sim["n_years"] * 365 - pre["min_steps"]:
        raise PipelineError(f"{path}: data.test_steps leaves fewer than preprocessing.min_steps training days")
    if data["frequency"] == "monthly":
        raise PipelineError(f"{path}: data.frequency = 'monthly' needs your own files (data.source); "
                            "the simulation is daily")
