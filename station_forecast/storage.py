"""Where every artifact lives, how it is written safely, and the only code that reads or writes tables.

Writes are atomic: a temporary file beside the target, flushed to disk, then
renamed over it, so a reader sees the old complete file or the new complete
file. A temporary file carries its writer's process id, and only a dead
writer's leftovers are removed. Folders are replaced by renames only, never
left missing. Inputs are read only from regular files of bounded size, so a
FIFO, a device or a huge file named like a station file is refused instead of
hanging the stage or filling the memory. Only the standard library is imported
at module level; pandas and joblib are imported where a table or a model is
read or written.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from station_forecast import runtime, stopping
from station_forecast.errors import PipelineError, cannot_write
from station_forecast.files import MAX_INPUT_BYTES, PROJECT, check_regular_file

ROOT = PROJECT
# Ground-truth columns live only in data/truth; a test checks none of them
# appears in any table a model is trained or scored on.
TRUTH_COLUMNS = ["clean_temperature", "anomaly", "event"]
# A station file's header names a few columns: a first line longer than this, or with more fields, is not one,
# and parsing it as a table would take minutes and gigabytes (10^6 columns: 7 GB before the parser gave up).
MAX_HEADER_BYTES = 1 << 16
MAX_COLUMNS = 1000
MAX_NAME_BYTES = 100  # a station's name (its file name less .csv): report files add to it, and names are paths
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass(frozen=True)
class Paths:
    """Where every artifact lives; a test's tmp_path can stand in for ROOT."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_raw(self) -> Path:
        return self.data / "train" / "raw"

    @property
    def test_raw(self) -> Path:
        return self.data / "test" / "raw"

    @property
    def truth(self) -> Path:
        return self.data / "truth"

    @property
    def source_record(self) -> Path:
        """Where the raw data came from, the first test day and, for imported files, what was dropped."""
        return self.data / "source.json"

    @property
    def station_list(self) -> Path:
        """The imported stations' coordinates, where the user's folder has a station list."""
        return self.data / "stations.csv"

    @property
    def train_features(self) -> Path:
        return self.data / "train" / "features.csv"

    @property
    def test_features(self) -> Path:
        return self.data / "test" / "features.csv"

    @property
    def flagged(self) -> Path:
        """Every reading the detector flagged, training and test period alike."""
        return self.data / "flagged.csv"

    @property
    def train_flags(self) -> Path:
        return self.data / "train" / "flags.csv"

    @property
    def test_flags(self) -> Path:
        return self.data / "test" / "flags.csv"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def scaler(self) -> Path:
        return self.models / "scaler.joblib"

    @property
    def detector(self) -> Path:
        return self.models / "detector.json"

    @property
    def model(self) -> Path:
        return self.models / "model.joblib"

    @property
    def model_record(self) -> Path:
        return self.models / "model.json"

    @property
    def metrics(self) -> Path:
        return self.models / "metrics.json"

    @property
    def manifest(self) -> Path:
        return self.models / "manifest.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def accepted(self) -> Path:
        """The last model set that passed the quality gate: the one to use."""
        return self.models / "accepted"

    @property
    def previous(self) -> Path:
        """The accepted set before that, restorable with model_testing.py --restore."""
        return self.models / "previous"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.logs / ".pipeline.lock"

    @property
    def pid_file(self) -> Path:
        """The process id of the run holding the lock, for the busy message."""
        return self.logs / ".pipeline.pid"

    @property
    def sets(self) -> Path:
        """Every model set that is accepted or previous (``accepted`` and ``previous`` link into it)."""
        return self.models / "sets"

    @property
    def own_folders(self) -> list[Path]:
        """Every folder the pipeline writes into, deletes in or swaps, parents before children. Each must be a
        real folder of the project (or not exist yet): never a link, through which a write or a delete would
        reach files that are not the pipeline's."""
        return [self.data, self.data / "train", self.data / "test", self.train_raw, self.test_raw, self.truth,
                self.models, self.sets, self.reports, self.logs]

    @property
    def own_files(self) -> list[Path]:
        """Every file the pipeline writes under a fixed name (station files aside)."""
        return [self.source_record, self.station_list, self.train_features, self.test_features, self.flagged,
                self.train_flags, self.test_flags, self.scaler, self.detector, self.model, self.model_record,
                self.metrics, self.manifest]

    @property
    def replaced_whole(self) -> dict[Path, Callable[[str], bool]]:
        """The folders a stage replaces whole on every run (the swap deletes whatever else they hold), each with
        the names of the files it writes there (never a folder)."""
        def station_file(name: str) -> bool:
            return name.endswith(".csv")

        return {self.train_raw: station_file, self.test_raw: station_file, self.truth: station_file,
                self.reports: lambda name: name in ("summary.md", "predictions.csv") or name.endswith(".png")}

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of the folders the pipeline writes, or inside one."""
        resolved = Path(os.path.realpath(path))
        return any(resolved == folder or folder in resolved.parents
                   for folder in (Path(os.path.realpath(f)) for f in self.own_folders))


# Files a file manager leaves in any folder a person opens: nobody's work, they go with a swapped folder.
SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}


def check_project_layout(paths: Paths) -> None:
    """Refuse to start when a folder the pipeline writes, deletes in or swaps is a symbolic link or not a
    folder, when the lock or its pid file is not a regular file, or when a folder a stage replaces whole holds
    a file or folder of a name the stage never writes there: through a link, a write or a delete would reach
    files that are not the pipeline's, opening a FIFO would hang the run, and a swap would delete a person's
    file (notes in reports/). Hidden files and ``SYSTEM_FILES`` go with the folder."""
    for folder in paths.own_folders:
        refuse_link(folder)
        if folder.exists() and not folder.is_dir():
            raise PipelineError(f"{folder}: not a folder, but the pipeline keeps its own folder there; move it away")
    for path in paths.own_files:
        refuse_folder(path)
    for path in (paths.lock, paths.pid_file):
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise PipelineError(f"{path}: not a regular file (a link, FIFO or folder); remove it (rm -r {path}); "
                                "the pipeline makes it again")
    for folder, ours in paths.replaced_whole.items():
        refuse_foreign(folder, ours)


# In a folder a stage replaces whole, the names the stage put there (hidden: it goes with the folder, and no
# listing of station files or record of the folder sees it).
WRITTEN = ".written"


def refuse_foreign(folder: Path, ours: Callable[[str], bool]) -> None:
    """PipelineError naming what in ``folder``, one a stage replaces whole, is not the stage's: a folder, a
    file of a name it never writes there, or one of its names that it did not put there (the names it put
    there are listed in the folder's ``WRITTEN``; a folder made before that list judges by names alone).
    Hidden files and ``SYSTEM_FILES`` go with the folder."""
    if not folder.is_dir() or folder.is_symlink():
        return
    written = _written_names(folder)
    foreign = [path for path in sorted(folder.iterdir())
               if not (path.name.startswith(".") or path.name in SYSTEM_FILES)
               and (path.is_dir() or not ours(path.name) or (written is not None and path.name not in written))]
    if foreign:  # a person's file dropped there would go with the next swap
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise PipelineError(f"{foreign[0]}{more}: not the pipeline's, in a folder it replaces whole on every run, "
                            "which would delete it; move it elsewhere (your own files belong outside data/, models/ "
                            "and reports/) and run again")


def _written_names(folder: Path) -> set[str] | None:
    path = folder / WRITTEN
    if not path.exists() and not path.is_symlink():
        return None
    check_regular_file(path, limit=1 << 24)  # a FIFO planted there would hang the check
    return set(path.read_text(encoding="utf-8").splitlines())


# ------------------------------------------------------------------- atomic writes


def refuse_link(folder: Path) -> None:
    """PipelineError if ``folder``, one the pipeline writes, deletes in or swaps, is a symbolic link."""
    if folder.is_symlink():
        raise PipelineError(f"{folder}: a symbolic link where the pipeline keeps its own folder; it never writes, "
                            f"swaps or deletes through a link, so replace the link with a real folder (rm {folder})")


def refuse_folder(path: Path) -> None:
    """PipelineError if a folder stands where the pipeline writes the file ``path`` (no rename can replace it)."""
    if path.is_dir() and not path.is_symlink():
        raise PipelineError(f"{path}: a folder stands where the pipeline writes this file; remove it "
                            f"(rm -r {path}) and run again")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process has such a number
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_stale_temp_files(folder: Path, name: str) -> None:
    """Remove temporary files of ``name`` left by writers that died; never a live writer's."""
    for stale in folder.glob(f".{name}.*.tmp"):
        owner = stale.name[len(name) + 2:].split(".", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only on success.

    The temporary file lives in the same folder (so the rename is atomic on POSIX),
    carries this process's id in its name, is fsync'ed before the rename, and is
    removed if anything goes wrong.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        refuse_folder(target)
        remove_stale_temp_files(target.parent, target.name)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        stopping.check()
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except OSError as exc:
        raise cannot_write(exc, target) or exc from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(target: Path, payload: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)


def write_json(target: Path, obj: Any) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


CSV_CHUNK_ROWS = 1 << 18  # rows converted and written at a time, so a large table is never copied whole


def write_csv(target: Path, frame: Any, decimals: int = 6, fixed: dict[str, int] | None = None,
              staged: bool = False, threads: int = 1) -> None:
    """Write a DataFrame as CSV atomically, floats rounded to ``decimals`` places.

    pyarrow's writer does it about ten times faster than pandas' (which formats
    every number in Python); each float is written as the shortest text that
    reads back as the same rounded number, so the bytes are deterministic. A text
    value holding a comma or a quote is quoted; nothing else is. Date-time columns
    that hold whole days are written as YYYY-MM-DD. The float columns named in
    ``fixed`` are written with exactly that many decimals (``12.0``, not ``12``),
    as readings are recorded. Rows go out in chunks of ``CSV_CHUNK_ROWS``, made
    into text on up to ``threads`` threads; the bytes depend on neither.

    ``staged``: ``target`` is in a private staging folder that will be put in
    place whole by ``replace_folder``, so the file is written under its own name
    (and fsync'ed) without a temporary file of its own: with thousands of station
    files that saves most of the time.
    """
    if staged:
        digest = _write_csv_file(target, lambda: [frame], decimals, fixed or {}, threads)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    else:
        with atomic_path(target) as tmp:
            digest = _write_csv_file(tmp, lambda: [frame], decimals, fixed or {}, threads)
    _remember_digest(target, digest)


def write_csv_batches(target: Path, batches: Callable[[], Iterable[Any]], decimals: int = 6,
                      threads: int = 1) -> None:
    """``write_csv`` of the table the DataFrames of ``batches()`` make one after the other, byte for byte
    (a batch's date-time columns are judged whole days on its own rows), without it ever being held whole.
    ``batches`` is called a second time if some value needs quotes: every value is then quoted, as
    ``write_csv`` quotes a table with such a value."""
    with atomic_path(target) as tmp:
        digest = _write_csv_file(tmp, batches, decimals, {}, threads)
    _remember_digest(target, digest)


def _write_csv_file(path: Path, frames: Callable[[], Iterable[Any]], decimals: int, fixed: dict[str, int],
                    threads: int) -> str:
    """Write the CSV text of the frames ``frames()`` gives, one header; returns its SHA-256."""
    import hashlib

    import pyarrow as pa

    for quoting in ("none", "needed"):  # "none" refuses values that need quotes
        try:
            given = iter(frames())
            first = next(given, None)
            if first is None:
                raise ValueError(f"{path}: no table to write")
            header = _csv_header(first)
            digest = hashlib.sha256(header)
            with open(path, "wb") as handle:
                handle.write(header)
                # pyarrow formats without holding the GIL, so chunks are made into text on threads; the chunks
                # of all the frames go through one pool, so a frame of two chunks keeps both threads busy.
                chunks = ((frame, start, days) for frame in itertools.chain([first], given)
                          for days in [_day_columns(frame)] for start in range(0, len(frame), CSV_CHUNK_ROWS))
                for text in runtime.Threads(threads).imap(_csv_chunk, chunks, decimals=decimals, fixed=fixed,
                                                          quoting=quoting):
                    handle.write(text)
                    digest.update(text)
            return digest.hexdigest()
        except pa.ArrowInvalid:
            continue
    raise AssertionError("quoting 'needed' writes any text")


def _day_columns(frame: Any) -> set[str]:
    """The date-time columns of ``frame`` that hold whole days only (written as YYYY-MM-DD)."""
    return {name for name, dtype in frame.dtypes.items() if dtype.kind == "M" and _whole_days(frame[name])}


def write_csv_parts(targets: list[Path], frame: Any, sizes: list[int], decimals: int = 6,
                    fixed: dict[str, int] | None = None) -> None:
    """Write consecutive row ranges of ``frame`` as files of their own: ``targets[i]`` gets the next
    ``sizes[i]`` rows (no file for 0), byte for byte what ``write_csv(target, rows, staged=True)`` writes.

    For thousands of small station files the time goes into each file's own
    conversion, so the rows are made into text in one pass and cut at their line
    ends. Like ``staged``, for a staging folder that is put in place whole. A
    table whose text needs quotes, or date-times that are not all whole days,
    goes file by file, where ``write_csv`` decides such things per file.
    """
    import hashlib

    import numpy as np
    import pyarrow as pa

    fixed = fixed or {}
    days = {name for name, dtype in frame.dtypes.items() if dtype.kind == "M"}
    text = None
    if all(_whole_days(frame[name]) for name in days):
        try:
            text = b"".join(bytes(_csv_chunk((frame, start, days), decimals, fixed, "none"))
                            for start in range(0, len(frame), CSV_CHUNK_ROWS))
        except pa.ArrowInvalid:  # a value needs quotes
            pass
    if text is None:
        first = np.concatenate([[0], np.cumsum(sizes)])
        for target, begin, end in zip(targets, first[:-1], first[1:], strict=True):
            if end > begin:
                write_csv(target, frame.iloc[begin:end], decimals, fixed, staged=True)
        return
    # Without quotes no value holds a line break: the n-th line end closes the n-th row.
    line_ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == ord("\n")) + 1
    offsets = np.concatenate([[0], line_ends])[np.concatenate([[0], np.cumsum(sizes)])]
    header = _csv_header(frame)
    for target, begin, end in zip(targets, offsets[:-1], offsets[1:], strict=True):
        if end > begin:
            with open(target, "wb") as handle:
                handle.write(header)
                handle.write(text[begin:end])
                handle.flush()
                os.fsync(handle.fileno())
            _remember_digest(target, hashlib.sha256(header + text[begin:end]).hexdigest())


def _csv_header(frame: Any) -> bytes:
    """The first line of every table file: the column names."""
    return (",".join(map(str, frame.columns)) + "\n").encode()


def _csv_chunk(chunk: tuple[Any, int, set[str]], decimals: int, fixed: dict[str, int], quoting: str) -> Any:
    """The CSV text of ``CSV_CHUNK_ROWS`` rows of a frame from row ``start`` on (``chunk``: the frame, start and
    the date-time columns written as YYYY-MM-DD), as a pyarrow buffer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    frame, start, days = chunk
    columns = []
    for name, dtype in frame.dtypes.items():
        # Column by column, each handed to pyarrow as pandas stores it, floats rounded by numpy: no rounded
        # copy of the chunk (most of a small station file's time went there); NaN and None become empty fields.
        values = frame[name].iloc[start:start + CSV_CHUNK_ROWS]
        if dtype.kind == "f":
            values = np.round(values.to_numpy(), fixed.get(name, decimals))
        elif name in fixed and dtype.kind in "iu":  # whole numbers: an int64 needs more digits than the decimal has
            values = values.to_numpy(dtype=float)
        column = pa.array(values, from_pandas=True)
        if name in days:  # YYYY-MM-DD, without making text in Python
            column = column.cast(pa.date32())
        if name in fixed:  # a decimal type prints its trailing zeros
            column = column.cast(pa.decimal128(18, fixed[name]), safe=False)
        columns.append(column)
    table = pa.Table.from_arrays(columns, names=[str(name) for name in frame.columns])
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False, quoting_style=quoting))
    return sink.getvalue()


def _whole_days(column: Any) -> bool:
    values = column.to_numpy()
    return bool((values.astype("datetime64[D]") == values)[~column.isna().to_numpy()].all())


def write_joblib(target: Path, obj: Any) -> None:
    import joblib

    with atomic_path(target) as tmp:
        joblib.dump(obj, tmp)


def replace_folder(staged: Path, target: Path, ours: Callable[[str], bool]) -> None:
    """Put a fully written folder in place of ``target`` by renames only.

    The old ``target`` is parked beside it, then deleted once the new one is in
    place; if putting ``staged`` in place fails, the old one is put back. A
    ``target`` that is a link is refused: the folder it leads to is not ours;
    so is one that holds anything the stage did not put there (``refuse_foreign``
    with ``ours``, the names it writes there), checked again just before the
    swap, which would delete it. The staged folder lists what it holds in its
    ``WRITTEN`` before it moves.
    """
    refuse_link(target)
    with open(staged / WRITTEN, "w", encoding="utf-8") as handle:  # fsync'ed: a list lost would refuse all
        handle.write("".join(f"{name}\n" for name in listing(staged)))
        handle.flush()
        os.fsync(handle.fileno())
    refuse_foreign(target, ours)
    parking = target.with_name(f".{target.name}.old")
    remove_tree(parking)
    stopping.check()
    try:
        if target.exists():
            target.rename(parking)
        staged.rename(target)
    except OSError:
        if not target.exists() and parking.exists():
            parking.rename(target)
        raise
    fsync_folder(target.parent)
    remove_tree(parking)


def remove_tree(folder: Path) -> None:
    """Delete a folder of the pipeline's own making and everything in it; a link in its place is only
    unlinked, never followed (inside the folder, ``shutil.rmtree`` never follows one either)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------- reading


# Files this process wrote or hashed, by device and inode (a file keeps them when its folder is renamed
# into place): their size, modification and change times then, and their SHA-256. Any write to a file,
# or a reset of its modification time, moves its change time, which no one can set; so a file in the
# same state has the same bytes and need not be read again.
_DIGESTS: dict[tuple[int, int], tuple[tuple[int, ...], str]] = {}


def _file_state(path: Path) -> tuple[tuple[int, int], tuple[int, ...]]:
    info = os.stat(path)
    return (info.st_dev, info.st_ino), (info.st_size, info.st_mtime_ns, info.st_ctime_ns)


# What each file a stage read was like when it read it (``_checked_text``): a file changed after that, by a
# download or a sync job still writing, is not what the stage's outputs were made from, and its record must
# not say it is (``digest_as_read``).
_READ_STATES: dict[tuple[int, int], tuple[int, ...]] = {}
CHANGED_SINCE_READ = "changed after the stage read it"  # recorded in place of a digest: the next run reads it again


_LISTED: dict[Path, list[str]] = {}  # each folder's listing as a stage listed it to read it (``station_files``)


def listing(folder: Path) -> list[str]:
    """The names in a folder, sorted, leaving out hidden ones (temporary files, editors' and systems' own)."""
    return sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith("."))


