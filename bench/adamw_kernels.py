"""One AdamW step over a whole ESM-2's parameters on the GPU: torch's fused kernel (the clip's divisor as its
grad_scale, as the trainer passes it) against optim.TritonAdamW over a sweep of its launch settings (elements per
program, warps), median of `--reps` steps between CUDA events, with the memory traffic each reaches (the fused kernel
also writes the gradients back). The last line names the Triton settings fastest summed over the sizes (the shipped
ones are TritonAdamW.BLOCK and .WARPS). The parameters are the model's shapes, FP32, as the trainer keeps them.

    source .device/setup.sh && python bench/adamw_kernels.py [--sizes 650M 3B]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipe.model import EsmConfig, build_model  # noqa: E402
from recipe.optim import TritonAdamW  # noqa: E402


def shapes(size: str) -> list[tuple[str, torch.Size]]:
    model = build_model(EsmConfig.from_size(size, backend="torch"), device="meta", seed=None)
    return [(name, p.shape) for name, p in model.named_parameters()]


def groups(model: torch.nn.Module) -> list[dict]:
    """The trainer's two groups: weight decay for the matrices, none for biases and LayerNorm weights (1-D)."""
    params = list(model.parameters())
    return [{"params": [q for q in params if q.dim() > 1], "weight_decay": 0.01},
            {"params": [q for q in params if q.dim() == 1], "weight_decay": 0.0}]  # fmt: skip


def time_steps(optimizer: torch.optim.Optimizer, reps: int) -> float:
    """Median milliseconds of `optimizer.step()` over `reps` steps after three untimed ones."""
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=["650M", "3B"])
    p.add_argument("--blocks", nargs="*", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--warps", nargs="*", type=int, default=[4, 8, 16])
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    dev = torch.device("cuda")
    totals: dict = {}
    for size in a.sizes:
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for _, s in shapes(size)])
        n = sum(q.numel() for q in model.parameters())
        for q in model.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        scale = torch.tensor(1.7, device=dev)
        gb = n * 4 / 1e9
        print(f"{size}: {n / 1e9:.2f} B parameters; TritonAdamW reads 4 and writes 3 FP32 arrays ({7 * gb:.1f} GB), "
              f"torch's fused kernel with grad_scale also writes the gradients ({8 * gb:.1f} GB)")  # fmt: skip
        fused = torch.optim.AdamW(groups(model), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, fused=True)
        fused.grad_scale = scale
        ms = time_steps(fused, a.reps)
        print(f"  torch fused                 {ms:7.2f} ms ({8 * gb / ms:.2f} TB/s)", flush=True)
        del fused
        ours = TritonAdamW(groups(model), lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
        ours.grad_scale = scale
        for block in a.blocks:
            for warps in a.warps:
                ours.BLOCK, ours.WARPS = block, warps
                ours._layouts.clear()
                ms = time_steps(ours, a.reps)
                totals[(block, warps)] = totals.get((block, warps), 0.0) + ms
                print(f"  triton block={block:<5d} warps={warps:<2d} {ms:7.2f} ms ({7 * gb / ms:.2f} TB/s)", flush=True)
        del ours, model
        torch.cuda.empty_cache()
    best = min(totals, key=totals.get)
    print(f"BEST block={best[0]} warps={best[1]} (summed over {', '.join(a.sizes)})")


if __name__ == "__main__":
    main()
