"""What the four stages share: paths, parameters, errors, atomic writes, the manifest.

Only the standard library is imported at module level, so that ``--help`` and
argument errors answer at once; numpy, pandas and joblib are imported inside the
functions that need them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_PARAMS = ROOT / "params.toml"

# Exit codes, documented in the README ("What can go wrong").
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected environment problem
EXIT_BAD_INPUT = 2  # bad data, parameters, arguments or artifacts: the user can fix it
EXIT_GATE = 3  # the model was built but failed the quality gate

# Every feature the model sees, in order. Anything else in a features table is
# metadata (identifiers, targets, baselines) and never reaches a model.
FEATURES = [
    "temp_lag0",
    "temp_lag1",
    "temp_lag2",
    "temp_lag3",
    "temp_mean7",
    "temp_mean30",
    "temp_std7",
    "temp_trend7",
    "doy_sin",
    "doy_cos",
    "repaired_today",
]
# The spread of the day-to-day change over the last 60 days (°C), a per-row
# metadata column: prediction intervals are this times calibrated quantiles, so
# a station with calm weather gets a narrow band and a stormy one a wide band.
SPREAD_COLUMN = "change_sd60"
# Ground-truth columns live only in data/truth; a test checks none of them
# appears in any table a model is trained or scored on.
TRUTH_COLUMNS = ["clean_temperature", "anomaly", "event"]
ANOMALY_KINDS = ["spike", "level_shift", "stuck", "drift", "missing"]

log = logging.getLogger("pipeline")
_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """A problem the user can fix: bad input, parameters or artifacts (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(PipelineError):
    """The new model did not beat the baseline it must beat (exit 3)."""

    exit_code = EXIT_GATE


# --------------------------------------------------------------------------- params

# Each parameter: (type, minimum, maximum), or (str, allowed values, None). The
# defaults live in params.toml only, so there is exactly one place to read them.
SIMULATION = "simulation"
PARAM_SCHEMA: dict[str, dict[str, Any]] = {
    "data": {
        "source": (str, None, None),
        "test_days": (int, 30, 36_500),
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
        "resolution": (str, ("0.1C", "1F"), None),
    },
    "anomalies": {
        **{f"{kind}_rate": (float, 0.0, 0.2) for kind in ANOMALY_KINDS},
        **{f"{kind}_days": (list, 1, 365) for kind in ANOMALY_KINDS},
    },
    "import": {
        "date_column": (str, None, None),
        "temperature_column": (str, None, None),
        "date_format": (str, None, None),
        "delimiter": (str, (",", ";", "\t", "|"), None),
        "unit": (str, ("C", "F"), None),
        "quantity": (str, ("mean", "max", "min"), None),
    },
    "quality_control": {
        "detector": (str, ("network", "none"), None),
        "neighbours": (int, 1, 50),
        "min_correlation": (float, 0.0, 0.99),
        "window": (int, 3, 90),
        "spike_threshold": (float, 1.0, 50.0),
        "shift_threshold": (float, 1.0, 200.0),
        "stuck_threshold": (float, 0.5, 50.0),
        "gross_margin": (float, 1.0, 20.0),
        "repair_confidence": (float, 0.5, 1.0),
    },
    "preprocessing": {
        "min_temp": (float, -100.0, 60.0),
        "max_temp": (float, -60.0, 70.0),
        "min_days": (int, 40, 100_000),
    },
    "model": {
        "cv_folds": (int, 2, 20),
        "ridge_alpha": (float, 0.0, 1e6),
        "gbr_max_iter": (int, 10, 5000),
        "gbr_learning_rate": (float, 1e-4, 1.0),
        "gbr_max_leaf_nodes": (int, 2, 1000),
        "tie_tolerance": (float, 0.0, 0.5),
        "random_state": (int, 0, 2**32 - 1),
        "interval_level": (float, 0.5, 0.99),
    },
    "evaluation": {
        "gate_min_improvement": (float, -1.0, 0.9),
        "interval_tolerance": (float, 0.0, 0.5),
        "report_stations": (int, 0, 50),
        "report_flags": (int, 0, 1000),
    },
}


def params_text_with(overrides: dict[str, Any], base: Path = DEFAULT_PARAMS) -> str:
    """The text of a parameters file with some values replaced; keys are unique across sections."""
    import re

    text = base.read_text()
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

    @property
    def source_folder(self) -> Path | None:
        """The folder of the user's station files, or None to simulate.

        A relative folder is taken relative to the parameters file.
        """
        source = self.sections["data"]["source"]
        return None if source == SIMULATION else (self.path.parent / source).resolve()


def load_params(path: Path | str | None = None) -> Params:
    """Read and validate a TOML parameters file; every key is required, none unknown."""
    path = Path(path) if path else DEFAULT_PARAMS
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: parameters file not found") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read parameters file ({exc.strerror})") from None
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"{path}: malformed parameters file ({exc})") from None
    sections = {name: _check_section(path, name, raw.get(name), schema)
                for name, schema in PARAM_SCHEMA.items()}
    unknown = sorted(set(raw) - set(PARAM_SCHEMA))
    if unknown:
        raise PipelineError(f"{path}: unknown section [{unknown[0]}]")
    _check_cross_constraints(path, sections)
    return Params(sections, path, hashlib.sha256(raw_bytes).hexdigest())