def listing_as_read(folder: Path) -> list[str]:
    """A folder's listing as the stage listed it to read it, else as it is now: a station file added while
    the stage ran was not read, so its record must not list it."""
    listed = _LISTED.get(folder.resolve())
    return listing(folder) if listed is None else listed


def forget_reads() -> None:
    """Nothing noted of what a stage read: each run starts so (a process may run several, as the tests do)."""
    _READ_STATES.clear()
    _LISTED.clear()


def note_read(paths: list[Path]) -> None:
    """Note what files are like as a stage starts to read them, where its workers (on a cluster) read them."""
    for path in paths:
        check_regular_file(path, limit=None)  # a broken link or a FIFO named like a station file: say so
        file, state = _file_state(path)
        _READ_STATES.setdefault(file, state)


def digest_as_read(path: Path) -> str:
    """The SHA-256 of a file a stage read, or ``CHANGED_SINCE_READ`` when it has changed since the stage read
    it, or gone (then no digest can say what the stage read)."""
    try:
        file, state = _file_state(path)
    except FileNotFoundError:  # deleted (or moved) by someone else after the stage read it
        return CHANGED_SINCE_READ
    read = _READ_STATES.get(file)
    return CHANGED_SINCE_READ if read is not None and read != state else sha256_file(path)


