"""Sequences -> a prepared store (recipe/data/store.py) with a train/validation split, streaming in constant memory.

    python -m recipe.data.prepare uniref50.fasta.gz data/uniref50 --val-fraction 0.0005
    python -m recipe.data.prepare esm2_uniref_pretraining_data/train data/uniref --val-fraction 0.001   # parquet
    python -m recipe.data.prepare uniref90.fasta.gz data/uniref90 --membership uniref90_to_50.tsv.gz

Inputs: FASTA (plain, .gz, .xz), a parquet file or directory of shards, or CSV, with a `sequence` column (--column).
Cluster ids, when the input has them, become the store's cluster index (UniRef50 -> UniRef90 -> members):
  - parquet / CSV columns `ur50_id` and optionally `ur90_id` (NVIDIA's esm2_uniref_pretraining_data layout);
  - FASTA headers with `ur50_id=X` / `ur90_id=Y` tags;
  - a UniRef90 FASTA (ids `UniRef90_...`) plus --membership, a two-column TSV `UniRef90 id <TAB> UniRef50 id`
    (e.g. columns 9 and 10 of UniProt's idmapping_selected.tab, deduplicated).
A row whose ur50_id is null (or, with --membership, absent from the file) becomes its own cluster and is counted;
`prepare` warns with the count and stores it in the manifest. Cluster ids are stored as 64-bit hashes.

Each record goes to validation when a hash of (seed, its UniRef50 cluster | its id | its sequence) falls under
--val-fraction: whole clusters are held out, and the split is deterministic, independent of file order and needs no
second pass. Residues stream straight to disk; building the cluster index at the end needs memory in proportion to
the number of sequences (one sort of their cluster keys; docs/data_store.md). Output: `OUT/train/`, `OUT/validation/`
(stores) and `OUT/prepare_stats.json`. OUT must be new or empty;
--overwrite removes a previous prepare's output first (and refuses when OUT holds anything else).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from recipe.data import mlm
from recipe.data.sources import CLUSTER_COLUMNS, DataError, detect_format, iter_fasta, open_text
from recipe.data.store import StoreError, StoreWriter

log = logging.getLogger(__name__)
BATCH = 65_536
OUTPUTS = ("train", "validation", "prepare_stats.json")
_TAG = re.compile(r"\b(ur50_id|ur90_id)=(\S+)")


def record_id(header: str) -> str:
    """`sp|P12345|NAME ...` -> P12345; `UniRef50_Q6GZX4 n=2 ...` -> UniRef50_Q6GZX4; else the first word."""
    first = header.split(maxsplit=1)[0] if header.strip() else ""
    parts = first.split("|")
    return parts[1] if len(parts) >= 3 and parts[0] in ("sp", "tr") else first


def hash_strings(values) -> np.ndarray:
    """A 64-bit key per string (pandas' vectorised SipHash): cluster ids and split keys without a Python dict."""
    from pandas.util import hash_array

    return hash_array(np.asarray(values, dtype=object), categorize=False).astype(np.uint64)


def is_validation(seed: int, keys: np.ndarray, fraction: float) -> np.ndarray:
    mixed = mlm.sample_keys(seed, 0, keys, mlm.SHUFFLE + 100)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53) < fraction


def singleton_keys(n: int, start: int) -> np.ndarray:
    """Keys for rows without a cluster id: one cluster each (a tag bit keeps them apart from hashed ids)."""
    return (np.uint64(1) << np.uint64(63)) | np.arange(start, start + n, dtype=np.uint64)


class Batch:
    """Up to BATCH sequences as concatenated ASCII bytes + lengths, with their split keys and cluster keys."""

    def __init__(self, raw: np.ndarray, lengths: np.ndarray, split_keys: np.ndarray, ur50=None, ur90=None):
        self.raw, self.lengths, self.split_keys, self.ur50, self.ur90 = raw, lengths, split_keys, ur50, ur90

    def select(self, keep: np.ndarray) -> Batch:
        """The rows where `keep` is true, copied run by run (a split keeps long runs of consecutive rows)."""
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
        raw = np.concatenate([self.raw[offsets[a] : offsets[b]] for a, b in zip(edges[::2], edges[1::2])] or [self.raw[:0]])

        def pick(a):
            return a[keep] if a is not None else None

        return Batch(raw, self.lengths[keep], self.split_keys[keep], pick(self.ur50), pick(self.ur90))


