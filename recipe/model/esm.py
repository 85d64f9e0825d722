"""ESM-2 masked language model: embeddings with ESM token dropout, a layer stack, and the tied LM head.

Input is either packed THD (`input_ids` [T], `cu_seqlens` int32 [N+1], `max_seqlen`) or padded BSHD (`input_ids`
[B, S] with `attention_mask`). Both give the same per-token outputs for the same sequences. With `labels`, the LM
head runs only at labelled (masked) positions unless logits are asked for: the head and softmax over all T tokens
are wasted work in training.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recipe.data.mlm import IGNORE_INDEX
from recipe.model.config import EsmConfig, Runtime
from recipe.model.layers import Linear, PackedInfo, TorchEsmLayer, init_scale, linear, rotary_cos_sin, rotary_inv_freq

log = logging.getLogger(__name__)

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM-2's token-dropout constant (mask probability x <mask> share)


@dataclass
class EsmOutput:
    loss: torch.Tensor | None = None  # mean cross-entropy over labelled tokens
    loss_sum: torch.Tensor | None = None  # summed cross-entropy, for token-weighted reductions
    num_tokens: torch.Tensor | None = None  # labelled tokens in this batch
    num_correct: torch.Tensor | None = None  # labelled tokens whose argmax is the label
    logits: torch.Tensor | None = None
    # the final hidden states; None where only the loss was asked for (labels without return_logits) of a packed
    # batch: the final LayerNorm then runs on the labelled tokens only (masked_lm_output)
    last_hidden_state: torch.Tensor | None = None


def rope_inputs(config: EsmConfig, rope_kernel: str, packed: PackedInfo, position_ids=None, device=None):
    """What every layer's `attend` takes as `rope` for a packed batch, built once per forward: the torch backend's
    cos/sin tables (by `position_ids` if given), TE's angle table, or the Triton kernel's (positions, inv_freq)."""
    if config.backend == "te" and rope_kernel == "triton":
        return packed.offsets, rotary_inv_freq(config.head_dim, config.rope_theta, device)
    if config.backend == "te":
        from recipe.model.te_layers import rotary_freqs

        return rotary_freqs(packed.max_seqlen, config.head_dim, config.rope_theta, device)
    return rotary_cos_sin(packed.offsets if position_ids is None else position_ids, config.head_dim, config.rope_theta)


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, config: EsmConfig, device=None, dtype=None):
        super().__init__()
        h = config.hidden_size
        self.dense = Linear(h, h, device=device, dtype=dtype)  # layers.Linear: no BF16 weight copy kept for backward
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(config.vocab_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(F.gelu(self.dense(x)))
        return linear(x, decoder_weight, self.bias)


def _layer_class(backend: str):
    if backend == "torch":
        return TorchEsmLayer
    if backend == "te":
        from recipe.model.te_layers import TEEsmLayer

        return TEEsmLayer
    raise ValueError(f"model backend must be resolved to 'torch' or 'te' before building, got {backend!r}")


class EsmForMaskedLM(nn.Module):
    def __init__(self, config: EsmConfig, device=None, dtype=None, layer_init_contexts=None, runtime: Runtime | None = None):
        """`layer_init_contexts`: one context manager per layer to build it in (TE's quantized_model_init)."""
        super().__init__()
        self.config = config
        self.runtime = runtime = runtime or Runtime()
        cp, recipes = runtime.context_parallel, runtime.layer_recipes
        if config.backend != "te" and (cp.size > 1 or recipes is not None):
            raise ValueError("context parallelism and FP8/FP4 layers need the te backend (TransformerEngine)")
        if runtime.rope_kernel != "te" and (config.backend != "te" or cp.size > 1):
            raise ValueError(f"rope_kernel={runtime.rope_kernel} is for the te backend without context parallelism")
        if runtime.attention_kernel not in ("flash", "te", "triton"):
            raise ValueError(f"attention_kernel={runtime.attention_kernel!r}: flash, te or triton")
        if recipes is not None and len(recipes) != config.num_layers:
            raise ValueError(f"{len(recipes)} layer recipes for {config.num_layers} layers")
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id, device=device, dtype=dtype)
        layer_cls = _layer_class(config.backend)
        contexts = layer_init_contexts or [nullcontext() for _ in range(config.num_layers)]
        # TE's context-parallel attention takes its group at construction; one side stream serves every layer.
        layer_kw: dict[str, Any] = {"context_parallel": cp, "cp_stream": torch.cuda.Stream()} if cp.size > 1 else {}
        if config.backend == "te":
            layer_kw["rope_kernel"] = runtime.rope_kernel
        if config.backend in ("te", "torch"):
            layer_kw["attention_kernel"] = runtime.attention_kernel
        layers = []
        for i, ctx in enumerate(contexts):
            if config.backend == "te":  # an FP8/FP4 layer runs TE's projections (te_layers.py)
                layer_kw["quantized"] = recipes is not None and recipes[i] is not None
            with ctx:
                layers.append(layer_cls(config, device=device, dtype=dtype, **layer_kw))
        self.layers = nn.ModuleList(layers)
        self.final_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.lm_head = LMHead(config, device=device, dtype=dtype)

    def compile_layers(self) -> None:
        """torch.compile per torch layer, with dynamic shapes (packed lengths, the number of sequences and max_seqlen
        vary per batch). A te layer has nothing left to compile: TE's modules and our kernels (fused_kernels.py, the
        Triton rope) run their own fused kernels, which torch.compile would only break its graph around."""
        if self.config.backend == "te":
            log.warning("use_torch_compile=true with the te backend compiles nothing: its layers run TE's and our own "
                        "fused kernels (model.backend=torch compiles whole layers)")  # fmt: skip
            return
        for layer in self.layers:
            layer.compile(dynamic=True)

    def _layer_contexts(self):
        """One outer TE autocast around the stack (amax reduction once per step, at its exit) and a per-layer
        context inside it that switches each layer to its own recipe or to BF16."""
        recipes, group = self.runtime.layer_recipes, self.runtime.amax_group
        if recipes is None:
            return nullcontext(), [nullcontext()] * len(self.layers)
        import transformer_engine.pytorch as te

        first = next(r for r in recipes if r is not None)
        outer = te.autocast(enabled=True, recipe=first, amax_reduction_group=group)
        # The inner contexts name the same amax group: TE keys its amax buffers by (recipe, group), and a layer run
        # under a group-less context would be reduced on its own rank only.
        return outer, [te.autocast(enabled=r is not None, recipe=r, amax_reduction_group=group) for r in recipes]

    # ---------------------------------------------------------------- embeddings
    def embed(
        self,
        input_ids: torch.Tensor,
        seq_of_token: torch.Tensor | None,
        lengths: torch.Tensor,
        masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Word embeddings with ESM token dropout: zero `<mask>` rows, rescale each sequence by its own mask ratio.
        With context parallelism a rank holds part of each sequence: `masked` then gives the `<mask>` count of every
        whole sequence (the batch carries it, from recipe.data.context_parallel.shard_batch).

        A `<pad>` token is embedded like any other: as in transformers, only an attention mask (BSHD) zeroes
        positions, and a packed sequence attends to every token it holds. Training moves the `<pad>` row (the decoder
        is tied to it), so zeroing `<pad>` here would break parity on inputs that attend to one."""
        x = self.embed_tokens(input_ids)
        cfg = self.config
        if cfg.token_dropout:
            is_mask = input_ids == cfg.mask_token_id
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            if seq_of_token is None:  # BSHD: one row per sequence
                masked = is_mask.sum(-1).float()
                scale = (1 - MASK_RATIO_TRAIN) / (1 - masked / lengths)
                x = (x * scale[:, None, None]).to(x.dtype)
            else:
                if masked is None:
                    masked = torch.zeros(len(lengths), device=x.device).index_add_(0, seq_of_token, is_mask.float())
                scale = (1 - MASK_RATIO_TRAIN) / (1 - masked / lengths.clamp(min=1))
                x = (x * scale[seq_of_token][:, None]).to(x.dtype)
        return self.to_residual_dtype(x)

    def to_residual_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """The dtype the layers add into. Under autocast that is the autocast dtype unless `fp32_residual`: a bf16
        stream halves the memory traffic of every residual add and LayerNorm input (measured faster with both
        backends: docs/benchmarks.md). Under FSDP2's bf16 parameters the
        embeddings already come out in bf16; `fp32_residual` then casts them up, so both strategies run the same
        arithmetic."""
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return x
        return x.to(torch.float32 if self.config.fp32_residual else torch.get_autocast_dtype(device))

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        position_ids: torch.Tensor | None = None,
        cu_seqlens_padded: torch.Tensor | None = None,
        seq_mask_counts: torch.Tensor | None = None,
        masked_index: torch.Tensor | None = None,
    ) -> EsmOutput:
        """`cu_seqlens_padded`: the padded sequences' offsets (with context parallelism: of the full sequences, of
        which this rank holds 1/cp_size each, and cu_seqlens has their real lengths); `seq_mask_counts`: `<mask>`
        tokens per full sequence, which token dropout needs under context parallelism (see recipe/data/context_parallel.py);
        `masked_index`: the flat positions of the labelled tokens, if known (see `masked_lm_output`)."""
        cp = self.runtime.context_parallel
        if self.runtime.check_inputs:
            check_inputs(self.config, input_ids, cu_seqlens, max_seqlen, attention_mask, labels, cu_seqlens_padded, cp.size)
            check_masked_index(masked_index, labels)
        if cu_seqlens_padded is not None and self.config.backend != "te":
            raise ValueError("cu_seqlens_padded (context-parallel batches) needs the te backend")
        if cp.size > 1 and (
            input_ids.dim() != 1 or cu_seqlens_padded is None or (self.config.token_dropout and seq_mask_counts is None)
        ):
            raise ValueError(
                f"this model was built for context parallelism over {cp.size} ranks: it takes this rank's share of a "
                "packed batch (recipe.data.context_parallel.shard_batch: cu_seqlens_padded, seq_mask_counts)"
            )
        if input_ids.dim() == 1:
            assert cu_seqlens is not None and max_seqlen is not None  # check_inputs refuses their absence with a message
            packed = PackedInfo(cu_seqlens, int(max_seqlen), input_ids.numel(), cu_seqlens_padded, cp.size, cp.rank)
            last = self._forward_packed(input_ids, packed, position_ids, seq_mask_counts)
            return self.head_and_loss(last, labels, return_logits, masked_index, norm=self.final_layer_norm)
        return self.head_and_loss(self._forward_padded(input_ids, attention_mask), labels, return_logits, masked_index)

    def _forward_packed(self, input_ids, packed: PackedInfo, position_ids=None, seq_mask_counts=None) -> torch.Tensor:
        masked = None if seq_mask_counts is None else seq_mask_counts.float()
        x = self.embed(input_ids, packed.seq_index, packed.lengths.float(), masked)
        return self._run_layers(x, packed, position_ids)

    def _run_layers(self, x, packed: PackedInfo, position_ids=None) -> torch.Tensor:
        """The last layer's output (before the final LayerNorm)."""
        rope = rope_inputs(self.config, self.runtime.rope_kernel, packed, position_ids, x.device)
        outer, per_layer = self._layer_contexts()
        if self.runtime.layer_recipes is not None and x.shape[0] % 16:
            raise ValueError(f"FP8/FP4 layers need a token count divisible by 16, got {x.shape[0]} (dataset.pad_to_multiple_of)")
        with outer:
            for layer, ctx in zip(self.layers, per_layer):
                with ctx:
                    x = layer(x, rope, packed=packed)
        return x

    def _forward_padded(self, input_ids, attention_mask) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(-1)
        x = self.embed(input_ids, None, lengths.float())
        x = (x * attention_mask.unsqueeze(-1)).to(x.dtype)
        if self.config.backend == "te":  # TE runs THD: unpad, run, scatter back
            keep = attention_mask.flatten().bool()
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            out = self._run_layers(x.flatten(0, 1)[keep], PackedInfo(cu, int(lengths.max()), int(lengths.sum())))
            out = self.final_layer_norm(out)
            return out.new_zeros(*input_ids.shape, out.shape[-1]).masked_scatter_(attention_mask.bool()[..., None], out)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rope = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        key_padding_mask = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, rope, key_padding_mask=key_padding_mask)
        return self.final_layer_norm(x)

    def head_and_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None,
        return_logits: bool,
        masked_index: torch.Tensor | None = None,
        norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> EsmOutput:
        """`norm`: the final LayerNorm, where `hidden` is still before it (see masked_lm_output)."""
        return masked_lm_output(hidden, labels, return_logits, self.tied_head, masked_index, norm)

    def tied_head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head with its decoder tied to the token embeddings."""
        return self.lm_head(x, self.embed_tokens.weight)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions of the labelled tokens (what the LM head runs on), in order. On the host before the batch
    goes up (recipe.validation.model_inputs), it costs the GPU nothing; on the device, its data-dependent size makes
    the host wait for the work queued before it."""
    return torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).squeeze(1)