def _remember_digest(path: Path, digest: str) -> None:
    file, state = _file_state(path)
    _DIGESTS[file] = (state, digest)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a regular file (anything else is refused rather than read: a FIFO would block); not
    read again when this process wrote or hashed it and it has not changed since."""
    import hashlib

    check_regular_file(path, limit=None)
    file, state = _file_state(path)
    known = _DIGESTS.get(file)
    if known is not None and known[0] == state:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if _file_state(path) == (file, state):  # unchanged while it was read
        _DIGESTS[file] = (state, digest.hexdigest())
    return digest.hexdigest()


def read_text_file(path: Path, delimiter: str = ",") -> str:
    """A CSV file's text, or PipelineError for a file that is missing, not regular, too large, binary (a NUL
    byte), not UTF-8, empty, or whose first line is too long or has too many ``delimiter``-separated fields
    to be a header."""
    return _checked_text(path, delimiter, other_encodings=False)[0]


# What to do with a table larger than a data file may be (GHCN-Daily's by-year files of recent years are over 1 GiB).
SPLIT_LARGE_FILE = ("split a table of many stations' rows (import.station_column) between lines into several files, "
                    "each with the header if it has one, and they are read as one table; or keep only the rows you "
                    "need (e.g. grep -E 'TMAX|TMIN' for GHCN-Daily's elements)")
# Files a station file's name is often given by mistake, by their first bytes, with the way to a CSV text file.
BINARY_KINDS = {
    b"PK\x03\x04": "a zip archive (an Excel .xlsx workbook is one), not CSV text: save the sheet as CSV, or unzip it",
    b"\xd0\xcf\x11\xe0": "an old Excel .xls workbook, not CSV text: save the sheet as CSV",
    b"\x1f\x8b": "gzip-compressed, not CSV text: name it <station>.csv.gz, and it is read as archives ship it",
}


def read_archive_text(path: Path, delimiter: str = ",") -> tuple[str, str]:
    """A user's CSV file's text and the encoding it was read in, checked as ``read_text_file`` checks, but
    read as archives ship it: UTF-16 where it starts with UTF-16's byte-order mark (a spreadsheet's "Unicode
    text"), else UTF-8, else Latin-1 (ISO-8859-1: older European archives' station names). Dates and
    readings are ASCII in all three, so only names and other text can come out wrong, in any other
    encoding; the caller says which encoding it used. Lines may end in CR alone (as old Mac spreadsheets
    wrote them)."""
    return _checked_text(path, delimiter, other_encodings=True)


def _checked_text(path: Path, delimiter: str, other_encodings: bool) -> tuple[str, str]:
    size = check_regular_file(path, limit=None)
    if size > MAX_INPUT_BYTES:
        raise PipelineError(f"{path}: {size:,} bytes, more than the {MAX_INPUT_BYTES:,} a data file may have; "
                            f"{SPLIT_LARGE_FILE}")
    try:
        file, state = _file_state(path)
        raw = _decompressed(path) if other_encodings and path.name.lower().endswith(COMPRESSED) \
            else path.read_bytes()
        if _file_state(path) != (file, state):
            raise PipelineError(f"{path}: changed while it was read (a download or copy still writing it?); run "
                                "again once it is complete")
    except OSError as exc:
        raise PipelineError(f"{path}: cannot be read ({exc.strerror})") from None
    _READ_STATES.setdefault(file, state)
    if other_encodings and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            text, encoding = raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}: starts with UTF-16's byte-order mark but is not UTF-16 text "
                                f"(at byte {exc.start})") from None
        raw = text.encode("utf-8", errors="replace")  # the checks below count in UTF-8 bytes
    else:
        text, encoding = None, "utf-8"
    for magic, what in BINARY_KINDS.items():
        if raw.startswith(magic):
            raise PipelineError(f"{path}: {what}")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise PipelineError(f"{path}: binary data (a NUL byte at offset {nul:,}), not a CSV text file")
    if raw.startswith(b"version https://git-lfs.github.com/spec/"):
        raise PipelineError(f"{path}: a Git LFS pointer ({len(raw)} bytes naming the file's content), not the table "
                            "itself: the repository it came from keeps its data in Git LFS; run git lfs install and "
                            "git lfs pull there (or download the file from the repository's web page)")
    if raw[:MAX_HEADER_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        raise PipelineError(f"{path}: a web page (HTML), not a CSV table: saved from the page that shows the file "
                            "rather than from the file itself (on GitHub, its Raw link: raw.githubusercontent.com/"
                            "...); download the file again")
    start = raw[:MAX_HEADER_BYTES + 1]
    if other_encodings and b"\r" in start and b"\n" not in start:  # lines ended by CR alone, as old Macs wrote
        raw = raw.replace(b"\r", b"\n")
        text = None if text is None else text.replace("\r", "\n")
    first_line = raw[:MAX_HEADER_BYTES + 1].split(b"\n", 1)[0]
    if len(first_line) > MAX_HEADER_BYTES:
        raise PipelineError(f"{path}: the first line is longer than {MAX_HEADER_BYTES:,} bytes; not a CSV header")
    fields = len(first_line.split()) if delimiter == "whitespace" else first_line.count(delimiter.encode()) + 1
    if fields > MAX_COLUMNS:
        raise PipelineError(f"{path}: the header has {fields:,} columns, more than the {MAX_COLUMNS:,} a station "
                            "file may have")
    if text is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not other_encodings:
                raise PipelineError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                                    f"{exc.start})") from None
            text, encoding = raw.decode("latin-1"), "latin-1"
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise PipelineError(f"{path}: empty file")
    return text, encoding


def _decompressed(path: Path) -> bytes:
    """A gzip-compressed file's bytes, at most ``MAX_INPUT_BYTES`` of them (a small file can expand to any
    size), or PipelineError."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read(MAX_INPUT_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path}: not a complete gzip file ({exc or 'it ends too early'})") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise PipelineError(f"{path}: decompresses to more than the {MAX_INPUT_BYTES:,} bytes a data file may have; "
                            f"{SPLIT_LARGE_FILE}")
    return raw


