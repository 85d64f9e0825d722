"""The ESM-2 layer on TransformerEngine (THD input only; the model unpads BSHD before the layers): TE's cuDNN
attention or our Triton attention (attention_kernel) in every layer, TE's projections and MLP in the layers the
precision plan quantizes.

Parameter names equal the torch backend's (see layers.py), so state dicts move between backends as they are.
TE's fused LayerNormMLP only knows the tanh GELU. With `activation: gelu` (ESM-2's exact erf GELU, the default)
the MLP runs in plain PyTorch, so a converted facebook checkpoint gives ESM-2's numbers; `activation: gelu_tanh`
uses TE's fused kernel (measured difference: docs/numerics.md).
"""

from __future__ import annotations

from typing import cast

import torch

from recipe.model import fused_kernels
from recipe.model.config import ContextParallel, EsmConfig
from recipe.model.layers import (
    AttentionBlock,
    EsmLayerBase,
    LayerNormLinear,
    LayerNormMLP,
    Linear,
    PackedInfo,
    layer_norm_mlp,
    packed_attention,
    rotary_inv_freq,
)


def rotary_freqs(max_seqlen: int, head_dim: int, theta: float, device) -> torch.Tensor:
    """[S, 1, 1, D] fp32 angles for TE's fused rope (same non-interleaved layout as the torch backend)."""
    freqs = torch.arange(max_seqlen, device=device, dtype=torch.float)[:, None] * rotary_inv_freq(head_dim, theta, device)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def requantize_weight_in_backward(module: torch.nn.Module) -> None:
    """Ask a quantized TE module to quantize its weight again in backward instead of keeping the forward's FP8 copy
    (row- and column-wise) until then. TE does this under FSDP2 (its `is_fsdp2` path, for the same memory reason);
    our unsharded one-GPU runs and DDP would otherwise hold those copies for every quantized layer at the peak. The
    backward reads the module's own full weight, which outside FSDP2 is always there. Weights held quantized
    (quantized_model_init) are left alone: under FSDP2 their usages are kept by FSDP2's hooks, which we lack."""
    if any(hasattr(p, "_quantizer") for p in module.parameters()):
        return
    if isinstance(getattr(type(module), "is_fsdp2", None), property):  # TE's cached flag behind the property
        module._is_fsdp2 = True  # type: ignore[assignment]


def require_packed(packed: PackedInfo | None) -> PackedInfo:
    if packed is None:
        raise ValueError("the te backend runs packed (THD) input only")
    return packed


