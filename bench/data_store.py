"""The prepared store against the in-memory path at UniRef-like scale (results: docs/data_store.md).

    python bench/make_synthetic_uniref.py /tmp/synthetic_uniref --sequences 20000000 --subset-dirs 2 5
    python bench/data_store.py /tmp/synthetic_uniref --sizes 2 5 20 --memory-sizes 2 5 --memory-root /work/main

For each size (millions of sequences; `DATA_<k>M/` holds the first k parquet parts, `DATA/` all of them):
  prepare        `python -m recipe.data.prepare` into a store: wall time and peak RSS
  first batch    seconds from launching a fresh Python process to its first training batch (imports included)
  RSS            one trainer-like process reading batches: peak RSS and, at the end, private (anonymous) and
                 file-backed resident memory; and the same for each of 2 gloo processes (ranks 0 and 1)
  loader         batches/s and unpadded tokens/s with 0, 1 and 2 loader workers (after the first batch)
and, once, the per-sample random-access cost of flat files against the same data in an Arrow IPC file.
The in-memory path runs the code under --memory-root (the project before the store, for "today's" numbers) on the
same parquet files. Settings: THD, 16,384-token budget, max length 1024, cluster sampling on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ child side
def memory() -> dict:
    """Peak RSS, current private (anonymous) and file-backed resident memory, and PSS (shared pages divided among
    the processes that map them), MB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    pss = next(
        (int(x.split()[1]) / 1024 for x in Path("/proc/self/smaps_rollup").read_text().splitlines() if x.startswith("Pss:")), None
    )
    return {"peak_rss_mb": fields["VmHWM"], "anon_mb": fields["RssAnon"], "file_mb": fields["RssFile"], "pss_mb": pss}


def open_dataset(path: str, rank: int = 0, world: int = 1):
    from recipe.data.dataset import BatchSettings, MLMBatches
    from recipe.data.sources import load_sequences

    store = load_sequences(path)
    settings = BatchSettings(max_seq_length=1024, token_micro_batch_size=16384, seed=0)
    return MLMBatches(store, settings, rank, world, train=True, cluster_sampling=True)


def child_loader(a) -> dict:
    """First batch time (from a.launched, the parent's clock at launch), then throughput and memory."""
    from recipe.data.dataset import make_loader

    ds = open_dataset(a.path, a.rank, a.world)
    it = iter(make_loader(ds, num_workers=a.workers))
    next(it)
    first = time.time() - a.launched
    start, batches, tokens = time.perf_counter(), 0, 0
    while time.perf_counter() - start < a.seconds:
        tokens += next(it)["num_real_tokens"]
        batches += 1
    elapsed = time.perf_counter() - start
    return {"first_batch_s": first, "batches_per_s": batches / elapsed, "tokens_per_s": tokens / elapsed, **memory()}


def child_gloo(a) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    a.rank, a.world = dist.get_rank(), dist.get_world_size()
    result = child_loader(a)
    out = [None] * a.world
    dist.all_gather_object(out, result)
    if a.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
    del torch


def child_prepare(a) -> dict:
    from recipe.data.prepare import prepare

    start = time.perf_counter()
    stats = prepare(a.path, a.out, val_fraction=0.0005, progress=False)
    return {
        "prepare_s": time.perf_counter() - start,
        "sequences": stats["train"] + stats["validation"],
        "residues": stats["residues"],
        "clusters": stats["train_clusters"],
        **memory(),
    }


