"""The fused kernels under our own modules: what the te backend's BF16 layers run (their `norm` and feed-forward),
and the torch backend's MLP. The modules, their parameters and what they keep for backward stay ours (layers.py);
only the kernels change.

- `layer_norm`: LayerNorm in one Triton pass forward and one backward that also sums the weight and bias gradients
  (layernorm_triton.py; lever 43 in docs/benchmarks.md), or TE's kernels for rows wider than 4096 and where Triton
  does not import. Both compute the weight and bias gradients inside the kernel, where PyTorch's runs a separate
  column reduction over all tokens (lever 33); for the 650M and 3B widths TE has only its general kernels, which
  the Triton pair outruns.
- `gelu_mlp`: the exact-GELU MLP after its LayerNorm, whose backward turns GELU's gradient into the pre-activation's
  in place and sums fc1's bias gradient in the same pass, one Triton kernel (gelu_triton.py; lever 37), and
  writes fc2's input gradient over fc2's input: no [T, ffn] tensor allocated in backward (lever 41). It needs no
  TE: the torch backend's layers use it too (lever 44).
- The other linears stay `layers.linear`: TE's weight-gradient GEMM with the bias gradient in its epilogue was
  measured and was no faster (lever 32).

The fused paths are taken for CUDA input under autocast only, PyTorch's otherwise, so a model moved to the CPU still
computes. What they compute is checked against PyTorch's on the GPU (tests/test_gpu.py) and, through Triton's
interpreter, on the CPU (tests/test_fused_kernels.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from recipe.model import layers, rope_kernel


class _LayerNorm(torch.autograd.Function):
    """LayerNorm in `dtype` through TE's kernels; parameters cast as layers.layer_norm casts them, gradients returned
    in the parameters' dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, dtype):
        from transformer_engine.pytorch.constants import TE_DType
        from transformer_engine_torch import layernorm_fwd

        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, mu, rsigma = layernorm_fwd(x2, weight.to(dtype), bias.to(dtype), eps, None, None, TE_DType[dtype], 0, False)
        ctx.save_for_backward(x2, mu, rsigma, weight)
        ctx.shape, ctx.dtype, ctx.bias_dtype = x.shape, dtype, bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        from transformer_engine_torch import layernorm_bwd

        x2, mu, rsigma, weight = ctx.saved_tensors
        dy = grad.to(ctx.dtype).reshape(x2.shape).contiguous()
        dx, dw, db = layernorm_bwd(dy, x2, mu, rsigma, weight.to(ctx.dtype), 0, False)
        return dx.view(ctx.shape), dw.to(weight.dtype), db.to(ctx.bias_dtype), None, None


@functools.cache
def _layer_norm_kernels() -> tuple[Any, Any]:
    """The Triton LayerNorm kernels (layernorm_triton.py)."""
    module = rope_kernel.kernel_module("recipe.model.layernorm_triton")
    return module.layer_norm_fwd, module.layer_norm_bwd


# Launch settings of the Triton LayerNorm, the fastest of bench/layer_norm_kernels.py's sweep summed over the 3B and
# 650M widths (docs/benchmarks.md; alone, 3B's backward was fastest at 64 rows): rows per program of the backward (one
# row of weight/bias partial sums per program) and warps per program of each kernel.
LN_ROWS = 32
LN_FWD_WARPS = 4
LN_BWD_WARPS = 4