class TEEsmLayer(EsmLayerBase):
    """An ESM-2 layer on TransformerEngine: TE's attention, or ours (`attention_kernel=triton`). A `quantized` layer
    (FP8/FP4 under the precision plan) runs its projections and MLP through TE's modules, whose GEMMs quantize. A BF16
    layer runs its projections through our linears: TE's keep a BF16 copy of every weight for backward under autocast,
    ours cast the FP32 weight again there (layers.py `linear`), which is the same arithmetic with less memory
    (docs/benchmarks.md, lever 26). Its LayerNorms run our Triton kernels, or TE's for rows wider than 4096
    (fused_kernels.py, levers 33 and 43)."""

    def __init__(
        self,
        config: EsmConfig,
        device=None,
        dtype=None,
        context_parallel: ContextParallel | None = None,
        cp_stream=None,
        quantized: bool = False,
        rope_kernel: str = "te",
        attention_kernel: str = "te",
    ):
        super().__init__(config)
        import transformer_engine.pytorch as te

        h, eps, ffn = config.hidden_size, config.layer_norm_eps, config.intermediate_size
        device = device if device is not None else "cuda"
        kw = dict(params_dtype=dtype or torch.float32, device=device)
        self.eps, self.activation, self.rope_kernel, self.quantized = eps, config.activation, rope_kernel, quantized
        if attention_kernel == "triton" and context_parallel is not None and context_parallel.size > 1:
            raise ValueError("attention_kernel=triton runs without context parallelism (TE's attention splits sequences)")
        self.attention_kernel = attention_kernel
        if quantized:
            qkv, proj = te.LayerNormLinear(h, 3 * h, eps=eps, bias=True, **kw), te.Linear(h, h, bias=True, **kw)
        else:
            qkv = LayerNormLinear(h, 3 * h, eps, device=device, dtype=dtype, norm=fused_kernels.layer_norm)
            proj = Linear(h, h, device=device, dtype=dtype)
        self.attention = AttentionBlock(qkv, proj)
        # TE's fused MLP has only the tanh GELU: with the exact GELU a BF16 layer runs ours (an FP8 layer keeps TE's
        # parameters and runs them through `layer_norm_mlp`, see feed_forward).
        if quantized or config.activation != "gelu":
            self.mlp = te.LayerNormMLP(h, ffn, eps=eps, bias=True, activation="gelu", **kw)
        else:
            self.mlp = LayerNormMLP(h, ffn, eps, "gelu", device=device, dtype=dtype, norm=fused_kernels.layer_norm,
                                    feed_forward=fused_kernels.gelu_mlp)  # fmt: skip
        cp = {}
        if context_parallel is not None and context_parallel.size > 1:
            cp = dict(
                cp_group=context_parallel.group,
                cp_global_ranks=list(context_parallel.ranks),
                cp_stream=cp_stream,
                cp_comm_type=context_parallel.comm_type,
            )
        if quantized:
            for module in (qkv, proj, self.mlp):
                requantize_weight_in_backward(module)
        self.core_attention = te.DotProductAttention(
            config.num_heads,
            config.head_dim,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding",
            softmax_scale=config.head_dim**-0.5,
            **cp,
        )

    def forward(self, x, rope, packed: PackedInfo | None = None, key_padding_mask: torch.Tensor | None = None):
        """A BF16 layer with the exact GELU adds the attention's output to the residual stream inside its MLP's
        LayerNorm kernels (fused_kernels.add_layer_norm): one pass over the sum fewer forward, and backward the
        sum's two gradients are added where the LayerNorm's is written. The same arithmetic as the base forward."""
        if self.quantized or self.activation != "gelu":
            return super().forward(x, rope, packed, key_padding_mask)
        attn = self.attention.proj(self.attention_output(x, rope, packed, key_padding_mask).flatten(-2))
        s, h = fused_kernels.add_layer_norm(x, attn, self.mlp.layer_norm_weight, self.mlp.layer_norm_bias, self.eps)
        return s + fused_kernels.gelu_mlp(h, self.mlp, "gelu")

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return layer_norm_mlp(x, self.mlp, self.eps, "gelu", fused_kernels.layer_norm, fused_kernels.gelu_mlp)
        return self.mlp(x)

    def attention_output(self, x, rope, packed: PackedInfo | None, key_padding_mask):
        """A BF16 layer with our rope kernel runs its QKV projection and rope as one function, whose backward sums
        the projection's bias gradient in the rope's kernel (rope_kernel.linear_rope_qkv; lever 39)."""
        if self.rope_kernel != "triton" or self.quantized:
            return super().attention_output(x, rope, packed, key_padding_mask)
        from recipe.model import rope_kernel

        qkv = cast(LayerNormLinear, self.attention.layernorm_qkv)
        h = qkv.norm(x, qkv.layer_norm_weight, qkv.layer_norm_bias, qkv.eps)
        positions, inv_freq = rope
        q, k, v = rope_kernel.linear_rope_qkv(h, qkv.weight, qkv.bias, positions, inv_freq, self.num_heads, self.head_dim)
        return self.attend_rotated(q, k, v, packed)

    def attend(self, qkv, rope, packed: PackedInfo | None, key_padding_mask):
        packed = require_packed(packed)
        q, k, v = self.rotate(qkv, rope, packed)
        return self.attend_rotated(q, k, v, packed)

    def attend_rotated(self, q, k, v, packed: PackedInfo | None):
        """Attention over q, k, v [T, H, D] (rotated) within each packed sequence: TE's, or with attention_kernel=triton
        ours (layers.packed_attention; faster than TE's cuDNN kernels at head dim 64, docs/benchmarks.md lever 58).
        TE's module is built either way: it holds no weights, and the state dict keeps one layout."""
        packed = require_packed(packed)
        if self.attention_kernel == "triton":
            if packed.cu_seqlens_padded is not None:
                raise ValueError("cu_seqlens_padded (sequences laid out with gaps) needs TE's attention: attention_kernel=te")
            return packed_attention(q, k, v, packed, "triton")
        cu, cu_pad = packed.cu_seqlens, packed.cu_seqlens_padded
        out = self.core_attention(
            q,
            k,
            v,
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_kv=packed.max_seqlen,
        )
        return out.view(*q.shape)

    def rotate(self, qkv, rope, packed: PackedInfo):
        """q and k rotated, and v, as contiguous [T, H, D] from QKV, by the layer's rope kernel (`rope`: what
        esm.rope_inputs builds for it)."""
        if self.rope_kernel == "triton":  # rope: (positions, inv_freq); one pass over QKV
            from recipe.model import rope_kernel

            positions, inv_freq = rope
            return rope_kernel.rope_qkv(qkv, positions, inv_freq, self.num_heads, self.head_dim)
        return self.te_rope(qkv, rope, packed)  # rope: TE's angle table

    def te_rope(self, qkv, freqs, packed: PackedInfo):
        """TE's fused rope on q and k. With context parallelism it finds each token's position in the full sequence
        from the padded offsets and this rank's place in the dual-chunk-swap layout. q and k stay strided views of
        QKV (the kernel reads any layout and writes contiguous outputs, so a copy first would only add a pass); v is
        copied, because the attention keeps its inputs for backward and a view would keep all of QKV alive."""
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb

        q, k, v = self.split_heads(qkv)
        cu_pad = packed.cu_seqlens_padded
        rope_kw = dict(tensor_format="thd", fused=True, cu_seqlens=packed.cu_seqlens if cu_pad is None else cu_pad,
                       cp_size=packed.cp_size, cp_rank=packed.cp_rank)  # fmt: skip
        return apply_rotary_pos_emb(q, freqs, **rope_kw), apply_rotary_pos_emb(k, freqs, **rope_kw), v.contiguous()
