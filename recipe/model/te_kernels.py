"""TransformerEngine's kernels under our own modules: what the te backend's BF16 layers run (their `norm`). The
modules, their parameters and what they keep for backward stay ours (layers.py); only the kernel changes.

- `layer_norm`: TE's LayerNorm kernels. Their backward computes the weight and bias gradients inside the kernel,
  where PyTorch's runs a separate column reduction over all tokens for them (docs/benchmarks.md, lever 33).
- The linears stay `layers.linear`: TE's weight-gradient GEMM with the bias gradient in its epilogue was measured
  and was no faster (lever 32).

TE's path is taken for CUDA input under autocast only, PyTorch's otherwise, so a te model moved to the CPU still
computes. What it computes is checked against PyTorch's on the GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import torch

from recipe.model import layers


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The compute dtype when TE's kernels apply: CUDA input under autocast."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


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


@torch.compiler.disable  # TE's kernels are opaque to torch.compile: a compiled MLP (te + compile) calls them eagerly
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.layer_norm through TE's kernels (CUDA under autocast; PyTorch's otherwise)."""
    dtype = _autocast_dtype(x)
    if dtype is None or x.dtype != dtype:  # also an FP32 residual stream: layers.layer_norm's FP32 path
        return layers.layer_norm(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps, dtype)
