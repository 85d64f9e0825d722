"""Hugging Face <-> ours: the one place that knows transformers' EsmForMaskedLM parameter names.

Export writes a directory that `AutoModelForMaskedLM`, `AutoModel` and `AutoTokenizer` load without
`trust_remote_code`. Import reads a local facebook/esm2_* style directory (config.json + model.safetensors or
pytorch_model.bin) and refuses anything it cannot account for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from recipe.data.tokenizer import write_vocab
from recipe.model.config import EsmConfig
from recipe.model.layers import rotary_inv_freq

log = logging.getLogger(__name__)

# Tensors of EsmForMaskedLM checkpoints that our model has no use for: skipped with one log line.
UNUSED_PREFIXES = ("esm.contact_head.",)
# Buffers that are derived, not learned (rotary inverse frequencies, position ids).
DERIVED_SUFFIXES = ("rotary_embeddings.inv_freq", "embeddings.position_ids")


def _modern_name(key: str) -> str:
    """transformers writes LayerNorm parameters as gamma/beta in some versions (5.x save_pretrained does)."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def hf_to_ours(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map an EsmForMaskedLM state dict to ours. Every key must be used, skipped on purpose, or it is an error."""
    hf = {_modern_name(k): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise KeyError(f"Hugging Face checkpoint lacks tensor {key!r}")
        return hf.pop(key)

    out["embed_tokens.weight"] = take("esm.embeddings.word_embeddings.weight")
    for i in range(num_layers):
        p, q = f"esm.encoder.layer.{i}.", f"layers.{i}."
        att = p + "attention."
        out[q + "attention.layernorm_qkv.layer_norm_weight"] = take(att + "LayerNorm.weight")
        out[q + "attention.layernorm_qkv.layer_norm_bias"] = take(att + "LayerNorm.bias")
        for part in ("weight", "bias"):
            out[q + f"attention.layernorm_qkv.{part}"] = torch.cat(
                [take(att + f"self.{n}.{part}") for n in ("query", "key", "value")]
            )
            out[q + f"attention.proj.{part}"] = take(att + f"output.dense.{part}")
            out[q + f"mlp.fc1_{part}"] = take(p + f"intermediate.dense.{part}")
            out[q + f"mlp.fc2_{part}"] = take(p + f"output.dense.{part}")
        out[q + "mlp.layer_norm_weight"] = take(p + "LayerNorm.weight")
        out[q + "mlp.layer_norm_bias"] = take(p + "LayerNorm.bias")
    out["final_layer_norm.weight"] = take("esm.encoder.emb_layer_norm_after.weight")
    out["final_layer_norm.bias"] = take("esm.encoder.emb_layer_norm_after.bias")
    for part in ("weight", "bias"):
        out[f"lm_head.dense.{part}"] = take(f"lm_head.dense.{part}")
        out[f"lm_head.layer_norm.{part}"] = take(f"lm_head.layer_norm.{part}")
    out["lm_head.bias"] = take("lm_head.bias")
    decoder = hf.pop("lm_head.decoder.weight", None)
    if decoder is not None and not torch.equal(decoder, out["embed_tokens.weight"]):
        raise ValueError("lm_head.decoder.weight differs from the word embeddings: ESM-2 ties them, we cannot load this")

    skipped = [k for k in hf if k.startswith(UNUSED_PREFIXES)]
    derived = [k for k in hf if k.endswith(DERIVED_SUFFIXES)]
    if skipped:
        log.info("import: skipped %d tensors we do not use (%s)", len(skipped), ", ".join(sorted(skipped)))
    unexpected = sorted(set(hf) - set(skipped) - set(derived))
    if unexpected:
        raise KeyError(f"Hugging Face checkpoint has unexpected tensors: {unexpected}")
    return out


def ours_to_hf(ours: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our state dict as EsmForMaskedLM's (decoder weight written out tied, as transformers saves it)."""
    sd = {k: v for k, v in ours.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {"esm.embeddings.word_embeddings.weight": sd.pop("embed_tokens.weight")}
    for i in range(num_layers):
        p, q = f"esm.encoder.layer.{i}.", f"layers.{i}."
        att = p + "attention."
        out[att + "LayerNorm.weight"] = sd.pop(q + "attention.layernorm_qkv.layer_norm_weight")
        out[att + "LayerNorm.bias"] = sd.pop(q + "attention.layernorm_qkv.layer_norm_bias")
        for part in ("weight", "bias"):
            for name, chunk in zip(("query", "key", "value"), sd.pop(q + f"attention.layernorm_qkv.{part}").chunk(3)):
                out[att + f"self.{name}.{part}"] = chunk.clone()
            out[att + f"output.dense.{part}"] = sd.pop(q + f"attention.proj.{part}")
            out[p + f"intermediate.dense.{part}"] = sd.pop(q + f"mlp.fc1_{part}")
            out[p + f"output.dense.{part}"] = sd.pop(q + f"mlp.fc2_{part}")
        out[p + "LayerNorm.weight"] = sd.pop(q + "mlp.layer_norm_weight")
        out[p + "LayerNorm.bias"] = sd.pop(q + "mlp.layer_norm_bias")
    out["esm.encoder.emb_layer_norm_after.weight"] = sd.pop("final_layer_norm.weight")
    out["esm.encoder.emb_layer_norm_after.bias"] = sd.pop("final_layer_norm.bias")
    for part in ("weight", "bias"):
        out[f"lm_head.dense.{part}"] = sd.pop(f"lm_head.dense.{part}")
        out[f"lm_head.layer_norm.{part}"] = sd.pop(f"lm_head.layer_norm.{part}")
    out["lm_head.bias"] = sd.pop("lm_head.bias")
    if sd:
        raise KeyError(f"our state dict has tensors the HF layout has no place for: {sorted(sd)}")
    return out


def hf_config_dict(config: EsmConfig, extra: dict | None = None) -> dict:
    """config.json for transformers' EsmConfig (model_type esm), with our own settings under `recipe`."""
    d = {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": config.max_position_embeddings,
        "position_embedding_type": "rotary",
        "rope_theta": config.rope_theta,
        "layer_norm_eps": config.layer_norm_eps,
        "initializer_range": config.initializer_range,
        "emb_layer_norm_before": False,
        "token_dropout": config.token_dropout,
        "mask_token_id": config.mask_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True,
        "is_folding_model": False,
        "torch_dtype": "float32",
        "recipe": {"activation": config.activation, **(extra or {})},
    }
    return d


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the value: TE's quantized weights (quantized_model_init) are dequantized; for an ordinary
    tensor `dequantize` is the identity (or a float cast)."""
    return t.detach().dequantize()


def export_hf(state_dict: dict[str, torch.Tensor], config: EsmConfig, directory: str | Path, extra: dict | None = None) -> Path:
    """Write a transformers-loadable directory: config.json, model.safetensors, vocab.txt and tokenizer config."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf = {k: _plain(v).to("cpu", torch.float32).contiguous() for k, v in ours_to_hf(state_dict, config.num_layers).items()}
    # What EsmForMaskedLM also holds, so that it loads with nothing reported missing: the rotary buffer, and the
    # contact head (which we do not train) as zeros.
    d = config.head_dim
    hf["esm.rotary_embeddings.inv_freq"] = rotary_inv_freq(d, config.rope_theta)
    hf["esm.contact_head.regression.weight"] = torch.zeros(1, config.num_layers * config.num_heads)
    hf["esm.contact_head.regression.bias"] = torch.zeros(1)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, extra), indent=2) + "\n")
    write_tokenizer(out)
    return out


