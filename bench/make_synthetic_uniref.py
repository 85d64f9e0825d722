"""A synthetic UniRef-like training set as parquet shards (NVIDIA's esm2_uniref_pretraining_data columns), for
bench/data_store.py. Not committed: it goes to /tmp.

    python bench/make_synthetic_uniref.py /tmp/synthetic_uniref --sequences 20000000

Structure: UniRef50 cluster sizes follow a Zipf law (most clusters are singletons, a few hold thousands), each
cluster's members spread over UniRef90 groups (about half as many groups as members), rows shuffled over the whole
set as in a real dump. Lengths are log-normal (median 100, capped at 2,000): shorter than UniRef90's (mean about
270) so that the build stays within minutes on a small machine; prepare's per-residue cost scales from there.
Everything is vectorised (numpy + pyarrow buffers, no Python object per row) and seeded. Writes `part-NNNNN.parquet`
of 1 M rows each, so a subset is simply the first k parts (`--subset-dirs` links them into `OUT_<k>M/`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

AMINO = np.frombuffer(b"LAGVSERTIDPKQNFYMHWC", dtype=np.uint8)
FREQ = np.array([9.9, 8.3, 7.1, 6.9, 6.6, 6.8, 5.5, 5.3, 5.9, 5.5, 4.7, 5.8, 3.9, 4.1, 3.9, 2.9, 2.4, 2.3, 1.1, 1.4])
ROWS_PER_PART = 1_000_000


def cluster_ids(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (UniRef50 cluster, UniRef90 group) integers, rows in cluster order."""
    sizes = np.minimum(rng.zipf(2.2, size=n), 20_000)  # mean about 3.3 members, as UniRef90 / UniRef50
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    c50 = np.repeat(np.arange(len(sizes)), sizes)
    groups = np.maximum(1, sizes // 2)  # UniRef90 groups per UniRef50 cluster
    within = (rng.random(n) * np.repeat(groups, sizes)).astype(np.int64)
    c90 = np.repeat(np.cumsum(groups) - groups, sizes) + within
    return c50, c90


def ids(prefix: str, values: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(values).cast(pa.string()), pa.scalar(""))


def sequences(lengths: np.ndarray, rng: np.random.Generator) -> pa.Array:
    total = int(lengths.sum())
    table = np.repeat(AMINO, np.round(FREQ * 10).astype(int))  # residue frequencies as a lookup table
    data = table[rng.integers(0, len(table), size=total, dtype=np.uint16)]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--sequences", type=int, default=20_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset-dirs", type=int, nargs="*", default=[], help="also make OUT_<k>M/ with the first k parts")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(a.seed)
    start = time.perf_counter()
    c50, c90 = cluster_ids(a.sequences, rng)
    shuffle = rng.permutation(a.sequences)
    c50, c90 = c50[shuffle], c90[shuffle]
    del shuffle
    for part, lo in enumerate(range(0, a.sequences, ROWS_PER_PART)):
        hi = min(lo + ROWS_PER_PART, a.sequences)
        lengths = np.minimum(np.maximum(rng.lognormal(np.log(100), 0.6, hi - lo).astype(np.int64), 5), 2000)
        table = pa.table(
            {
                "id": ids("SYN", np.arange(lo, hi)),
                "sequence": sequences(lengths, rng),
                "ur50_id": ids("UniRef50_S", c50[lo:hi]),
                "ur90_id": ids("UniRef90_S", c90[lo:hi]),
            }
        )
        pq.write_table(table, out / f"part-{part:05d}.parquet", compression="snappy")
        print(f"part {part}: {hi:,} rows, {time.perf_counter() - start:.0f} s", flush=True)
    for k in a.subset_dirs:
        sub = out.parent / f"{out.name}_{k}M"
        sub.mkdir(exist_ok=True)
        for part in range(k):
            (sub / f"part-{part:05d}.parquet").symlink_to(out / f"part-{part:05d}.parquet")
    print(
        f"{a.sequences:,} sequences, {c50.max() + 1:,} UniRef50 clusters, {len(np.unique(c90)):,} UniRef90 groups "
        f"in {time.perf_counter() - start:.0f} s: {out}"
    )


if __name__ == "__main__":
    main()
