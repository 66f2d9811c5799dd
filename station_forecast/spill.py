"""A table too large to hold at once, kept as the blocks of rows it was built in: in memory while they are
small, in files of a private folder once they pass a size (each column of a block a NumPy file, read back
mapped, so one column of every block can be read without the rest).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from station_forecast import runtime, storage

np = runtime.lazy_import("numpy")

LIMIT_BYTES = 1 << 28  # a table's blocks held in memory up to this size in all, then all of them on disk


LABELS = ":labels"  # the key of a coded text column's labels: its name and this (``coded``)


def coded(name: str, values: Any) -> dict[str, Any]:
    """A text column of a block (``values``: a pandas Series or array) as integer codes under ``name`` and its
    distinct values under ``name + LABELS`` (-1: missing): four bytes a row instead of a string object each.
    ``decoded`` gives the text back."""
    import pandas as pd

    codes, labels = pd.factorize(values)
    return {name: codes.astype(np.int32), name + LABELS: np.asarray(labels, dtype=object)}


def decoded(columns: dict[str, Any]) -> dict[str, Any]:
    """A block's columns with each coded text column (``coded``) back as text (None where missing), in
    their order, without the labels."""
    result = {}
    for name, values in columns.items():
        if name.endswith(LABELS):
            continue
        labels = columns.get(name + LABELS)
        result[name] = values if labels is None else np.where(values < 0, None, labels[np.maximum(values, 0)])
    return result


class Blocks:
    """Blocks of rows (each a dict of equally long column arrays, every block the same columns), in the
    order they were added; past ``limit_bytes`` in all, every block is kept in ``folder`` instead of
    memory. ``close`` removes the folder."""

    def __init__(self, folder: Path, limit_bytes: int) -> None:
        self.folder, self.limit_bytes = folder, limit_bytes
        self.rows = self.bytes = 0
        self._blocks: list[dict[str, Any] | Path] = []
        storage.remove_tree(folder)  # a killed run's blocks

    def add(self, columns: dict[str, Any]) -> None:
        self._blocks.append(columns)
        self.rows += len(next(iter(columns.values()), []))
        self.bytes += sum(values.nbytes for values in columns.values())
        if self.bytes > self.limit_bytes:
            self._blocks = [self._spilled(i, block) for i, block in enumerate(self._blocks)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Each block's columns in order (mapped from their files where spilled)."""
        return (self._columns(block) for block in self._blocks)

    def column(self, name: str) -> Iterator[Any]:
        """One column of each block, in order."""
        return (self._columns(block, [name])[name] for block in self._blocks)

    @property
    def spilled(self) -> bool:
        return any(isinstance(block, Path) for block in self._blocks)

    def close(self) -> None:
        self._blocks = []
        storage.remove_tree(self.folder)

    def _spilled(self, index: int, block: dict[str, Any] | Path) -> Path:
        if isinstance(block, Path):
            return block
        place = self.folder / f"{index:06d}"
        place.mkdir(parents=True)
        for i, values in enumerate(block.values()):
            np.save(place / f"{i:03d}.npy", values, allow_pickle=values.dtype == object)
        # Text columns are pickled objects, read back whole; the others are mapped.
        (place / "columns").write_text("".join(f"{name}\t{values.dtype == object:d}\n"
                                               for name, values in block.items()), encoding="utf-8")
        return place

    @staticmethod
    def _columns(block: dict[str, Any] | Path, names: list[str] | None = None) -> dict[str, Any]:
        if not isinstance(block, Path):
            return block if names is None else {name: block[name] for name in names}
        stored = [line.split("\t") for line in (block / "columns").read_text(encoding="utf-8").splitlines()]
        return {name: np.load(block / f"{i:03d}.npy", mmap_mode=None if text == "1" else "r", allow_pickle=text == "1")
                for i, (name, text) in enumerate(stored) if names is None or name in names}
