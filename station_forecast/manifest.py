"""What each stage wrote (the manifest), and the signatures that make loading a model safe.

The manifest, ``models/manifest.json``, records per stage the SHA-256 of its
inputs and outputs, the parameters' hash and the library versions; a stage
refuses inputs that are not exactly what the stage before it wrote. A hash is an
integrity check, not proof of origin: anyone who can write a model file can
rewrite its hash too. Model files are pickles, and unpickling can run code, so
every pickle a stage writes is also signed with HMAC-SHA256 under a secret key
kept outside the project folder (``~/.config/station-pipeline/signing.key``,
created on first use, readable by its owner only; ``PIPELINE_SIGNING_KEY``
names another file, which must also be outside the project and readable by its
owner only). No pickle is unpickled, promoted or restored unless its signature
checks, and a stage whose pickles no longer check under this machine's key is
not up to date. Someone who can write the project folder but cannot read the
key cannot make the pipeline run their code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import platform
import secrets
import stat
from pathlib import Path
from typing import Any

from station_forecast.errors import PipelineError
from station_forecast.files import check_regular_file
from station_forecast.params import STAGES
from station_forecast.storage import (
    CHANGED_SINCE_READ,
    ROOT,
    Paths,
    digest_as_read,
    listing,
    listing_as_read,
    sha256_file,
    write_json,
)

log = logging.getLogger("pipeline")

PACKAGE = Path(__file__).resolve().parent.name  # the shared code's folder beside the stage scripts

KEY_ENVIRONMENT = "PIPELINE_SIGNING_KEY"
DEFAULT_KEY = Path("~/.config/station-pipeline/signing.key")
SIGNED_SUFFIXES = (".joblib",)  # the files whose loading can run code
# What why_stale says of each kind of record that no longer holds.
CHANGE_WORDS = {"inputs": "{} changed since it ran", "outputs": "{} changed since it ran",
                "listings": "files were added to or removed from {} since it ran",
                "links": "{} no longer points where it did", "signatures": "{} is not signed with this machine's key"}


# ------------------------------------------------------------------------ signatures


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENVIRONMENT) or DEFAULT_KEY).expanduser()


def signing_key() -> bytes:
    """The secret key, created (32 random bytes, mode 0600) the first time it is needed."""
    path = key_path()
    try:
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
                handle.flush()
                os.fsync(handle.fileno())
        check_key_file(path)
        key = path.read_bytes()
    except FileExistsError:  # another process created it a moment ago
        key = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot create or read the model-signing key ({exc.strerror}); set "
                            f"{KEY_ENVIRONMENT} to a file outside the project that only you can read") from None
    if len(key) < 16:
        raise PipelineError(f"{path}: the model-signing key is damaged (shorter than 16 bytes); delete it and "
                            "rerun ./pipeline.sh")
    return key


def check_key_file(path: Path) -> None:
    """Refuse a key that would not keep a secret: inside the project (it would travel with the models it
    signs), readable or writable by others, or not a regular file (a FIFO would hang the stage)."""
    try:
        check_regular_file(path, limit=1 << 16)
    except PipelineError as exc:
        raise PipelineError(f"{exc}, where the model-signing key should be; set {KEY_ENVIRONMENT} to a file "
                            "outside the project that only you can read") from None
    resolved = path.resolve()
    if resolved == ROOT or ROOT in resolved.parents:
        raise PipelineError(f"{path}: the model-signing key is inside the project ({ROOT}), where it would travel "
                            f"with the models it signs; set {KEY_ENVIRONMENT} to a file outside it")
    mode = stat.S_IMODE(resolved.stat().st_mode)
    if mode & 0o077:
        raise PipelineError(f"{path}: the model-signing key can be read or written by others (mode {mode:o}); "
                            f"make it its owner's only (chmod 600 {path})")


def signature(path: Path) -> str:
    check_regular_file(path, limit=None)  # a FIFO planted as a model would block the check itself
    digest = hmac.new(signing_key(), digestmod=hashlib.sha256)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_signature(path: Path, expected: str | None, remedy: str) -> None:
    """Refuse a pickle whose signature is missing or wrong: it may have been planted."""
    if not isinstance(expected, str) or not hmac.compare_digest(signature(path), expected):
        raise PipelineError(f"{path}: not signed with this machine's model-signing key ({key_path()}); refusing "
                            f"to load it, because loading a model can run code. {remedy}")


def load_signed(path: Path, expected: str | None, stage: str) -> Any:
    """Unpickle a model file only after its signature checks."""
    import joblib

    remedy = f"Rerun {stage}.py"
    check_signature(path, expected, remedy)
    try:
        return joblib.load(path)
    except Exception as exc:  # signed by us, yet it does not unpickle: a disk fault or a library change
        raise PipelineError(f"{path}: cannot be loaded ({type(exc).__name__}); rerun {stage}.py") from None


# -------------------------------------------------------------------------- manifest


LIBRARIES = {"numpy": "numpy", "pandas": "pandas", "scikit-learn": "sklearn", "joblib": "joblib",
             "matplotlib": "matplotlib", "pyarrow": "pyarrow"}  # distribution: module


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour or pickles the artifacts depend on: of the one this process
    loaded where it did (a library upgraded in the shared environment while a stage ran is not what it ran),
    else of the one installed."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name, module in LIBRARIES.items():
        loaded = getattr(sys.modules.get(module), "__version__", None)
        try:
            versions[name] = loaded if isinstance(loaded, str) else version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(paths: Paths, fresh_if_damaged: bool = False) -> dict[str, Any]:
    """The manifest; a damaged one is an error, or, for the stage that starts a run afresh, a new one."""
    if not paths.manifest.exists():
        return {"stages": {}}
    try:
        check_regular_file(paths.manifest)
        # RecursionError: brackets nested thousands deep
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict) \
                or not all(isinstance(entry, dict) for entry in manifest["stages"].values()):
            raise ValueError("no valid 'stages'")
    except (ValueError, UnicodeDecodeError, RecursionError, PipelineError) as exc:
        if fresh_if_damaged:
            return {"stages": {}}
        raise PipelineError(f"{paths.manifest}: corrupt manifest ({str(exc)[:100]}); run ./pipeline.sh from the "
                            "start (data_creation.py writes a new one)") from None
    return manifest


def code_files(stage: str) -> list[Path]:
    """The project's modules a stage runs: its script and every module of the project it imports, directly or
    through another, anywhere in the module (deferred imports too), with the ``__init__`` of each package on
    the way. A tool (benchmark, salary case) or another stage's script is not among them unless the stage
    imports it."""
    seen, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(project_imports(name) - seen)
    return sorted(module_file(name) for name in seen)


def project_imports(name: str) -> set[str]:
    """The project's modules (dotted names) that module ``name`` imports anywhere in it, each package on the way
    included (``from a.b import c`` runs ``a``, then ``a.b``, then ``a.b.c`` if that is a module)."""
    import ast

    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            found.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    prefixes = {".".join(module.split(".")[:i]) for module in found for i in range(1, len(module.split(".")) + 1)}
    return {module for module in prefixes if module and module != name and module_file(module) is not None}


def module_file(name: str) -> Path | None:
    """The file of the project's module ``name`` (dotted), or None when it is not one of the project's."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


