"""Shared fixtures: a tiny configuration and a helper that runs a stage in-process."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data_creation  # noqa: E402
import model_preparation  # noqa: E402
import model_preprocessing  # noqa: E402
import model_testing  # noqa: E402

STAGES = [data_creation, model_preprocessing, model_preparation, model_testing]
TINY = {
    "n_stations": 5,
    "n_years": 3,
    "test_days": 120,
    "gbr_max_iter": 60,
    "cv_folds": 3,
}


def write_params(path: Path, **overrides: object) -> Path:
    """A copy of params.toml with some values replaced (keys are unique across sections)."""
    text = (ROOT / "params.toml").read_text()
    for key, value in overrides.items():
        rendered = f'"{value}"' if isinstance(value, str) else repr(value)
        text, count = re.subn(rf"^{key} = [^#\n]*", f"{key} = {rendered}  ", text, flags=re.M)
        assert count == 1, f"no parameter {key} in params.toml"
    path.write_text(text)
    return path


def run_stage(module, root: Path, params: Path, *extra: str) -> int:
    """Run a stage's command line in this process; returns its exit code."""
    parser = module.parser() if hasattr(module, "parser") else common.stage_parser(module.__doc__.splitlines()[0])
    return common.run(module.STAGE, module.main, parser, ["--root", str(root), "--params", str(params), *extra])


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
    shutil.copytree(built[0], root)
    return root, root / "params.toml"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under data/ and models/, to prove a failed run changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes()
            for folder in ("data", "models") for p in sorted((root / folder).rglob("*")) if p.is_file()}
