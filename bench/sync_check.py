"""Where the trainer makes the host wait for the GPU: runs `train_fsdp2.py` in this process with
`torch.cuda.set_sync_debug_mode("warn")`, which warns at every synchronizing CUDA call, and counts the warnings by
the line of our code that led to them. A line counted once per step is a per-step wait (each one lets the GPU run
dry while the host catches up); lines counted once are set-up.

    source .device/setup.sh && python bench/sync_check.py --config-name L1_650M num_train_steps=6 \\
        dataset.train_path=... [key=value ...]

All arguments go to train_fsdp2.py. Prints the counts, most frequent first, with the call chain inside recipe/.
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/...`: the repository's packages importable

from bench.in_process import is_ours, run_train_fsdp2  # noqa: E402


def our_frames(stack: list[traceback.FrameSummary]) -> str:
    """The call chain within this project (outermost first), shortened to file:line."""
    ours = [f for f in stack if is_ours(f.filename, ROOT, "bench/sync_check.py")]
    return " <- ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno}" for f in reversed(ours[-4:]))


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/sync_check.py needs a CUDA GPU (it counts synchronizing CUDA calls)")
    counts: collections.Counter[str] = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            counts[our_frames(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        run_train_fsdp2(sys.argv[1:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
        print(f"\nsynchronizing CUDA calls by where they came from ({sum(counts.values())} in all):")
        for where, n in counts.most_common():
            print(f"  {n:5d}  {where or '(outside recipe/)'}")


if __name__ == "__main__":
    main()
