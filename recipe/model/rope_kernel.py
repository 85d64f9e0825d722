"""Rotary embedding of packed QKV in one Triton pass forward and one backward (`model.rope_kernel=triton`, which
`auto` picks for the te backend without context parallelism when Triton is installed).

TE's way (`te`) splits the fused QKV projection into q, k, v views, runs TE's fused THD rope on q
and k (a kernel each, forward and backward), copies v, and in backward concatenates dq, dk, dv into QKV's gradient.
Here one kernel reads each QKV row once and writes q and k rotated and v copied, and the backward kernel reads dq,
dk, dv once and writes QKV's gradient: the same arithmetic (angles position x inv_freq in fp32, the rotation in fp32,
rounded once to the input dtype) in fewer passes over memory (measured through the trainer: docs/benchmarks.md,
lever 29). Needs Triton (ships with PyTorch's CUDA wheels); the CPU tests run it through Triton's interpreter
(TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable


@functools.cache
def available() -> bool:
    """Triton imports (not merely installed: `model.rope_kernel=auto` must not pick a broken install)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an install that fails to import for any reason counts as absent
        return False
    return True


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The forward and backward kernels. Reloaded after a cache_clear, so that a change of TRITON_INTERPRET (read when
    Triton decorates a kernel) takes effect."""
    import importlib
    import sys

    name = "recipe.model.rope_triton"
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    return module.rope_qkv_fwd, module.rope_qkv_bwd


def _launch(kernel, big: torch.Tensor, parts: tuple[torch.Tensor, ...], positions, inv_freq, heads: int, head_dim: int):
    num_tokens, half = big.shape[0], head_dim // 2
    block_j = 1 << (half - 1).bit_length()
    block_t = max(1, 4096 // block_j)
    grid = ((num_tokens + block_t - 1) // block_t, heads)
    kernel[grid](big, *parts, positions, inv_freq, num_tokens, HD=heads * head_dim, HALF=half, BLOCK_T=block_t,
                 BLOCK_J=block_j)  # fmt: skip


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
        grads = [g.contiguous() for g in (dq, dk, dv)]  # autograd gives zeros for outputs that got no gradient
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