# ------------------------------------------------------------------------------------------------ readers
class Counters:
    def __init__(self):
        self.records = self.empty = self.ur50_missing = self.ur90_missing = 0


def fasta_batches(path: Path, counters: Counters, membership: tuple | None, limit: int | None):
    ids, seqs, tags50, tags90 = [], [], [], []
    for header, seq, _ in iter_fasta(path):
        counters.records += 1
        if seq:
            ids.append(record_id(header))
            seqs.append(seq)
            tags = dict(_TAG.findall(header)) if "_id=" in header else {}
            tags50.append(tags.get("ur50_id"))
            tags90.append(tags.get("ur90_id"))
        else:
            counters.empty += 1
        if len(ids) >= BATCH or (limit and counters.records >= limit):
            yield _fasta_batch(ids, seqs, tags50, tags90, counters, membership)
            ids, seqs, tags50, tags90 = [], [], [], []
        if limit and counters.records >= limit:
            return
    if ids:
        yield _fasta_batch(ids, seqs, tags50, tags90, counters, membership)


def _fasta_batch(ids, seqs, tags50, tags90, counters: Counters, membership) -> Batch:
    raw = np.frombuffer(b"".join(seqs), dtype=np.uint8)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    id_keys = hash_strings(ids)
    ur50 = ur90 = None
    if membership is not None:
        ur90 = id_keys
        ur50 = _lookup(membership, id_keys, counters)
    elif any(t is not None for t in tags50):
        ur50 = _keys_with_nulls(tags50, counters, "ur50")
        ur90 = _keys_with_nulls(tags90, counters, "ur90") if any(t is not None for t in tags90) else None
    return Batch(raw, lengths, ur50 if ur50 is not None else id_keys, ur50, ur90)


def _keys_with_nulls(values, counters: Counters, level: str, null: np.ndarray | None = None) -> np.ndarray:
    """Hashed cluster ids; rows without one (None, or `null`) get singleton keys and are counted."""
    values = np.asarray(values, dtype=object)
    if null is None:
        null = np.array([v is None for v in values], dtype=bool)
    keys = np.zeros(len(values), dtype=np.uint64)
    if (~null).any():
        keys[~null] = hash_strings(values[~null])
    missing = int(null.sum())
    start = counters.ur50_missing + counters.ur90_missing
    keys[null] = singleton_keys(missing, start)
    setattr(counters, f"{level}_missing", getattr(counters, f"{level}_missing") + missing)
    return keys


