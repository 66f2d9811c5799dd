"""Shared fixtures: a tiny configuration and a helper that runs a stage in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data_creation  # noqa: E402
import model_preparation  # noqa: E402
import model_preprocessing  # noqa: E402
import model_testing  # noqa: E402
from station_forecast import cli, manifest  # noqa: E402
from station_forecast.params import params_text_with  # noqa: E402

STAGES = [data_creation, model_preprocessing, model_preparation, model_testing]
assert [module.STAGE for module in STAGES] == cli.STAGES, "stages.txt and the tests disagree"
TINY = {
    "n_stations": 5,
    "n_years": 3,
    "test_steps": 120,
    "gbr_max_iter": 60,
    "cv_folds": 3,
}


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Iterator[Path]:
    """Every test, and every process a test starts, signs models with a key of the test session's own."""
    path = tmp_path_factory.mktemp("key") / "signing.key"
    patch = pytest.MonkeyPatch()
    patch.setenv(manifest.KEY_ENVIRONMENT, str(path))
    yield path
    patch.undo()


def write_params(path: Path, **overrides: object) -> Path:
    """A copy of params.toml with some values replaced."""
    path.write_text(params_text_with(overrides))
    return path


def run_stage(module, root: Path, params: Path, *extra: str) -> int:
    """Run a stage's command line in this process, in ``root`` made as a user makes a project folder (a stage
    never makes it); returns its exit code."""
    root.mkdir(parents=True, exist_ok=True)
    parser = module.parser() if hasattr(module, "parser") else cli.stage_parser(module.__doc__)
    return cli.run(module.STAGE, module.main, parser, ["--root", str(root), "--params", str(params), *extra])


def run_all(root: Path, params: Path) -> None:
    for module in STAGES:
        assert run_stage(module, root, params) == 0, f"{module.STAGE} failed"


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """A project folder where all four stages ran once on the tiny configuration (read-only)."""
    root = tmp_path_factory.mktemp("built")
    params = write_params(root / "params.toml", **TINY)
    run_all(root, params)
    return root, params


@pytest.fixture
def project(built, tmp_path) -> tuple[Path, Path]:
    """A private copy of ``built`` that a test may change."""
    root = tmp_path / "project"
    shutil.copytree(built[0], root, symlinks=True)  # models/accepted stays a link, as the stage made it
    return root, root / "params.toml"


@pytest.fixture(scope="session")
def horizon_built(built, tmp_path_factory) -> Path:
    """``built``'s simulated data, with stages 2-4 run again to forecast 1, 2 and 3 days ahead."""
    root = tmp_path_factory.mktemp("horizon") / "project"
    shutil.copytree(built[0], root, symlinks=True)
    params = write_params(root / "horizon.toml", **TINY, horizon=HORIZON)
    for module in STAGES[1:]:
        assert run_stage(module, root, params) == 0, f"{module.STAGE} failed"
    return root


HORIZON = 3


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under data/ and models/, to prove a failed run changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes()
            for folder in ("data", "models") for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def default_built(tmp_path_factory) -> Path:
    """A project folder where all four stages ran on the default params.toml."""
    root = tmp_path_factory.mktemp("default")
    run_all(root, ROOT / "params.toml")
    return root


# A station file as real ones come: another delimiter, column names, date format
# and unit, rows out of order, repeated and conflicting rows, empty and NaN
# readings, a word, a sentinel value, an impossible date and a three-week gap.
REAL_FORMAT = {
    "date_column": "DATE",
    "temperature_column": "TMAX",
    "date_format": "%d/%m/%Y",
    "delimiter": ";",
    "unit": "F",
    "quantity": "max",
    "holdout_stations": 0,
}
REAL_FORMAT_FLAWS = {"rows": 1078, "kept": 1057, "missing_value": 14, "bad_date": 1, "not_a_number": 1,
                     "impossible": 1, "conflicting_duplicate": 2, "repeated_rows": 2, "out_of_order": True,
                     "steps_without_reading": 39}


def write_real_format_station(path: Path) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    dates = pd.date_range("2020-01-01", "2022-12-31", freq="D")
    seasonal = 14 + 11 * np.cos(2 * np.pi * (dates.day_of_year.to_numpy() - 200) / 365.25)
    weather = np.zeros(len(dates))
    for t in range(1, len(dates)):  # a few thousand steps of AR(1); fine for a fixture
        weather[t] = 0.7 * weather[t - 1] + rng.normal(0, 2.0)
    fahrenheit = np.round((seasonal + weather) * 9 / 5 + 32, 1)
    table = pd.DataFrame({"DATE": dates.strftime("%d/%m/%Y"), "TMAX": fahrenheit.astype(str), "NAME": "HOME"})
    table = table.drop(index=range(300, 321))  # a gap of 21 days without rows
    table.loc[100:111, "TMAX"] = ""  # twelve days with an empty reading
    table.loc[[200, 201], "TMAX"] = ["NaN", "NA"]
    table.loc[250, "TMAX"] = "err"
    table.loc[500, "TMAX"] = "999.9"  # a sentinel, impossible as a temperature
    table.loc[600, "DATE"] = "31/02/2021"
    repeated = table.loc[[700, 701]]
    conflicting = table.loc[[800]].assign(TMAX="50.0")
    table = pd.concat([table, repeated, conflicting]).sample(frac=1.0, random_state=3)
    table.to_csv(path, sep=";", index=False)


@contextmanager
def lock_held(root):
    """Another process holds the pipeline's lock; on leaving, it is SIGKILLed (no chance to clean up)."""
    (root / "logs").mkdir(exist_ok=True)
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root / "logs/.pipeline.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()
