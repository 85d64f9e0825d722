"""Where the time of one training step goes: torch.profiler over a few steps (one micro-batch and the optimizer
each) of one model size, for any of throughput.py's implementations (torch, torch_compile, te, te_compile, te_fp8,
te_fp8_delayed, ...). Prints per-step GPU kernel time by kind, against the unprofiled step time (a gap means the GPU
waited for the host), and the top kernels.

    python bench/profile_step.py --data .device/data/swissprot14_train_100k.fasta.xz --size 650M --impls torch_compile te \
        --trace-dir $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with contextlib.suppress(ImportError):  # before any CUDA work (TE loads its cuDNN first)
    import transformer_engine.pytorch  # noqa: F401
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.throughput import LABELS, TOKEN_BUDGET, batches_for, make_model, step_fn, timed_seconds  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402

GROUPS = [  # first match wins
    ("attention", r"flash|fmha|attn|cudnn|sdpa"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90|wgmma|matmul"),
    ("layernorm", r"layer_?norm|ln_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("rope", r"rope|rotary"),
    ("copy/cast", r"copy|cast|convert|fill|transpose"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "elementwise/other")


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

    by_group, total = defaultdict(float), 0.0
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        if e.device_type != torch.autograd.DeviceType.CUDA:  # CPU ops carry their kernels' time too: count kernels only
            continue
        if getattr(e, "is_user_annotation", False) or e.key.startswith("Optimizer."):
            continue  # an annotated range ("Optimizer.step#AdamW.step") spans its kernels; it is not one itself
        by_group[group_of(e.key)] += t
        total += t
        kernels.append((t, e.count, e.key))
    tokens = sum(b["num_real_tokens"] for b in data[warmup:]) / steps
    print(
        f"\n{size} {impl}: {wall_ms:.1f} ms per step unprofiled, {total / steps / 1e3:.1f} ms of it in GPU kernels "
        f"({tokens:,.0f} tokens/step; the rest is the GPU waiting for the host to launch work)"
    )
    for g, t in sorted(by_group.items(), key=lambda x: -x[1]):
        print(f"  {g:18} {t / steps / 1e3:8.2f} ms  {t / total:6.1%}")
    print("  top kernels:")
    for t, n, key in sorted(kernels, reverse=True)[:10]:
        print(f"    {t / steps / 1e3:7.2f} ms  x{n // steps:<4} {key[:110]}")

    if trace_dir is not None:
        raw = trace_dir / f"trace_{size}_{impl}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


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
