"""Where NVIDIA's recipe spends its step: the reference run that bench/vs_reference.py times (same rows, same
settings, unmodified code under its own timing wrapper), with torch.profiler recording a window of its steps. The
profiler is the one our trainer runs with `profiler.enabled=true` (recipe/profiling.py), so the two summaries read
side by side: OUT/reference_<row>/summary_rank0.txt, the trace beside it.

    source .device/setup.sh && python bench/profile_reference.py --rows 650M 3B --out $OUT/reference_profile

The recipe calls its logger's `log_step` once per optimizer step, after the update; this script wraps that method to
advance the profiler (as its timing wrapper wraps it to read the clock) and changes nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.vs_reference import ROWS, Reference, run_logged  # noqa: E402


def inner(start: int, steps: int, out: Path, rest: list[str]) -> None:
    """In the reference's process: the trainer's own StepProfiler over optimizer steps start .. start + steps - 1,
    advanced by the recipe's per-step `log_step`, then its wrapper run as usual."""
    from types import SimpleNamespace

    import torch

    from recipe.profiling import StepProfiler

    wrapper, args = rest[0], rest[1:]
    sys.path.insert(0, args[args.index("--recipe") + 1])
    import perf_logger  # the recipe's module: its train_*.py imports the same class

    settings = SimpleNamespace(enabled=True, start_step=start, num_steps=steps, dir=str(out), record_shapes=False,
                               with_stack=False)  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profiler = StepProfiler(settings, out, rank=0, device=device, first_step=0)
    original = perf_logger.PerfLogger.log_step

    def log_step(self, *a, **kw):
        result = original(self, *a, **kw)
        profiler.step()  # after the recipe's step, whose gradient clipping synced the host
        return result

    perf_logger.PerfLogger.log_step = log_step
    sys.argv = [wrapper, *args]
    try:
        runpy.run_path(wrapper, run_name="__main__")
    finally:
        profiler.close()


def main() -> None:
    if "--inner" in sys.argv:
        i = sys.argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--inner", action="store_true")
        p.add_argument("--start", type=int)
        p.add_argument("--steps", type=int)
        p.add_argument("--out", type=Path)
        a = p.parse_args(sys.argv[1:i])
        inner(a.start, a.steps, a.out, sys.argv[i + 1 :])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=ROOT / ".device/peers/bionemo-esm2-native-te")
    p.add_argument("--data", type=Path, default=ROOT / ".device/data/swissprot14_train_100k.fasta.xz")
    p.add_argument("--rows", nargs="+", default=["650M"], choices=list(ROWS))
    p.add_argument("--start", type=int, default=10, help="first profiled optimizer step (1-based)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps profiled")
    p.add_argument("--gpu", help="CUDA_VISIBLE_DEVICES for the runs")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "reference_profile")
    a = p.parse_args()
    if a.start < 2:
        p.error("--start must be at least 2 (the step before the window warms the profiler up)")
    (a.out / "work").mkdir(parents=True, exist_ok=True)
    ref = Reference(a.reference, a.data, a.out / "work")
    for name in a.rows:
        row = dataclasses.replace(ROWS[name], warmup=a.start, timed=a.steps + 1)
        cmd, _ = ref.command(row, name)
        wrapped = [sys.executable, __file__, "--inner", "--start", str(a.start), "--steps", str(a.steps)]
        wrapped += ["--out", str(a.out / f"reference_{name}"), "--", *cmd[1:]]
        rc, wall = run_logged(wrapped, a.out / f"reference_{name}.log", a.gpu, ref.env, a.timeout)
        summary = a.out / f"reference_{name}" / "summary_rank0.txt"
        print(f"== {name}: rc {rc}, {wall:.0f} s")
        print(summary.read_text() if summary.exists() else f"no profile (see {a.out}/reference_{name}.log)", flush=True)


if __name__ == "__main__":
    main()
