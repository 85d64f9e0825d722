"""The Triton kernels of the te backend's BF16 LayerNorm (the autograd function is fused_kernels.layer_norm).

A module of its own because this import needs Triton: fused_kernels.py imports it only when a kernel first runs (and
again under TRITON_INTERPRET=1 in the CPU tests, which reload it).

Arithmetic, as PyTorch's LayerNorm under autocast: the weight and bias rounded to the input's dtype, the row's mean
and variance (biased) in fp32, y = (x - mean) * rstd * w + b in fp32 rounded once. Backward, with xhat = (x - mean) *
rstd and g = dy * w: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); each program also writes its rows' share of
the weight and bias gradients (sum of dy * xhat and of dy), summed over the programs afterwards in a fixed order.
"""

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    """tl.sum's combine function, ours: the CPU tests' interpreter runs only functions defined after it is on."""
    return a + b


@triton.jit
def layer_norm_fwd(x, r, s, w, b, y, mean, rstd, num_rows, eps, H: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_R: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """One program: BLOCK_R rows, each whole (BLOCK_H >= H lanes). With RESIDUAL the rows normalised are
    s = x + r, rounded to s's dtype and stored (as PyTorch's add rounds it) before the statistics are taken."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < H)
    offsets = rows[:, None].to(tl.int64) * H + cols[None, :]
    wv = tl.load(w + cols, mask=cols < H, other=0.0).to(y.dtype.element_ty).to(tl.float32)
    bv = tl.load(b + cols, mask=cols < H, other=0.0).to(y.dtype.element_ty).to(tl.float32)
    xv = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        sv = (xv + tl.load(r + offsets, mask=mask, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + offsets, sv, mask=mask)
        xv = sv.to(tl.float32)
    mu = tl.reduce(xv, 1, _add) / H
    d = tl.where(mask, xv - mu[:, None], 0.0)
    r_std = 1.0 / tl.sqrt(tl.reduce(d * d, 1, _add) / H + eps)
    tl.store(y + offsets, (d * r_std[:, None] * wv[None, :] + bv[None, :]).to(y.dtype.element_ty), mask=mask)
    tl.store(mean + rows, mu, mask=rows < num_rows)
    tl.store(rstd + rows, r_std, mask=rows < num_rows)


@triton.jit
def layer_norm_bwd(dy, x, w, mean, rstd, dres, dx, dw_part, db_part, num_rows, H: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_R: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """One program: ROWS rows in tiles of BLOCK_R; writes dx for them and one row of weight and bias partial sums.
    With RESIDUAL, dx is the gradient of the residual sum s: the LayerNorm's own, rounded to dx's dtype, plus `dres`
    (what s's other use gives it), rounded again: the two roundings of autograd adding the two gradients."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    wv = tl.load(w + cols, mask=cols < H, other=0.0).to(dx.dtype.element_ty).to(tl.float32)
    dw_acc = tl.full([BLOCK_H], 0.0, tl.float32)
    db_acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        rows = pid * ROWS + start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < H)
        offsets = rows[:, None].to(tl.int64) * H + cols[None, :]
        mu = tl.load(mean + rows, mask=rows < num_rows, other=0.0)
        r = tl.load(rstd + rows, mask=rows < num_rows, other=0.0)
        xhat = tl.where(mask, (tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32) - mu[:, None]) * r[:, None], 0.0)
        dyv = tl.load(dy + offsets, mask=mask, other=0.0).to(tl.float32)
        g = dyv * wv[None, :]
        c_xhat = tl.reduce(g * xhat, 1, _add) / H
        c_mean = tl.reduce(g, 1, _add) / H
        dxv = (g - xhat * c_xhat[:, None] - c_mean[:, None]) * r[:, None]
        dxv = dxv.to(dx.dtype.element_ty)
        if RESIDUAL:
            dxv = (dxv.to(tl.float32) + tl.load(dres + offsets, mask=mask, other=0.0).to(tl.float32)).to(dx.dtype.element_ty)
        tl.store(dx + offsets, dxv, mask=mask)
        dw_acc += tl.reduce(dyv * xhat, 0, _add)
        db_acc += tl.reduce(dyv, 0, _add)
    tl.store(dw_part + pid * H + cols, dw_acc, mask=cols < H)
    tl.store(db_part + pid * H + cols, db_acc, mask=cols < H)