def _ln_blocks(hidden: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_R): a row's lanes (a power of two) and the rows of one tile, about 4096 elements a tile."""
    import triton

    block_h = triton.next_power_of_2(hidden)
    return block_h, max(1, 4096 // block_h)


def layer_norm_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, warps: int = LN_FWD_WARPS,
                       residual: torch.Tensor | None = None):  # fmt: skip
    """(y, mean, rstd, s) of the rows of `x2` [T, H] (contiguous): y in x2's dtype, computed with the weight and bias
    rounded to it; the rows' mean and reciprocal standard deviation in fp32, for the backward. With `residual` (x2's
    shape and dtype, contiguous) the rows normalised are s = x2 + residual, rounded to x2's dtype and returned;
    without, s is x2."""
    rows, hidden = x2.shape
    y = torch.empty_like(x2)
    s = x2 if residual is None else torch.empty_like(x2)
    mean, rstd = (torch.empty(rows, device=x2.device, dtype=torch.float32) for _ in range(2))
    block_h, block_r = _ln_blocks(hidden)
    _layer_norm_kernels()[0][(-(-rows // block_r),)](x2, x2 if residual is None else residual, s, weight, bias, y, mean,
                                                      rstd, rows, eps, H=hidden, BLOCK_H=block_h, BLOCK_R=block_r,
                                                      RESIDUAL=residual is not None, num_warps=warps)  # fmt: skip
    return y, mean, rstd, s


def layer_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        rows_per_program: int = LN_ROWS, warps: int = LN_BWD_WARPS,
                        dres: torch.Tensor | None = None):  # fmt: skip
    """(dx, dw, db) from the output's gradient `dy` [T, H] (contiguous, x2's dtype): dx in that dtype, the weight's
    and bias's gradients in fp32 (summed over the programs' partial rows in a fixed order). With `dres` (dy's shape,
    contiguous) dx is the LayerNorm's input gradient plus it, as autograd would add them."""
    rows, hidden = x2.shape
    block_h, block_r = _ln_blocks(hidden)
    per_program = max(block_r, rows_per_program // block_r * block_r)
    programs = -(-rows // per_program)
    dx = torch.empty_like(dy)
    dw_part, db_part = (torch.empty(programs, hidden, device=x2.device, dtype=torch.float32) for _ in range(2))
    _layer_norm_kernels()[1][(programs,)](dy, x2, weight, mean, rstd, dy if dres is None else dres, dx, dw_part, db_part,
                                          rows, H=hidden, BLOCK_H=block_h, BLOCK_R=block_r, ROWS=per_program,
                                          RESIDUAL=dres is not None, num_warps=warps)  # fmt: skip
    return dx, dw_part.sum(0), db_part.sum(0)


class _TritonLayerNorm(torch.autograd.Function):
    """LayerNorm in `dtype` through our Triton kernels: one pass forward, one backward that also sums the weight and
    bias gradients (layernorm_triton.py). Gradients are those of the parameters rounded to `dtype` (what autocast's
    cast gives back), returned in the parameters' dtype.

    With a residual `r` (x's shape and dtype; None: none) the rows normalised are s = x + r, added in the forward
    kernel and returned before the output, (s, y); in backward s's two gradients (from the residual stream and from
    the LayerNorm) are added where the LayerNorm's is written. Bit for bit what `x + r` then this LayerNorm give: the
    sum rounded once, the gradients rounded as autograd rounds each before adding them."""

    @staticmethod
    def forward(ctx, x, r, weight, bias, eps, dtype):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        r2 = None if r is None else r.reshape(-1, r.shape[-1]).contiguous()
        y, mean, rstd, s2 = layer_norm_forward(x2, weight, bias, eps, LN_FWD_WARPS, residual=r2)
        ctx.save_for_backward(s2, mean, rstd, weight)
        ctx.shape, ctx.dtype, ctx.bias_dtype, ctx.residual = x.shape, dtype, bias.dtype, r is not None
        return (s2.view(x.shape), y.view(x.shape)) if ctx.residual else y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        s2, mean, rstd, weight = ctx.saved_tensors
        grad_s, grad_y = grads if ctx.residual else (None, grads[0])
        dy = grad_y.to(ctx.dtype).reshape(s2.shape).contiguous()
        dres = None if grad_s is None else grad_s.to(ctx.dtype).reshape(s2.shape).contiguous()
        dx, dw, db = layer_norm_backward(dy, s2, weight, mean, rstd, LN_ROWS, LN_BWD_WARPS, dres=dres)
        dx = dx.view(ctx.shape)
        dw, db = dw.to(ctx.dtype).to(weight.dtype), db.to(ctx.dtype).to(ctx.bias_dtype)
        return dx, dx if ctx.residual else None, dw, db, None, None


# The widest rows the Triton LayerNorm takes: at 5120 (15B) TE has tuned kernels, faster than ours (whose rows of
# 8192 lanes spill registers in the backward); at the 650M and 3B widths TE runs its general ones, slower than ours
# (bench/layer_norm_kernels.py; docs/benchmarks.md, lever 43).
LN_TRITON_MAX_WIDTH = 4096


def layer_norm_kernel(hidden: int) -> str:
    """Which kernels `layer_norm` runs for rows of `hidden` values on CUDA under autocast: "triton" or "te"."""
    return "triton" if rope_kernel.available() and hidden <= LN_TRITON_MAX_WIDTH else "te"


@torch.compiler.disable  # Triton launches and TE's kernels, which torch.compile would only break around
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.layer_norm through our Triton kernels or TE's (`layer_norm_kernel`) on CUDA under autocast; PyTorch's
    otherwise."""
    dtype = layers.cuda_autocast_dtype(x)
    if dtype is None or x.dtype != dtype:  # also an FP32 residual stream: layers.layer_norm's FP32 path
        return layers.layer_norm(x, weight, bias, eps)
    if layer_norm_kernel(x.shape[-1]) == "triton":
        return _TritonLayerNorm.apply(x, None, weight, bias, eps, dtype)
    return _LayerNorm.apply(x, weight, bias, eps, dtype)


@torch.compiler.disable  # Triton launches, which torch.compile would only break around
def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(s, y): the residual sum s = x + r and y = layer_norm(s), in one Triton pass each way where `layer_norm` runs
    ours (CUDA under autocast, x and r both in its dtype, rows up to LN_TRITON_MAX_WIDTH); `x + r` then `layer_norm`
    otherwise. One pass fewer over s forward and the autograd add of s's two gradients saved backward."""
    dtype = layers.cuda_autocast_dtype(x)
    if dtype is None or x.dtype != dtype or r.dtype != dtype or x.shape != r.shape or layer_norm_kernel(x.shape[-1]) != "triton":
        s = x + r
        return s, layer_norm(s, weight, bias, eps)
    return _TritonLayerNorm.apply(x, r, weight, bias, eps, dtype)


@functools.cache
def _gelu_kernel() -> Any:
    """The Triton kernel of the GELU backward (gelu_triton.py)."""
    return rope_kernel.kernel_module("recipe.model.gelu_triton").gelu_bwd_bias


def gelu_backward_and_bias(grad: torch.Tensor, pre: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """The exact GELU's backward in place: `grad` ([T, F], the gradient of GELU(pre)) becomes that of `pre`; returns
    the column sums of the result in fp32 (the bias gradient of the linear that produced `pre`). One pass over both,
    where PyTorch writes a new [T, F] tensor and reads it once more for the bias gradient (docs/benchmarks.md,
    lever 37)."""
    if grad.shape != pre.shape or grad.dim() != 2 or not (grad.is_contiguous() and pre.is_contiguous()):
        raise ValueError(f"gelu_backward_and_bias takes two contiguous [T, F] tensors, got {grad.shape} and {pre.shape}")
    if rows % 32:
        raise ValueError(f"rows={rows} must be a multiple of the kernel's 32-row tiles")
    num_tokens, features = grad.shape
    import triton

    block_f = min(128, triton.next_power_of_2(features))
    partial = torch.empty(-(-num_tokens // rows), features, device=grad.device, dtype=torch.float32)
    grid = (partial.shape[0], -(-features // block_f))
    _gelu_kernel()[grid](grad, pre, partial, num_tokens, F=features, ROWS=rows, BLOCK_T=32, BLOCK_F=block_f)
    return partial.sum(0)


class _GeluMLP(torch.autograd.Function):
    """fc2(GELU(fc1(x))), exact GELU, in `dtype` with the FP32 weights kept for backward and cast again there (as
    layers.linear). The backward allocates no [T, ffn] tensor: fc2's input gradient is written over fc2's input
    (GELU's output: inside this function, so nothing else holds it, and nothing needs it after fc2's weight
    gradient), then turned in place into the pre-activation's gradient, fc1's bias gradient summed in the same pass
    (`gelu_backward_and_bias`). Where PyTorch's autograd runs the same MLP, its backward holds two [T, ffn] tensors
    more at its peak: fc2's new input gradient beside fc2's saved input, then GELU's new output gradient."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        with torch.autocast("cuda", enabled=False):
            pre = layers.recast_linear(x, w1, b1, dtype)
            act = torch.nn.functional.gelu(pre)
            y = layers.recast_linear(act, w2, b2, dtype)
        ctx.save_for_backward(x, w1, pre, act, w2)
        ctx.dtype, ctx.bias_dtypes = dtype, (b1.dtype, b2.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w1, pre, act, w2 = ctx.saved_tensors
        needs, features = ctx.needs_input_grad, pre.shape[-1]
        dy = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        act2 = act.view(-1, features)
        grad_w2 = layers.weight_grad(dy, act2, w2.dtype) if needs[3] else None
        grad_b2 = dy.sum(0).to(ctx.bias_dtypes[1]) if needs[4] else None
        dact = torch.matmul(dy, w2.to(ctx.dtype), out=act2)  # over fc2's input, which nothing needs any more
        grad_b1 = gelu_backward_and_bias(dact, pre.view(-1, features))
        grad_x, grad_w1 = layers.linear_grads(dact, x, w1, ctx.dtype, needs[:2])
        grad_b1 = grad_b1.to(ctx.bias_dtypes[0]) if needs[2] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


@torch.compiler.disable  # a Triton launch torch.compile would only break around
def gelu_mlp(h: torch.Tensor, mlp: Any, activation: str) -> torch.Tensor:
    """layers.gelu_mlp through `_GeluMLP` (CUDA under autocast, exact GELU, Triton importable, a gradient wanted);
    layers.gelu_mlp otherwise."""
    dtype = layers.cuda_autocast_dtype(h)
    params = (mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias)
    trained = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params))
    if dtype is None or activation != "gelu" or not trained or not rope_kernel.available():
        return layers.gelu_mlp(h, mlp, activation)
    return _GeluMLP.apply(h.to(dtype), *params, dtype)
