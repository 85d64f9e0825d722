"""The te layer's two rotary paths on one layer's packed QKV, timed alone and in front of TE's attention.

`te`: q, k, v as views of QKV, TE's fused THD rope on q and k, v copied; backward concatenates dq, dk, dv.
`triton` (`model.rope_kernel=triton`, recipe/model/rope_kernel.py): one pass each way. Both run through the te
layer's own code (`TEEsmLayer.rotate`, and `attend` for the attention). Forward and backward are
timed separately with CUDA events (median of `--reps`), on Swiss-Prot-like lengths at a size's head shape.

    source .device/setup.sh && python bench/rope_kernels.py --heads 20 --head-dim 64 --tokens 49152

`--sweep` times our two kernels alone (`rope_kernel._forward`, and `_backward` with the bias sums, as the trainer's
BF16 layers run it) over launch settings (tile elements, warps, backward tokens per program) and prints each one's
bandwidth and the best.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
import transformer_engine.pytorch  # noqa: F401  (before torch touches CUDA: TE loads its cuDNN first)
import torch
# isort: on

from bench.attention_shapes import cu_seqlens, shape_arguments, te_layer  # noqa: E402
from bench.backward_kernel_configs import median_ms  # noqa: E402
from recipe.model import rope_kernel  # noqa: E402
from recipe.model.esm import rope_inputs  # noqa: E402
from recipe.model.layers import PackedInfo  # noqa: E402

SWEEP_TILES, SWEEP_WARPS, SWEEP_ROWS = (1024, 2048, 4096), (4, 8, 16), (128, 256, 512)


def timed(fn, reps: int) -> tuple[float, float]:
    """Median forward and backward milliseconds of fn() -> (outputs, leaf). A GPU sleep queued before each window
    keeps the GPU busy while the host launches the window's work, so the events time the kernels, not the launches;
    the output gradients are made between the windows."""
    fwd, bwd = [], []
    for _ in range(reps + 2):
        e = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda._sleep(2_000_000)
        e[0].record()
        outs, leaf = fn()
        e[1].record()
        grads = [torch.ones_like(o) for o in outs]
        torch.cuda._sleep(2_000_000)
        e[2].record()
        torch.autograd.backward(outs, grads)
        e[3].record()
        torch.cuda.synchronize()
        fwd.append(e[0].elapsed_time(e[1]))
        bwd.append(e[2].elapsed_time(e[3]))
        leaf.grad = None
    fwd, bwd = sorted(fwd[2:]), sorted(bwd[2:])
    return fwd[len(fwd) // 2], bwd[len(bwd) // 2]


def sweep(qkv: torch.Tensor, cu: torch.Tensor, heads: int, head_dim: int, reps: int) -> None:
    """Our forward and backward kernels over launch settings; bandwidth counts QKV read and q, k, v written (forward)
    and the reverse (backward)."""
    cfg, layer = te_layer(heads, head_dim, rope_kernel="triton")
    positions, inv_freq = rope_inputs(cfg, "triton", PackedInfo(cu, 1024, qkv.shape[0]), device=qkv.device)
    data = qkv.detach()
    grads = rope_kernel._forward(data, positions, inv_freq, heads, head_dim)
    moved = 2 * data.numel() * data.element_size() / 1e9
    best: dict[str, tuple[float, rope_kernel.Launch]] = {}
    for tile, warps, rows in itertools.product(SWEEP_TILES, SWEEP_WARPS, SWEEP_ROWS):
        launch = rope_kernel.Launch(tile, warps, rows)
        runs = {"backward": functools.partial(rope_kernel._backward, *grads, positions, inv_freq, heads, head_dim, True,
                                              launch=launch)}  # fmt: skip
        if rows == SWEEP_ROWS[0]:  # the forward has no rows setting
            runs["forward"] = functools.partial(rope_kernel._forward, data, positions, inv_freq, heads, head_dim, launch)
        for name, fn in runs.items():
            ms = median_ms(fn, reps)
            print(f"sweep {name:8s} {launch}: {ms:.4f} ms, {moved / ms:.2f} TB/s", flush=True)
            if name not in best or ms < best[name][0]:
                best[name] = (ms, launch)
    shipped = {"forward": rope_kernel.FORWARD, "backward": rope_kernel.BACKWARD}
    for name, (ms, launch) in best.items():
        print(f"best {name}: {launch} {ms:.4f} ms ({moved / ms:.2f} TB/s); shipped {shipped[name]}", flush=True)


def main() -> None:
    p = shape_arguments(__doc__)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="time our kernels' launch settings alone; print the best")
    a = p.parse_args()
    dev = torch.device("cuda")
    H, D, T = a.heads, a.head_dim, a.tokens
    cu = cu_seqlens(T, a.seqs, 1024, dev)
    qkv = torch.randn(T, 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mb = 3 * T * H * D * 2 / 1e6
    print(f"{torch.cuda.get_device_name()}, T={T}, {H} heads x {D}; QKV is {mb:.0f} MB")
    if a.sweep:
        sweep(qkv, cu, H, D, a.reps)
        return
    for name in ("te", "triton"):
        cfg, layer = te_layer(H, D, rope_kernel=name)  # the model's own layer: its rotate and attend
        for with_attention in (False, True):

            def step(cfg=cfg, layer=layer, with_attention=with_attention):
                packed = PackedInfo(cu, 1024, T)
                rope = rope_inputs(cfg, layer.rope_kernel, packed, device=dev)
                if with_attention:
                    return [layer.attend(qkv, rope, packed, None)], qkv
                return list(layer.rotate(qkv, rope, packed)), qkv

            f, b = timed(step, a.reps)
            what = "rope + attention" if with_attention else "rope"
            print(f"{name:7s} {what:17s} forward {f:7.3f} ms  backward {b:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
