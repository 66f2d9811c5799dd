"""The import of a user's own station files into the files the stages read: any column names, date
format, delimiter, unit and missing-value codes (``[import]``), one station per file or many per file
(``import.station_column``) or a column per station (a wide table), with a station list of coordinates beside
them.

The import is lenient where the stages are strict: a row it cannot use (no
date, no reading, a declared code, a value outside [min_temp, max_temp], two
different readings on one day) is dropped and counted, and the counts go into
the log and data/source.json; only a file it cannot use at all is an error. What
it writes, ``date,temperature`` in °C, is read by ``station_files``, the one
reader of the stages' station files.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from station_forecast import compute, runtime, storage
from station_forecast.errors import PipelineError
from station_forecast.params import EVERY_COLUMN, MONTH_COLUMNS
from station_forecast.runtime import lazy_import, log
from station_forecast.station_files import FILES_PER_CHUNK
from station_forecast.steps import FREQUENCIES
from station_forecast.units import WRITTEN_AFTER, to_celsius

np = lazy_import("numpy")
pd = lazy_import("pandas")

# In the data.source folder, the station list (station, latitude, longitude, optionally elevation), not a station.
STATION_LIST = "stations.csv"
STATION_LIST_COLUMNS = ["station", "latitude", "longitude"]
# The names station lists give these columns as archives ship them (any case; the first found is read): GHCN's
# derived packages name the station "id", others "station_id", lists of cities "City" (a name comes last: a list
# with an id and a name names its stations by the id); lat / lon as many tools write them, and Environment
# Canada's daily files "Latitude (y)".
STATION_LIST_NAMES = {"station": ("station", "station_id", "stationid", "station id", "id", "city", "location",
                                  "site", "name"),
                      "latitude": ("latitude", "lat", "latitude (y)"),
                      "longitude": ("longitude", "lon", "lng", "long", "longitude (x)"),
                      "elevation": ("elevation", "elev", "altitude", "alt")}
COORDINATE_NAMES = {name for key in ("latitude", "longitude", "elevation") for name in STATION_LIST_NAMES[key]}
# GHCN-Daily's .dly layout: a line per station, month and element (each field's first character and width),
# then 31 days of a 5-character value and 3 flags each; read as the by-station CSV file with the same
# readings, so with that file's settings.
DLY_FIELDS = {"station": (0, 11), "year": (11, 4), "month": (15, 2), "element": (17, 4)}
DLY_FIRST_DAY, DLY_DAY_WIDTH, DLY_VALUE_WIDTH = 21, 8, 5
DLY_WIDTH = DLY_FIRST_DAY + 31 * DLY_DAY_WIDTH
BY_STATION_SETTINGS = ('date_column = "#2", element_column = "#3", value_column = "#4", temperature_column = the '
                       'element(s), date_format = "%Y%m%d", unit = "0.1C", missing_values = [-9999] and the '
                       'delimiter "," (docs/own_data.md)')
# A coordinate beyond its limit (degrees, metres) is a typo, not a place.
COORDINATE_LIMITS = {"latitude": 90.0, "longitude": 180.0, "elevation": 9000.0}
# Below the lowest land (the Dead Sea's shore, about -430 m) an elevation is a code for "unknown" (GHCN's
# station list writes -999.9), read as unknown: elevation is never used, only passed on.
LOWEST_ELEVATION = -500.0
# A file with at least this share of its rows outside [min_temp, max_temp] gets a warning: a sentinel now and then
# is dropped quietly, but that many are a unit read wrongly (°F as °C: every summer day) or an undeclared code.
IMPOSSIBLE_SHARE = 0.01
# Spellings of "no reading" in real station files; compared in lower case.
MISSING_MARKERS = ["", "na", "n/a", "nan", "null", "none", "-", "--", "---", "m", "missing"]
# Marks some archives write right after a value: the UK Met Office's historic station data "7.2*" (estimated),
# NOAA's Global Summary of the Day "87.1*" (from hourly readings). The value is a reading, read without its mark,
# as is one written with the unit import.unit names ("12.5 °C": units.WRITTEN_AFTER).
VALUE_MARKS = "*#"
DROP_REASONS = ["missing_value", "missing_code", "bad_date", "future_date", "ancient_date", "not_a_number",
                "impossible", "conflicting_duplicate", "incomplete_day"]
# Readings at several times of a day make one daily value (the day's quantity: mean, max or min) where the day
# has at least this share of the file's usual number of readings a day; fewer would bias it.
COMPLETE_DAY = 0.5
PREAMBLE_LINES = 100  # lines of notes a file may have before its header
WHITESPACE = "whitespace"  # the import.delimiter of files whose fields are separated by runs of spaces
# A wide table (import.temperature_column = EVERY_COLUMN) is read as the long form of many stations a file would
# be, the readings in a column named EVERY_COLUMN and the stations in this one (names read from a header are
# stripped, so no column of a file is named so).
WIDE_STATION = " station"
# A table of a row per year and a column per month (import.temperature_column = MONTH_COLUMNS) is read as a row
# per month: the year's column and this one (the month's number) make the date, the value is under MONTH_COLUMNS.
MONTH_OF_ROW = " month"
MONTH_NAMES = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
               "november", "december"]
LATIN1_READ = "not UTF-8: read as Latin-1 (ISO-8859-1), so text such as names may be wrong"
# No instrumental record is older (Central England's monthly means, the oldest, begin in 1659): an earlier date is
# a typo (0001-01-01), and keeping it would stretch every station's days x stations table over centuries.
EARLIEST_DATE = "1600-01-01"
LATEST_UTC_OFFSET = 14  # hours: the Line Islands' time zone, the first to reach a date
MONTHLY_STRETCH = 12  # this many month-apart readings in a row make a daily file mixed


def read_user_station(path: Path, imp: dict, min_temp: float, max_temp: float) -> tuple[pd.DataFrame, dict]:
    """One of the user's station files as (date, temperature in °C) and a count of what was dropped
    (``clean_readings``), with the coordinates its rows carry (``row_coordinates``) if any."""
    table = _read_user_csv(path, imp)
    kept, report = clean_readings(table, path, reading_settings(imp), min_temp, max_temp)
    coordinates = row_coordinates(table, path)
    return kept, {**report, **({"coordinates": coordinates} if coordinates else {})}


def clean_readings(table: pd.DataFrame, path: Path, imp: dict, min_temp: float, max_temp: float,
                   written: tuple | None = None) -> tuple[pd.DataFrame, dict]:
    """One station's rows of ``path`` (text columns as read) as (date, temperature in °C) and a count of what
    was dropped.

    Rows with no date matching ``date_format``, a date after today (no record
    can hold a reading from the future, and one such row would move the test
    period for every station) or before ``EARLIEST_DATE``, no reading, a reading that is not a number or is
    outside [min_temp, max_temp] are dropped; of rows sharing a
    date, one is kept if they agree and none if they disagree (which one is
    right cannot be known). Readings at several times of a day (``date_format`` with a time: hourly records)
    become the day's ``quantity`` (mean, max or min) where the day is complete enough (``COMPLETE_DAY``). A
    decimal comma is read as a decimal point where the comma is not the delimiter. A file with no usable row
    raises PipelineError, unless most of its rows hold no reading (empty, a marker or a declared code): that
    station has no readings, an empty table, and is left out like a short one. ``written``: the table's
    ``_readings_as_written``, where the caller has it already.
    """
    first, *others = date_columns(imp)
    date_text = table[first].str.strip().str.cat([table[name].str.strip() for name in others], sep=" ")
    stamps = parse_stamps(date_text, imp["date_format"])
    dates = stamps.dt.normalize()
    if dates.isna().all():
        where = f"column {first!r}" if not others else f"columns {', '.join(map(repr, [first, *others]))} joined"
        raise PipelineError(f"{path}: no value in {where} matches import.date_format "
                            f"{imp['date_format']!r} (the first is {date_text.iat[0]!r}){_date_hint(date_text)}")
    values, missing, code, marked = written or _readings_as_written(table, imp)
    missing, values = missing | code, values.mask(code)
    not_number = ~missing & ~np.isfinite(values)
    with np.errstate(over="ignore"):  # a huge °F value overflows to infinity: impossible, like any other
        values = to_celsius(values, imp["unit"])
    impossible = ~missing & ~not_number & ~values.between(min_temp, max_temp)
    # A date out of time is a typo worth a warning where it carries a reading; an archive's rows for the rest of
    # the current year, empty until the days come (as national services' yearly files are), are missing days.
    future = (dates > latest_date()) & ~missing
    ancient = (dates < pd.Timestamp(EARLIEST_DATE)) & ~missing
    bad_date = dates.isna() | future | ancient
    reasons = {
        "bad_date": dates.isna(),
        "future_date": future,
        "ancient_date": ancient,
        "missing_value": ~bad_date & missing & ~code,
        "missing_code": ~bad_date & code,
        "not_a_number": ~bad_date & not_number,
        "impossible": ~bad_date & impossible,
    }
    usable = pd.DataFrame({"date": dates, "stamp": stamps, "temperature": values.round(2)})[
        ~(bad_date | missing | not_number | impossible)]
    spread = usable.groupby("stamp")["temperature"].agg(["min", "max"])
    in_conflict = usable["stamp"].isin(spread.index[spread["min"] != spread["max"]])
    kept = usable[~in_conflict].drop_duplicates("stamp")
    kept, within_days, incomplete = _daily(kept, imp["quantity"])
    report = {
        "file": path.name,
        "rows": len(table),
        "kept": len(kept),
        **{reason: int(mask.sum()) for reason, mask in reasons.items()},
        "conflicting_duplicate": int(in_conflict.sum()),
        "repeated_rows": int((~in_conflict).sum() - within_days - incomplete - len(kept)),
        "within_days": within_days,
        "incomplete_day": incomplete,
        "out_of_order": bool(not usable["date"].is_monotonic_increasing),
        "repeated_header": int(table.attrs.get("repeated_header", 0)),
        "preamble": int(table.attrs.get("preamble", 0)),
        "notes": int(table.attrs.get("notes", 0)),
        "other_elements": int(table.attrs.get("other_elements", 0)),
        "encoding": table.attrs.get("encoding", "utf-8"),
        "marked": int(marked.sum()),
    }
    examples = {**reasons, "marked": marked}
    for reason in ("impossible", "not_a_number", "marked"):  # the first such value as written says what to set, or fix
        if report[reason]:
            row = int(np.argmax(examples[reason].to_numpy()))
            report[f"{reason}_example"] = "/".join(table[name].iat[row].strip() for name in temperature_columns(imp))
    if kept.empty and not _misread(report):  # a station without readings (one closed before the archive's years)
        report.update(frequency="unknown", steps_without_reading=0)
        return kept, report  # left out with the short stations (``_report_and_split``)
    if 2 * report["conflicting_duplicate"] >= report["rows"]:  # most of its time stamps hold two readings
        merged = ("two stations' rows under one name (name them by more columns: import.station_column = "
                  '["City", "State"], say)') if station_columns(imp) else \
            "two stations' columns of one name in several files (rename one)" \
            if imp["temperature_column"] == EVERY_COLUMN else "two stations' rows in one file"
        raise PipelineError(f"{path}: {report['conflicting_duplicate']:,} of its {report['rows']:,} rows share their "
                            f"time with a different reading: {merged}, or readings at several times of a day whose "
                            "time import.date_column does not read")
    if kept.empty:
        hint = ""
        if report["impossible"] and report["impossible"] >= report["rows"] // 2:
            hint = (f"; read as unit {imp['unit']!r} its readings lie outside preprocessing's [min_temp, max_temp] = "
                    f"[{min_temp:g}, {max_temp:g}] °C (the first: {report['impossible_example']!r}): is import.unit "
                    "right for it?")
        elif report["not_a_number"] >= report["rows"] // 2 and imp["temperature_column"] == EVERY_COLUMN:
            hint = (f"; most of its values do not read as numbers: with import.temperature_column = {EVERY_COLUMN!r} "
                    "every column but the date's is read as a station's, so a column of text (a description, a "
                    "flag) has to go: delete it from the table")
        elif report["not_a_number"] >= report["rows"] // 2:
            hint = ("; most of its values do not read as numbers: a unit or a flag written beside them, or another "
                    f"column than import.temperature_column = {imp['temperature_column']!r} meant?")
        raise PipelineError(f"{path}: no usable readings ({_describe(report)}){hint or '; fix or remove the file'}")
    kept = kept.sort_values("date", ignore_index=True)
    try:
        frequency = infer_frequency(pd.DatetimeIndex(kept["date"]))
    except ValueError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    if frequency == "monthly":
        kept["date"] = kept["date"].dt.to_period("M").dt.to_timestamp()
    span = len(pd.date_range(kept["date"].iat[0], kept["date"].iat[-1], freq=FREQUENCIES.get(frequency, "D")))
    report.update(frequency=frequency, first=str(kept["date"].iat[0].date()), last=str(kept["date"].iat[-1].date()),
                  steps_without_reading=span - len(kept))
    return kept, report


def _misread(report: dict) -> bool:
    """Whether at least half of a file's rows hold something the settings could not read as a reading (not a
    date, not a number, out of range, at odds with another row of its time), which says a setting is wrong."""
    unread = sum(report[reason] for reason in ("bad_date", "future_date", "ancient_date", "not_a_number",
                                               "impossible", "conflicting_duplicate"))
    return 2 * unread >= max(1, report["rows"])


def utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


def latest_date() -> pd.Timestamp:
    """The date it is now where the day is furthest on (UTC+14): a station's local date may be a day ahead of
    this machine's, and a reading of that day is not from the future."""
    return (utc_now() + pd.Timedelta(hours=LATEST_UTC_OFFSET)).tz_localize(None).normalize()


