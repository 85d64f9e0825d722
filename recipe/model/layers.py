"""The ESM-2 transformer layer in plain PyTorch, with TransformerEngine's parameter names.

Both backends name their parameters as TE's modules do (`LayerNormLinear`: layer_norm_weight, layer_norm_bias, weight,
bias; `LayerNormMLP`: layer_norm_weight, layer_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias), so one
state dict serves both and no key mapping sits between them. The layer body (`EsmLayerBase.forward`) is shared;
a backend supplies its modules and its attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from recipe.model.config import EsmConfig


@dataclass
class PackedInfo:
    """Where the sequences are in a packed [T] batch. The derived index tensors are built once per forward."""

    cu_seqlens: torch.Tensor  # int32 [N+1], 0 ... T (with context parallelism: the full sequences' real lengths)
    max_seqlen: int
    num_tokens: int  # T (this rank's tokens)
    # Context parallelism (recipe/data/context_parallel.py): each sequence padded to a multiple of 2*cp_size and
    # split over cp_size ranks; cu_seqlens_padded covers the full padded sequences, this rank holds 1/cp_size of each.
    cu_seqlens_padded: torch.Tensor | None = None
    cp_size: int = 1
    cp_rank: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> torch.Tensor:
        """Real lengths of the (full) sequences."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def local_cu_seqlens(self) -> torch.Tensor:
        """Where each sequence's tokens sit in this rank's [T] tensor."""
        return self.cu_seqlens if self.cu_seqlens_padded is None else self.cu_seqlens_padded // self.cp_size

    @property
    def seq_index(self) -> torch.Tensor:
        """For every token, the index of its sequence (a search, not repeat_interleave: no host sync on GPU)."""
        if "seq" not in self._cache:
            cu = self.local_cu_seqlens
            tokens = torch.arange(self.num_tokens, device=cu.device, dtype=cu.dtype)
            self._cache["seq"] = torch.searchsorted(cu[1:], tokens, right=True)
        return self._cache["seq"]

    @property
    def offsets(self) -> torch.Tensor:
        """For every token, its position inside its own sequence (restarts at each sequence start)."""
        if "off" not in self._cache:
            seq = self.seq_index
            self._cache["off"] = torch.arange(len(seq), device=seq.device) - self.local_cu_seqlens[:-1].long()[seq]
        return self._cache["off"]


def rotary_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """ESM-2's rotary frequencies, fp32 [head_dim / 2] (transformers' `inv_freq`; both backends and the export use it)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables as transformers' EsmRotaryEmbedding builds them (non-interleaved halves)."""
    freqs = position_ids[..., None].float() * rotary_inv_freq(head_dim, theta, position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., H, D] by the tables [..., D], in fp32 like the reference, returning x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).to(x.dtype)


def gelu(x: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm whose output is in the dtype the next matmul runs in.

    Autocast runs `layer_norm` in fp32: it casts a bf16 input up, keeps that fp32 copy for backward and writes an
    fp32 output that the following linear casts straight back to bf16. Here the kernel takes the bf16 input and
    parameters (it accumulates in fp32 either way) and rounds its output to bf16 once: the same matmul input without
    the fp32 copies, and half the bytes kept for backward. The parameters are cast as FSDP2's mixed precision already
    does, so DDP and FSDP2 run the same arithmetic. An fp32 input (`fp32_residual`) and runs without autocast (the
    fp32 CPU reference) take the plain path.
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype != torch.get_autocast_dtype(device):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    with torch.autocast(device, enabled=False):
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)


class _LinearRecastInBackward(torch.autograd.Function):
    """`F.linear` in `dtype` with a weight of another dtype (fp32 master weights under autocast), keeping the weight
    itself for backward and casting it again there, instead of keeping the cast copy that autocast's F.linear holds
    until backward (2 bytes per parameter of the whole model, alive for the whole step). The arithmetic is autocast's:
    the same casts, the same bf16 GEMMs, gradients in the parameters' dtype (on CUDA the weight's straight from the
    GEMM's FP32 accumulator, `weight_grad`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        return recast_linear(x, weight, bias, dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x, grad_w = linear_grads(g2, x, weight, ctx.dtype, ctx.needs_input_grad[:2])
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def cuda_autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The compute dtype where our fused kernels apply (CUDA input under autocast), else None."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def recast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The forward of the linears here: `x W^T + b` in `dtype`, the parameters cast to it, autocast off (their
    backward: `linear_grads`)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))


def linear_grads(g2: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, needs: tuple[bool, ...]):
    """The input's and weight's gradients of `x W^T` from the output's gradient `g2` [T, out], as the linears here
    compute them: GEMMs in `dtype` (the weight cast again), the weight's gradient in the weight's dtype; None where
    `needs` (ctx.needs_input_grad for x, weight) says no gradient is wanted."""
    grad_x = (g2 @ weight.to(dtype)).view_as(x) if needs[0] else None
    grad_w = weight_grad(g2, x.reshape(-1, x.shape[-1]), weight.dtype) if needs[1] else None
    return grad_x, grad_w


def weight_grad(g2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`g2^T x2` in `dtype`. On CUDA, for BF16/FP16 inputs and an FP32 weight, the GEMM writes its FP32 accumulator
    directly (`out_dtype`), where the product rounded to the inputs' dtype and then cast would add a pass over
    every weight gradient and round it."""
    if g2.is_cuda and dtype == torch.float32 and g2.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(g2.t(), x2, out_dtype=torch.float32)
    return (g2.t() @ x2).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, but under autocast with weights of another dtype no cast copy is kept for backward (above)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if weight.dtype != dtype and torch.is_grad_enabled() and weight.requires_grad:
            return _LinearRecastInBackward.apply(x.to(dtype), weight, bias, dtype)
    return F.linear(x, weight, bias)


