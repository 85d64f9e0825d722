"""The Triton kernel of the exact-GELU MLP backward, both backends' (the autograd function is fused_kernels.gelu_mlp).

A module of its own because this import needs Triton: fused_kernels.py imports it only when the kernel first runs (and
again under TRITON_INTERPRET=1 in the CPU tests, which reload it).
"""

import triton
import triton.language as tl

# One program: ROWS tokens x BLOCK_F columns of the fc1 output, in tiles of BLOCK_T rows. It overwrites the gradient
# of GELU's output with that of its input, dy * (Phi(x) + x * phi(x)) computed in fp32 and rounded once (PyTorch's
# GeluBackward arithmetic), and writes the column sums of what it stored: this program's share of fc1's bias
# gradient, summed over the programs afterwards (a fixed order: the result does not depend on scheduling).


@triton.jit
def _add(a, b):
    """tl.sum's combine function, ours: the CPU tests' interpreter runs only functions defined after it is on."""
    return a + b


@triton.jit
def gelu_bwd_bias(grad, pre, partial, num_tokens, F: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_F: tl.constexpr):  # fmt: skip
    pid_t, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    acc = tl.full([BLOCK_F], 0.0, tl.float32)
    for start in range(0, ROWS, BLOCK_T):
        rows = pid_t * ROWS + start + tl.arange(0, BLOCK_T)
        mask = (rows[:, None] < num_tokens) & (cols[None, :] < F)
        offsets = rows[:, None].to(tl.int64) * F + cols[None, :]
        dy = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(pre + offsets, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        dx = (dy * (cdf + x * pdf)).to(grad.dtype.element_ty)
        tl.store(grad + offsets, dx, mask=mask)
        acc += tl.reduce(dx.to(tl.float32), 0, _add)
    tl.store(partial + pid_t * F + cols, acc, mask=cols < F)