def parse_stamps(text: pd.Series, date_format: str) -> pd.Series:
    """Dates (and times) as written, NaT where one does not match ``date_format``. A UTC offset at the end
    (``%z``: ``+02:00``, ``+0200`` or ``Z``, as ISO 8601 time stamps carry it) is dropped, not applied: the
    local date and time as written is the station's day, which a daily value means, and an offset that
    changes with daylight saving time would otherwise mix time zones in one column. A two-digit year (``%y``)
    is of the hundred years up to today (Python reads 00-68 as 2000-2068)."""
    if date_format.rstrip().endswith("%z"):
        text = text.str.replace(r"\s*(?:[+-]\d{2}:?\d{2}|Z)$", "", regex=True)
        date_format = date_format.rstrip()[:-2].rstrip()
    stamps = pd.to_datetime(text, format=date_format, errors="coerce")
    if "%y" in date_format:  # "65" is 1965, not 2065: no record holds readings from the future
        future = stamps.dt.normalize() > latest_date()
        if future.any():
            stamps = stamps.where(~future, stamps - pd.DateOffset(years=100))
    return stamps


# Ways archives write dates and times, tried on dates that ``date_format`` does not read, to name one that does.
COMMON_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%m-%Y", "%m-%d-%Y", "%Y%m%d",
                       "%Y %m %d", "%d-%b-%Y", "%d %b %Y", "%b %d %Y", "%Y-%m", "%Y%m", "%Y",
                       "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M",
                       "%d/%m/%Y %H:%M", "%m/%d/%Y %H:%M", "%d.%m.%Y %H:%M", "%Y%m%d%H", "%Y%m%d%H%M")
HINT_DATES = 1000  # distinct dates a guessed format must read


def _date_hint(dates: pd.Series) -> str:
    """How to read dates that ``date_format`` does not: the formats of ``COMMON_DATE_FORMATS`` (or one with a
    UTC offset, ``%z``) that read every one of the first ``HINT_DATES`` distinct dates, or what whole numbers
    stand for (``_numbered_days``); "" when none fits."""
    written = pd.Series(dates.dropna().str.strip().unique()[:HINT_DATES])
    written = written[written != ""]
    if written.empty:
        return ""
    numbered = _numbered_days(written)
    if numbered:
        return numbered
    fits = [form for form in COMMON_DATE_FORMATS if parse_stamps(written, form).notna().all()]
    if not fits:
        fits = [f"{form}%z" for form in COMMON_DATE_FORMATS if "%H" in form
                and parse_stamps(written, f"{form}%z").notna().all()]
    if not fits:
        return ""
    if len(fits) == 1:
        return f'; they read as import.date_format = "{fits[0]}"'
    named = " or ".join(f'"{form}"' for form in fits[:3])
    return f"; they read as import.date_format = {named} (every date fits each: which is meant, only the source says)"


def _numbered_days(dates: pd.Series) -> str:
    """What dates written as whole numbers are, if they look like a spreadsheet's serial day numbers (43831 is
    2020-01-01) or seconds since 1970, which no ``date_format`` reads; "" otherwise."""
    numbers = pd.to_numeric(dates.head(100), errors="coerce")
    if numbers.isna().any() or (numbers % 1 != 0).any():
        return ""
    if numbers.between(10_000, 80_000).all():  # 1927 to 2119
        return ("; they look like a spreadsheet's serial day numbers (43831 is 2020-01-01): save the column "
                "formatted as dates, e.g. YYYY-MM-DD")
    if numbers.between(1e8, 1e10).all():
        return "; they look like seconds since 1970 (Unix time): write them as dates, e.g. YYYY-MM-DD"
    return ""