def read_membership(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """UniRef90 -> UniRef50 as two aligned uint64 arrays sorted by the UniRef90 key (16 bytes per UniRef90 cluster)."""
    k90s: list[np.ndarray] = []
    k50s: list[np.ndarray] = []
    with open_text(path) as f:
        lines = []
        for lineno, line in enumerate(f, 1):
            if line.startswith(b"#") or not line.strip():
                continue
            lines.append(line.rstrip(b"\r\n").split(b"\t"))
            if len(lines) >= BATCH:
                _membership_block(path, lines, lineno, k90s, k50s)
                lines = []
        if lines:
            _membership_block(path, lines, lineno, k90s, k50s)
    if not k90s:
        raise DataError(f"{path}: no UniRef90 -> UniRef50 rows")
    k90, k50 = np.concatenate(k90s), np.concatenate(k50s)
    order = np.argsort(k90, kind="stable")
    return k90[order], k50[order]


def _membership_block(path: Path, rows: list, lineno: int, k90: list, k50: list) -> None:
    if any(len(r) < 2 for r in rows):
        raise DataError(f"{path}: near line {lineno}: expected two tab-separated columns (UniRef90 id, UniRef50 id)")
    rows = [r for r in rows if r[0] not in (b"ur90_id", b"UniRef90", b"uniref90")]  # a header line
    k90.append(hash_strings([r[0].decode() for r in rows]))
    k50.append(hash_strings([r[1].decode() for r in rows]))


def _lookup(membership: tuple, keys: np.ndarray, counters: Counters) -> np.ndarray:
    k90, k50 = membership
    pos = np.minimum(np.searchsorted(k90, keys), len(k90) - 1)
    found = k90[pos] == keys
    out = np.where(found, k50[pos], np.uint64(0))
    missing = int((~found).sum())
    out[~found] = singleton_keys(missing, counters.ur50_missing)
    counters.ur50_missing += missing
    return out


def table_batches(path: Path, fmt: str, column: str, counters: Counters):
    """Batches from parquet (file or directory) or CSV, read in record batches."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: directory holds no .parquet files")
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as exc:
                raise DataError(f"{f}: not a readable parquet file ({exc})") from exc
            cols = _columns(f, pf.schema_arrow.names, column)
            for rb in pf.iter_batches(batch_size=BATCH, columns=cols):
                yield _arrow_batch(f, rb, column, counters)
    else:
        import pyarrow.csv as pcsv

        try:
            reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 24))
            _columns(path, reader.schema.names, column)
            for rb in reader:
                yield _arrow_batch(path, rb, column, counters)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: not a readable CSV file ({exc})") from exc


def _columns(path: Path, names: list[str], column: str) -> list[str]:
    if column not in names:
        raise DataError(f"{path}: no {column!r} column (columns: {names})")
    return [column] + [c for c in (*CLUSTER_COLUMNS, "id") if c in names]


def _arrow_batch(path: Path, rb, column: str, counters: Counters) -> Batch:
    import pyarrow as pa
    import pyarrow.compute as pc

    from recipe.data.sources import check_sequence_column

    col = rb.column(rb.schema.get_field_index(column))
    check_sequence_column(col.type, path, column)
    counters.records += len(col)
    col = col.cast(pa.large_binary())
    keep = pc.fill_null(pc.greater(pc.binary_length(col), 0), False).to_numpy(zero_copy_only=False)
    counters.empty += int((~keep).sum())
    col = pc.filter(col, pa.array(keep))
    _, offs_buf, data_buf = col.buffers()
    offs = np.frombuffer(offs_buf, dtype=np.int64)[col.offset : col.offset + len(col) + 1]
    raw = np.frombuffer(data_buf, dtype=np.uint8)[offs[0] : offs[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    names = rb.schema.names

    def get(name):
        return rb.column(names.index(name)).filter(pa.array(keep)) if name in names else None

    ur50, ur90, ids = get("ur50_id"), get("ur90_id"), get("id")
    k50 = _arrow_keys(ur50, counters, "ur50") if ur50 is not None else None
    k90 = _arrow_keys(ur90, counters, "ur90") if (ur90 is not None and k50 is not None) else None
    if k50 is not None:
        split = k50
    elif ids is not None:
        split = hash_strings(pc.fill_null(ids.cast(pa.string()), "").to_numpy(zero_copy_only=False))
    else:  # no id: the sequence itself, so the split still ignores file order
        split = hash_strings([bytes(raw[a:b]) for a, b in zip(offs[:-1] - offs[0], offs[1:] - offs[0])])
    return Batch(raw.copy(), np.diff(offs), split, k50, k90)


def _arrow_keys(column, counters: Counters, level: str) -> np.ndarray:
    """Cluster keys of an Arrow column; null (and NaN, which pandas writes for missing strings) is no id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    null = pc.is_null(column, nan_is_null=True).to_numpy(zero_copy_only=False)
    values = pc.fill_null(column.cast(pa.string()), "").to_numpy(zero_copy_only=False)
    return _keys_with_nulls(values, counters, level, null)


# ------------------------------------------------------------------------------------------------ prepare
def clear_output(out: Path, overwrite: bool) -> None:
    """OUT must be new or empty; --overwrite removes a previous prepare's output and nothing else."""
    if not out.exists() or not any(out.iterdir()):
        return
    entries = sorted(p.name for p in out.iterdir())
    if not overwrite:
        raise DataError(
            f"{out}: not empty ({', '.join(entries[:5])}); choose a new directory or pass --overwrite "
            "to replace a previous prepare's output (stale shards would otherwise be read by training)"
        )
    foreign = [e for e in entries if e not in OUTPUTS]
    if foreign:
        raise DataError(f"{out}: --overwrite only removes a previous prepare's output, but it also holds {foreign[:5]}")
    for e in entries:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def prepare(
    source: str | Path,
    out: str | Path,
    val_fraction: float = 0.001,
    seed: int = 0,
    membership: str | Path | None = None,
    column: str = "sequence",
    fmt: str = "auto",
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"{source}: no such file")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if membership is not None and fmt != "fasta":
        raise DataError(f"--membership joins a UniRef90 FASTA; {source} is {fmt} (give ur50_id/ur90_id columns instead)")
    clear_output(out, overwrite)
    start = time.perf_counter()
    counters = Counters()
    members = read_membership(Path(membership)) if membership is not None else None
    if fmt == "fasta":
        batches = fasta_batches(source, counters, members, limit)
    elif fmt in ("parquet", "csv"):
        batches = table_batches(source, fmt, column, counters)
    else:
        raise DataError(f"{source}: prepare reads fasta, parquet or csv, not {fmt}")
    writers = {"train": StoreWriter(out / "train"), "validation": StoreWriter(out / "validation")}
    bar = tqdm(unit="seq", unit_scale=True, disable=not progress, desc=f"prepare {source.name}", mininterval=1.0)
    clustered = None
    for batch in batches:
        clustered = batch.ur50 is not None if clustered is None else clustered
        val = is_validation(seed, batch.split_keys, val_fraction)
        for split, keep in (("train", ~val), ("validation", val)):
            part = batch.select(keep) if not keep.all() else batch
            writers[split].add(part.raw, part.lengths, part.ur50, part.ur90)
        bar.update(len(batch.lengths))
    bar.close()
    stats = {
        "records": counters.records,
        "empty_skipped": counters.empty,
        "ur50_null_rows": counters.ur50_missing,
        "ur90_null_rows": counters.ur90_missing,
        "source": str(source),
        "seed": seed,
        "val_fraction": val_fraction,
    }
    if writers["train"].rows + writers["validation"].rows == 0:
        raise DataError(f"{source}: no non-empty sequences")
    if counters.ur50_missing:
        log.warning(
            "%s: %d of %d rows have no UniRef50 id (null, or not in --membership): each is its own cluster",
            source,
            counters.ur50_missing,
            counters.records - counters.empty,
        )
    for split, w in writers.items():
        manifest = w.close(
            {
                "source": str(source),
                "split": split,
                "empty_skipped": counters.empty if split == "train" else 0,
                "ur50_null_rows": counters.ur50_missing,
                "seed": seed,
                "val_fraction": val_fraction,
            }
        )
        stats[split] = manifest["sequences"]
        stats[f"{split}_residues"] = manifest["residues"]
        stats[f"{split}_clusters"] = manifest["clusters"]
    stats["residues"] = stats["train_residues"] + stats["validation_residues"]
    stats["seconds"] = round(time.perf_counter() - start, 3)
    stats["sequences_per_second"] = round(counters.records / max(stats["seconds"], 1e-9))
    (out / "prepare_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="FASTA (plain, .gz or .xz), parquet file or directory, or CSV")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--val-fraction", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--membership", default=None, help="UniRef90 -> UniRef50 TSV, for a UniRef90 FASTA")
    p.add_argument("--column", default="sequence", help="sequence column (parquet, CSV)")
    p.add_argument("--format", default="auto", choices=("auto", "fasta", "parquet", "csv"))
    p.add_argument("--limit", type=int, default=None, help="stop after this many FASTA records")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare's output in OUT")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        stats = prepare(a.source, a.out, a.val_fraction, a.seed, a.membership, a.column, a.format, a.limit, a.overwrite)
    except (DataError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
