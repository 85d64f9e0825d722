"""TransformerEngine's kernels under our own modules: what the te backend's BF16 layers run (their `norm`). The
modules, their parameters and what they keep for backward stay ours (layers.py); only the kernel changes.

- `layer_norm`: TE's LayerNorm kernels. Their backward computes the weight and bias gradients inside the kernel,
  where PyTorch's runs a separate column reduction over all tokens for them (docs/benchmarks.md, lever 33).
- `gelu_mlp`: the exact-GELU MLP after its LayerNorm, whose backward turns GELU's gradient into the pre-activation's
  in place and sums fc1's bias gradient in the same pass, one Triton kernel (gelu_triton.py; lever 37), and
  writes fc2's input gradient over fc2's input: no [T, ffn] tensor allocated in backward (lever 41).
- The other linears stay `layers.linear`: TE's weight-gradient GEMM with the bias gradient in its epilogue was
  measured and was no faster (lever 32).

TE's path is taken for CUDA input under autocast only, PyTorch's otherwise, so a te model moved to the CPU still
computes. What it computes is checked against PyTorch's on the GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import functools
import importlib
import sys
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


@torch.compiler.disable  # TE's kernels are opaque to torch.compile
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.layer_norm through TE's kernels (CUDA under autocast; PyTorch's otherwise)."""
    dtype = layers.cuda_autocast_dtype(x)
    if dtype is None or x.dtype != dtype:  # also an FP32 residual stream: layers.layer_norm's FP32 path
        return layers.layer_norm(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps, dtype)


@functools.cache
def _gelu_kernel() -> Any:
    """The Triton kernel (gelu_triton.py), reloaded after a cache_clear so that TRITON_INTERPRET takes effect."""
    name = "recipe.model.gelu_triton"
    module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    return module.gelu_bwd_bias


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
    block_f = min(128, triton_next_pow2(features))
    partial = torch.empty(-(-num_tokens // rows), features, device=grad.device, dtype=torch.float32)
    grid = (partial.shape[0], -(-features // block_f))
    _gelu_kernel()[grid](grad, pre, partial, num_tokens, F=features, ROWS=rows, BLOCK_T=32, BLOCK_F=block_f)
    return partial.sum(0)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


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
        grad_w2 = (dy.t() @ act2).to(w2.dtype) if needs[3] else None
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
