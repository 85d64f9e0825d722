"""The Triton kernel of `optimizer.fused=triton`'s AdamW update (the optimizer is optim.TritonAdamW).

A module of its own because this import needs Triton: optim.py imports it when the first step runs (and again under
TRITON_INTERPRET=1 in the CPU tests, which reload it).
"""

import triton
import triton.language as tl

# One launch updates every tensor of a parameter group. Program i handles BLOCK elements of tensor t = blocks[i], its
# (i - first[t])-th BLOCK. The tensors are addressed from one base pointer: table row t holds, in elements from `base`,
# where tensor t's parameter, gradient and two moments start (addresses read from memory would hide their alignment
# from the compiler; offsets from an argument keep it, so ALIGNED launches load and store four floats at a time).
# The arithmetic is torch's fused AdamW's, in fp32 and in its order, with IEEE division and square root: the gradient
# divided by the clip divisor (HAS_SCALE), decoupled weight decay (DECAY), both moments, then the bias-corrected step.
# With HAS_INF, a non-zero `found_inf` (the step's loss or gradient norm is not finite) masks every load and store:
# the update skips itself on the GPU, and the host, which checks after queuing it, stops the run.


@triton.jit
def adamw_step(base, table, numels, first, blocks, scale, found_inf, lr, beta1, beta2, eps, weight_decay, step_size,
               bc2_sqrt, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, DECAY: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    VEC: tl.constexpr = 4 if ALIGNED else 1  # offsets and sizes of ALIGNED tensors: multiples of 4 elements
    t = tl.load(blocks + pid)
    offsets = tl.multiple_of((pid - tl.load(first + t)) * BLOCK, BLOCK) + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    if HAS_INF:  # no element of any tensor when the flag is set
        numel = numel * (tl.load(found_inf) == 0).to(numel.dtype)
    mask = offsets < tl.multiple_of(numel, VEC)
    param = base + tl.multiple_of(tl.load(table + 4 * t), VEC) + offsets
    grad = base + tl.multiple_of(tl.load(table + 4 * t + 1), VEC) + offsets
    exp_avg = base + tl.multiple_of(tl.load(table + 4 * t + 2), VEC) + offsets
    exp_avg_sq = base + tl.multiple_of(tl.load(table + 4 * t + 3), VEC) + offsets
    g = tl.load(grad, mask=mask, other=0.0)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale))
    p = tl.load(param, mask=mask, other=0.0)
    m = tl.load(exp_avg, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq, mask=mask, other=0.0)
    if DECAY:  # skipped at zero weight decay, as torch does (an infinite weight stays infinite, not NaN)
        p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.math.div_rn(step_size * m, denom)
    tl.store(param, p, mask=mask)
    tl.store(exp_avg, m, mask=mask)
    tl.store(exp_avg_sq, v, mask=mask)
