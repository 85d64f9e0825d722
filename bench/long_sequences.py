"""Long protein-like sequences for context-parallel memory runs: Swiss-Prot sequences laid end to end and cut into
sequences of exactly --length residues (real residue statistics; no real protein is that long).

    python bench/long_sequences.py --source .device/data/swissprot14_train_100k.fasta.xz --length 131070 --count 16 \
        --out /tmp/long.fasta
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipe.data.sources import load_sequences  # noqa: E402
from recipe.data.tokenizer import decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--length", type=int, required=True, help="residues per sequence (add 2 for <cls>/<eos>)")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    store = load_sequences(args.source)
    need = args.length * args.count
    if need > len(store.tokens):
        raise SystemExit(f"{args.source} holds {len(store.tokens)} residues, fewer than {need}")
    with open(args.out, "w") as f:
        for i in range(args.count):
            f.write(f">long_{i} {args.length} residues of concatenated sequences\n")
            f.write(decode(store.tokens[i * args.length : (i + 1) * args.length]) + "\n")
    print(f"wrote {args.count} sequences of {args.length} residues to {args.out}")


if __name__ == "__main__":
    main()