def arrow_vs_flat(store_dir: Path, rows: int = 200_000) -> dict:
    """Random-access cost of the two layouts the store could use: our flat files, and the same sequences in an
    Arrow IPC file (record batches of 1 M rows, memory-mapped), each read as training reads: one sample at a time."""
    import numpy as np
    import pyarrow as pa

    from recipe.data.store import MappedStore

    store = MappedStore(store_dir)
    n = min(len(store), 5_000_000)
    path = store_dir.parent / "arrow_compare.arrow"
    schema = pa.schema([("tokens", pa.large_binary())])
    if not path.exists():
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for lo in range(0, n, 1_000_000):
                hi = min(lo + 1_000_000, n)
                offs = np.asarray(store.offsets[lo : hi + 1]) - store.offsets[lo]
                data = pa.py_buffer(np.ascontiguousarray(store.tokens[store.offsets[lo] : store.offsets[hi]]))
                writer.write_batch(
                    pa.record_batch(
                        [pa.LargeBinaryArray.from_buffers(pa.large_binary(), hi - lo, [None, pa.py_buffer(offs), data])],
                        schema=schema,
                    )
                )
    pick = np.random.default_rng(0).integers(0, n, rows)
    start = time.perf_counter()
    flat = sum(len(store.residues(int(r))) for r in pick)
    flat_s = time.perf_counter() - start
    start = time.perf_counter()
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    batches = [reader.get_batch(i).column(0) for i in range(reader.num_record_batches)]
    views = [(np.frombuffer(b.buffers()[1], np.int64), np.frombuffer(b.buffers()[2], np.uint8)) for b in batches]
    starts = np.cumsum([0] + [len(b) for b in batches])
    total = 0
    for r in pick:
        i = int(np.searchsorted(starts, r, side="right")) - 1
        offs, data = views[i]
        j = int(r - starts[i])
        total += len(data[offs[j] : offs[j + 1]])
    arrow_s = time.perf_counter() - start
    assert total == flat
    return {"rows": rows, "flat_us_per_sample": flat_s / rows * 1e6, "arrow_ipc_us_per_sample": arrow_s / rows * 1e6}


# ------------------------------------------------------------------------------------------------ parent side
def run_child(kind: str, code_root: Path, args: list[str], nproc: int = 1, timeout: int = 3600) -> dict | list:
    env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS="1")
    script = [str(Path(__file__).resolve()), "child", kind, *args, "--launched", repr(time.time())]
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
        if nproc > 1
        else [sys.executable, *script]
    )
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=code_root, check=False)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {args} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def measure(label: str, code_root: Path, path: Path, seconds: float) -> dict:
    out = {}
    for workers in (0, 1, 2):
        out[f"workers_{workers}"] = run_child(
            "loader", code_root, ["--path", str(path), "--workers", str(workers), "--seconds", str(seconds)]
        )
        print(label, f"workers={workers}", json.dumps(out[f"workers_{workers}"]), flush=True)
    out["gloo_2"] = run_child("gloo", code_root, ["--path", str(path), "--workers", "0", "--seconds", str(seconds)], nproc=2)
    print(label, "2 gloo processes", json.dumps(out["gloo_2"]), flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        p = argparse.ArgumentParser()
        p.add_argument("child")
        p.add_argument("kind")
        p.add_argument("--path")
        p.add_argument("--out")
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--seconds", type=float, default=10)
        p.add_argument("--launched", type=float)
        a = p.parse_args()
        a.rank, a.world = 0, 1
        if a.kind == "gloo":
            child_gloo(a)
            return
        result = child_prepare(a) if a.kind == "prepare" else child_loader(a)
        print("RESULT " + json.dumps(result), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="directory written by bench/make_synthetic_uniref.py")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 20], help="store sizes, millions of sequences")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[2], help="in-memory sizes, millions of sequences")
    p.add_argument("--memory-root", default=str(ROOT), help="code for the in-memory path (e.g. the project before the store)")
    p.add_argument("--stores", default="/tmp/data_store_bench", help="where the prepared stores go")
    p.add_argument("--seconds", type=float, default=10.0, help="loader timing window")
    p.add_argument("--results", default="/tmp/data_store_bench/results.json")
    a = p.parse_args()
    data = Path(a.data)
    total = len(list(data.glob("part-*.parquet")))
    source = {k: data if k == total else data.parent / f"{data.name}_{k}M" for k in set(a.sizes) | set(a.memory_sizes)}
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "store": {}, "memory": {}}
    for k in a.sizes:
        store = Path(a.stores) / f"store_{k}M"
        if not (store / "train" / "manifest.json").exists():
            prep = run_child("prepare", ROOT, ["--path", str(source[k]), "--out", str(store)])
            print(f"store {k}M prepare", json.dumps(prep), flush=True)
        else:
            prep = json.loads((store / "prepare_stats.json").read_text())
        results["store"][k] = {"prepare": prep, **measure(f"store {k}M", ROOT, store / "train", a.seconds)}
        Path(a.results).write_text(json.dumps(results, indent=1))
    for k in a.memory_sizes:
        results["memory"][k] = measure(f"memory {k}M", Path(a.memory_root), source[k], a.seconds)
        Path(a.results).write_text(json.dumps(results, indent=1))
    results["arrow_vs_flat"] = arrow_vs_flat(Path(a.stores) / f"store_{min(a.sizes)}M" / "train")
    print("arrow vs flat", json.dumps(results["arrow_vs_flat"]), flush=True)
    Path(a.results).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