def _daily(readings: pd.DataFrame, quantity: str) -> tuple[pd.DataFrame, int, int]:
    """One reading a day (date, temperature) from readings with unique time stamps, and how many readings were
    combined into other days' values and dropped with their incomplete days. Several readings a day make the
    day's ``quantity`` where the day has at least ``COMPLETE_DAY`` of the usual number of readings a day."""
    per_day = readings.groupby("date")["temperature"]
    counts = per_day.size()
    if counts.max() == 1:
        return readings[["date", "temperature"]], 0, 0
    complete = counts.index[counts >= COMPLETE_DAY * counts.median()]
    daily = per_day.agg(quantity)[complete].round(2)
    incomplete = int(counts.sum() - counts[complete].sum())
    return (pd.DataFrame({"date": daily.index, "temperature": daily.to_numpy()}),
            int(counts[complete].sum() - len(complete)), incomplete)


def infer_frequency(dates: pd.DatetimeIndex) -> str:
    """``daily`` or ``monthly`` from sorted, unique dates, or ValueError saying why neither fits.

    Daily: most readings are one day apart (gaps of any length are missing
    days). Monthly: at most one reading per month, on the same day of the month
    or on the month's last day, most of them one month apart. A single reading
    says nothing about its step: ``unknown``, which fits the other files' step.
    """
    if len(dates) < 2:
        return "unknown"
    gaps = np.diff(dates.to_numpy()).astype("timedelta64[D]").astype(int)
    typical = int(np.median(gaps))
    if typical == 1:
        monthly = (gaps >= 28) & (gaps <= 31)
        run = np.convolve(monthly, np.ones(MONTHLY_STRETCH, dtype=int), mode="valid")
        if (run == MONTHLY_STRETCH).any():  # a year of month-apart readings is a monthly stretch, not gaps
            i = int(np.argmax(run == MONTHLY_STRETCH))
            raise ValueError(f"mixed steps: readings are mostly a day apart, but from {dates[i].date()} to "
                             f"{dates[i + MONTHLY_STRETCH].date()} they are a month apart")
        return "daily"
    if 28 <= typical <= 31:
        same_month = np.flatnonzero(np.diff((dates.year * 12 + dates.month).to_numpy()) < 1)
        if len(same_month):
            i = same_month[0]
            raise ValueError(f"mixed steps: readings are mostly a month apart, but {dates[i].date()} and "
                             f"{dates[i + 1].date()} fall in the same month")
        if dates.day.nunique() > 1 and not dates.is_month_end.all():
            days = ", ".join(map(str, sorted(dates.day.unique())[:3]))
            raise ValueError(f"mixed steps: readings are mostly a month apart, but not on the same day of each "
                             f"month (days {days}, ...)")
        return "monthly"
    raise ValueError(f"irregular steps: readings are typically {typical} days apart; only daily and monthly "
                     "series can be used (resample yours to one of them)")


def temperature_columns(imp: dict) -> list[str]:
    """The column that holds a row's reading, or the two (the day's maximum and minimum) whose mean it is."""
    names = [imp["temperature_column"]] if isinstance(imp["temperature_column"], str) \
        else list(imp["temperature_column"])
    if len(names) == 2 and imp["quantity"] != "mean":
        raise PipelineError(f"import.temperature_column = {names!r} makes each day's reading the mean of the two "
                            f"columns, but import.quantity is {imp['quantity']!r}: set quantity = \"mean\", or name "
                            "one column")
    return names


def station_columns(imp: dict) -> list[str]:
    """The column, or the columns whose values joined by a space, that name a row's station; none where each
    file is a station."""
    column = imp["station_column"]
    if isinstance(column, str):
        return [column] if column.strip() else []
    return list(column)


def date_columns(imp: dict) -> list[str]:
    """The column, or the columns whose values joined by a space, that hold a row's date."""
    return [imp["date_column"]] if isinstance(imp["date_column"], str) else list(imp["date_column"])


def _read_user_csv(path: Path, imp: dict) -> pd.DataFrame:
    text, encoding = storage.read_archive_text(path, imp["delimiter"])
    _refuse_merge_conflict(text, path)
    named = named_columns(imp)
    headerless = all(re.fullmatch(r"#[1-9][0-9]{0,2}", name) for name in named)  # "#1": the first column
    if path.name.lower().endswith(storage.FIXED_WIDTH):
        if not (headerless and imp["element_column"] and imp["delimiter"] == ","):
            raise PipelineError(f"{path}: a GHCN-Daily .dly file is read as its by-station CSV file would be: "
                                f"{BY_STATION_SETTINGS}")
        text = dly_as_csv(text, path)
    text, preamble = _from_first_reading(text, imp) if headerless else _from_header(text, set(named), imp["delimiter"])
    if not headerless:
        text = _index_named(text, imp, path)

    def used(name: str) -> bool:  # an export's other columns (names, flags, other elements) are never read
        return str(name).strip() in named or str(name).strip().lower() in COORDINATE_NAMES

    wide = imp["temperature_column"] == EVERY_COLUMN
    every = imp["temperature_column"] in (EVERY_COLUMN, MONTH_COLUMNS)  # the readings' columns are found after
    positions = _positions_read(text, named, imp["delimiter"]) if headerless and not every else None
    try:
        table = _parsed(text, sep=separator(imp["delimiter"]), dtype=str, keep_default_na=False,
                        skipinitialspace=True, on_bad_lines="error", header=None if headerless else "infer",
                        usecols=None if every else positions if headerless else used)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: malformed CSV ({str(exc).strip()})") from None
    table.columns = [f"#{int(c) + 1}" for c in table.columns] if headerless else \
        [str(c).strip() for c in table.columns]
    header = text.split("\n", 1)[0].rstrip("\r")[:200]
    absent = [name for name in named if name not in table.columns]
    in_header = any(name.lower() in header.lower() for name in absent)  # else another delimiter would do
    readings = [name for name, key in named.items() if key != "station_column"]
    if readings and set(readings) <= set(absent) and not in_header:  # most likely not a station's file at all
        lowered = {str(column).lower() for column in table.columns}
        if all(lowered & set(STATION_LIST_NAMES[key]) for key in ("latitude", "longitude")):
            raise PipelineError(f"{path}: coordinates but no column {' nor '.join(map(repr, readings))} (header is "
                                f"{header!r}): a station list under another name? Only {STATION_LIST} is read as "
                                f"one (every other *.csv in data.source as readings): rename it to {STATION_LIST} "
                                "to use its coordinates, or move it out of the folder; if it holds readings, set "
                                "import.date_column, import.temperature_column or import.delimiter")
        raise PipelineError(f"{path}: no column {' nor '.join(map(repr, readings))} (header is "
                            f"{header!r}): every *.csv in data.source but {STATION_LIST} is read as one station's "
                            "readings; move this file out of the folder if it is not a station's, else set "
                            "import.date_column, import.temperature_column or import.delimiter")
    for name in absent:
        alike = re.search(rf"(?i)(?<![\w]){re.escape(name)}(?![\w])", header)
        hint = f"; its {alike.group()!r} differs only in case, and names must match exactly" \
            if alike and alike.group() != name else \
            _layout_hint(_fields(text.split("\n", 1)[0].rstrip("\r"), imp["delimiter"]), imp) \
            if named[name] == "temperature_column" else ""
        raise PipelineError(f"{path}: no column {name!r} (header is {header!r}){hint}; "
                            f"set import.{named[name]} or import.delimiter")
    # Exports downloaded in parts and joined with `cat` repeat the header where each part begins.
    first = date_columns(imp)[0]
    repeats = (table[first].str.strip() == first).to_numpy(copy=True)
    if repeats.any():
        repeats[repeats] = (table[repeats].apply(lambda values: values.str.strip()) == table.columns).all(axis=1)
    table = table[~repeats]
    if table.empty:
        raise PipelineError(f"{path}: header only, no data rows")
    table = table.fillna("")  # a short last line (a truncated file) leaves its fields empty
    attrs = {"repeated_header": int(repeats.sum()), "encoding": encoding,
             "notes" if headerless else "preamble": preamble}
    if imp["element_column"]:
        table = elements_as_columns(table, imp, path)
    if wide:
        table = stations_as_rows(table, text, imp, path)
    if imp["temperature_column"] == MONTH_COLUMNS:
        table = months_as_rows(table, imp, path)
    table.attrs.update(attrs)
    return table


def _layout_hint(columns: list[str], imp: dict) -> str:
    """A hint at the layouts a file without the temperature column may have, from its header's ``columns``: a
    column per month (a year to a row), or many columns beside the date's, each a station's (a wide table)."""
    columns = [column.strip().strip('"') for column in columns]
    if {_month_of(column) for column in columns} >= set(range(1, 13)):
        return (f'; a year to a row and a column per month? set import.temperature_column = "{MONTH_COLUMNS}" (with '
                'date_format = "%Y")')
    dates = set(date_columns(imp))
    others = [column for column in columns if column not in dates]
    # Columns named as a temperature (TMAX, TG, "Temp (°C)") say the file is a station's, its column misnamed.
    quantities = [column for column in others if re.search(r"(?i)temp|°|^t(max|min|avg|mean|g|x|n|obs)?\b", column)]
    if len(others) >= 3 and not quantities and not station_columns(imp):
        return f'; a column per station? set import.temperature_column = "{EVERY_COLUMN}"'
    return ""