def masked_lm_output(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    return_logits: bool,
    head,
    masked_index: torch.Tensor | None = None,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EsmOutput:
    """LM head (`head`: hidden -> logits) and summed cross-entropy. Shared with the hf backend's adapter so that both
    report loss, token and correct counts the same way. Without `return_logits` the head runs on the labelled tokens
    only: at `masked_index` (`labelled_positions`, found on the host by the loop, so nothing here waits for the GPU)
    or, without it, at the positions found here from the labels (which makes the host wait for the forward).

    `norm`, if given, is the final LayerNorm, still to be applied to `hidden`. A per-token function: on the
    labelled-tokens path it runs on those tokens only (the same values, without an FP32 [T, hidden] output kept for
    backward), and no last_hidden_state is returned there."""
    if norm is not None and (labels is None or return_logits):
        hidden, norm = norm(hidden), None
    if labels is None:
        return EsmOutput(logits=head(hidden), last_hidden_state=hidden)
    flat_labels = labels.reshape(-1)
    if return_logits:
        logits = head(hidden)
        picked, target = logits.reshape(-1, logits.shape[-1]), flat_labels
    else:
        logits = None
        if masked_index is None:
            masked_index = labelled_positions(labels)
        picked_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_index)
        picked = head(picked_hidden if norm is None else norm(picked_hidden))
        target = flat_labels.index_select(0, masked_index)
    loss_sum = F.cross_entropy(picked.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = target != IGNORE_INDEX
    num = valid.sum()
    correct = ((picked.argmax(-1) == target) & valid).sum()
    return EsmOutput(
        loss=loss_sum / num.clamp(min=1),
        loss_sum=loss_sum,
        num_tokens=num,
        num_correct=correct,
        logits=logits,
        last_hidden_state=hidden if norm is None else None,
    )


def check_inputs(
    config: EsmConfig, input_ids, cu_seqlens, max_seqlen, attention_mask, labels, cu_seqlens_padded=None, cp_size=1
) -> None:
    """Clear errors for malformed batches, instead of an index error deep inside a kernel."""
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(
            f"input_ids out of range: min {int(input_ids.min())}, max {int(input_ids.max())}, vocabulary size {config.vocab_size}"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if input_ids.dim() == 1:
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("packed (1-D) input_ids need cu_seqlens and max_seqlen")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32 tensor of N+1 >= 2 offsets, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.cpu()
        if cu_seqlens_padded is not None:
            _check_cp_offsets(cu, cu_seqlens_padded.cpu(), input_ids.numel(), cp_size)
        elif int(cu[0]) != 0 or int(cu[-1]) != input_ids.numel():
            raise ValueError(f"cu_seqlens must start at 0 and end at T={input_ids.numel()}, got {int(cu[0])} ... {int(cu[-1])}")
        lengths = cu[1:] - cu[:-1]
        if bool((lengths <= 0).any()):
            raise ValueError(f"cu_seqlens must be strictly increasing, got {cu.tolist()[:16]}")
        if int(lengths.max()) > int(max_seqlen):
            raise ValueError(f"max_seqlen={int(max_seqlen)} is smaller than the longest sequence ({int(lengths.max())})")
    elif input_ids.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens goes with packed 1-D input_ids, not [B, S]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if attention_mask is not None and bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("attention_mask has a row with no tokens")
        if config.backend == "te" and attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError(
                "the te backend needs a right-padded attention_mask (ones, then zeros): it runs padded rows as packed "
                "sequences, whose rotary positions start at their first attended token; model.backend=torch takes any mask"
            )
    else:
        raise ValueError(f"input_ids must be [T] (packed) or [B, S] (padded), got shape {tuple(input_ids.shape)}")


def check_masked_index(masked_index: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    """masked_index must be what `model_inputs` computes: the flat positions of exactly the labelled tokens."""
    if masked_index is None:
        return
    if labels is None:
        raise ValueError("masked_index (the labelled tokens' positions) goes with labels")
    expected = labelled_positions(labels)
    if masked_index.shape != expected.shape or not torch.equal(masked_index.to(expected.device), expected):
        raise ValueError(
            f"masked_index must list the positions of the labelled tokens ({expected.numel()} of them), in order; got "
            f"{masked_index.numel()} positions (recipe.validation.model_inputs computes it)"
        )


def _check_cp_offsets(cu: torch.Tensor, cu_pad: torch.Tensor, num_tokens: int, cp_size: int) -> None:
    padded = cu_pad[1:] - cu_pad[:-1]
    if len(cu_pad) != len(cu) or int(cu_pad[0]) != 0 or int(cu_pad[-1]) != num_tokens * cp_size:
        raise ValueError(
            f"cu_seqlens_padded must have one offset per cu_seqlens offset and end at T x cp_size = {num_tokens} x {cp_size}, "
            f"got {len(cu_pad)} offsets ending at {int(cu_pad[-1])}"
        )
    if bool((padded < cu[1:] - cu[:-1]).any()) or bool((padded % (2 * cp_size)).any()):
        raise ValueError(f"every padded sequence must hold its real tokens and be a multiple of 2 x cp_size = {2 * cp_size}")


# -------------------------------------------------------------------- initialisation
def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: Any, seed: int) -> None:
    """ESM-2 init (normal(0, 0.02), zero biases, unit norm weights, zero pad row), the same for any sharding.

    Each parameter draws from its own generator seeded by (seed, name) over its *full* shape; a sharded (DTensor)
    parameter keeps its slice. DDP, FSDP2 at any world size, and a single process therefore start from identical
    weights, which is what makes their losses comparable step by step.
    """
    if hasattr(model, "init_from_seed"):  # the hf backend's adapter maps these same values to transformers' names
        model.init_from_seed(seed)
        return
    config = getattr(model, "config", None)
    std = float(getattr(config, "initializer_range", 0.02))
    pad = getattr(config, "pad_token_id", None)
    for name, param in model.named_parameters():
        full_shape, local, _ = _local_view(param)
        kind = init_scale(name)
        if kind == "ones":
            local.fill_(1.0)
            continue
        if kind == "zeros":
            local.zero_()
            continue
        copy_full_into(param, initial_value(name, full_shape, seed, std, pad, local.device))


def initial_value(name: str, shape: tuple[int, ...], seed: int, std: float, pad: int | None, device) -> torch.Tensor:
    """The full initial value of our parameter `name` (what init_weights writes), drawn on `device`."""
    kind = init_scale(name)
    if kind != "normal":
        return (torch.ones if kind == "ones" else torch.zeros)(shape, device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    full = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if name.endswith("embed_tokens.weight") and pad is not None:
        full[pad] = 0.0
    return full


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a parameter's whole (unsharded) value into it, or into this rank's shard of it when it is a DTensor."""
    _, local, offsets = _local_view(param)
    for dim, (start, size) in enumerate(zip(offsets, local.shape)):
        full = full.narrow(dim, start, size)
    local.copy_(full)


def _local_view(param: torch.Tensor):
    """(global shape, the local tensor to write, its offset in the global tensor) for plain or DTensor params."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(param.shape), param.to_local(), tuple(offsets)
    return tuple(param.shape), param, (0,) * param.dim()