def read_json(path: Path) -> Any:
    if not path.exists() and not path.is_symlink():
        raise PipelineError(f"{path}: file not found; run the earlier stages first")
    check_regular_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise PipelineError(f"{path}: corrupt JSON ({str(exc)[:100]})") from None


# How every table this pipeline wrote is parsed: station names are text ("NA" and "001" are names), and only an
# empty field is a missing value.
TABLE_OPTIONS = {"dtype": {"station": str}, "keep_default_na": False, "na_values": [""]}


@contextmanager
def _reading_table(path: Path) -> Iterator[None]:
    """``path`` checked before a table is read from it (it exists, a regular file); a parse error while it is
    read becomes one PipelineError naming it."""
    import pandas as pd

    if not path.exists():
        raise PipelineError(f"{path}: file not found; run the earlier stages first")
    check_regular_file(path, limit=None)
    try:
        yield
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable CSV ({str(exc).strip()[:200]})") from None


def read_table(path: Path, required: list[str], allow_empty: bool = False, only: bool = False) -> Any:
    """Read a CSV this pipeline wrote, checking the columns a stage relies on (and reading no other with
    ``only``: a large table's other columns cost memory for nothing).

    Station names are text ("NA", "null" and "001" are names, not a missing
    value or the number 1); only an empty field is a missing value. The size is
    not capped as a station file's is: the stages check these tables against the
    manifest's hashes before they read them, and a large network's are large
    (features of 3,000 stations x 10 years: 1.7 GB).
    """
    import pandas as pd

    with _reading_table(path):
        table = pd.read_csv(path, **TABLE_OPTIONS, usecols=(lambda column: column in required) if only else None)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]!r}")
    if table.empty and not allow_empty:
        raise PipelineError(f"{path}: no data rows")
    return table