def months_as_rows(table: pd.DataFrame, imp: dict, path: Path) -> pd.DataFrame:
    """A table of a row per year and a column per month (``import.temperature_column = "months"``: Jan ... Dec or
    January ... December, any case, as NASA GISS's station files, the Met Office's and many national services'
    monthly tables write them) as a row per month, in the file's order: the year's column, ``MONTH_OF_ROW`` (01
    to 12) and the month's value under ``MONTH_COLUMNS``. Other columns (seasons, the year's mean) are not
    read; a month without a column, or with two, is refused."""
    dates = date_columns(imp)
    found: dict[int, list[str]] = {}
    if all(name.startswith("#") for name in dates):  # no header: the twelve columns after the date's
        after = max(int(name[1:]) for name in dates)
        found = {number: [f"#{after + number}"] for number in range(1, 13) if f"#{after + number}" in table.columns}
    for column in table.columns:
        number = _month_of(str(column))
        if number:
            found.setdefault(number, []).append(column)
    header = ",".join(map(str, table.columns))[:200]
    absent = [MONTH_NAMES[number - 1][:3].title() for number in range(1, 13) if number not in found]
    if absent:
        raise PipelineError(f"{path}: no column for {', '.join(absent)} (header is {header!r}); with "
                            f"import.temperature_column = {MONTH_COLUMNS!r} each row is a year and each month a column "
                            "named Jan ... Dec (or January ... December): check import.delimiter, or name the "
                            "temperature column")
    twice = next((columns for columns in found.values() if len(columns) > 1), None)
    if twice:
        raise PipelineError(f"{path}: columns {twice[0]!r} and {twice[1]!r} both name one month (header is "
                            f"{header!r}); keep one")
    kept = [*dates, *station_columns(imp)]
    values = table[[found[number][0] for number in range(1, 13)]].to_numpy()
    rows = pd.DataFrame({column: np.repeat(table[column].to_numpy(), 12) for column in kept})
    rows[MONTH_OF_ROW] = np.tile([f"{number:02d}" for number in range(1, 13)], len(table))
    rows[MONTH_COLUMNS] = values.reshape(-1)
    if "%d" not in imp["date_format"]:
        return rows
    # A row per day of the month holds 31 days of every month: 30 February is no day, whatever its placeholder
    # (-999 in the Met Office's daily series); a row whose own date does not read stays, to be counted as such.
    # Its rows run across the months (1 January, 1 February, ...): in date order they are what a file of a day
    # to a row holds, and the log does not call them out of order.
    own = rows[dates[0]].str.strip().str.cat([rows[name].str.strip() for name in dates[1:]], sep=" ")
    stamps = parse_stamps(own + " " + rows[MONTH_OF_ROW], reading_settings(imp)["date_format"])
    rows = rows[stamps.notna() | parse_stamps(own, imp["date_format"]).isna()]
    return rows.iloc[np.argsort(stamps[rows.index].to_numpy(), kind="stable")].reset_index(drop=True)


def _month_of(name: str) -> int | None:
    """The month (1-12) a column's name names, as tables write it (Jan, JAN, January, Sept), else None."""
    name = name.strip().lower()
    return next((number for number, month in enumerate(MONTH_NAMES, 1) if name in (month, month[:3])),
                9 if name == "sept" else None)


def reading_settings(imp: dict) -> dict:
    """The ``[import]`` settings that read the rows ``_read_user_csv`` returns: a year-by-month table's rows are
    dated by its date columns (the year's; the year's and the day's) and ``MONTH_OF_ROW`` joined; every other
    layout's as the user's settings say."""
    if imp["temperature_column"] != MONTH_COLUMNS:
        return imp
    return {**imp, "date_column": [*date_columns(imp), MONTH_OF_ROW], "date_format": f"{imp['date_format']} %m"}


def stations_as_rows(table: pd.DataFrame, text: str, imp: dict, path: Path) -> pd.DataFrame:
    """A wide table (``import.temperature_column = "*"``: beside the date's, a column per station, named by its
    header, as many archives' and courses' tables of cities come) as the long form of many stations: a row per
    date and station, the station in ``WIDE_STATION`` and its reading under ``EVERY_COLUMN``. A header that
    names a column twice, or leaves one unnamed that holds values, would hide a station or invent one, and is
    refused; an unnamed column without values (a delimiter ending every line) is no station."""
    dates = date_columns(imp)
    line = text.split("\n", 1)[0].rstrip("\r")
    header = line.split() if imp["delimiter"] == WHITESPACE else \
        next(csv.reader([line], delimiter=separator(imp["delimiter"])), [])
    names = [name.strip() for name in header]
    if len(names) == len(table.columns):  # a delimiter that ends every line leaves a last column, unnamed and empty
        empty = [column for name, column in zip(names, table.columns, strict=True)
                 if not name and not table[column].str.strip().astype(bool).any()]
        names = [name for name, column in zip(names, table.columns, strict=True) if column not in empty]
        table = table.drop(columns=empty)
    for number, name in enumerate(names, 1):
        if not name:
            raise PipelineError(f"{path}: column {number} of the header has no name, and with "
                                f"import.temperature_column = {EVERY_COLUMN!r} every column but the date's is a "
                                "station named by its header: name it, or delete the column")
        if names.index(name) + 1 != number:
            raise PipelineError(f"{path}: the header names {name!r} twice (columns {names.index(name) + 1} and "
                                f"{number}); with import.temperature_column = {EVERY_COLUMN!r} each column is a "
                                "station, and one would hide the other")
    if len(table.columns) == len(dates):
        raise PipelineError(f"{path}: no column but the date's (header is {line[:200]!r}); with "
                            f"import.temperature_column = {EVERY_COLUMN!r} each other column holds a station's "
                            "readings: check import.delimiter, or name the temperature column")
    return table.melt(id_vars=dates, var_name=WIDE_STATION, value_name=EVERY_COLUMN)


def dly_as_csv(text: str, path: Path) -> str:
    """A GHCN-Daily ``.dly`` file's readings as the lines of its by-station CSV file (``ID,YYYYMMDD,ELEMENT,
    VALUE``, no header). A ``.dly`` line is one station, month and element: the ID, year, month and element in
    the first 21 characters, then each of 31 days as a value of 5 characters and 3 flag characters; every day
    of the month is a row, its missing code (-9999) included, and the slots past a shorter month's end none.
    GHCN's flags are not read: the quality control checks every reading itself."""
    if not text.isascii():
        raise PipelineError(f"{path}: text that is not ASCII; not a GHCN-Daily .dly file")
    lines = np.array(text.splitlines())
    lines = lines[np.char.str_len(np.char.rstrip(lines)) > 0]
    if not len(lines):
        raise PipelineError(f"{path}: no lines; not a GHCN-Daily .dly file")
    chars = np.char.ljust(lines, DLY_WIDTH).astype(f"S{DLY_WIDTH}").view("S1").reshape(len(lines), -1)[:, :DLY_WIDTH]

    def field(start: int, width: int) -> np.ndarray:
        return np.ascontiguousarray(chars[:, start:start + width]).view(f"S{width}")[:, 0]

    station, year, month, element = (field(*DLY_FIELDS[name]) for name in DLY_FIELDS)
    dated = np.char.isdigit(year) & np.char.isdigit(month)
    if not dated.all():
        raise PipelineError(f"{path}: line {int(np.flatnonzero(~dated)[0]) + 1} has no year and month in "
                            "characters 12-17; not a GHCN-Daily .dly file")
    values = np.char.strip(np.stack([field(DLY_FIRST_DAY + DLY_DAY_WIDTH * day, DLY_VALUE_WIDTH)
                                     for day in range(31)], axis=1))
    months = np.char.add(np.char.add(year, b"-"), month).astype("U7").astype("datetime64[M]")
    length = ((months + 1).astype("datetime64[D]") - months.astype("datetime64[D]")).astype(int)
    row, day = np.nonzero((np.arange(31) < length[:, None]) & (values != b""))
    days = np.char.zfill(np.arange(1, 32).astype("S2"), 2)
    rows = [station[row], np.char.add(np.char.add(year[row], month[row]), days[day]), element[row],
            values[row, day]]
    joined = rows[0]
    for column in rows[1:]:
        joined = np.char.add(np.char.add(joined, b","), column)
    return b"\n".join(joined).decode("ascii") + "\n"