def _check_section(path: Path, name: str, values: Any, schema: dict) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: missing section [{name}]")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise PipelineError(f"{path}: unknown parameter {name}.{unknown[0]}")
    checked = {}
    for key, (kind, low, high) in schema.items():
        where = f"{path}: {name}.{key}"
        if key not in values:
            raise PipelineError(f"{where} is missing")
        value = values[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PipelineError(f"{where} must be {kind.__name__}, got {value!r}")
        if kind is list:
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


def _check_length_range(where: str, value: list, low: float, high: float) -> None:
    """A [min, max] pair: whole numbers where the bounds are whole, else any numbers."""
    kinds = (int,) if isinstance(low, int) else (int, float)
    ok = (len(value) == 2 and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
          and low <= value[0] <= value[1] <= high)
    if not ok:
        what = "whole numbers" if kinds == (int,) else "numbers"
        raise PipelineError(f"{where} must be [min, max] {what} with {low} <= min <= max <= {high}")


def _check_cross_constraints(path: Path, s: dict[str, dict[str, Any]]) -> None:
    data, sim, pre = s["data"], s["simulation"], s["preprocessing"]
    import datetime as dt

    try:
        dt.date.fromisoformat(sim["start_date"])
    except ValueError:
        raise PipelineError(f"{path}: simulation.start_date must be YYYY-MM-DD, got {sim['start_date']!r}") from None
    if pre["min_temp"] >= pre["max_temp"]:
        raise PipelineError(f"{path}: preprocessing.min_temp must be below preprocessing.max_temp")
    if data["source"] != SIMULATION:
        return  # the next checks are about the simulated stations; imported ones are checked when read
    if data["holdout_stations"] >= sim["n_stations"]:
        raise PipelineError(f"{path}: data.holdout_stations must leave at least one training station")
    if sim["clean_stations"] + sim["heavy_stations"] > sim["n_stations"]:
        raise PipelineError(f"{path}: simulation.clean_stations + simulation.heavy_stations exceed "
                            "simulation.n_stations")
    if data["test_days"] >= sim["n_years"] * 365 - pre["min_days"]:
        raise PipelineError(f"{path}: data.test_days leaves fewer than preprocessing.min_days training days")


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    """Where every artifact lives; a tests's tmp_path can stand in for ROOT."""

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
        """Where the raw data came from and, for imported files, what was dropped."""
        return self.data / "source.json"

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


# ------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place only on success.

    The temporary file lives in the same folder (so the rename is atomic on POSIX),
    is fsync'ed before the rename, and is removed if anything goes wrong, so a
    reader sees either the old complete file or the new complete file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
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


def write_csv(target: Path, frame: Any) -> None:
    """Write a DataFrame as CSV atomically; floats keep 6 significant decimals."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def write_joblib(target: Path, obj: Any) -> None:
    import joblib

    with atomic_path(target) as tmp:
        joblib.dump(obj, tmp)


def replace_folder(staged: Path, target: Path, backup: Path | None = None) -> None:
    """Put a fully written folder in place of ``target`` by renames only.

    The old ``target`` becomes ``backup`` (replacing any older backup) or is
    deleted. Readers never see a half-filled folder.
    """
    import shutil

    old = backup or target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    _fsync_dir(target.parent)
    if backup is None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------ manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour or pickles the artifacts depend on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("numpy", "pandas", "scikit-learn", "joblib", "matplotlib"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; run the earlier stages first") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: corrupt JSON ({exc})") from None


def read_manifest(paths: Paths) -> dict[str, Any]:
    if not paths.manifest.exists():
        return {"stages": {}}
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{paths.manifest}: corrupt manifest ({exc}); rerun ./pipeline.sh") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise PipelineError(f"{paths.manifest}: corrupt manifest (no 'stages'); rerun ./pipeline.sh")
    return manifest


def record_stage(paths: Paths, stage: str, params: Params, inputs: list[Path], outputs: list[Path]) -> None:
    """Record the SHA-256 of a stage's outputs, with its inputs, parameters and libraries.

    Written last, after every output is in place: a stage killed earlier leaves
    the manifest describing the previous run, and the next stage notices.
    """
    manifest = read_manifest(paths)
    manifest["stages"][stage] = {
        "params": {"file": str(params.path), "sha256": params.sha256},
        "inputs": {_rel(paths, p): sha256_file(p) for p in sorted(inputs)},
        "outputs": {_rel(paths, p): sha256_file(p) for p in sorted(outputs)},
        "libraries": library_versions(),
    }
    write_json(paths.manifest, manifest)


def verify_outputs_of(paths: Paths, stage: str, files: list[Path]) -> None:
    """Refuse files that are not exactly what ``stage`` last wrote."""
    entry = read_manifest(paths)["stages"].get(stage)
    if entry is None:
        raise PipelineError(f"{paths.manifest}: no record of stage {stage}; run it first")
    recorded = entry["outputs"]
    for path in files:
        key = _rel(paths, path)
        if not path.exists():
            raise PipelineError(f"{path}: missing; rerun {stage}.py")
        if key not in recorded:
            raise PipelineError(f"{path}: not written by {stage}.py (not in the manifest); rerun {stage}.py")
        if sha256_file(path) != recorded[key]:
            raise PipelineError(f"{path}: does not match its SHA-256 in the manifest "
                                f"(changed since {stage}.py wrote it); rerun {stage}.py")
    versions = library_versions()
    if entry["libraries"].get("scikit-learn") != versions["scikit-learn"]:
        raise PipelineError(
            f"{files[0]}: written with scikit-learn {entry['libraries'].get('scikit-learn')}, "
            f"this is {versions['scikit-learn']}; rerun {stage}.py or install requirements.txt")


def recorded_outputs(paths: Paths, stage: str) -> list[Path]:
    entry = read_manifest(paths)["stages"].get(stage, {})
    return [paths.root / key for key in entry.get("outputs", {})]


def _rel(paths: Paths, path: Path) -> str:
    """A path relative to the project folder; absolute for a file outside it (imported data)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


# ------------------------------------------------------------------------ forecasts


def forecast(estimator: Any, table: Any) -> Any:
    """Next-day temperature: today's (repaired) reading plus the predicted change.

    Models learn the change from today rather than the level, which puts stations
    with different climates on one scale.
    """
    return table["temp_today"].to_numpy() + estimator.predict(table[FEATURES])


def read_text_file(path: Path) -> str:
    """A CSV file's text, or PipelineError for a file that is missing, not UTF-8 or empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise PipelineError(f"{path}: empty file")
    return text


def read_table(path: Path, required: list[str], allow_empty: bool = False) -> Any:
    """Read a CSV this pipeline wrote, checking the columns a stage relies on."""
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; run the earlier stages first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable CSV ({str(exc).strip()})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]!r}")
    if table.empty and not allow_empty:
        raise PipelineError(f"{path}: no data rows")
    return table


# ------------------------------------------------------------------------ running


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="parameters file (default: params.toml beside this script)")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="project folder holding data/ and models/ (default: this script's folder)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def run(stage: str, main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
        argv: list[str] | None = None) -> int:
    """Run a stage's ``main`` and turn every failure into one line on stderr and an exit code."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage}: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    try:
        main(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{stage}: interrupted; earlier artifacts are unchanged", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns bugs into a clear line
        if args.debug:
            raise
        print(f"{stage}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK
