"""`model.backend=hf`: transformers' own `EsmForMaskedLM` (padded batches, SDPA attention) trained inside our loop.

It exists so that a user can compare our backends with the reference implementation in the trainer itself: same
data, masking, schedule, checkpoints and export. The adapter gives it our model's interface (the forward signature
and `EsmOutput` with the summed loss, token and correct counts; `layers` for FSDP2's per-layer wrapping) and starts
it from exactly the weights our torch backend starts from for the same seed, so the two runs differ only in the
implementation. What the reference model cannot do (packed THD batches, FP8/FP4, context parallelism,
torch.compile through our per-layer path, the tanh GELU) is refused with the key to change.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from omegaconf import DictConfig
from torch import nn

from recipe.model.config import EsmConfig, Runtime
from recipe.model.convert import hf_config_dict, hf_to_ours, ours_to_hf
from recipe.model.esm import (
    EsmForMaskedLM,
    EsmOutput,
    check_inputs,
    check_masked_index,
    copy_full_into,
    initial_value,
    masked_lm_output,
)

log = logging.getLogger(__name__)

PREFIX = "hf."  # where the transformers model sits in the adapter's state dict


class HFBackendError(ValueError):
    pass


def transformers_config(config: EsmConfig):
    """transformers' EsmConfig for our config, SDPA attention (what our export's config.json also says)."""
    from transformers import EsmConfig as HFConfig

    skip = ("recipe", "architectures", "model_type", "torch_dtype")
    fields = {k: v for k, v in hf_config_dict(config).items() if k not in skip}
    return HFConfig(**fields, attn_implementation="sdpa")  # type: ignore[call-arg]  # a PretrainedConfig keyword


class HFEsmForMaskedLM(nn.Module):
    """transformers.EsmForMaskedLM behind our model's forward signature and outputs."""

    def __init__(self, config: EsmConfig, device=None, dtype=None, runtime: Runtime | None = None):
        super().__init__()
        runtime = runtime or Runtime()
        if runtime.context_parallel.size > 1 or runtime.layer_recipes is not None:
            raise HFBackendError("model.backend=hf has no context-parallel attention and no FP8/FP4 layers")
        from transformers import EsmForMaskedLM as TransformersEsm

        if config.activation != "gelu":
            raise HFBackendError(
                f"model.backend=hf has only ESM-2's exact GELU: set model.activation=gelu, not {config.activation}"
            )
        self.config = config
        with torch.device(device if device is not None else "cpu"):
            hf = TransformersEsm(transformers_config(config))
        # The contact head is not trained by MLM: DDP would stop on its unused parameters. Export writes it as zeros.
        del hf.esm.contact_head
        self.hf = hf.to(dtype) if dtype is not None else hf
        self.runtime = runtime

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder layers: what FSDP2 shards one by one (recipe/parallel.py). A property, not a second
        registration, so that the state dict names every tensor once."""
        return self.hf.esm.encoder.layer

    def compile_layers(self) -> None:
        raise HFBackendError("use_torch_compile=true is not supported with model.backend=hf: it compiles our own layers only")

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
        masked_index: torch.Tensor | None = None,
    ) -> EsmOutput:
        if input_ids.dim() != 2 or cu_seqlens is not None or cu_seqlens_padded is not None:
            raise HFBackendError("model.backend=hf takes padded [B, S] batches (dataset.layout=bshd), not packed THD ones")
        if self.runtime.check_inputs:
            check_inputs(self.config, input_ids, None, None, attention_mask, labels)
            check_masked_index(masked_index, labels)
        hidden = self.hf.esm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return masked_lm_output(hidden, labels, return_logits, self.hf.lm_head, masked_index)

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_from_seed(self, seed: int) -> None:
        """Our torch backend's initial values for `seed` (recipe.model.esm.initial_value, per parameter of ours),
        mapped to transformers' names: a hf run starts where a torch run starts. Sharded (FSDP2) parameters keep
        their slice; the full values exist on the device for the duration of this call."""
        ours = EsmForMaskedLM(dataclasses.replace(self.config, backend="torch"), device="meta")
        device = self.hf.esm.embeddings.word_embeddings.weight.device
        cfg = self.config
        values = {
            n: initial_value(n, tuple(p.shape), seed, cfg.initializer_range, cfg.pad_token_id, device)
            for n, p in ours.named_parameters()
        }
        self.load_ours(values)

    @torch.no_grad()
    def load_ours(self, values: dict[str, torch.Tensor]) -> None:
        """Full tensors in our parameter names (an initialisation, or an imported checkpoint: model.init_from)
        mapped to transformers' names and copied in; every parameter must get exactly one value of its shape."""
        self.tie_weights()
        mapped = ours_to_hf(values, self.config.num_layers)
        params = dict(self.hf.named_parameters())  # the tied decoder weight appears once, as the word embeddings
        if set(params) != set(mapped):
            raise KeyError(
                f"hf backend: parameters without a value {sorted(set(params) - set(mapped))}, "
                f"values without a parameter {sorted(set(mapped) - set(params))}"
            )
        for name, value in mapped.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}")
            copy_full_into(params[name], value)
        self.init_buffers()

    def tie_weights(self) -> None:
        """The LM head's decoder is the word embedding matrix (ESM-2 ties them). `to_empty` after a meta build gives
        each module its own new tensor and so unties plain parameters (FSDP2's DTensors are swapped in place and
        stay tied): tie them again before any value is written."""
        embeddings = self.hf.esm.embeddings.word_embeddings
        if self.hf.lm_head.decoder.weight is not embeddings.weight:
            self.hf.lm_head.decoder.weight = embeddings.weight

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary inverse frequencies: a buffer, left uninitialised when the model is built on the meta device."""
        rotary = self.hf.esm.rotary_embeddings
        assert rotary is not None, "ESM-2 uses rotary position embeddings"
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device))


def ours_from_adapter(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The adapter's (full) state dict in our parameter names, for our Hugging Face export (recipe/model/convert.py)."""
    stray = [k for k in state_dict if not k.startswith(PREFIX)]
    if stray:
        raise KeyError(f"not a hf-backend state dict: {stray[:5]}")
    return hf_to_ours({k[len(PREFIX) :]: v for k, v in state_dict.items()}, num_layers)


def prepare_config(cfg: DictConfig) -> None:
    """Refuse what the hf backend cannot run, naming the key; switch packed batches to padded ones (logged)."""
    refused = {
        "fp8_config.enabled / fp4_config.enabled (FP8/FP4 layers are TransformerEngine's)": cfg.fp8_config.enabled
        or cfg.fp4_config.enabled,
        "quantized_model_init": cfg.quantized_model_init,
        "cp_size > 1 (context parallelism needs the te backend)": cfg.cp_size > 1,
        "use_torch_compile (it compiles our own layers)": cfg.use_torch_compile,
        "model.activation=gelu_tanh (transformers' ESM has the exact GELU only)": cfg.model.activation == "gelu_tanh",
    }
    bad = [key for key, on in refused.items() if on]
    if bad:
        raise HFBackendError(f"model.backend=hf (transformers' EsmForMaskedLM) cannot run with {'; '.join(bad)}")
    if cfg.dataset.layout != "bshd":
        log.warning(
            "model.backend=hf takes padded batches: dataset.layout %s -> bshd (micro_batch_size=%d sequences)",
            cfg.dataset.layout,
            cfg.dataset.micro_batch_size,
        )
        cfg.dataset.layout = "bshd"
    if not cfg.model.fp32_residual:
        log.info(
            "model.backend=hf: model.fp32_residual has no effect (transformers' residual stream keeps the dtype of its "
            "embeddings: fp32 under autocast, bf16 under FSDP2's bf16 parameters)"
        )