_CODE_AT_START: dict[str, str] = {}  # the code a stage process started with, by stage (``note_code``)


def note_code(stage: str) -> None:
    """Note the code ``stage`` runs as its process starts: code replaced while it runs (an update deployed
    mid-run) is not what made its outputs, so its record keeps what it started with and the next run reruns it."""
    if stage in STAGES:  # a stage's name; the tests run demonstration ones too
        _CODE_AT_START[stage] = code_hash(stage)


def code_hash(stage: str | None = None) -> str:
    """A hash of the code a stage runs (``code_files``), so editing a tool or a module it never imports reruns
    nothing; with no stage, of every module of the project (the stage scripts and the package)."""
    digest = hashlib.sha256()
    every = sorted([*ROOT.glob("*.py"), *(ROOT / PACKAGE).rglob("*.py")])
    for path in code_files(stage) if stage is not None else every:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def why_stale(paths: Paths, stage: str, params: Any) -> str | None:
    """Why ``stage`` must run again, or None when its record still holds: the parameters it reads, its code,
    its inputs and its outputs (each by SHA-256), the listings of the folders it reads or writes whole, the
    links it made and the signatures of its pickles are what it last ran with and wrote."""
    try:
        entry = read_manifest(paths)["stages"].get(stage)
    except PipelineError:
        return "the manifest is damaged"
    if not isinstance(entry, dict):
        return "no record of an earlier run"
    if entry.get("params_read") != params.stage_hash(stage):
        return "its parameters changed"
    if entry.get("code") != code_hash(stage):
        return "its code changed"
    if entry.get("gate_passed") is False:
        return "its last run failed the quality gate"
    checks = {"inputs": _file_changed, "outputs": _file_changed, "listings": _listing_changed,
              "links": _link_changed, "signatures": _signature_changed}
    for kind, changed in checks.items():
        recorded = entry.get(kind, {})
        if not isinstance(recorded, dict):
            return "its record is damaged"
        for key, value in recorded.items():
            path = Path(key) if Path(key).is_absolute() else paths.root / key
            if changed(path, value):
                gone = kind in ("inputs", "outputs") and not path.exists() and not path.is_symlink()
                return f"{key} is gone since it ran" if gone else CHANGE_WORDS[kind].format(key)
    return None


def _file_changed(path: Path, digest: str) -> bool:
    return path.is_symlink() or not path.is_file() or sha256_file(path) != digest


def _listing_changed(folder: Path, names: list[str]) -> bool:
    return folder.is_symlink() or not folder.is_dir() or listing(folder) != names


