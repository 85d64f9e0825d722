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
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from recipe.model import layers


class Launch(NamedTuple):
    """One rope kernel's launch settings (`bench/rope_kernels.py --sweep` times the alternatives): the elements of one
    [tokens, half-head] tile, the warps per program, and for the backward the tokens per program (one row of bias
    partial sums each)."""

    tile: int = 1024
    warps: int = 8
    rows: int = 256


FORWARD = BACKWARD = Launch()  # the sweep's best at the 3B shape, both kernels (docs/benchmarks.md, lever 54)


@functools.cache
def available() -> bool:
    """Triton imports (not merely installed: `model.rope_kernel=auto` must not pick a broken install)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an install that fails to import for any reason counts as absent
        return False
    return True


def kernel_module(name: str) -> Any:
    """The Triton kernel module `name`, imported, or reloaded if it was: Triton reads TRITON_INTERPRET when it
    decorates a kernel, so each module's cached loader, cleared and called again, takes a change of it into effect
    (the CPU tests' interpreter)."""
    import importlib
    import sys

    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The forward and backward kernels (rope_triton.py)."""
    module = kernel_module("recipe.model.rope_triton")
    return module.rope_qkv_fwd, module.rope_qkv_bwd


def _blocks(head_dim: int, tile: int) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_T): a half-head's lanes (a power of two) and the tokens of one tile of `tile` elements."""
    import triton

    block_j = triton.next_power_of_2(head_dim // 2)
    return block_j, max(1, tile // block_j)


def _forward(qkv: torch.Tensor, positions, inv_freq, heads: int, head_dim: int, launch: Launch = FORWARD):
    num_tokens = qkv.shape[0]
    q, k, v = (qkv.new_empty(num_tokens, heads, head_dim) for _ in range(3))
    block_j, block_t = _blocks(head_dim, launch.tile)
    grid = (-(-num_tokens // block_t), heads)
    _kernels()[0][grid](qkv, q, k, v, positions, inv_freq, num_tokens, HD=heads * head_dim, HALF=head_dim // 2,
                        BLOCK_T=block_t, BLOCK_J=block_j, num_warps=launch.warps)  # fmt: skip
    return q, k, v


def _backward(dq, dk, dv, positions, inv_freq, heads: int, head_dim: int, bias: bool, launch: Launch = BACKWARD):
    """QKV's gradient [T, 3 HD] from dq, dk, dv, and with `bias` its column sums in fp32 (else None). A program
    covers launch.rows tokens, rounded down to whole token tiles (at least one)."""
    grads = [g.contiguous() for g in (dq, dk, dv)]  # autograd gives zeros for outputs that got no gradient
    num_tokens, hd = grads[0].shape[0], heads * head_dim
    dqkv = grads[0].new_empty(num_tokens, 3 * hd)
    block_j, block_t = _blocks(head_dim, launch.tile)
    rows = block_t * max(1, launch.rows // block_t)
    blocks = -(-num_tokens // rows)
    partial = torch.empty(blocks if bias else 1, 3 * hd, device=dqkv.device, dtype=torch.float32)
    _kernels()[1][(blocks, heads)](dqkv, *grads, positions, inv_freq, partial, num_tokens, HD=hd, HALF=head_dim // 2,
                                   ROWS=rows, BLOCK_T=block_t, BLOCK_J=block_j, BIAS=bias, num_warps=launch.warps)  # fmt: skip
    return dqkv, partial.sum(0) if bias else None


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, positions, inv_freq, heads: int, head_dim: int):
        ctx.save_for_backward(positions, inv_freq)
        ctx.heads, ctx.head_dim = heads, head_dim
        return _forward(qkv.contiguous(), positions, inv_freq, heads, head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        positions, inv_freq = ctx.saved_tensors
        dqkv, _ = _backward(dq, dk, dv, positions, inv_freq, ctx.heads, ctx.head_dim, bias=False)
        return dqkv, None, None, None, None


class _LinearRopeQKV(torch.autograd.Function):
    """The QKV projection (layers.linear's arithmetic: `dtype` GEMMs, the FP32 weight kept and cast again in
    backward) and the rope in one function, so that the rope's backward kernel also sums the projection's bias
    gradient from the QKV gradient it writes: one pass over that [T, 3 HD] tensor fewer per layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, positions, inv_freq, heads: int, head_dim: int, dtype):
        qkv = layers.recast_linear(x, weight, bias, dtype)
        ctx.save_for_backward(x, weight, positions, inv_freq)
        ctx.heads, ctx.head_dim, ctx.dtype, ctx.bias_dtype = heads, head_dim, dtype, bias.dtype
        return _forward(qkv, positions, inv_freq, heads, head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        x, weight, positions, inv_freq = ctx.saved_tensors
        dqkv, grad_b = _backward(dq, dk, dv, positions, inv_freq, ctx.heads, ctx.head_dim, bias=ctx.needs_input_grad[2])
        grad_x, grad_w = layers.linear_grads(dqkv, x, weight, ctx.dtype, ctx.needs_input_grad[:2])
        return grad_x, grad_w, None if grad_b is None else grad_b.to(ctx.bias_dtype), None, None, None, None, None


def _check(qkv_shape: tuple[int, ...], positions: torch.Tensor, heads: int, head_dim: int) -> None:
    if head_dim % 2 or len(qkv_shape) != 2 or qkv_shape[1] != 3 * heads * head_dim or positions.shape != qkv_shape[:1]:
        raise ValueError(
            f"rope_qkv: qkv {tuple(qkv_shape)} is not [T, 3 x {heads} heads x {head_dim}] with an even head size, "
            f"or positions {tuple(positions.shape)} is not [T]"
        )


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, heads: int, head_dim: int):
    """q, k, v [T, H, D] (contiguous) from the fused projection `qkv` [T, 3*H*D], q and k rotated by the angles
    `positions[t] * inv_freq` (non-interleaved halves, as transformers' ESM-2 and TE's rope); `positions` is each
    token's place in its own sequence (int32 or int64 [T]), `inv_freq` the fp32 frequencies [D/2]."""
    _check(tuple(qkv.shape), positions, heads, head_dim)
    if qkv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"rope_qkv runs bf16, fp16 or fp32 QKV, got {qkv.dtype}")
    return _RopeQKV.apply(qkv, positions.contiguous(), inv_freq.float().contiguous(), heads, head_dim)


@torch.compiler.disable  # Triton launches torch.compile would only break around
def linear_rope_qkv(x, weight, bias, positions, inv_freq, heads: int, head_dim: int):
    """rope_qkv(layers.linear(x, weight, bias), ...) with the bias gradient summed by the rope's backward kernel
    (`_LinearRopeQKV`), where the computation is CUDA under autocast with a bias that takes a gradient; the two
    functions one after the other otherwise."""
    dtype = layers.cuda_autocast_dtype(x)
    if dtype is None or not (torch.is_grad_enabled() and bias.requires_grad):
        return rope_qkv(layers.linear(x, weight, bias), positions, inv_freq, heads, head_dim)
    _check((*x.shape[:-1], weight.shape[0]), positions, heads, head_dim)
    return _LinearRopeQKV.apply(x.to(dtype), weight, bias, positions.contiguous(), inv_freq.float().contiguous(),
                                heads, head_dim, dtype)  # fmt: skip
