"""The Triton kernels of `model.rope_kernel=triton` (the autograd functions and launches are in rope_kernel.py).

A module of its own because Triton resolves a kernel's helper functions among the module's globals, and this import
needs Triton: rope_kernel.py imports it only when the kernels first run (and again under TRITON_INTERPRET=1 in the
CPU tests, which reload it). Kernel names contain "rope", so that profiles group them with the other rope kernels.
"""

import triton
import triton.language as tl

# One program: BLOCK_T tokens x one head (the backward: ROWS tokens, in tiles of BLOCK_T). A head's two halves
# (elements j and j + HALF, j < HALF) are loaded as two [BLOCK_T, HALF] tiles whose rows are contiguous, so the
# loads vectorize; the angles are computed once for q and k. HD = heads x head_dim; QKV rows hold q, k, v one
# after the other.


@triton.jit
def _add(a, b):
    """tl.reduce's combine function, ours: the CPU tests' interpreter runs only functions defined after it is on."""
    return a + b


@triton.jit
def _tile(t, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr, BLOCK_J: tl.constexpr):
    """The tile of tokens `t` ([BLOCK_T, 1]) in this program's head: offsets of the first half-head in QKV
    (`packed`) and in q, k, v (`split`), the mask, and the angles' cos and sin."""
    j = tl.arange(0, BLOCK_J)[None, :]
    col = tl.program_id(1) * (2 * HALF) + j
    angle = tl.load(positions + t, mask=t < num_tokens, other=0).to(tl.float32) * tl.load(inv_freq + j, mask=j < HALF, other=0.0)
    mask = (t < num_tokens) & (j < HALF)
    return t.to(tl.int64) * (3 * HD) + col, t.to(tl.int64) * HD + col, mask, tl.cos(angle), tl.sin(angle)


@triton.jit
def _rotate(src, dst, cos, sin, mask, HALF: tl.constexpr, SIGN: tl.constexpr):
    """dst = src rotated by SIGN x angle (SIGN -1: the transpose, for backward); returns the two halves stored, in
    fp32."""
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    y1, y2 = (a * cos - SIGN * b * sin).to(x1.dtype), (b * cos + SIGN * a * sin).to(x1.dtype)
    tl.store(dst, y1, mask=mask)
    tl.store(dst + HALF, y2, mask=mask)
    return y1.to(tl.float32), y2.to(tl.float32)


@triton.jit
def _copy(src, dst, mask, HALF: tl.constexpr):
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    tl.store(dst, x1, mask=mask)
    tl.store(dst + HALF, x2, mask=mask)
    return x1.to(tl.float32), x2.to(tl.float32)


@triton.jit
def rope_qkv_fwd(qkv, q, k, v, positions, inv_freq, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    packed, split, mask, cos, sin = _tile(t, positions, inv_freq, num_tokens, HD, HALF, BLOCK_J)
    _rotate(qkv + packed, q + split, cos, sin, mask, HALF, 1.0)
    _rotate(qkv + packed + HD, k + split, cos, sin, mask, HALF, 1.0)
    _copy(qkv + packed + 2 * HD, v + split, mask, HALF)


@triton.jit
def rope_qkv_bwd(dqkv, dq, dk, dv, positions, inv_freq, partial, num_tokens, HD: tl.constexpr, HALF: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BIAS: tl.constexpr):  # fmt: skip
    """QKV's gradient from dq, dk, dv; with BIAS, also this program's column sums of what it stored (its share of
    the QKV projection's bias gradient: one row of `partial` [row blocks, 3 HD] per ROWS tokens, summed over the
    row blocks afterwards, in a fixed order). The sums are kept per tile element over the program's tiles and
    reduced across tokens once at the end: a reduction per tile made each tile wait on the others' warps."""
    j = tl.arange(0, BLOCK_J)
    zero = tl.full([BLOCK_T, BLOCK_J], 0.0, tl.float32)
    q1s, q2s, k1s, k2s, v1s, v2s = zero, zero, zero, zero, zero, zero
    for start in range(0, ROWS, BLOCK_T):
        t = tl.program_id(0) * ROWS + start + tl.arange(0, BLOCK_T)[:, None]
        packed, split, mask, cos, sin = _tile(t, positions, inv_freq, num_tokens, HD, HALF, BLOCK_J)
        q1, q2 = _rotate(dq + split, dqkv + packed, cos, sin, mask, HALF, -1.0)
        k1, k2 = _rotate(dk + split, dqkv + packed + HD, cos, sin, mask, HALF, -1.0)
        v1, v2 = _copy(dv + split, dqkv + packed + 2 * HD, mask, HALF)
        if BIAS:  # rows past the end loaded as zeros: they add nothing
            q1s, q2s, k1s, k2s, v1s, v2s = q1s + q1, q2s + q2, k1s + k1, k2s + k2, v1s + v1, v2s + v2
    if BIAS:
        row = partial + tl.program_id(0) * (3 * HD) + tl.program_id(1) * (2 * HALF) + j
        mask = j < HALF
        tl.store(row, tl.reduce(q1s, 0, _add), mask=mask)
        tl.store(row + HALF, tl.reduce(q2s, 0, _add), mask=mask)
        tl.store(row + HD, tl.reduce(k1s, 0, _add), mask=mask)
        tl.store(row + HD + HALF, tl.reduce(k2s, 0, _add), mask=mask)
        tl.store(row + 2 * HD, tl.reduce(v1s, 0, _add), mask=mask)
        tl.store(row + 2 * HD + HALF, tl.reduce(v2s, 0, _add), mask=mask)
