"""Cost of checkpoint manifests: time to write a checkpoint shard through torch.distributed.checkpoint against the
time to digest it (xxh3-128, what recipe/checkpoint.py uses, and sha256 for comparison). Results: docs/checkpoints.md.

    python bench/checkpoint_digest.py --gib 1 --dir /tmp/digest-bench
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import xxhash


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0, help="shard size (one rank's share of model + AdamW state)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/digest-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    n = int(args.gib * 2**30 / 4 / 3)  # fp32 weights and AdamW's two moments
    state = {"w": torch.randn(n), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    write = timed(lambda: dcp.save(state, checkpoint_id=str(args.dir)))
    files = [p for p in args.dir.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"shard {size / 2**30:.2f} GiB in {len(files)} files; dcp.save {write:.2f} s ({size / write / 1e9:.2f} GB/s)")
    for name, factory in (("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256)):

        def digest_all(factory=factory):
            for p in files:
                with open(p, "rb") as f:
                    hashlib.file_digest(f, factory)

        seconds = min(timed(digest_all) for _ in range(3))
        print(f"{name}: {seconds:.2f} s ({size / seconds / 1e9:.2f} GB/s, {100 * seconds / write:.0f} % of the write)")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
