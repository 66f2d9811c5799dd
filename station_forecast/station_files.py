"""The one reader and validator of the station files the stages read (``date,temperature``, one file per
station, as data_creation.py writes them into data/train/raw and data/test/raw).

Files as the pipeline writes them are parsed together by pyarrow in one pass;
any file that fast path does not fully accept (another header, blanks, a bad
line, a duplicate date, an impossible value) is read again the careful way,
which names the file, the line and the problem. A user's own files in other
formats are converted into these by data_creation.py's import.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

from station_forecast.errors import PipelineError
from station_forecast.runtime import lazy_import, log
from station_forecast.storage import read_text_file

np = lazy_import("numpy")
pd = lazy_import("pandas")

FILES_PER_CHUNK = 50  # station files one task reads and checks (the stages' own, and a user's on import)

RAW_COLUMNS = ["date", "temperature"]
CLEAN_HEADER = "date,temperature\n"  # the header of the station files the pipeline writes


def read_station_csv(path: Path, min_temp: float, max_temp: float) -> pd.DataFrame:
    """Read one raw station file, or raise PipelineError naming the file, line and problem.

    An empty temperature field is a missing reading; anything else must be a
    finite number in [min_temp, max_temp]. Dates must be unique YYYY-MM-DD days.
    """
    text = read_text_file(path)
    clean = _read_clean_station_csv(text, min_temp, max_temp)
    if clean is None:
        return _read_station_text(path, text, min_temp, max_temp)
    return pd.DataFrame({"date": clean[0], "temperature": clean[1]})


def _read_station_text(path: Path, text: str, min_temp: float, max_temp: float) -> pd.DataFrame:
    """``read_station_csv`` the careful way, which names the line and the problem."""
    header = text.splitlines()[0].strip()
    columns = [c.strip() for c in header.split(",")]
    if any(sep in header for sep in (";", "\t", "|")) and len(columns) == 1:
        raise PipelineError(f"{path}: wrong delimiter in header {header!r}; fields must be separated by commas")
    for column in RAW_COLUMNS:
        if column not in columns:
            raise PipelineError(f"{path}: missing column {column!r} (header is {header!r})")
    extra = [c for c in columns if c not in RAW_COLUMNS]
    if extra:
        log.warning("%s: ignoring unexpected column(s) %s", path, ", ".join(map(repr, extra)))
    if not text.endswith("\n"):
        raise PipelineError(f"{path}: last line has no line ending; the file looks truncated")
    separators = pd.Series(text.splitlines()).str.count(",")
    short = ((separators < separators.iat[0]) & (separators.index > 0)).to_numpy()
    if short.any():
        raise PipelineError(f"{path}: line {short.argmax() + 1} has too few fields; the file looks truncated")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: malformed CSV ({str(exc).strip()})") from None
    if table.empty:
        raise PipelineError(f"{path}: header only, no data rows")
    line = pd.RangeIndex(2, len(table) + 2)  # line 1 is the header
    return pd.DataFrame({
        "date": _parse_dates(path, table["date"], line),
        "temperature": _parse_temperatures(path, table["temperature"], line, min_temp, max_temp),
    }).sort_values("date", ignore_index=True)


def _read_clean_station_csv(text: str, min_temp: float, max_temp: float) -> tuple[np.ndarray, np.ndarray] | None:
    """A file as the pipeline writes it, parsed by pyarrow in one pass: its dates, in order, and readings;
    None if anything about it is off.

    Files the pipeline wrote are read several times faster this way; any file
    this fast path does not fully accept (another header, blanks, a bad line,
    a duplicate date, an impossible value) is read again by the careful path,
    which names the line and the problem.
    """
    if not text.startswith(CLEAN_HEADER) or not text.endswith("\n"):
        return None
    table = _parse_clean_rows(text[len(CLEAN_HEADER):])
    return None if table is None else _clean_station_rows(*table, min_temp, max_temp)


def _read_clean_station_csvs(texts: list[str], min_temp: float, max_temp: float
                             ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """``_read_clean_station_csv`` of several files' texts, the rows of all of them parsed in one pass (a
    station file's own parse costs more than its rows); a file that would need a parse of its own (a quote
    or a blank line, which would move the rows apart) or that breaks the common parse gets it."""
    together = [text.startswith(CLEAN_HEADER) and text.endswith("\n") and '"' not in text and "\n\n" not in text
                for text in texts]
    bodies = [text[len(CLEAN_HEADER):] for text, joined in zip(texts, together, strict=True) if joined]
    rows = np.array([body.count("\n") for body in bodies], dtype=int)
    parsed = _parse_clean_rows("".join(bodies)) if bodies else None
    if parsed is not None and len(parsed[0]) != rows.sum():
        parsed = None
    if parsed is None:  # one of them is off: each file on its own, to find which
        return [_read_clean_station_csv(text, min_temp, max_temp) for text in texts]
    starts = np.concatenate([[0], np.cumsum(rows)])
    pieces = itertools.pairwise(starts)
    tables = []
    for text, joined in zip(texts, together, strict=True):
        if not joined:
            tables.append(_read_clean_station_csv(text, min_temp, max_temp))
            continue
        begin, end = next(pieces)
        tables.append(_clean_station_rows(*(column[begin:end] for column in parsed), min_temp, max_temp))
    return tables


def _parse_clean_rows(body: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The dates, readings and which readings are empty, of header-less ``date,temperature`` rows, or None
    where pyarrow does not accept them all."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        table = pa_csv.read_csv(
            io.BytesIO(body.encode()),
            read_options=pa_csv.ReadOptions(column_names=RAW_COLUMNS, use_threads=False),
            convert_options=pa_csv.ConvertOptions(column_types={"date": pa.date32(), "temperature": pa.float64()},
                                                  null_values=[""], strings_can_be_null=False,
                                                  quoted_strings_can_be_null=False))
    except pa.ArrowInvalid:
        return None
    date, temperature = table.column("date"), table.column("temperature")
    if date.null_count:
        return None
    return (date.to_numpy().astype("datetime64[us]"), temperature.to_numpy(zero_copy_only=False).astype(float),
            temperature.is_null().to_numpy(zero_copy_only=False))


def _clean_station_rows(dates: np.ndarray, values: np.ndarray, empty: np.ndarray, min_temp: float,
                        max_temp: float) -> tuple[np.ndarray, np.ndarray] | None:
    """One station's parsed rows in date order, or None for no rows, a reading that is not a finite number
    in [min_temp, max_temp] or a duplicate date."""
    readings = values[~empty]
    if len(dates) == 0 or not (np.isfinite(readings).all() and (readings >= min_temp).all()
                               and (readings <= max_temp).all()):
        return None
    order = np.argsort(dates, kind="stable")  # plain arrays: a few thousand files, each read in microseconds
    dates, values = dates[order], values[order]
    if (dates[1:] == dates[:-1]).any():  # a duplicate date
        return None
    return dates, values


def _parse_dates(path: Path, text: pd.Series, line: pd.RangeIndex) -> pd.Series:
    dates = pd.to_datetime(text.str.strip(), format="%Y-%m-%d", errors="coerce")
    bad = dates.isna().to_numpy()
    if bad.any():
        i = bad.argmax()
        raise PipelineError(f"{path}: line {line[i]}: date {text.iloc[i]!r} is not a YYYY-MM-DD date")
    duplicated = dates.duplicated().to_numpy()
    if duplicated.any():
        i = duplicated.argmax()
        first = (dates == dates.iloc[i]).to_numpy().argmax()
        raise PipelineError(f"{path}: line {line[i]}: duplicate date {text.iloc[i]} (also on line {line[first]})")
    return dates


def _parse_temperatures(path: Path, text: pd.Series, line: pd.RangeIndex,
                        min_temp: float, max_temp: float) -> pd.Series:
    stripped = text.str.strip()
    values = pd.to_numeric(stripped.replace("", np.nan), errors="coerce").astype(float)
    not_number = (values.isna() & (stripped != "")).to_numpy()
    if not_number.any():
        i = not_number.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {text.iloc[i]!r} is not a number "
                            "(leave the field empty for a missing reading)")
    infinite = np.isinf(values.to_numpy())
    if infinite.any():
        i = infinite.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {text.iloc[i]!r} is not finite")
    impossible = ((values < min_temp) | (values > max_temp)).to_numpy()
    if impossible.any():
        i = impossible.argmax()
        raise PipelineError(f"{path}: line {line[i]}: temperature {values.iloc[i]:g} °C is outside the "
                            f"possible range [{min_temp:g}, {max_temp:g}]")
    return values


def read_station_files(paths: list[Path], min_temp: float, max_temp: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The dates (in order) and readings of each file, as ``read_station_csv`` reads them (the files the
    pipeline wrote parsed together)."""
    texts = [read_text_file(path) for path in paths]
    clean = _read_clean_station_csvs(texts, min_temp, max_temp)
    readings = []
    for path, text, rows in zip(paths, texts, clean, strict=True):
        if rows is None:
            table = _read_station_text(path, text, min_temp, max_temp)
            rows = table["date"].to_numpy(), table["temperature"].to_numpy()
        readings.append(rows)
    return readings