def elements_as_columns(table: pd.DataFrame, imp: dict, path: Path) -> pd.DataFrame:
    """A file with a row per day and element (``import.element_column`` names the element, ``value_column`` holds
    its value: GHCN-Daily's by-station files) as one with a column per element kept, named as the element, for
    the elements ``import.temperature_column`` names; rows of other elements (rain, snow) are left out. Two
    elements (a day's maximum and minimum) are matched by date (and station): a day with one of them has the
    other empty, a missing value. Rows keep the file's order."""
    element = table[imp["element_column"]].str.strip()
    wanted = temperature_columns(imp)
    keys = [*date_columns(imp), *station_columns(imp)]
    if not element.isin(wanted).any():
        held = ", ".join(map(repr, element.drop_duplicates().head(8)))
        raise PipelineError(f"{path}: no row of element {' nor '.join(map(repr, wanted))} in column "
                            f"{imp['element_column']!r} (import.element_column), which holds {held}: set "
                            "import.temperature_column to the element(s) to read, or move the file out of the "
                            "folder if it holds no temperature")
    row = " row"  # each row's place in the file, under a name no column read from a file has (names are stripped)
    parts = [table[element == name].drop(columns=imp["element_column"]).rename(columns={imp["value_column"]: name})
             .rename_axis(row).reset_index() for name in wanted]
    whole = parts[0]
    for name, part in zip(wanted[1:], parts[1:], strict=True):
        whole = whole.merge(part[[*keys, row, name]], on=keys, how="outer", suffixes=("", " other"))
        whole[row] = whole[[row, row + " other"]].min(axis=1)
        whole = whole.drop(columns=row + " other")
    whole = whole.sort_values(row, kind="stable").drop(columns=row).fillna("").reset_index(drop=True)
    whole.attrs["other_elements"] = int((~element.isin(wanted)).sum())
    return whole


def _parsed(text: str, **options: Any) -> pd.DataFrame:
    """``pd.read_csv`` of ``text``, handed over as UTF-8 bytes: an ``io.StringIO`` holds four bytes a
    character, and for a 176 MB export that copy was most of the stage's 1.1 GB peak."""
    return pd.read_csv(io.BytesIO(text.encode("utf-8")), encoding="utf-8", **options)


def separator(delimiter: str) -> str:
    """``import.delimiter`` as pandas reads it: "whitespace" is any run of spaces and tabs, as older
    archives' fixed-width text files are laid out."""
    return r"\s+" if delimiter == WHITESPACE else delimiter


# The lines git writes around the two versions of a conflicting merge: a file committed with them holds both.
MERGE_CONFLICT = re.compile(r"^(<{7}|={7}|>{7})(?: .*)?$", re.MULTILINE)


def _refuse_merge_conflict(text: str, path: Path) -> None:
    """Stop on a file that holds an unresolved git merge conflict (a course repository ships one): its rows are
    two versions of the same days, and which one is right only its owner can say."""
    if "<<<<<<<" not in text and ">>>>>>>" not in text:
        return
    found = MERGE_CONFLICT.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise PipelineError(f"{path}: line {line} is {found.group(1)!r}, a git merge conflict's marker: the file "
                            "holds two versions of the lines in conflict; resolve the conflict (keep one version, "
                            "delete the marker lines) and run again")


def named_columns(imp: dict) -> dict[str, str]:
    """Every column ``[import]`` names, and the parameter that names it. Names that are all positions ("#1",
    "#2") are a file without a header line, as some archives' bulk files are."""
    readings = {imp["element_column"]: "element_column", imp["value_column"]: "value_column"} \
        if imp["element_column"] else {} if imp["temperature_column"] in (EVERY_COLUMN, MONTH_COLUMNS) \
        else dict.fromkeys(temperature_columns(imp), "temperature_column")
    return ({name: "date_column" for name in date_columns(imp)} | readings
            | dict.fromkeys(station_columns(imp), "station_column"))


def _index_named(text: str, imp: dict, path: Path) -> str:
    """``text`` with its header's first field named as ``import.date_column`` where pandas left it empty (a table
    written with its dates as the index: ``,temperature`` or ``,Vancouver,Portland``) and no field has that name."""
    dates = date_columns(imp)
    if imp["delimiter"] == WHITESPACE or len(dates) != 1 or not text.startswith(separator(imp["delimiter"])):
        return text
    header = text.split("\n", 1)[0].rstrip("\r")
    if dates[0].lower() in {field.strip().strip('"').lower() for field in _fields(header, imp["delimiter"])}:
        return text  # named there (in another case, which the message about the missing column points out)
    log.info("%s: its first column, unnamed in the header, read as the date column %r (as pandas writes a table's "
             "index)", path.name, dates[0])
    return dates[0] + text


def _from_header(text: str, wanted: set[str], delimiter: str) -> tuple[str, int]:
    """The text from its header on, and how many lines came before it. Some archives (ECA&D among them) open
    their files with lines of licence and notes: the header is then the first of the first
    ``PREAMBLE_LINES`` lines that names every column ``wanted``."""
    return _from_first_line(text, lambda line: wanted <= {field.strip().strip('"')
                                                          for field in _fields(line, delimiter)})


def _from_first_reading(text: str, imp: dict) -> tuple[str, int]:
    """A file without a header from its first reading on, and how many lines came before it. Some archives
    (the Japan Meteorological Agency's downloads among them) open their files with the time of the download, the
    station's name and lines of column titles, none of which hold a date: the readings begin at the first of the
    first ``PREAMBLE_LINES`` lines whose date column(s) read under ``date_format``; the file as it is where
    none does (its first line then stops the stage, or counts as a bad date)."""
    positions = [int(name[1:]) - 1 for name in date_columns(imp)]

    def dated(line: str) -> bool:
        fields = _fields(line, imp["delimiter"])
        if not line.strip() or max(positions) >= len(fields):
            return False
        written = " ".join(fields[i].strip().strip('"') for i in positions)
        return bool(parse_stamps(pd.Series([written]), imp["date_format"]).notna().iat[0])

    return _from_first_line(text, dated)


def _from_first_line(text: str, wanted: Callable[[str], bool]) -> tuple[str, int]:
    """The text from the first of its first ``PREAMBLE_LINES`` lines that is ``wanted`` on, and how many lines
    came before it; the whole text and 0 where none is."""
    start = 0
    for number in range(PREAMBLE_LINES):
        end = text.find("\n", start)
        if wanted((text[start:] if end < 0 else text[start:end]).rstrip("\r")):
            return (text[start:], number) if number else (text, 0)
        if end < 0:
            break
        start = end + 1
    return text, 0


def _positions_read(text: str, named: dict[str, str], delimiter: str) -> list[int]:
    """The columns (from 0) a file without a header is read for: those named by position that its first line
    has. Only those: a word after some lines' values (the Met Office's "Provisional") is then no reason to
    refuse the file."""
    width = len(_fields(text.split("\n", 1)[0].rstrip("\r"), delimiter))
    return sorted({int(name[1:]) - 1 for name in named if int(name[1:]) <= width})


def _fields(line: str, delimiter: str) -> list[str]:
    return line.split() if delimiter == WHITESPACE else line.split(delimiter)


def _describe(report: dict) -> str:
    def example(reason: str) -> str:  # the impossible ones are shown by the warning of many
        return f" (e.g. {report['not_a_number_example']!r})" if reason == "not_a_number" else ""

    parts = [f"{report[reason]} {reason.replace('_', ' ')}{example(reason)}" for reason in DROP_REASONS
             if report.get(reason)]
    if report.get("marked"):
        parts.append(f"{report['marked']} values read without the mark or unit after them "
                     f"(e.g. {report['marked_example']!r})")
    if report.get("repeated_rows"):
        parts.append(f"{report['repeated_rows']} repeated rows merged")
    if report.get("within_days"):
        parts.append(f"readings at several times of a day made into daily values ({report['within_days']} "
                     "combined)")
    if report.get("out_of_order"):
        parts.append("dates out of order (sorted)")
    if report.get("encoding") == "latin-1":
        parts.append(LATIN1_READ)
    if report.get("preamble"):
        parts.append(f"{report['preamble']} lines before the header skipped")
    if report.get("notes"):
        parts.append(f"{report['notes']} lines before the first reading skipped")
    if report.get("repeated_header"):
        parts.append(f"{report['repeated_header']} repeated header line(s) skipped (files joined together)")
    if report.get("other_elements"):
        parts.append(f"{report['other_elements']} rows of other elements not read")
    return ", ".join(parts) or "nothing dropped"


def split_in_time(stations: dict[str, pd.DataFrame], test_steps: int, holdout_stations: int,
                  frequency: str = "daily") -> tuple[dict[str, dict[str, pd.DataFrame]], pd.Timestamp]:
    """Train and test part of each station, by the simulation's rules, and the first test step.

    The last ``test_steps`` steps (days or months) of the whole record are the
    test period for every station (one cut for all, so no station trains on
    steps another is tested on); the last ``holdout_stations`` stations by name
    go wholly to test.
    """
    last = max(table["date"].max() for table in stations.values())
    cutoff = pd.date_range(end=last, periods=test_steps, freq=FREQUENCIES[frequency])[0]
    names = sorted(stations)
    holdout = set(names[len(names) - holdout_stations:]) if holdout_stations else set()
    parts = {}
    for name in names:
        table = stations[name]
        in_test = (table["date"] >= cutoff) | (name in holdout)
        parts[name] = {"train": table[~in_test], "test": table[in_test]}
    if all(part["train"].empty for part in parts.values()):
        raise PipelineError(f"no station has readings before {cutoff.date()}, the start of the last "
                            f"data.test_steps = {test_steps} steps; lower data.test_steps")
    return parts, cutoff