def write_tokenizer(directory: str | Path) -> None:
    from transformers import EsmTokenizer

    vocab = write_vocab(directory)
    EsmTokenizer(vocab_file=str(vocab), model_max_length=1026).save_pretrained(str(directory))


def read_hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    d = Path(directory)
    if (d / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(str(d / "model.safetensors"))
    if (d / "pytorch_model.bin").exists():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not supported yet)")


def config_from_hf(directory: str | Path, **overrides) -> EsmConfig:
    """Our EsmConfig from a Hugging Face ESM-2 config.json (refusing the ESM variants we do not implement)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        c = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from exc
    if not isinstance(c, dict) or c.get("model_type") != "esm":
        raise ValueError(f"{path}: model_type is {c.get('model_type') if isinstance(c, dict) else None!r}, expected 'esm'")
    if c.get("position_embedding_type", "absolute") != "rotary" or c.get("emb_layer_norm_before"):
        raise ValueError(f"{path}: only ESM-2 (rotary, no emb_layer_norm_before) is supported")
    if c.get("vocab_size") != 33:
        raise ValueError(f"{path}: vocab_size {c.get('vocab_size')} is not ESM-2's 33")
    fields = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        token_dropout=bool(c.get("token_dropout", False)),
        rope_theta=c.get("rope_theta", 10000.0),
        max_position_embeddings=c.get("max_position_embeddings", 1026),
        activation=c.get("recipe", {}).get("activation", "gelu"),
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return EsmConfig(**fields)


def load_hf_into(model: Any, directory: str | Path) -> None:
    """Load a local HF ESM-2 checkpoint into an already built model of the same shape (strict): ours, or the hf
    backend's adapter (which holds transformers' names and loads through `load_ours`)."""
    ours = hf_to_ours(read_hf_state_dict(directory), model.config.num_layers)
    if hasattr(model, "load_ours"):  # the hf backend's adapter holds transformers' names (recipe/model/hf.py)
        model.load_ours({k: v.to(torch.float32) for k, v in ours.items()})
        return
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks tensors {missing}")
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{directory}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    from recipe.model.esm import copy_full_into

    for name, param in model.named_parameters():
        copy_full_into(param, ours[name])
