"""The prepared sequence store: what `python -m recipe.data.prepare` writes and training memory-maps.

One split is one directory of flat little-endian files, read with `np.memmap` (nothing is loaded at open; pages
come from the OS page cache, which every rank of a node shares):
  tokens.u8               residue token ids of every sequence, concatenated (1 byte per residue)
  offsets.i64             [n + 1] where each sequence starts in tokens.u8
  cluster_order.i64       optional cluster index (recipe/data/clusters.py): rows sorted by (UniRef50, UniRef90)
  cluster_sub_start.i64   [n90 + 1]
  cluster_first_sub.i64   [n50 + 1]
  manifest.json           written last and atomically: counts, file sizes, source. Without it the store is
                          incomplete (an interrupted prepare) and is refused; sizes that disagree mean a torn copy.
Flat files beat Arrow IPC here because a sample is two offset reads and one slice, with no per-batch record-batch
lookup; the format is simple enough to check completely at open (docs/data_store.md).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from recipe.data.clusters import ClusterIndex, group_index
from recipe.data.tokenizer import _LUT, _VALID

log = logging.getLogger(__name__)

FORMAT = "esm2-recipe-store"
VERSION = 1
MANIFEST = "manifest.json"
DATA_FILES = ("tokens.u8", "offsets.i64")
CLUSTER_FILES = ("cluster_order.i64", "cluster_sub_start.i64", "cluster_first_sub.i64")
_KEY_FILES = (".ur50.keys", ".ur90.keys")  # per-row cluster keys while writing; removed when the index is built


class StoreError(ValueError):
    """A store that cannot be used: the message names the directory and what is wrong."""


def is_store(path: str | Path) -> bool:
    """A directory that holds (or was meant to hold) a store: a manifest or any store data file."""
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in (MANIFEST, *DATA_FILES))


class StoreWriter:
    """Appends batches of sequences to a new store directory in constant memory; `close()` builds the cluster
    index (if cluster keys were given) and writes the manifest last."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        if any(self.dir.iterdir()):
            raise StoreError(f"{self.dir}: not empty; a store is only written into a new or empty directory")
        # open for the writer's whole life (batches arrive one call at a time); close() closes them
        self._tokens = open(self.dir / "tokens.u8", "wb")  # noqa: SIM115
        self._offsets = open(self.dir / "offsets.i64", "wb")  # noqa: SIM115
        self._offsets.write(np.zeros(1, np.int64).tobytes())
        self._keys: list | None = None
        self.rows, self.residues, self.invalid = 0, 0, 0

    def add(self, raw: np.ndarray, lengths: np.ndarray, ur50: np.ndarray | None = None, ur90: np.ndarray | None = None) -> None:
        """`raw`: the sequences' ASCII bytes concatenated; `lengths`: one per sequence (all > 0); `ur50`/`ur90`:
        uint64 cluster keys per sequence, given for every batch or for none."""
        if len(lengths) == 0:
            return
        if self._keys is None:
            self._keys = [open(self.dir / name, "wb") for name, k in zip(_KEY_FILES, (ur50, ur90)) if k is not None]  # noqa: SIM115
            self._has90 = ur90 is not None
        keys = [k for k in (ur50, ur90) if k is not None]
        if len(keys) != len(self._keys):
            raise StoreError(f"{self.dir}: cluster ids given for some batches and not others")
        self._tokens.write(_LUT[raw].tobytes())
        self.invalid += int(len(raw) - np.count_nonzero(_VALID[raw]))
        self._offsets.write((self.residues + np.cumsum(lengths, dtype=np.int64)).tobytes())
        for f, k in zip(self._keys, keys):
            f.write(np.asarray(k, dtype=np.uint64).tobytes())
        self.rows += len(lengths)
        self.residues += int(np.sum(lengths))

    def close(self, extra: dict | None = None) -> dict:
        for f in (self._tokens, self._offsets, *(self._keys or [])):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        clusters = None
        if self._keys:
            ur50 = np.memmap(self.dir / _KEY_FILES[0], dtype=np.uint64, mode="r")
            ur90 = np.memmap(self.dir / _KEY_FILES[1], dtype=np.uint64, mode="r") if self._has90 else None
            order, sub_start, first_sub = group_index(ur50, ur90)
            del ur50, ur90
            for name, arr in zip(CLUSTER_FILES, (order, sub_start, first_sub)):
                _write_synced(self.dir / name, arr.astype(np.int64).tobytes())
            clusters = {"ur50": len(first_sub) - 1, "ur90": len(sub_start) - 1 if self._has90 else None}
            for name in _KEY_FILES:
                (self.dir / name).unlink(missing_ok=True)
        files = DATA_FILES + (CLUSTER_FILES if clusters else ())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "sequences": self.rows,
            "residues": self.residues,
            "invalid_characters": self.invalid,
            "clusters": clusters,
            "files": {f: (self.dir / f).stat().st_size for f in files},
            **(extra or {}),
        }
        _write_synced(self.dir / f".{MANIFEST}.tmp", (json.dumps(manifest, indent=2) + "\n").encode())
        os.replace(self.dir / f".{MANIFEST}.tmp", self.dir / MANIFEST)  # the store exists from this moment on
        return manifest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class MappedStore:
    """A store opened read-only through memory maps: the `SequenceStore` interface without reading the data.
    Pickles as its path (a loader worker started by spawn re-opens it instead of copying it)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        self.source = str(self.dir)
        self.tokens = _map(self.dir / "tokens.u8", np.uint8) if self.manifest["residues"] else np.zeros(0, np.uint8)
        self.offsets = _map(self.dir / "offsets.i64", np.int64)
        self.clusters: dict = {}
        self.skipped_empty = int(self.manifest.get("empty_skipped", 0))
        self.invalid_chars = int(self.manifest["invalid_characters"])
        self._index = None
        if self.manifest["clusters"]:
            self._index = ClusterIndex(*(_map(self.dir / f, np.int64) for f in CLUSTER_FILES))

    def __getstate__(self) -> dict:
        return {"dir": self.dir}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["dir"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def residues(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def cluster_index(self) -> ClusterIndex | None:
        return self._index

    def summary(self) -> str:
        c = self.manifest["clusters"]
        where = f", {c['ur50']:,} UniRef50 clusters" + (f" / {c['ur90']:,} UniRef90" if c.get("ur90") else "") if c else ""
        return f"{self.source} (prepared store): {len(self):,} sequences, {self.manifest['residues']:,} residues{where}"


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memory map as a plain ndarray: slicing it costs what slicing an array costs (an np.memmap
    slice is a new memmap object each time, several times slower per sample)."""
    return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray)


def read_manifest(directory: Path) -> dict:
    """The manifest, after checking that the store is complete: every file there with the size it was written at."""
    path = directory / MANIFEST
    if not path.exists():
        raise StoreError(
            f"{directory}: incomplete store (no {MANIFEST}): `prepare` was interrupted or is still running; "
            "run it again into an empty directory (or with --overwrite)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable store manifest ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(f"{path}: not a version-{VERSION} {FORMAT} manifest")
    for name, size in manifest["files"].items():
        have = (directory / name).stat().st_size if (directory / name).exists() else None
        if have != size:
            raise StoreError(
                f"{directory}: torn store: {name} is {have if have is not None else 'missing'} bytes, "
                f"the manifest says {size}; copy it again or re-run prepare"
            )
    if manifest["files"]["offsets.i64"] != 8 * (manifest["sequences"] + 1):
        raise StoreError(f"{directory}: manifest counts {manifest['sequences']} sequences but offsets.i64 disagrees")
    return manifest


def open_store(directory: str | Path) -> MappedStore:
    store = MappedStore(directory)
    log.info("%s", store.summary())
    return store
