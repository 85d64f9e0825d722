"""Launch settings of our two backward kernels that also sum a bias gradient, timed alone at the 3B and 650M shapes:
the exact-GELU backward (recipe/model/gelu_triton.py: tile rows x columns, rows per program, warps) and the rope
backward (recipe/model/rope_triton.py: token tiles per program). Median of `--reps` CUDA-event windows, each after a
GPU sleep so that launches are not timed; the first line of each block is the shipped setting.

    source .device/setup.sh && python bench/backward_kernel_configs.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipe.model import fused_kernels, rope_kernel  # noqa: E402
from recipe.model.layers import rotary_inv_freq  # noqa: E402

# (tokens, ffn) and (tokens, heads, head_dim) of the 3B and 650M matched rows
GELU_SHAPES = [(16384, 10240), (49152, 5120)]
ROPE_SHAPES = [(16384, 40, 64), (49152, 20, 64)]
# (BLOCK_T, BLOCK_F, ROWS, num_warps)
GELU_CONFIGS = [(32, 128, 512, 4), (32, 128, 256, 4), (32, 128, 1024, 4), (16, 256, 512, 4), (32, 256, 512, 8),
                (64, 128, 512, 8), (16, 128, 512, 4), (64, 64, 512, 4), (8, 512, 512, 4), (16, 512, 1024, 8)]  # fmt: skip
ROPE_TILES = [None, 1, 4, 8]


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times = sorted(times[2:])
    return times[len(times) // 2]


def gelu(reps: int) -> None:
    kernel = fused_kernels._gelu_kernel()
    for tokens, ffn in GELU_SHAPES:
        grad = torch.randn(tokens, ffn, device="cuda", dtype=torch.bfloat16)
        pre = torch.randn_like(grad)
        mb = 3 * grad.numel() * 2 / 1e6
        print(f"GELU backward + bias sums, [{tokens}, {ffn}] ({mb:.0f} MB read and written)")
        for block_t, block_f, rows, warps in GELU_CONFIGS:
            partial = torch.empty(-(-tokens // rows), ffn, device="cuda", dtype=torch.float32)
            grid = (partial.shape[0], -(-ffn // block_f))

            def run(block_t=block_t, block_f=block_f, rows=rows, warps=warps, partial=partial, grid=grid, grad=grad,
                    pre=pre, tokens=tokens, ffn=ffn):  # fmt: skip
                kernel[grid](grad, pre, partial, tokens, F=ffn, ROWS=rows, BLOCK_T=block_t, BLOCK_F=block_f,
                             num_warps=warps)  # fmt: skip
                partial.sum(0)

            ms = median_ms(run, reps)
            print(f"  BLOCK_T={block_t:3d} BLOCK_F={block_f:3d} ROWS={rows:5d} warps={warps}: {ms:.3f} ms "
                  f"({mb / ms / 1e3:.2f} TB/s)", flush=True)  # fmt: skip


def rope(reps: int) -> None:
    for tokens, heads, head_dim in ROPE_SHAPES:
        grads = [torch.randn(tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        positions = torch.arange(tokens, device="cuda") % 1024
        inv_freq = rotary_inv_freq(head_dim, 10000.0, torch.device("cuda"))
        mb = 6 * tokens * heads * head_dim * 2 / 1e6
        print(f"rope backward + QKV bias sums, {tokens} tokens x {heads} heads x {head_dim} ({mb:.0f} MB)")
        shape = (positions, inv_freq, heads, head_dim, True)
        block_t = rope_kernel._blocks(head_dim, rope_kernel.BACKWARD.tile)[1]
        for tiles in ROPE_TILES:
            launch = rope_kernel.BACKWARD if tiles is None else rope_kernel.Launch(rows=tiles * block_t)
            ms = median_ms(lambda launch=launch, grads=grads, shape=shape: rope_kernel._backward(*grads, *shape, launch), reps)
            print(f"  tiles per program {tiles or 'default'}: {ms:.3f} ms ({mb / ms / 1e3:.2f} TB/s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    gelu(a.reps)
    rope(a.reps)


if __name__ == "__main__":
    main()
