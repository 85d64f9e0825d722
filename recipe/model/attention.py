"""Exact packed (THD) attention through our own Triton kernels (attention_triton.py): each token attends to every
token of its own sequence (bidirectional, no dropout), the sequences given by cumulative lengths as for
`torch.nn.attention.varlen.varlen_attn`.

Why: at ESM-2's small head dims (16, 24, 32) FA2's Hopper kernels pad the head dim to 32 and run 128x128 tiles, and
attention is most of the torch backend's step at the small sizes; these kernels pad only to the next power of two
and take their block sizes as launch settings (bench/attention_kernels.py --sweep times them). The CPU tests run
them through Triton's interpreter (tests/test_attention_triton.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from recipe.model import rope_kernel


class Launch(NamedTuple):
    """One pass's launch settings: the rows of a program's own block (`block_m`: queries in the forward and dQ, keys
    in dK/dV), the rows of each tile its loop runs over (`block_n`: keys, or queries in dK/dV), warps and pipeline
    stages per program."""

    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 2


# The fastest of bench/attention_kernels.py --sweep at the 8M and 150M shapes on an H200 (docs/benchmarks.md, lever 50).
FORWARD = Launch(64, 64, 4, 3)
BACKWARD = Launch(128, 32, 4, 3)
DELTA_ROWS = 64  # tokens per program of the delta = rowsum(dO * O) preprocess


@functools.cache
def _kernels() -> Any:
    """The kernel module (attention_triton.py), loaded so that TRITON_INTERPRET applies (rope_kernel.kernel_module)."""
    return rope_kernel.kernel_module("recipe.model.attention_triton")


def _head_block(head_dim: int) -> int:
    """The head dim padded to a power of two and at least 16 (tl.dot's smallest operand)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _grid_rows(num_tokens: int, num_seqs: int, block: int) -> int:
    """An upper bound on the blocks of `block` rows over all sequences: each sequence leaves at most one block part
    filled (the kernels find their block from cu_seqlens and return past the last)."""
    return -(-num_tokens // block) + num_seqs


def _head_align(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 that divides every tensor's head stride (the kernels' HEAD_ALIGN: what lets
    them load 16 bytes at a time where the head stride is not a multiple of 16, as at head dim 24)."""
    align = 16
    while any(t.stride(1) % align for t in tensors):
        align //= 2
    return align


def _seq_lanes(num_seqs: int) -> int:
    """The lanes over which a program scans the sequences' block counts: a power of two, at least 16."""
    return max(16, 1 << max(0, num_seqs - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dot products (the tests' tight check), not TF32; bf16 and fp16 products are
    exact either way (Triton's default is named)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with unit stride along D (the kernels take the token and head strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(q, k, v, cu_seqlens, scale: float, launch: Launch = FORWARD) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H, D] in q's dtype, lse [H, T] fp32, natural log) of packed attention."""
    num_tokens, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty(num_tokens, heads, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(heads, num_tokens, device=q.device, dtype=torch.float32)
    rows = _grid_rows(num_tokens, num_seqs, launch.block_m)
    if num_tokens and rows:
        _kernels().attn_fwd[(rows, heads)](
            q, k, v, out, lse, cu_seqlens, num_seqs, num_tokens, scale * math.log2(math.e),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            D=head_dim, BLOCK_D=_head_block(head_dim), HEAD_ALIGN=_head_align(q, k, v, out),
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            SEQS=_seq_lanes(num_seqs), PRECISION=_precision(q.dtype), num_warps=launch.warps, num_stages=launch.stages,
        )  # fmt: skip
    return out, lse


def attention_backward(do, q, k, v, out, lse, cu_seqlens, scale: float, launch: Launch = BACKWARD):
    """(dq, dk, dv) [T, H, D] in q's dtype: the delta preprocess, then dK/dV per block of launch.block_m keys,
    looping over tiles of launch.block_n queries, and dQ per block of launch.block_m queries, looping over tiles of
    launch.block_n keys."""
    num_tokens, heads, head_dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    dq, dk, dv = (torch.empty(num_tokens, heads, head_dim, device=q.device, dtype=q.dtype) for _ in range(3))
    if not num_tokens:
        return dq, dk, dv
    kernels, block_d = _kernels(), _head_block(head_dim)
    delta = torch.empty_like(lse)
    kernels.attn_bwd_delta[(-(-num_tokens // DELTA_ROWS), heads)](
        out, do, delta, num_tokens, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        D=head_dim, BLOCK_D=block_d, HEAD_ALIGN=_head_align(out, do), BLOCK_T=DELTA_ROWS,
    )  # fmt: skip
    common = dict(D=head_dim, BLOCK_D=block_d, HEAD_ALIGN=_head_align(q, k, v, do, dq, dk, dv), SEQS=_seq_lanes(num_seqs),
                  PRECISION=_precision(q.dtype), num_warps=launch.warps, num_stages=launch.stages)  # fmt: skip
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    qk_scale = scale * math.log2(math.e)
    grid = (_grid_rows(num_tokens, num_seqs, launch.block_m), heads)
    kernels.attn_bwd_dkdv[grid](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, num_seqs, num_tokens, scale, qk_scale, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), BLOCK_N=launch.block_m, BLOCK_M=launch.block_n, **common,
    )  # fmt: skip
    kernels.attn_bwd_dq[grid](
        q, k, v, do, lse, delta, dq, cu_seqlens, num_seqs, num_tokens, scale, qk_scale, *strides,
        dq.stride(0), dq.stride(1), BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, **common,
    )  # fmt: skip
    return dq, dk, dv


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_attention: q, k, v must be [T, H, D] of one shape, got {[tuple(x.shape) for x in (q, k, v)]}")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"varlen_attention: q, k, v must share one of bf16, fp16, fp32, got {(q.dtype, k.dtype, v.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"varlen_attention: cu_seqlens must be int32 [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float | None = None, fwd: Launch = FORWARD, bwd: Launch = BACKWARD) -> torch.Tensor:  # fmt: skip
    """Exact softmax attention of q, k, v [T, H, D] (bf16, fp16 or fp32; any token and head strides, copied where
    D's stride is not 1) within each packed sequence of `cu_seqlens` (int32 [N + 1], non-decreasing from 0 to T;
    empty sequences allowed), with a positive scale, 1/sqrt(D) by default. Returns [T, H, D] in q's dtype.
    `max_seqlen` is taken for varlen_attn's signature only: the kernels find each block's sequence from cu_seqlens.
    `fwd` and `bwd` are the kernels' launch settings. q, k and v are kept for backward: pass v as its own tensor,
    not a view of a fused QKV projection, or all of QKV stays alive. What the torch and te backends' layers run with
    model.attention_kernel=triton (layers.packed_attention), at the default launch settings."""
    _check(q, k, v, cu_seqlens)
    del max_seqlen
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:  # the forward takes the row max of unscaled scores
        raise ValueError(f"varlen_attention: the softmax scale must be positive, got {scale}")
    out, _ = _attention_op(q, k, v, cu_seqlens.contiguous(), scale, list(Launch(*fwd)), list(Launch(*bwd)))
    return out


# The kernels as PyTorch custom ops with their autograd registered, which torch.compile keeps in a compiled layer's
# graph as opaque calls (a graph break per layer costs more than the kernels save at the small sizes).
@torch.library.custom_op("esm::packed_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                  fwd: list[int], bwd: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return attention_forward(_rows(q), _rows(k), _rows(v), cu_seqlens, scale, Launch(*fwd))


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale, fwd, bwd):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("esm::packed_attention_backward", mutates_args=())
def _attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, bwd: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return attention_backward(_rows(grad), _rows(q), _rows(k), _rows(v), out, lse, cu_seqlens, scale, Launch(*bwd))


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, scale, bwd):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, scale, _, bwd = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.bwd = scale, bwd


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad, q, k, v, out, lse, cu_seqlens, ctx.scale, ctx.bwd)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
