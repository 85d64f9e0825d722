"""Reading protein sequences: FASTA (plain, .gz, .xz), parquet / CSV with a `sequence` column, and local Hugging Face
`datasets` directories, into one compact in-memory store (1 byte per residue, token ids already applied).

Every error names the file and, for FASTA, the line. Empty sequences are skipped and counted; characters outside the
vocabulary become `<unk>` and are counted. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import logging
import lzma
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recipe.data.tokenizer import _LUT, _VALID, UNK_ID

log = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna")
CLUSTER_COLUMNS = ("ur50_id", "ur90_id")


class DataError(ValueError):
    """Bad input data: the message names the file (and line)."""


@dataclass
class SequenceStore:
    """All sequences of one split as concatenated residue token ids (uint8) plus offsets."""

    tokens: np.ndarray  # uint8 [total residues]
    offsets: np.ndarray  # int64 [n + 1]
    source: str = ""
    clusters: dict[str, np.ndarray] = field(default_factory=dict)  # column -> int64 cluster index per sequence
    skipped_empty: int = 0
    invalid_chars: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def residues(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cluster_index(self):
        """ESM-2's cluster sampling index over these rows, or None without ur50 ids."""
        from recipe.data.clusters import ClusterIndex

        return (
            ClusterIndex.from_ids(self.clusters["ur50_id"], self.clusters.get("ur90_id")) if "ur50_id" in self.clusters else None
        )

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self):,} sequences, {len(self.tokens):,} residues"
            f", {self.skipped_empty:,} empty skipped, {self.invalid_chars:,} characters mapped to <unk>"
        )


def _build(chunks: list[np.ndarray], lengths: list[np.ndarray], source: str, empty: int, clusters=None) -> SequenceStore:
    raw = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    invalid = int(len(raw) - np.count_nonzero(_VALID[raw]))
    if len(lens) == 0:
        raise DataError(f"{source}: no sequences (empty file, or every sequence empty: {empty} skipped)")
    store = SequenceStore(_LUT[raw], offsets, source, clusters or {}, empty, invalid)
    if empty or invalid:
        log.warning("%s", store.summary())
    return store


def _open_store(path: Path):
    from recipe.data.store import StoreError, open_store

    try:
        return open_store(path)
    except StoreError as exc:
        raise DataError(str(exc)) from exc