def read_table_batches(path: Path, columns: list[str], rows_per_batch: int) -> Iterator[Any]:
    """``read_table``'s parse of the ``columns`` of a table too large to hold, ``rows_per_batch`` rows at a time."""
    import pandas as pd

    with _reading_table(path):
        with open(path, "rb") as handle:
            header = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n").split(",")
        missing = [c for c in columns if c not in header]
        if missing:
            raise PipelineError(f"{path}: missing column {missing[0]!r}")
        with pd.read_csv(path, **TABLE_OPTIONS, usecols=columns, chunksize=rows_per_batch) as batches:
            yield from (batch[columns] for batch in batches)


def read_station_batches(path: Path, columns: list[str], rows_per_batch: int) -> Iterator[Any]:
    """``read_table_batches`` of a table whose rows come station by station, stations in name order (as stage
    2 writes them), cut so that each batch holds whole stations: about ``rows_per_batch`` rows, more where
    one station has more. PipelineError if the rows are not in that order."""
    import numpy as np
    import pandas as pd

    held = None
    last = None
    for batch in read_table_batches(path, columns, rows_per_batch):
        if batch.empty:  # a table of a header only
            continue
        if held is not None:
            batch = pd.concat([held, batch], ignore_index=True)
        station = batch["station"].to_numpy(dtype=object)
        changes = np.flatnonzero(station[1:] != station[:-1]) + 1
        firsts = station[np.r_[0, changes]]
        if (last is not None and firsts[0] < last) or (firsts[1:] <= firsts[:-1]).any():
            raise PipelineError(f"{path}: rows are not station by station in name order; rerun the stage that "
                                "wrote it")
        cut = changes[-1] if len(changes) else 0  # the last station may go on in the next batch
        if cut:
            yield batch.iloc[:cut].reset_index(drop=True)
        held, last = batch.iloc[cut:].reset_index(drop=True), firsts[-1]
    if held is not None and len(held):
        yield held