# A LayerNorm kernel: (x, weight, bias, eps) -> normalized x. `layer_norm` above, or fused_kernels.layer_norm (ours in
# Triton, or TransformerEngine's) in the te backend's layers; a module gets its kernel at construction.
Norm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def gelu_mlp(h: torch.Tensor, mlp: Any, activation: str) -> torch.Tensor:
    """fc2(GELU(fc1(h))) from LayerNormMLP-named parameters: the MLP after its LayerNorm (fused_kernels.gelu_mlp, what
    both backends' layers run, takes this path off CUDA; on CUDA its backward allocates no [T, ffn] tensor)."""
    return linear(gelu(linear(h, mlp.fc1_weight, mlp.fc1_bias), activation), mlp.fc2_weight, mlp.fc2_bias)


FeedForward = Callable[[torch.Tensor, Any, str], torch.Tensor]


def layer_norm_mlp(
    x: torch.Tensor, mlp: Any, eps: float, activation: str, norm: Norm = layer_norm, ffn: FeedForward = gelu_mlp
) -> torch.Tensor:
    """Pre-LN MLP from LayerNormMLP-named parameters (`mlp`: ours or TE's module), in plain PyTorch (also TE's
    exact-GELU path)."""
    return ffn(norm(x, mlp.layer_norm_weight, mlp.layer_norm_bias, eps), mlp, activation)