def import_stations(folder: Path, data: dict, imp: dict, pre: dict, pool: compute.Pool | None = None,
                    skip: Callable[[Path], bool] | None = None) -> tuple[dict, dict, str]:
    """Read, clean and split every <station>.csv (or .csv.gz) in ``folder``, or the one file it is (read on
    ``pool``); returns the parts, a report and the first test day. ``skip``: see ``source_files``."""
    files = source_files(folder, skip)
    storage.note_read(files)  # the record of what was read must not take a file written since for it
    if not files:
        others = sorted({path.suffix.lower() or path.name for path in folder.iterdir() if path.is_file()})
        inside = sorted(path.name for path in folder.iterdir() if path.is_dir())
        if inside and not others:
            raise PipelineError(f"{folder}: the data.source folder holds folders only ({', '.join(inside[:3])}"
                                f"{', ...' if len(inside) > 3 else ''}), and none of them holds station files "
                                "(<station>.csv, .csv.gz or .dly; folders a level deeper are not read): point "
                                "data.source at the folder that holds them")
        packed = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in (".zip", ".tar", ".7z"))
        if packed and set(others) <= {".zip", ".tar", ".7z", ".txt", ".pdf", ".md"}:
            raise PipelineError(f"{folder}: no .csv files in the data.source folder, but archives "
                                f"({', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}): unpack them (unzip, "
                                "tar -xf) and point data.source at the folder of station files they hold")
        held = f" (it holds {', '.join(others[:5])} files)" if others else " (it is empty)"
        raise PipelineError(f"{folder}: no .csv files in the data.source folder{held}; readings are read from "
                            "tables in .csv files, or .csv.gz as archives compress them (import.delimiter: ',', "
                            "';', tab, '|' or whitespace; without a header line, columns named by position, "
                            "\"#1\"), and from GHCN-Daily's .dly files: rename text tables to <station>.csv "
                            "(<station>.csv.gz), convert anything else")
    in_folders = folder.is_dir() and any(path.parent != folder for path in files)  # a folder of folders
    if folder.is_dir() and not in_folders:
        _warn_unread_folders(folder, skip)
    if imp["station_column"] or imp["temperature_column"] == EVERY_COLUMN or in_folders:
        return _report_and_split(read_long_form(files, imp, pre, folder), data, folder, pre["min_steps"],
                                 imp["unit"])
    if pool is None or not pool.cluster:
        pool = runtime.Threads(runtime.work_threads(-(-len(files) // FILES_PER_CHUNK)))
    read = pool.map(read_user_stations, runtime.chunks(files, FILES_PER_CHUNK), what="station files read (chunks)",
                    imp=imp, min_temp=pre["min_temp"], max_temp=pre["max_temp"])
    stations = {storage.station_name(path): one
                for path, one in zip(files, (one for chunk in read for one in chunk), strict=True)}
    return _report_and_split(stations, data, folder, pre["min_steps"], imp["unit"])


def _warn_unread_folders(folder: Path, skip: Callable[[Path], bool] | None) -> None:
    """A warning naming the folders inside ``folder`` that hold station files, which are not read where
    ``folder`` holds station files of its own (``source_files``): files a user put there would be left out
    unsaid."""
    unread = [inside for inside in station_folders(folder) if not (skip and skip(inside))
              and any(storage.holds_a_table(inside / name, as_shipped=True) for name in storage.listing(inside))]
    if unread:
        log.warning("%s: the station files in %d folder(s) inside data.source are not read (%s%s), only those of "
                    "the folder itself; a folder of folders is read only where it holds no station files of its "
                    "own", folder, len(unread), ", ".join(f"{inside.name}/" for inside in unread[:3]),
                    ", ..." if len(unread) > 3 else "")


def source_files(source: Path, skip: Callable[[Path], bool] | None = None) -> list[Path]:
    """The station files ``data.source`` names: those of its folder but the station list, or the one file it
    names (a single station's, or many stations' in long form); where the folder holds none, those of each
    folder in it for which ``skip`` is not true (the pipeline's own, where the folder is the project's)."""
    if source.is_file():
        if source.name.lower() == STATION_LIST:
            raise PipelineError(f"{source}: data.source names the station list, which is never a station; point "
                                "it at the folder that holds the list and the station files")
        if not storage.holds_a_table(source, as_shipped=True):
            raise PipelineError(f"{source}: data.source names a file that is not a station table (<station>.csv, "
                                ".csv.gz or .dly); rename a text table to .csv, or point data.source at its folder")
        return [source]
    if not source.is_dir():
        raise PipelineError(f"{source}: data.source not found (a folder of station files, or one file)")
    files = [path for path in storage.station_files(source, as_shipped=True) if path.name.lower() != STATION_LIST]
    # Archives that grow by the year ship a folder a year, each with a file per station (NOAA's GSOD:
    # 1995/72530094846.csv, 1996/72530094846.csv, ...): read as one folder, a station's files joined.
    return files or [path for folder in station_folders(source) if not (skip and skip(folder))
                     for path in storage.station_files(folder, as_shipped=True) if path.name.lower() != STATION_LIST]


def station_folders(source: Path) -> list[Path]:
    """The folders inside ``source`` (not hidden), sorted: where its station files are when it holds none
    itself (``source_files``)."""
    return [source / name for name in storage.listing(source) if (source / name).is_dir()]


def file_label(path: Path, source: Path) -> str:
    """A station file's name as the report gives it: with its folder's when it is in one inside ``source``."""
    return path.name if source in (path, path.parent) else f"{path.parent.name}/{path.name}"


def read_long_form(files: list[Path], imp: dict, pre: dict, source: Path) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Files that hold many stations each, a station per value of ``import.station_column`` (as archives'
    exports come) or per column (a wide table: ``stations_as_rows``), or files of the folders inside
    ``source`` with a station's years in files of its name (``source_files``): each station's rows, from every
    file, cleaned as one station's file is."""
    wide = imp["temperature_column"] == EVERY_COLUMN
    columns = [WIDE_STATION] if wide else station_columns(imp)
    rows, encodings = {}, {}
    named_by = "the header's column" if wide else f"column {columns[0]!r}" if len(columns) == 1 \
        else f"columns {', '.join(map(repr, columns))} joined"
    for path in files:
        table = _read_user_csv(path, imp)
        label = file_label(path, source)
        skipped = {key: table.attrs.get(key, 0)  # the file's lines, no station's
                   for key in ("preamble", "notes", "repeated_header", "other_elements")}
        if any(skipped.values()):
            log.info("%s: %s", label, _describe(skipped))
        encodings[path] = table.attrs["encoding"]
        if not columns:  # a station per file, its name the file's
            rows.setdefault(storage.station_name(path), []).append((path, table))
            continue
        named = table[columns[0]].str.strip()
        if len(columns) > 1:  # joined by a space, an empty one (a state only American cities have) left out
            named = named.str.cat([table[column].str.strip() for column in columns[1:]], sep=" ") \
                .str.replace(r"\s+", " ", regex=True).str.strip()
        for name, part in table.groupby(named, sort=True):
            if not name or len(name.encode()) > storage.MAX_NAME_BYTES or name.startswith(".") \
                    or not re.fullmatch(r"[^/\\\x00-\x1f\x7f]+", name):
                raise PipelineError(f"{path}: station {name[:60]!r} in {named_by} cannot name a station "
                                    f"(empty, over {storage.MAX_NAME_BYTES} bytes, a leading dot, a slash or a "
                                    "control character such as a line break)")
            rows.setdefault(name, []).append((path, part))
    seen: dict[str, str] = {}
    for name in rows:
        other = seen.setdefault(storage.name_key(name), name)
        if other != name:
            named_in = "the header" if wide else "import.station_column" if columns else \
                f"the file names {file_label(rows[other][0][0], source)} and {file_label(rows[name][0][0], source)}"
            way_out = "" if wide or columns else ": rename one (to the other's name, if they are one station)"
            raise PipelineError(f"station {name!r} differs from {other!r} only in case or in how an accent is "
                                f"encoded ({named_in}); one would hide the other{way_out}")
    stations, without = {}, []
    for name, parts in rows.items():
        first = parts[0][0]  # errors name the station in its (first) file
        whole = pd.concat([part for _, part in parts], ignore_index=True)
        written = _readings_as_written(whole, imp)
        _, missing, code, _ = written
        if (missing | code).all():  # no reading in any row: empty, a "no reading" marker or a declared code
            without.append(name)  # an export's stations that measure other things (rain, snow) only
            continue
        # The files' repeated headers were reported with the files, not with a station's rows.
        read_in = {encodings[path] for path, _ in parts}
        whole.attrs = {"encoding": "latin-1" if "latin-1" in read_in else read_in.pop()}
        where = first.with_name(f"{first.name} [station {name}]")
        table, counts = clean_readings(whole, where, reading_settings(imp), pre["min_temp"], pre["max_temp"], written)
        coordinates = row_coordinates(whole, where)
        stations[name] = table, {**counts, "file": file_label(first, source),
                                 "files": [file_label(path, source) for path, _ in parts],
                                 **({"coordinates": coordinates} if coordinates else {})}
    if without:
        read_from = "its column" if wide else f"column {imp['temperature_column']!r}"
        if not stations:
            raise PipelineError(f"{source}: no station has a reading in {read_from} "
                                "(import.temperature_column); every value is empty or a declared missing code")
        log.warning("%d station(s) left out, with no reading in %s (every value empty or a declared missing "
                    "code: stations that measure other things), e.g. %s", len(without), read_from,
                    ", ".join(without[:3]))
    return stations


def _readings_as_written(table: pd.DataFrame, imp: dict) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    """A table's readings (``import.temperature_column``; the mean of the two where it names a day's maximum and
    minimum) as numbers in the file's unit (NaN where not a number), where it says "no reading" (empty,
    ``MISSING_MARKERS``; either column, for two), where it holds a declared missing code (either column) and
    where a value was read without a mark after it (``VALUE_MARKS``; either column). A decimal comma ("12,5", as
    European archives write it) is a point where the comma is not the delimiter, and the minus sign of typeset
    tables (U+2212) a minus."""
    columns = [_column_as_written(table[name], imp) for name in temperature_columns(imp)]
    if len(columns) == 1:
        return columns[0]
    (high, high_missing, high_code, high_marked), (low, low_missing, low_code, low_marked) = columns
    return (high + low) / 2, high_missing | low_missing, high_code | low_code, high_marked | low_marked


def _column_as_written(column: pd.Series, imp: dict) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    text = column.str.strip()
    if imp["delimiter"] != ",":
        text = text.str.replace(",", ".", regex=False)
    missing = text.str.lower().isin(MISSING_MARKERS)
    values = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)  # whole degrees too
    # The minus sign of typeset tables (U+2212, as web pages and word processors write it) is a minus, and a
    # value may carry a mark after it; looked for only in what did not read as a number, few values or none.
    retry = np.flatnonzero((values.isna() & ~missing & text.notna()).to_numpy())
    marked = np.zeros(len(text), dtype=bool)
    if len(retry):
        typeset = text.iloc[retry].str.replace("\u2212", "-", regex=False)
        read = np.array(pd.to_numeric(typeset, errors="coerce"), dtype=float)  # a copy: it is written to
        unmarked = typeset.str.rstrip(VALUE_MARKS)
        if imp["unit"] in WRITTEN_AFTER:  # "12.5 °C" where import.unit = "C" is the reading 12.5
            unmarked = unmarked.str.replace(f"(?i){WRITTEN_AFTER[imp['unit']]}$", "", regex=True)
        again = np.isnan(read) & (unmarked != typeset).to_numpy()
        read[again] = pd.to_numeric(unmarked[again], errors="coerce")
        marked[retry[again]] = ~np.isnan(read[again])
        values = values.copy()
        values.iloc[retry] = read
    # A declared code is compared as written, before any conversion: -99 in a °F file is -99, not -72.8.
    return (values, missing, values.isin([float(value) for value in imp["missing_values"]]),
            pd.Series(marked, index=text.index))


def row_coordinates(table: pd.DataFrame, where: Path) -> dict[str, float]:
    """A station's coordinates from the latitude, longitude and (optional) elevation columns its rows carry, as
    NOAA's exports do (any case, any of ``STATION_LIST_NAMES``), the most frequent value of each; {} without
    latitude and longitude columns."""
    lowered = {str(column).strip().lower(): column for column in table.columns}
    columns = {key: next((lowered[name] for name in STATION_LIST_NAMES[key] if name in lowered), None)
               for key in COORDINATE_LIMITS}
    if columns["latitude"] is None or columns["longitude"] is None:
        return {}
    found = {}
    for key, limit in COORDINATE_LIMITS.items():
        if columns[key] is None:
            continue
        text = table[columns[key]].astype(str).str.strip()
        text = text[text != ""]
        values = coordinate_values(text, key)
        bad = values.isna() | (values > limit if key == "elevation" else values.abs() > limit)
        if bad.any():
            raise PipelineError(f"{where}: {key} {text[bad].iat[0]!r} is not {_coordinate(key)}")
        if key == "elevation":
            values = unknown_elevations(values, where)
        if values.notna().any():
            found[key] = float(values.mode().iat[0])
    return found if {"latitude", "longitude"} <= set(found) else {}  # half a position is none


# A position in degrees as lists write it besides decimals: "+51:28:39" (ECA&D's station list), 51°28'39"N,
# "51 28.6 N", "0.45W": an optional hemisphere or sign, degrees, then optional minutes and seconds.
DEGREES = re.compile(r"^([NSEW])?\s*([+-])?\s*(\d+(?:\.\d+)?)\s*[:°º]?\s*"  # hemisphere, sign, degrees
                     r"(?:(\d+(?:\.\d+)?)\s*[:'\u2032]?\s*)?"  # minutes (' or the prime sign)
                     r'(?:(\d+(?:\.\d+)?)\s*["\u2033]?\s*)?([NSEW])?$', re.IGNORECASE)  # seconds, hemisphere


def coordinate_values(text: pd.Series, key: str) -> pd.Series:
    """A column of coordinates as numbers (NaN where one does not read): decimal degrees, or for latitude and
    longitude also degrees, minutes and seconds with a sign or a hemisphere (``DEGREES``); south and west are
    negative."""
    values = pd.to_numeric(text, errors="coerce").astype(float)
    retry = values.isna() & (text.str.strip() != "")
    if key == "elevation" or not retry.any():
        return values
    parts = text[retry].str.strip().str.extract(DEGREES)
    degrees = parts[2].astype(float) + parts[3].astype(float).fillna(0) / 60 + parts[4].astype(float).fillna(0) / 3600
    hemisphere = parts[0].fillna(parts[5]).str.upper()
    west_or_south = hemisphere.isin(["S", "W"]) | (parts[1] == "-")
    wrong_axis = hemisphere.isin(["E", "W"] if key == "latitude" else ["N", "S"])
    values[retry] = degrees.where(~west_or_south, -degrees).mask(wrong_axis | (parts[0].notna() & parts[5].notna()))
    return values


def _coordinate(key: str) -> str:
    limit = COORDINATE_LIMITS[key]
    return f"a number of metres up to {limit:g}" if key == "elevation" else f"a number within ±{limit:g}"


def unknown_elevations(values: pd.Series, where: Path | str, stations: pd.Series | None = None) -> pd.Series:
    """``values`` with those below ``LOWEST_ELEVATION`` (codes for unknown) read as unknown, with a warning."""
    coded = values < LOWEST_ELEVATION
    if coded.any():
        more = f" and {coded.sum() - 1} more" if coded.sum() > 1 else ""
        whose = f" (station {stations[coded].iat[0]!r}{more})" if stations is not None else ""
        log.warning("%s: elevation %g%s is below any land (%g m): read as unknown", getattr(where, "name", where),
                    values[coded].iat[0], whose, LOWEST_ELEVATION)
    return values.mask(coded)


def log_many_impossible(reports: dict[str, dict], unit: str) -> None:
    """One warning for the files (``reports``: import reports by label) with at least ``IMPOSSIBLE_SHARE`` of their
    rows outside [min_temp, max_temp], naming the first few with a value as written."""
    many = {label: counts for label, counts in reports.items()
            if counts["impossible"] >= max(1, IMPOSSIBLE_SHARE * counts["rows"])}
    if not many:
        return
    named = [f"{label}: {counts['impossible']} of {counts['rows']} rows, e.g. {counts['impossible_example']!r}"
             for label, counts in list(many.items())[:3]]
    log.warning("%d file(s) with many readings outside preprocessing's [min_temp, max_temp], read as unit %r (%s%s): "
                "if they are readings, import.unit is probably wrong (°F or kelvins read as °C?); if the value marks "
                "missing days, declare it in [import] missing_values", len(many), unit, "; ".join(named),
                "; ..." if len(many) > 3 else "")


def _report_and_split(read: dict[str, tuple[pd.DataFrame, dict]], data: dict, folder: Path, min_steps: int,
                      unit: str) -> tuple[dict, dict, str]:
    """The parts, report and first test day of the stations read (``import_stations``; their ``unit``), without
    those with fewer than ``min_steps`` readings (too few to build features from; one would stop the run)."""
    labels = {name: _station_label(name, counts.get("files", [counts["file"]])) for name, (_, counts) in read.items()}
    for name, (_, counts) in read.items():
        # Dates from the future or before any record are typos worth a look, not just dropped rows.
        level = logging.WARNING if counts["future_date"] or counts["ancient_date"] \
            or counts["encoding"] == "latin-1" else logging.INFO
        log.log(level, "%s: %d of %d rows kept; %s", labels[name], counts["kept"], counts["rows"], _describe(counts))
    log_many_impossible({labels[name]: counts for name, (_, counts) in read.items()}, unit)
    short = {name: counts["kept"] for name, (_, counts) in read.items() if counts["kept"] < min_steps}
    if len(short) == len(read):
        raise PipelineError(f"{folder}: no station has the preprocessing.min_steps = {min_steps} readings the "
                            f"features need (the most: {max(short.values())}); add history, or lower min_steps "
                            "only if the records really are that short")
    if short:
        log.warning("%d station(s) left out, with fewer than preprocessing.min_steps = %d readings (too few to build "
                    "features from): %s", len(short), min_steps,
                    ", ".join(f"{name} ({kept})" for name, kept in list(short.items())[:5]))
        read = {name: one for name, one in read.items() if name not in short}
    if data["holdout_stations"] >= len(read):
        raise PipelineError(f"data.holdout_stations = {data['holdout_stations']} leaves no station to train on "
                            f"({len(read)} station(s) in {folder}); set it to 0 for a single station")
    stations, report = {}, {}
    for name, (table, counts) in read.items():
        stations[name], report[name] = table, counts
    frequency = common_frequency(report, data["frequency"], folder)
    first, last = min(t["date"].iat[0] for t in stations.values()), max(t["date"].iat[-1] for t in stations.values())
    runtime.check_memory(len(stations) * len(pd.date_range(first, last, freq=FREQUENCIES[frequency])),
                     f"{len(stations)} stations from {first.date()} to {last.date()} in {folder}")
    for entry in report.values():  # a one-reading file takes the step of the others
        entry["frequency"] = frequency
    parts, cutoff = split_in_time(stations, data["test_steps"], data["holdout_stations"], frequency)
    for name, part in parts.items():
        report[name].update(train_steps=len(part["train"]), test_steps=len(part["test"]))
    return parts, report, str(cutoff.date())


def _station_label(name: str, files: list[str]) -> str:
    """How the log names a station: by its file, or with its files (the first and last of many)."""
    if len(files) == 1 and storage.station_name(Path(files[0])) == name:
        return files[0]
    return f"{name} ({', '.join(files) if len(files) <= 3 else f'{len(files)} files, {files[0]} to {files[-1]}'})"


def read_user_stations(paths: list[Path], imp: dict, min_temp: float, max_temp: float) -> list[tuple]:
    """``read_user_station`` of each file."""
    return [read_user_station(path, imp, min_temp, max_temp) for path in paths]


def common_frequency(report: dict[str, dict], wanted: str, folder: Path) -> str:
    """The one frequency of all files (as ``data.frequency`` asks, unless "auto"), or PipelineError."""
    found = {name: entry["frequency"] for name, entry in report.items() if entry["frequency"] != "unknown"}
    kinds = sorted(set(found.values())) or [wanted if wanted != "auto" else "daily"]
    if len(kinds) > 1:
        example = {kind: next(name for name, f in found.items() if f == kind) for kind in kinds}
        raise PipelineError(f"{folder}: mixed frequencies: {example['daily']}.csv is daily, "
                            f"{example['monthly']}.csv is monthly; one frequency per run")
    if wanted != "auto" and found and kinds[0] != wanted:
        name = next(iter(found))
        raise PipelineError(f"{folder / (name + '.csv')}: readings are {kinds[0]}, but data.frequency is {wanted!r}")
    return kinds[0]


def write_imported_files(staging: Path, parts: dict[str, dict[str, pd.DataFrame]]) -> None:
    for station, split in parts.items():
        for folder, table in split.items():
            if len(table):
                storage.write_csv(staging / folder / f"{station}.csv", table, fixed={"temperature": 2}, staged=True)


def read_station_list(path: Path, delimiter: str, stations: set[str], station_column: str = "") -> pd.DataFrame:
    """The station list's coordinates of every imported station (empty where the list has none), or
    PipelineError naming the file and the problem. Its columns go by any of ``STATION_LIST_NAMES`` (the
    station's also by ``station_column``, the name the station files give it)."""
    text, encoding = storage.read_archive_text(path, delimiter)
    if encoding == "latin-1":
        log.warning("%s: %s", path.name, LATIN1_READ)
    own = [station_column.strip().lower()] if station_column.strip() else []
    names = {**STATION_LIST_NAMES, "station": (*own, *STATION_LIST_NAMES["station"])}

    def found_in(columns: list[str]) -> dict[str, str | None]:  # each column's name in the list, or None
        return {column: next((name for name in names[column] if name in columns), None) for column in names}

    # A list saved by hand (a spreadsheet's ";" export beside ","-separated station files) is read with the
    # delimiter its header is written with.
    header = text.lstrip().split("\n", 1)[0]

    def names_a_list(other: str) -> bool:
        fields = [field.strip().strip('"').lower() for field in (header.split() if other == WHITESPACE
                                                                 else header.split(other))]
        found = found_in(fields)
        return all(found[column] or (column == "station" and not fields[0]) for column in STATION_LIST_COLUMNS)

    written = next((other for other in dict.fromkeys([delimiter, ",", ";", "\t", "|"]) if names_a_list(other)),
                   delimiter)
    if written != delimiter:
        log.info("%s: read with the delimiter %r its header is written with", path.name, written)
        delimiter = written
    try:
        table = _parsed(text, sep=separator(delimiter), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: malformed station list ({str(exc).strip()})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    found = found_in(list(table.columns))
    # A list pandas wrote with the stations as its index leaves their column unnamed ("unnamed: 0" once read).
    if found["station"] is None and table.columns[0].startswith("unnamed: "):
        table = table.rename(columns={table.columns[0]: "station"})
        found["station"] = "station"
        log.info("%s: read its first column, which the header leaves unnamed, as the station", path.name)
    missing = [c for c in STATION_LIST_COLUMNS if found[c] is None]
    if missing:
        raise PipelineError(f"{path}: the station list has no column {missing[0]!r} (any of "
                            f"{', '.join(map(repr, names[missing[0]]))}; it needs "
                            f"{', '.join(STATION_LIST_COLUMNS)}, optionally elevation); a file named {STATION_LIST} "
                            "in data.source is read as the station list, never as a station")
    renamed = {name: column for column, name in found.items() if name not in (None, column)}
    if renamed:
        log.info("%s: read %s", path.name, ", ".join(f"{name!r} as {column}" for name, column in renamed.items()))
    table = table.rename(columns=renamed)
    if table.empty:
        raise PipelineError(f"{path}: the station list lists no station (a header only); add a row per station "
                            f"({', '.join(STATION_LIST_COLUMNS)}) or remove the file")
    columns = [c for c in [*STATION_LIST_COLUMNS, "elevation"] if c in table.columns]
    table = table[columns].astype(object).apply(lambda column: column.str.strip())
    # Names are matched whatever their case or Unicode form (station names may not differ only so): a list that
    # writes "Helsinki" names the station of HELSINKI.csv.
    imported = {storage.name_key(name): name for name in stations}
    table["station"] = table["station"].map(lambda name: imported.get(storage.name_key(name), name))
    repeated = table["station"][table["station"].map(storage.name_key).duplicated()]
    if len(repeated):
        raise PipelineError(f"{path}: station {repeated.iat[0]!r} is listed twice")
    # An empty cell is unknown: an elevation, or a station's whole position (it is then one without
    # coordinates); half a position is a mistake.
    unknown = table[columns[1:]] == ""
    half = unknown["latitude"] != unknown["longitude"]
    if half.any():
        raise PipelineError(f"{path}: station {table['station'][half].iat[0]!r} has a latitude or a longitude "
                            "but not both")
    numbers = pd.DataFrame({column: coordinate_values(table[column], column) for column in columns[1:]})
    if "elevation" in numbers:
        coded = numbers["elevation"] < LOWEST_ELEVATION
        numbers["elevation"] = unknown_elevations(numbers["elevation"], path, table["station"])
        unknown["elevation"] |= coded
    for column in columns[1:]:
        bad = (numbers[column].isna() & ~unknown[column]) | (numbers[column].abs() > COORDINATE_LIMITS[column])
        if bad.any():
            raise PipelineError(f"{path}: station {table['station'][bad].iat[0]!r}: {column} "
                                f"{table[column][bad].iat[0]!r} is not {_coordinate(column)}")
    numbers.insert(0, "station", table["station"])
    numbers = numbers[~unknown["latitude"]]
    unlisted = sorted(stations - set(numbers["station"]))
    if unlisted:
        log.warning("%s: no coordinates for %d station(s), e.g. %s", path.name, len(unlisted), unlisted[0])
    return pd.DataFrame({"station": sorted(stations)}).merge(numbers, on="station", how="left")