def read_tables(paths: list[Path], required: list[str]) -> tuple[Any, list[int]] | None:
    """Many CSV files with one header, as ``read_table`` reads each, in one table (their rows in order)
    and how many rows each has; None where one of them needs reading on its own (another header, no
    rows, a quote or a blank line, a field that does not parse), so that ``read_table`` names the file.

    Thousands of small files (a network's ground truth) cost mostly their parse each; their bodies are
    parsed together instead.
    """
    import pandas as pd

    bodies, header = [], None
    for path in paths:
        check_regular_file(path, limit=None)
        text = path.read_bytes()
        first, _, body = text.partition(b"\n")
        header = first if header is None else header
        if first != header or not body or not body.endswith(b"\n") or b'"' in body or b"\n\n" in body:
            return None
        bodies.append(body)
    names = header.decode("utf-8", errors="replace").split(",")
    if not bodies or any(column not in names for column in required):
        return None
    try:
        table = pd.read_csv(io.BytesIO(b"".join(bodies)), names=names, header=None, **TABLE_OPTIONS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        return None
    rows = [body.count(b"\n") for body in bodies]
    return (table, rows) if len(table) == sum(rows) else None


COMPRESSED = ".gz"  # a user's station file may come gzip-compressed, as archives ship them: <station>.csv.gz
FIXED_WIDTH = ".dly"  # GHCN-Daily's by-station files in its own fixed-width layout: <station>.dly


def name_key(name: str) -> str:
    """What two names of one station share: the name in Unicode's composed form (NFC), lower case. A file
    copied from macOS keeps its name decomposed ("Zu\u0308rich", NFD) where a station list typed elsewhere
    writes "Z\u00fcrich": the same name to a reader, other bytes to the disk."""
    return unicodedata.normalize("NFC", name).lower()


def station_name(path: Path) -> str:
    """The station a file holds: its name without ``.csv`` (and ``.gz`` for a compressed one)."""
    name = path.name[:-len(COMPRESSED)] if path.name.lower().endswith(COMPRESSED) else path.name
    return Path(name).stem


def is_utf8(text: str) -> bool:
    """Whether ``text`` is text, not bytes of another encoding that the file system's decoding kept as
    surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def holds_a_table(path: Path, as_shipped: bool = False) -> bool:
    """Whether a file's name says it is a station table: ``*.csv`` (and, ``as_shipped`` by archives, ``*.csv.gz``
    and GHCN-Daily's ``*.dly``)."""
    name = path.name.lower()
    return name.endswith(".csv") or (as_shipped and name.endswith((".csv" + COMPRESSED, FIXED_WIDTH)))


def station_files(folder: Path, as_shipped: bool = False) -> list[Path]:
    """Every ``*.csv`` entry of a folder but hidden ones (and, ``as_shipped`` by archives, ``*.csv.gz`` and
    GHCN-Daily's ``*.dly``), sorted; two names of one station (names that differ only in case, or one file
    twice, in two forms) are refused: one would silently hide the other, on a case-insensitive disk or in a
    report."""
    # The listing leaves hidden files out: macOS writes "._HOME.csv" (binary) beside each file copied to a
    # shared or USB drive, editors their temporary copies. Nor are Excel's "~$HOME.csv" owner files, there
    # while HOME.csv is open in it, a station's.
    names = listing(folder)
    _LISTED.setdefault(folder.resolve(), names)
    files = [folder / name for name in names if holds_a_table(folder / name, as_shipped) and not name.startswith("~$")]
    seen: dict[str, Path] = {}
    for path in files:
        name = station_name(path)
        if not is_utf8(name):  # the bytes of another encoding, which UTF-8 does not decode
            written = os.fsencode(path.name)
            raise PipelineError(f"{folder}: the file name {written!r} is not UTF-8 (an older system's encoding; as "
                                f"Latin-1 it reads {written.decode('latin-1')!r}): rename it, e.g. convmv -f latin1 "
                                "-t utf8 --notest on the folder's files")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise PipelineError(f"{path}: a station name of {len(name.encode())} bytes; at most "
                                f"{MAX_NAME_BYTES} (the name becomes part of report file names); rename the file")
        if any(ord(char) < 32 or char == "\x7f" for char in name):
            raise PipelineError(f"{path!r}: a station name with a control character (a line break or a tab); "
                                "rename the file")
        other = seen.setdefault(name_key(name), path)
        if other != path:
            raise PipelineError(f"{path}: names the same station as {other.name} (station names may not differ "
                                "only in case or in how an accent is encoded, and a file may not be there in two "
                                "forms); rename or remove one")
    return files
