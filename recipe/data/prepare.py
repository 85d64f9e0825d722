"""FASTA -> parquet shards with a train/validation split, streaming in constant memory.

    python -m recipe.data.prepare uniref50.fasta.gz data/uniref50 --val-fraction 0.001 --seed 0

Each record goes to validation when a hash of (seed, its id) falls under --val-fraction, so the split is
deterministic, independent of file order and shard size, and needs no second pass. Output:
`OUT/train/part-00000.parquet ...`, `OUT/validation/part-00000.parquet ...` with columns id and sequence (upper case), plus `OUT/prepare_stats.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from recipe.data.sources import DataError, iter_fasta


def record_id(header: str) -> str:
    """`sp|P12345|NAME ...` -> P12345; `UniRef50_Q6GZX4 n=2 ...` -> UniRef50_Q6GZX4; else the first word."""
    first = header.split(maxsplit=1)[0] if header.strip() else ""
    parts = first.split("|")
    return parts[1] if len(parts) >= 3 and parts[0] in ("sp", "tr") else first


def is_validation(seed: int, rid: str, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class ShardWriter:
    """Buffers rows and writes numbered parquet shards of `rows_per_shard` rows (zstd)."""

    def __init__(self, directory: Path, rows_per_shard: int):
        self.dir, self.rows_per_shard = directory, rows_per_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.buf: dict[str, list] = {"id": [], "sequence": []}
        self.shards = 0
        self.rows = 0

    def add(self, rid: str, seq: str) -> None:
        self.buf["id"].append(rid)
        self.buf["sequence"].append(seq)
        if len(self.buf["id"]) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buf["id"]:
            return
        tmp = self.dir / f".part-{self.shards:05d}.parquet.tmp"
        pq.write_table(pa.table(self.buf), tmp, compression="zstd", compression_level=9)
        os.replace(tmp, self.dir / f"part-{self.shards:05d}.parquet")  # a crash never leaves a half shard
        self.rows += len(self.buf["id"])
        self.shards += 1
        self.buf = {"id": [], "sequence": []}


def prepare(
    fasta: str | Path,
    out: str | Path,
    val_fraction: float = 0.001,
    seed: int = 0,
    rows_per_shard: int = 1_000_000,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    fasta, out = Path(fasta), Path(out)
    if not fasta.exists():
        raise DataError(f"{fasta}: no such file")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    writers = {"train": ShardWriter(out / "train", rows_per_shard), "validation": ShardWriter(out / "validation", rows_per_shard)}
    stats = {"records": 0, "empty_skipped": 0, "residues": 0, "train": 0, "validation": 0}
    start = time.perf_counter()
    bar = tqdm(total=limit, unit="seq", unit_scale=True, disable=not progress, desc=f"prepare {fasta.name}", mininterval=1.0)
    for header, seq, _ in iter_fasta(fasta):
        stats["records"] += 1
        if not seq:
            stats["empty_skipped"] += 1
            continue
        rid = record_id(header)
        split = "validation" if is_validation(seed, rid, val_fraction) else "train"
        writers[split].add(rid, seq.decode("ascii", "replace").upper())
        stats[split] += 1
        stats["residues"] += len(seq)
        bar.update(1)
        if limit and stats["records"] >= limit:
            break
    bar.close()
    for w in writers.values():
        w.flush()
    stats["seconds"] = round(time.perf_counter() - start, 3)
    stats["sequences_per_second"] = round(stats["records"] / max(stats["seconds"], 1e-9))
    stats.update(source=str(fasta), seed=seed, val_fraction=val_fraction)
    if stats["train"] + stats["validation"] == 0:
        raise DataError(f"{fasta}: no non-empty sequences")
    (out / "prepare_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fasta", help="input FASTA (plain, .gz or .xz)")
    p.add_argument("out", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=int, default=1_000_000)
    p.add_argument("--limit", type=int, default=None, help="stop after this many records")
    a = p.parse_args(argv)
    try:
        stats = prepare(a.fasta, a.out, a.val_fraction, a.seed, a.rows_per_shard, a.limit)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