def _link_changed(link: Path, target: str) -> bool:
    return not link.is_symlink() or os.readlink(link) != target


def _signature_changed(path: Path, expected: str) -> bool:
    return not isinstance(expected, str) or not path.is_file() or not hmac.compare_digest(signature(path), expected)


def record_stage(paths: Paths, stage: str, params: Any, inputs: list[Path], outputs: list[Path],
                 gate_passed: bool | None = None, folders: list[Path] = (), links: list[Path] = ()) -> None:
    """Record the SHA-256 of a stage's inputs and outputs (and signatures of its pickles), the listing of each
    folder in ``folders`` (read or written whole: a file added to one or removed makes the stage stale), the
    target of each link in ``links``, with the parameters and libraries.

    Written last, after every output is in place: a stage killed earlier leaves
    the manifest describing the previous run, and the next stage notices. The
    other stages' records stay: each names its own inputs, so it holds only
    while those are what it last read (a rerun of an earlier stage that wrote
    the same bytes reruns nothing after it).
    """
    manifest = read_manifest(paths, fresh_if_damaged=stage == STAGES[0])
    read = {relative(paths, p): digest_as_read(p) for p in sorted(inputs)}
    changed = [name for name, digest in read.items() if digest == CHANGED_SINCE_READ]
    if changed:
        log.warning("%d input(s) changed or removed after %s read them, e.g. %s: its outputs are from what it "
                    "read, and the next run reads them again", len(changed), stage, changed[0])
    manifest["stages"][stage] = {
        "params": {"file": str(params.path), "sha256": params.sha256},
        "params_read": params.stage_hash(stage),
        "code": _CODE_AT_START.get(stage) or code_hash(stage),
        "inputs": read,
        "outputs": {relative(paths, p): sha256_file(p) for p in sorted(outputs)},
        "signatures": {relative(paths, p): signature(p) for p in sorted(outputs) if p.suffix in SIGNED_SUFFIXES},
        "listings": {relative(paths, folder): listing_as_read(folder) for folder in folders},
        "links": {relative(paths, link, follow=False): os.readlink(link) for link in links if link.is_symlink()},
        "libraries": library_versions(),
    }
    if gate_passed is not None:
        manifest["stages"][stage]["gate_passed"] = gate_passed
    write_json(paths.manifest, manifest)


def stage_entry(paths: Paths, stage: str) -> dict[str, Any]:
    entry = read_manifest(paths)["stages"].get(stage)
    if entry is None:
        raise PipelineError(f"{paths.manifest}: no record of stage {stage}; run it first")
    for key in ("outputs", "libraries"):
        if not isinstance(entry.get(key), dict):
            raise PipelineError(f"{paths.manifest}: damaged record of stage {stage} (no {key}); rerun {stage}.py")
    return entry


def verify_outputs_of(paths: Paths, stage: str, files: list[Path]) -> None:
    """Refuse files that are not exactly what ``stage`` last wrote."""
    entry = stage_entry(paths, stage)
    recorded = entry["outputs"]
    for path in files:
        key = relative(paths, path)
        if not path.exists():
            raise PipelineError(f"{path}: missing; rerun {stage}.py")
        if key not in recorded:
            raise PipelineError(f"{path}: not written by {stage}.py (not in the manifest); rerun {stage}.py")
        if sha256_file(path) != recorded[key]:
            raise PipelineError(f"{path}: does not match its SHA-256 in the manifest "
                                f"(changed since {stage}.py wrote it); rerun {stage}.py")
    versions = library_versions()
    if files and entry["libraries"].get("scikit-learn") != versions["scikit-learn"]:
        raise PipelineError(
            f"{files[0]}: written with scikit-learn {entry['libraries'].get('scikit-learn')}, "
            f"this is {versions['scikit-learn']}; rerun {stage}.py or install requirements.txt")


def load_output(paths: Paths, stage: str, path: Path) -> Any:
    """A pickle ``stage`` wrote, after checking its hash and its signature."""
    verify_outputs_of(paths, stage, [path])
    return load_signed(path, stage_entry(paths, stage).get("signatures", {}).get(relative(paths, path)), stage)


def recorded_outputs(paths: Paths, stage: str) -> list[Path]:
    entry = read_manifest(paths)["stages"].get(stage, {})
    return [paths.root / key for key in entry.get("outputs", {})]


def relative(paths: Paths, path: Path, follow: bool = True) -> str:
    """A path relative to the project folder; absolute for a file outside it (imported data). ``follow``:
    a link stands for what it leads to (else for itself)."""
    path = Path(path)
    # A network's thousands of files share a few folders: each folder is resolved once.
    resolved = path.resolve() if follow and path.is_symlink() else _resolved(path.parent) / path.name
    try:
        return resolved.relative_to(_resolved(paths.root)).as_posix()
    except ValueError:
        return resolved.as_posix()


@functools.lru_cache(maxsize=256)
def _resolved(folder: Path) -> Path:
    return folder.resolve()