def _param(*shape: int, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class LayerNormLinear(nn.Module):
    """LayerNorm then Linear, named as te.LayerNormLinear."""

    def __init__(self, in_features: int, out_features: int, eps: float, device=None, dtype=None, norm: Norm = layer_norm):
        super().__init__()
        self.eps, self.norm = eps, norm
        self.layer_norm_weight = _param(in_features, device=device, dtype=dtype)
        self.layer_norm_bias = _param(in_features, device=device, dtype=dtype)
        self.weight = _param(out_features, in_features, device=device, dtype=dtype)
        self.bias = _param(out_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.norm(x, self.layer_norm_weight, self.layer_norm_bias, self.eps), self.weight, self.bias)


class Linear(nn.Linear):
    """nn.Linear through `linear`: no cast copy of its weight kept for backward under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNormMLP(nn.Module):
    """LayerNorm, fc1, GELU, fc2, named as te.LayerNormMLP."""

    def __init__(
        self, hidden: int, ffn: int, eps: float, activation: str, device=None, dtype=None, norm: Norm = layer_norm,
        feed_forward: FeedForward = gelu_mlp,
    ):  # fmt: skip
        super().__init__()
        self.eps, self.activation, self.norm, self.feed_forward = eps, activation, norm, feed_forward
        self.layer_norm_weight = _param(hidden, device=device, dtype=dtype)
        self.layer_norm_bias = _param(hidden, device=device, dtype=dtype)
        self.fc1_weight = _param(ffn, hidden, device=device, dtype=dtype)
        self.fc1_bias = _param(ffn, device=device, dtype=dtype)
        self.fc2_weight = _param(hidden, ffn, device=device, dtype=dtype)
        self.fc2_bias = _param(hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_mlp(x, self, self.eps, self.activation, self.norm, self.feed_forward)


class AttentionBlock(nn.Module):
    """Holds the attention projections so that their names read `attention.layernorm_qkv` / `attention.proj`."""

    def __init__(self, layernorm_qkv: nn.Module, proj: nn.Module):
        super().__init__()
        self.layernorm_qkv = layernorm_qkv
        self.proj = proj


class EsmLayerBase(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); rotary on q and k. Subclasses provide `attend` and the modules."""

    attention: AttentionBlock
    mlp: nn.Module

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim

    def attend(self, qkv, rope, packed: PackedInfo | None, key_padding_mask: torch.Tensor | None):
        """Attention [..., H, D] from the fused QKV projection [..., 3*H*D], the rotary included."""
        raise NotImplementedError

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [..., H, D]: views of the fused projection."""
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return q, k, v

    def forward(self, x, rope, packed: PackedInfo | None = None, key_padding_mask: torch.Tensor | None = None):
        x = x + self.attention.proj(self.attention_output(x, rope, packed, key_padding_mask).flatten(-2))
        return x + self.feed_forward(x)

    def attention_output(self, x, rope, packed: PackedInfo | None, key_padding_mask: torch.Tensor | None):
        """Attention [..., H, D] of the layer's input: its LayerNorm, QKV projection, rotary and attention."""
        return self.attend(self.attention.layernorm_qkv(x), rope, packed, key_padding_mask)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TorchEsmLayer(EsmLayerBase):
    """The reference layer: transformers' EsmLayer arithmetic (fp32 rotary). transformers scales q by 1/sqrt(D)
    before the rotation; we let the attention kernel scale, which is the same function (rotation is linear) and
    lets flash kernels fuse it; fp32 logits agree to ~1e-6."""

    def __init__(self, config: EsmConfig, device=None, dtype=None, attention_kernel: str = "flash"):
        super().__init__(config)
        h, eps = config.hidden_size, config.layer_norm_eps
        self.attention_kernel = attention_kernel
        self.attention = AttentionBlock(
            LayerNormLinear(h, 3 * h, eps, device=device, dtype=dtype), Linear(h, h, device=device, dtype=dtype)
        )
        # The exact-GELU MLP through fused_kernels.gelu_mlp (needs no TE: our Triton kernel, PyTorch's path off CUDA):
        # its backward allocates no [T, ffn] tensor, which compiled PyTorch's does (imported here: it imports us).
        from recipe.model import fused_kernels

        self.mlp = LayerNormMLP(h, config.intermediate_size, eps, config.activation, device=device, dtype=dtype,
                                feed_forward=fused_kernels.gelu_mlp)  # fmt: skip

    def attend(self, qkv, rope, packed, key_padding_mask):
        q, k, v = self.split_heads(qkv)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if packed is None:
            return padded_attention(q, k, v, key_padding_mask)
        return packed_attention(q, k, v, packed, self.attention_kernel)


def padded_attention(q, k, v, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, S, H, D] attention through SDPA with a key padding mask (True = real token); scale 1/sqrt(D)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _varlen_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def packed_attention(q, k, v, packed: PackedInfo, kernel: str = "flash") -> torch.Tensor:
    """[T, H, D] attention within each packed sequence.

    On CUDA in bf16/fp16 this is `varlen_attn` (flash attention over cu_seqlens), or with kernel="triton" our Triton
    kernels (attention.py). Elsewhere (CPU, or fp32 where the flash kernel does not run) the sequences are scattered
    into a padded [N, S, H, D] block and run through SDPA: slower, but the same function, and what the CPU tests
    check against transformers.
    """
    if q.is_cuda and kernel == "triton":
        from recipe.model.attention import varlen_attention

        return varlen_attention(q, k, v.contiguous(), packed.cu_seqlens, packed.max_seqlen)  # v copied: see below
    if _varlen_usable(q):
        from torch.nn.attention.varlen import varlen_attn

        cu = packed.cu_seqlens
        # The kernel keeps its inputs for backward. q and k arrive as fresh tensors from the rotary; v is still a view
        # of the fused QKV projection, and keeping it would keep all of QKV alive: a copy of v frees two thirds of it.
        out = varlen_attn(q, k, v.contiguous(), cu, cu, packed.max_seqlen, packed.max_seqlen)  # default scale 1/sqrt(D)
        return cast(torch.Tensor, out)  # without return_aux, only the output
    n = len(packed.cu_seqlens) - 1
    seq, off = packed.seq_index, packed.offsets
    shape = (n, packed.max_seqlen, *q.shape[1:])
    q_pad, k_pad, v_pad = (x.new_zeros(shape).index_put_((seq, off), x) for x in (q, k, v))
    mask = torch.zeros(n, packed.max_seqlen, dtype=torch.bool, device=q.device).index_put_(
        (seq, off), torch.ones_like(seq, dtype=torch.bool)
    )
    return padded_attention(q_pad, k_pad, v_pad, mask)[seq, off]


def is_norm_param(name: str) -> bool:
    """LayerNorm parameters: TE-style `layer_norm_weight`/`layer_norm_bias`, or weight/bias of a `*layer_norm`
    module. (Not a substring test: `layernorm_qkv.weight` is the fused QKV projection, a matrix.)"""
    parts = name.split(".")
    return parts[-1].startswith("layer_norm_") or (len(parts) > 1 and parts[-2].endswith("layer_norm"))


def param_kind(name: str) -> str:
    """'norm', 'bias' or 'weight': what ESM-2's initialisation and the weight-decay exclusions go by."""
    if is_norm_param(name):
        return "norm" if name.endswith("weight") else "bias"
    return "bias" if name.endswith("bias") else "weight"


def init_scale(name: str) -> str:
    """How ESM-2 initialises a parameter: 'ones' for norm weights, 'zeros' for biases (norm biases too), else 'normal'."""
    kind = param_kind(name)
    return {"norm": "ones", "bias": "zeros", "weight": "normal"}[kind]
