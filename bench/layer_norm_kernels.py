"""The te backend's BF16 LayerNorm kernels on one layer's activations: TE's (`te`), ours in Triton
(recipe/model/layernorm_triton.py) over a sweep of its launch settings (forward warps; backward rows per program and
warps) and PyTorch's (`torch`, layers.layer_norm), forward and backward timed separately (median of `--reps`, CUDA
events; bench/rope_kernels.py's `timed`), with the memory traffic each reaches. The last line names the Triton
settings fastest over all the shapes (the shipped ones are fused_kernels.LN_*). Shapes: tokens x hidden of the matched
rows of bench/vs_reference.py.

    source .device/setup.sh && python bench/layer_norm_kernels.py [--shapes 16384x2560 49152x1280]

TE's kernels can be switched to cuDNN's with NVTE_NORM_FWD_USE_CUDNN=1 NVTE_NORM_BWD_USE_CUDNN=1 in the environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
from bench.rope_kernels import timed  # noqa: E402  (imports TE before torch touches CUDA)
import torch  # noqa: E402
# isort: on

from recipe.model import fused_kernels, layers  # noqa: E402

SHAPES = ["65536x640", "49152x1280", "16384x2560", "8192x5120"]  # 150M, 650M, 3B, 15B


def kernels(fwd_warps: list[int], bwd: list[tuple[int, int]]) -> dict:
    """name -> (fn(x, w, b), the Triton settings it runs with or None)."""

    shipped = fused_kernels.LN_ROWS, fused_kernels.LN_FWD_WARPS, fused_kernels.LN_BWD_WARPS

    def triton(rows, fwd_w, bwd_w):
        def run(x, w, b):
            fused_kernels.LN_ROWS, fused_kernels.LN_FWD_WARPS, fused_kernels.LN_BWD_WARPS = rows, fwd_w, bwd_w
            return fused_kernels._TritonLayerNorm.apply(x, None, w, b, 1e-5, torch.bfloat16)

        return run

    found: dict = {"te": (lambda x, w, b: fused_kernels._LayerNorm.apply(x, w, b, 1e-5, torch.bfloat16), None)}
    found.update({f"triton fwd warps={fw}": (triton(shipped[0], fw, shipped[2]), ("fwd", fw)) for fw in fwd_warps})
    found.update({f"triton bwd rows={r} warps={bw}": (triton(r, shipped[1], bw), ("bwd", r, bw)) for r, bw in bwd})
    found["torch"] = (lambda x, w, b: layers.layer_norm(x, w, b, 1e-5), None)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=SHAPES, help="TOKENSxHIDDEN")
    p.add_argument("--fwd-warps", nargs="*", type=int, default=[4, 8, 16], help="forward warps per program (ours)")
    p.add_argument("--rows", nargs="*", type=int, default=[8, 16, 32, 64, 128], help="backward rows per program (ours)")
    p.add_argument("--bwd-warps", nargs="*", type=int, default=[4, 8, 16], help="backward warps per program (ours)")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    totals: dict = {}  # Triton setting -> summed milliseconds over the shapes
    for shape in a.shapes:
        tokens, hidden = map(int, shape.split("x"))
        x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(hidden, device=dev) * 0.1 + 1).requires_grad_()
        b = (torch.randn(hidden, device=dev) * 0.1).requires_grad_()
        mb = tokens * hidden * 2 / 1e6  # one [T, H] bf16 tensor
        print(f"{shape}: forward reads x, writes y ({2 * mb:.0f} MB); backward reads x, dy, writes dx ({3 * mb:.0f} MB)")
        for name, (fn, setting) in kernels(a.fwd_warps, [(r, bw) for r in a.rows for bw in a.bwd_warps]).items():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f, bw = timed(lambda fn=fn, x=x, w=w, b=b: ([fn(x, w, b)], x), a.reps)
            print(f"  {name:28s} forward {f:.3f} ms ({2 * mb / f / 1e3:.2f} TB/s)  backward {bw:.3f} ms "
                  f"({3 * mb / bw / 1e3:.2f} TB/s)", flush=True)  # fmt: skip
            if setting is not None:
                totals[setting] = totals.get(setting, 0.0) + (f if setting[0] == "fwd" else bw)
            w.grad = b.grad = None
    best_fwd = min((s for s in totals if s[0] == "fwd"), key=totals.get)
    best_bwd = min((s for s in totals if s[0] == "bwd"), key=totals.get)
    print(f"BEST fwd_warps={best_fwd[1]} rows={best_bwd[1]} bwd_warps={best_bwd[2]} (summed over {', '.join(a.shapes)})")


if __name__ == "__main__":
    main()
