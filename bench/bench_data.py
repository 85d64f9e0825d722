"""Data pipeline throughput on this machine (not a test: numbers go to docs/benchmarks.md).

    python bench/bench_data.py [--data data/uniprot_sample/train] [--seconds 10]

Prints: tokenizer residues/s on one core (ours and transformers' EsmTokenizer), loader unpadded tokens/s with 0, 1
and 2 workers (THD, 16,384-token budget, max length 1024), padding waste for several budgets, and the prepare rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from recipe.data import tokenizer  # noqa: E402
from recipe.data.dataset import BatchSettings, MLMBatches, make_loader  # noqa: E402
from recipe.data.packing import padding_waste  # noqa: E402
from recipe.data.prepare import prepare  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402


def bench_tokenizer(sequences: list[str]) -> None:
    residues = sum(map(len, sequences))
    start = time.perf_counter()
    for s in sequences:
        tokenizer.encode(s)
    ours = residues / (time.perf_counter() - start)
    from transformers import EsmTokenizer

    with tempfile.TemporaryDirectory() as d:
        hf = EsmTokenizer(vocab_file=str(tokenizer.write_vocab(d)))
        subset = sequences[:2000]
        start = time.perf_counter()
        hf(subset)
        theirs = sum(map(len, subset)) / (time.perf_counter() - start)
    print(f"tokenizer, one core: ours {ours / 1e6:.1f} M residues/s; transformers EsmTokenizer {theirs / 1e6:.2f} M residues/s")


def bench_loader(store, seconds: float) -> None:
    settings = BatchSettings(max_seq_length=1024, token_micro_batch_size=16384, seed=0)
    for workers in (0, 1, 2):
        loader = make_loader(MLMBatches(store, settings), num_workers=workers)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        tokens, n, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += next(it)["num_real_tokens"]
            n += 1
        rate = tokens / (time.perf_counter() - start)
        print(f"loader, num_workers={workers}: {rate / 1e6:.2f} M unpadded tokens/s ({n} batches of <=16,384 tokens)")
        del it, loader


def bench_padding(store) -> None:
    for budget, fixed in ((4096, False), (16384, False), (4096, True), (16384, True), (65536, True)):
        batches = list(
            MLMBatches(store, BatchSettings(max_seq_length=1024, token_micro_batch_size=budget, pad_to_fixed=fixed), train=False)
        )
        print(f"padding waste, budget {budget:>6}, {'fixed size' if fixed else 'multiple of 16'}: {padding_waste(batches):.2%}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/uniprot_sample/train")
    p.add_argument("--fasta", default="../shared/data/uniprot_sample_20k.fasta.gz")
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    sequences = pq.read_table(a.data).column("sequence").to_pylist()
    store = load_sequences(a.data)
    bench_tokenizer(sequences)
    bench_loader(store, a.seconds)
    bench_padding(store)
    if Path(a.fasta).exists():
        with tempfile.TemporaryDirectory() as d:
            stats = prepare(a.fasta, d, val_fraction=0.001, progress=False)
        rate = stats["records"] / stats["seconds"]
        print(
            f"prepare {Path(a.fasta).name}: {rate:,.0f} sequences/s, "
            f"{stats['residues'] / stats['seconds'] / 1e6:.1f} M residues/s; "
            f"UniRef50 (~70 M sequences) projected {70e6 / rate / 60:.0f} min"
        )


if __name__ == "__main__":
    main()
