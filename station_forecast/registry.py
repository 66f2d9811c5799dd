"""The accepted model: promotion after the quality gate, and going back to the one before.

``models/accepted`` and ``models/previous`` are symbolic links to complete,
never-changed sets in ``models/sets/``. Promoting or restoring writes the new
set first and then replaces each link with one rename, which cannot be half
done: whenever the process dies, ``models/accepted`` names a complete set, and a
failed write (a full disk, a read-only folder) changes neither link. Every set
holds ``SIGNATURES.json``, an HMAC of each file under the model-signing key
(see manifest.py); a set is promoted or restored only when all of them check,
so a file planted in ``models/`` never becomes the accepted model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from station_forecast import stopping
from station_forecast.errors import PipelineError
from station_forecast.manifest import check_signature, signature
from station_forecast.storage import Paths, fsync_folder, read_json, remove_tree, sha256_file, write_bytes, write_json

log = logging.getLogger("pipeline")
SIGNATURES = "SIGNATURES.json"
SET_NAME_LENGTH = 16  # hex digits of the hash of a set's signatures


def accepted_files(paths: Paths) -> list[Path]:
    return [paths.scaler, paths.detector, paths.model, paths.model_record, paths.metrics]


def accept(paths: Paths, trusted: dict[Path, str]) -> None:
    """Make the model set that just passed the gate the accepted one; the accepted set becomes the previous.

    ``trusted`` maps each pickle to the signature the manifest recorded for it;
    the copies are checked against them before anything is promoted.
    """
    for path, expected in trusted.items():
        check_signature(path, expected, "Rerun ./pipeline.sh")
    sets = paths.sets
    staged = sets / f".new.{os.getpid()}"
    remove_tree(staged)
    staged.mkdir(parents=True)
    try:
        signatures = {}
        for path in accepted_files(paths):
            write_bytes(staged / path.name, path.read_bytes())
            signatures[path.name] = signature(staged / path.name)
        write_json(staged / SIGNATURES, signatures)
        final = sets / _set_name(signatures)
        if final.exists():  # the same set was accepted before: reuse it
            remove_tree(staged)
        else:
            stopping.check()
            staged.rename(final)
            fsync_folder(sets)
    finally:
        remove_tree(staged)
    _adopt(paths, paths.previous)
    current = _adopt(paths, paths.accepted)
    if current is not None and current != final.name:
        _point(paths.previous, current)
    _point(paths.accepted, final.name)
    _forget_unused_sets(paths)


def restore_previous(paths: Paths) -> None:
    """Swap models/accepted and models/previous, after checking the previous set's signatures."""
    previous = _adopt(paths, paths.previous)
    if previous is None:
        raise PipelineError(f"{paths.previous}: no previously accepted model to restore (a model is kept there "
                            "only after a second one has passed the quality gate)")
    _verify_set(paths.sets / previous)
    current = _adopt(paths, paths.accepted)
    _point(paths.accepted, previous)
    if current is not None:
        _point(paths.previous, current)
    log.info("restored: %s now holds the previously accepted model (the replaced one is in %s)",
             paths.accepted, paths.previous)


def _set_name(signatures: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(signatures, sort_keys=True).encode()).hexdigest()[:SET_NAME_LENGTH]


def _verify_set(folder: Path) -> None:
    try:
        signatures = read_json(folder / SIGNATURES)
    except PipelineError:
        raise PipelineError(f"{folder / SIGNATURES}: missing or damaged; the set cannot be restored") from None
    expected = {path.name for path in folder.iterdir()} - {SIGNATURES}
    if not isinstance(signatures, dict) or set(signatures) != expected:
        raise PipelineError(f"{folder}: files do not match {SIGNATURES}; the set cannot be restored")
    for name, value in signatures.items():
        path = folder / name
        check_signature(path, value, "The set cannot be restored")


def set_of(paths: Paths, link: Path) -> str | None:
    """The name of the set in sets/ that ``link`` points to, or None: a link anywhere else (made by hand,
    leading out of the project) names no set, and is replaced, never followed, when the link is next set."""
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link))
    if target.parent != Path("sets") or target.name.startswith("."):
        return None
    folder = paths.sets / target.name
    return target.name if folder.is_dir() and not folder.is_symlink() else None


def _adopt(paths: Paths, link: Path) -> str | None:
    """The set a link points to. A plain folder (from an older version, or a copy of the project) is moved
    into sets/ as it is, and signs nothing: it can be restored only if its own signatures check."""
    if link.is_symlink() or not link.is_dir():
        return set_of(paths, link)
    contents = {p.name: sha256_file(p) for p in sorted(link.iterdir()) if p.is_file()}
    name = _set_name(contents)
    sets = paths.sets
    sets.mkdir(exist_ok=True)
    if (sets / name).exists():
        remove_tree(link)
    else:
        link.rename(sets / name)
    _point(link, name)
    return name


def _point(link: Path, set_name: str) -> None:
    """Make ``link`` point at ``sets/<set_name>`` with a single rename."""
    for stale in link.parent.glob(f".{link.name}.*.link"):  # left by a process killed mid-swap
        stale.unlink(missing_ok=True)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    os.symlink(Path("sets") / set_name, temporary)
    stopping.check()
    os.replace(temporary, link)
    fsync_folder(link.parent)


def _forget_unused_sets(paths: Paths) -> None:
    """Delete the sets neither link points to: only folders named as this module names sets, so nothing a
    user put in sets/ is touched."""
    used = {set_of(paths, link) for link in (paths.accepted, paths.previous)}
    for folder in paths.sets.iterdir():
        if folder.name not in used and _is_set_name(folder.name) and folder.is_dir() and not folder.is_symlink():
            remove_tree(folder)


def _is_set_name(name: str) -> bool:
    return len(name) == SET_NAME_LENGTH and all(c in "0123456789abcdef" for c in name)
