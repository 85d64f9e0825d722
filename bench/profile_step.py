"""Where the time of one training step goes: torch.profiler over a few steps (one micro-batch and the optimizer
each) of one model size, for any of throughput.py's implementations (torch, torch_compile, te, te_fp8,
te_fp8_delayed, ...). Prints per-step GPU kernel time by kind, against the unprofiled step time (a gap means the GPU
waited for the host), and the top kernels.

    python bench/profile_step.py --data .device/data/swissprot14_train_100k.fasta.xz --size 650M --impls torch_compile te \
        --trace-dir $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with contextlib.suppress(ImportError):  # before any CUDA work (TE loads its cuDNN first)
    import transformer_engine.pytorch  # noqa: F401
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.throughput import LABELS, TOKEN_BUDGET, batches_for, make_model, step_fn, timed_seconds  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.profiling import export_trace, summarize  # noqa: E402


def profile_impl(store, size: str, impl: str, steps: int, trace_dir: Path | None, budget: int) -> None:
    _, model = make_model(size, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    warmup = 6 if impl.endswith("compile") else 3
    data = batches_for(store, impl, budget, warmup + steps)

    step = step_fn(model, impl, opt)
    for b in data[:warmup]:
        step(b)
    wall_ms = timed_seconds(step, data[warmup:]) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in data[warmup:]:
            step(b)
        torch.cuda.synchronize()

    tokens = sum(b["num_real_tokens"] for b in data[warmup:]) / steps
    print(f"\n{size} {impl}: {tokens:,.0f} tokens/step, unprofiled")
    print(summarize(prof, steps, wall_ms))
    if trace_dir is not None:
        export_trace(prof, trace_dir / f"trace_{size}_{impl}.json.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--size", default="650M")
    p.add_argument("--impls", nargs="+", default=["torch", "te"], choices=[i for i in LABELS if i != "hf"])
    p.add_argument("--budget", type=int, help="THD tokens per micro-batch (default: the throughput table's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--trace-dir", type=Path)
    a = p.parse_args()
    store = load_sequences(a.data)
    print(torch.cuda.get_device_name())
    for impl in a.impls:
        profile_impl(store, a.size, impl, a.steps, a.trace_dir, a.budget or TOKEN_BUDGET[a.size])


if __name__ == "__main__":
    main()