# ------------------------------------------------------------------------------------------------ FASTA
def open_text(path: Path):
    """Open plain, gzip or xz text by content (magic bytes), not by file name."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


def iter_fasta(path: str | Path):
    """Yield (header, sequence bytes, header line number); raise DataError for what is not FASTA."""
    path = Path(path)
    parts: list[bytes] = []
    header, header_line, lineno = None, 0, 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line[:1] == b">":
                    if header is not None:
                        yield header, b"".join(parts), header_line
                    header, parts, header_line = line[1:].decode("utf-8", "replace"), [], lineno
                elif header is None:
                    raise DataError(f"{path}:{lineno}: malformed FASTA: sequence data before the first '>' header")
                else:
                    if b">" in line or b"\x00" in line:
                        raise DataError(f"{path}:{lineno}: malformed FASTA line: {line[:60]!r}")
                    parts.append(line.replace(b" ", b""))
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}:{lineno}: cannot read ({exc})") from exc
    if header is not None:
        yield header, b"".join(parts), header_line


def read_fasta(path: str | Path) -> SequenceStore:
    chunks, lengths, empty = [], [], 0
    lens_batch: list[int] = []
    for _, seq, _ in iter_fasta(path):
        if not seq:
            empty += 1
            continue
        chunks.append(np.frombuffer(seq, dtype=np.uint8))
        lens_batch.append(len(seq))
    lengths.append(np.asarray(lens_batch, dtype=np.int64))
    return _build(chunks, lengths, str(path), empty)


# ------------------------------------------------------------------------------------------------ Arrow-backed
def _from_arrow_table(table, source: str, column: str = "sequence") -> SequenceStore:
    """Sequences straight from Arrow buffers: no Python object per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in table.column_names:
        raise DataError(f"{source}: no {column!r} column (columns: {table.column_names})")
    col = table.column(column)
    check_sequence_column(col.type, source, column)
    keep = pc.fill_null(pc.greater(pc.binary_length(col.cast(pa.large_binary())), 0), False)
    empty = len(col) - int(pc.sum(keep.cast(pa.int64())).as_py() or 0)
    col = pc.filter(col, keep).cast(pa.large_binary()).combine_chunks()
    _, offs_buf, data_buf = col.buffers()
    offs = np.frombuffer(offs_buf, dtype=np.int64)[col.offset : col.offset + len(col) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    raw = data[offs[0] : offs[-1]]
    clusters = {}
    for name in CLUSTER_COLUMNS:
        if name in table.column_names and (name == "ur50_id" or "ur50_id" in clusters):
            clusters[name] = cluster_codes(pc.filter(table.column(name), keep), source, name)
    return _build([raw], [np.diff(offs)], source, empty, clusters)


def check_sequence_column(dtype, source, column: str) -> None:
    """Sequences are strings (or bytes); integers or floats in that column mean a wrong file or column."""
    import pyarrow as pa

    if not (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
        or pa.types.is_null(dtype)
    ):
        raise DataError(
            f"{source}: column {column!r} holds {dtype}, not protein sequences (strings); "
            "set dataset.column (or --column) to the sequence column"
        )


def cluster_codes(ids, source: str, name: str) -> np.ndarray:
    """Cluster id per row -> int64 code (equal id, equal code). A null id is no cluster: such a row becomes a
    cluster of its own (with a warning), never one big cluster named "None"."""
    import pyarrow.compute as pc

    null = pc.is_null(ids, nan_is_null=True).to_numpy(zero_copy_only=False)
    codes = np.empty(len(null), dtype=np.int64)
    if (~null).any():
        present = ids.to_numpy(zero_copy_only=False)[~null].astype(str)
        codes[~null] = np.unique(present, return_inverse=True)[1]
    missing = int(null.sum())
    if missing:
        base = int(codes[~null].max()) + 1 if (~null).any() else 0
        codes[null] = base + np.arange(missing)
        log.warning(
            "%s: %d of %d rows have a null %s: each of them is sampled as its own cluster", source, missing, len(null), name
        )
    return codes


def _parquet_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: directory holds no .parquet files")
    return files


def read_parquet(path: str | Path, column: str = "sequence") -> SequenceStore:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tables = []
    for f in _parquet_files(path):
        try:
            schema = pq.read_schema(f)
        except Exception as exc:
            raise DataError(f"{f}: not a readable parquet file ({exc})") from exc
        if column not in schema.names:
            raise DataError(f"{f}: no {column!r} column (columns: {schema.names})")
        cols = [column] + [c for c in CLUSTER_COLUMNS if c in schema.names]
        tables.append(pq.read_table(f, columns=cols))
    return _from_arrow_table(pa.concat_tables(tables), str(path), column)


def read_csv(path: str | Path, column: str = "sequence") -> SequenceStore:
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    return _from_arrow_table(table, str(path), column)


def read_hf_dataset(path: str | Path, column: str = "sequence", split: str = "train") -> SequenceStore:
    """A directory written by `datasets.Dataset.save_to_disk` (a DatasetDict takes `split`)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return _from_arrow_table(ds.data.table, str(path), column)


def detect_format(path: Path) -> str:
    from recipe.data.store import is_store

    name = path.name.lower()
    for suffix in (".gz", ".xz"):
        name = name.removesuffix(suffix)
    if is_store(path):
        return "store"
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf"
        return "parquet"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(FASTA_SUFFIXES):
        return "fasta"
    raise DataError(f"{path}: cannot tell the format from the name; set dataset.format (fasta, parquet, csv, hf, store)")


def load_sequences(path: str | Path, fmt: str = "auto", column: str = "sequence", split: str = "train"):
    """Load one split into memory (`fmt`: auto, fasta, parquet, csv or hf, a save_to_disk directory), or open a
    prepared store (`store`, recipe/data/store.py) through memory maps without reading it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {
        "fasta": lambda: read_fasta(path),
        "parquet": lambda: read_parquet(path, column),
        "csv": lambda: read_csv(path, column),
        "hf": lambda: read_hf_dataset(path, column, split),
        "store": lambda: _open_store(path),
    }
    if fmt not in readers:
        raise DataError(f"dataset.format={fmt!r} is not one of auto, {', '.join(readers)}")
    store = readers[fmt]()
    log.info("%s", store.summary())
    return store


__all__ = ["DataError", "SequenceStore", "iter_fasta", "load_sequences", "UNK_ID"]
