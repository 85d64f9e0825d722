"""The Triton kernels of `model.rope_kernel=triton` (the autograd function and launch are in rope_kernel.py).

A module of its own because Triton resolves a kernel's helper functions among the module's globals, and this import
needs Triton: rope_kernel.py imports it only when the kernels first run (and again under TRITON_INTERPRET=1 in the
CPU tests, which reload it). Kernel names contain "rope", so that profiles group them with the other rope kernels.
"""

import triton
import triton.language as tl

# One program: BLOCK_T tokens x one head. A head's two halves (elements j and j + HALF, j < HALF) are loaded as
# two [BLOCK_T, HALF] tiles whose rows are contiguous, so the loads vectorize; the angles are computed once for q
# and k. HD = heads x head_dim; QKV rows hold q, k, v one after the other.


@triton.jit
def _tile(positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
          BLOCK_J: tl.constexpr):  # fmt: skip
    """This program's tile: offsets of the first half-head in QKV (`packed`) and in q, k, v (`split`), the mask, and
    the angles' cos and sin."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    col = tl.program_id(1) * (2 * HALF) + j
    angle = tl.load(positions + t, mask=t < num_tokens, other=0).to(tl.float32) * tl.load(inv_freq + j, mask=j < HALF, other=0.0)
    mask = (t < num_tokens) & (j < HALF)
    return t.to(tl.int64) * (3 * HD) + col, t.to(tl.int64) * HD + col, mask, tl.cos(angle), tl.sin(angle)


@triton.jit
def _rotate(src, dst, cos, sin, mask, HALF: tl.constexpr, SIGN: tl.constexpr):
    """dst = src rotated by SIGN x angle (SIGN -1: the transpose, for backward)."""
    x1 = tl.load(src, mask=mask)
    x2 = tl.load(src + HALF, mask=mask)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst, (a * cos - SIGN * b * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (b * cos + SIGN * a * sin).to(x1.dtype), mask=mask)


@triton.jit
def rope_qkv_fwd(qkv, q, k, v, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    packed, split, mask, cos, sin = _tile(positions, inv_freq, num_tokens, HD, HALF, BLOCK_T, BLOCK_J)
    _rotate(qkv + packed, q + split, cos, sin, mask, HALF, 1.0)
    _rotate(qkv + packed + HD, k + split, cos, sin, mask, HALF, 1.0)
    tl.store(v + split, tl.load(qkv + packed + 2 * HD, mask=mask), mask=mask)
    tl.store(v + split + HALF, tl.load(qkv + packed + 2 * HD + HALF, mask=mask), mask=mask)


@triton.jit
def rope_qkv_bwd(dqkv, dq, dk, dv, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    packed, split, mask, cos, sin = _tile(positions, inv_freq, num_tokens, HD, HALF, BLOCK_T, BLOCK_J)
    _rotate(dq + split, dqkv + packed, cos, sin, mask, HALF, -1.0)
    _rotate(dk + split, dqkv + packed + HD, cos, sin, mask, HALF, -1.0)
    tl.store(dqkv + packed + 2 * HD, tl.load(dv + split, mask=mask), mask=mask)
    tl.store(dqkv + packed + 2 * HD + HALF, tl.load(dv + split + HALF, mask=mask), mask=mask)
