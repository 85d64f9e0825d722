"""Rotary embedding of packed QKV in one Triton pass forward and one backward (`model.rope_kernel=triton`).

The te backend's default (`te`) splits the fused QKV projection into q, k, v views, runs TE's fused THD rope on q
and k (a kernel each, forward and backward), copies v, and in backward concatenates dq, dk, dv into QKV's gradient.
Here one kernel reads each QKV row once and writes q and k rotated and v copied, and the backward kernel reads dq,
dk, dv once and writes QKV's gradient: the same arithmetic (angles position x inv_freq in fp32, the rotation in fp32,
rounded once to the input dtype) in fewer passes over memory. Experimental: off by default until it is measured
faster through the trainer (docs/benchmarks.md). Needs Triton (ships with PyTorch's CUDA wheels); the CPU tests run
it through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch.autograd.function import once_differentiable


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def rope_qkv_fwd(qkv, q, k, v, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                     PAIRS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
        which = tl.program_id(1)  # 0: q, 1: k, 2: v
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]  # one (head, frequency) pair: elements j and j + HALF of a head
        mask = (t < num_tokens) & (p < PAIRS)
        col = (p // HALF) * (2 * HALF) + p % HALF
        src = qkv + t.to(tl.int64) * (3 * HD) + which * HD + col
        x1 = tl.load(src, mask=mask)
        x2 = tl.load(src + HALF, mask=mask)
        dst = t.to(tl.int64) * HD + col
        if which == 2:
            tl.store(v + dst, x1, mask=mask)
            tl.store(v + dst + HALF, x2, mask=mask)
        else:
            angle = tl.load(positions + t, mask=t < num_tokens, other=0).to(tl.float32) * tl.load(inv_freq + p % HALF)
            cos, sin = tl.cos(angle), tl.sin(angle)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            y1, y2 = (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)
            if which == 0:
                tl.store(q + dst, y1, mask=mask)
                tl.store(q + dst + HALF, y2, mask=mask)
            else:
                tl.store(k + dst, y1, mask=mask)
                tl.store(k + dst + HALF, y2, mask=mask)

    @triton.jit
    def rope_qkv_bwd(dqkv, dq, dk, dv, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                     PAIRS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
        which = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        mask = (t < num_tokens) & (p < PAIRS)
        col = (p // HALF) * (2 * HALF) + p % HALF
        src = t.to(tl.int64) * HD + col
        dst = dqkv + t.to(tl.int64) * (3 * HD) + which * HD + col
        if which == 2:
            tl.store(dst, tl.load(dv + src, mask=mask), mask=mask)
            tl.store(dst + HALF, tl.load(dv + src + HALF, mask=mask), mask=mask)
        else:
            if which == 0:
                g1, g2 = tl.load(dq + src, mask=mask), tl.load(dq + src + HALF, mask=mask)
            else:
                g1, g2 = tl.load(dk + src, mask=mask), tl.load(dk + src + HALF, mask=mask)
            angle = tl.load(positions + t, mask=t < num_tokens, other=0).to(tl.float32) * tl.load(inv_freq + p % HALF)
            cos, sin = tl.cos(angle), tl.sin(angle)
            a, b = g1.to(tl.float32), g2.to(tl.float32)
            # The transpose of the rotation: rotate by -angle.
            tl.store(dst, (a * cos + b * sin).to(g1.dtype), mask=mask)
            tl.store(dst + HALF, (b * cos - a * sin).to(g1.dtype), mask=mask)

    return rope_qkv_fwd, rope_qkv_bwd  # named so that profiles group them with the other rope kernels


def _launch(kernel, big: torch.Tensor, parts: tuple[torch.Tensor, ...], positions, inv_freq, heads: int, head_dim: int):
    num_tokens = big.shape[0]
    pairs = heads * head_dim // 2
    block_p = 1 << (pairs - 1).bit_length()
    block_t = max(1, 4096 // block_p)
    grid = ((num_tokens + block_t - 1) // block_t, 3)
    kernel[grid](big, *parts, positions, inv_freq, num_tokens, HD=heads * head_dim, HALF=head_dim // 2, PAIRS=pairs,
                 BLOCK_T=block_t, BLOCK_P=block_p)  # fmt: skip


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, positions, inv_freq, heads: int, head_dim: int):
        qkv = qkv.contiguous()
        shape = (qkv.shape[0], heads, head_dim)
        q, k, v = (qkv.new_empty(shape) for _ in range(3))
        _launch(_kernels()[0], qkv, (q, k, v), positions, inv_freq, heads, head_dim)
        ctx.save_for_backward(positions, inv_freq)
        ctx.heads, ctx.head_dim = heads, head_dim
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        positions, inv_freq = ctx.saved_tensors
        grads = [torch.zeros_like(dq if dq is not None else dk) if g is None else g.contiguous() for g in (dq, dk, dv)]
        dqkv = grads[0].new_empty(grads[0].shape[0], 3 * ctx.heads * ctx.head_dim)
        _launch(_kernels()[1], dqkv, tuple(grads), positions, inv_freq, ctx.heads, ctx.head_dim)
        return dqkv, None, None, None, None


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, heads: int, head_dim: int):
    """q, k, v [T, H, D] (contiguous) from the fused projection `qkv` [T, 3*H*D], q and k rotated by the angles
    `positions[t] * inv_freq` (non-interleaved halves, as transformers' ESM-2 and TE's rope); `positions` is each
    token's place in its own sequence (int32 or int64 [T]), `inv_freq` the fp32 frequencies [D/2]."""
    if head_dim % 2 or qkv.dim() != 2 or qkv.shape[1] != 3 * heads * head_dim or positions.shape != qkv.shape[:1]:
        raise ValueError(
            f"rope_qkv: qkv {tuple(qkv.shape)} is not [T, 3 x {heads} heads x {head_dim}] with an even head size, "
            f"or positions {tuple(positions.shape)} is not [T]"
        )
    if qkv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"rope_qkv runs bf16, fp16 or fp32 QKV, got {qkv.dtype}")
    return _RopeQKV.apply(qkv, positions.contiguous(), inv_freq.float().contiguous(), heads, head_dim)
