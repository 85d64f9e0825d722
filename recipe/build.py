"""What a training config builds, in the order the trainer needs it: the model's config and precision plan (checked
before any memory is spent), the model itself (built with its run-time settings, then parallelised), the data, and
what a resumed run must agree on. `recipe/train.py` calls these; nothing here runs a step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from recipe import config as config_lib
from recipe import quant_stats, quantization
from recipe.data.context_parallel import shard_batch
from recipe.data.dataset import BatchSettings, MLMBatches, make_loader
from recipe.data.sources import load_sequences
from recipe.model import EsmConfig, Runtime, build_model, init_weights, resolve_backend
from recipe.model.config import SIZES
from recipe.model.convert import config_from_hf, load_hf_into
from recipe.parallel import DistInfo, Strategy, check_context_parallel, parallelize, unwrap

log = logging.getLogger("recipe")

# Model settings that a checkpoint carries in its config.json; null in the config means "the model's own".
OWN_SETTINGS = ("activation", "layer_norm_eps", "token_dropout")
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "intermediate_size")


# ====================================================================================== the model
def compute_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def model_config(cfg: DictConfig) -> EsmConfig:
    """The model's config: the size preset (and shape keys), or with `model.init_from` the checkpoint's own config.
    Continued training keeps the checkpoint's settings; one given explicitly replaces it, and the log says so."""
    m = cfg.model
    settings = {k: m[k] for k in OWN_SETTINGS}
    overrides = dict(backend=m.backend, fp32_residual=m.fp32_residual, **settings)
    shape = {k: m[k] for k in SHAPE_KEYS}
    if m.init_from is None:
        return EsmConfig.from_size(m.size, **shape, **overrides)
    given = {f"model.{k}={v}" for k, v in shape.items() if v is not None}
    if given:
        raise config_lib.ConfigError(
            f"{', '.join(sorted(given))}: model.init_from={m.init_from} fixes the shape; drop the shape keys"
        )
    own = config_from_hf(m.init_from)
    for key, value in settings.items():
        if value is not None and value != getattr(own, key):
            log.info("model.%s=%s replaces %s's own %s=%s", key, value, m.init_from, key, getattr(own, key))
    return dataclasses.replace(own, **{k: v for k, v in overrides.items() if v is not None})


def resolved_model_config(cfg: DictConfig, info: DistInfo) -> EsmConfig:
    """`model_config` with `backend: auto` resolved (once) and every backend-dependent refusal made: the hf
    backend's, context parallelism's. May switch `cfg.dataset.layout` to bshd for the hf backend, and sets
    `cfg.model.rope_kernel` and `cfg.dataset.pad_to_multiple_of` to what `auto` resolves to (all logged)."""
    quantized = bool(cfg.fp8_config.enabled or cfg.fp4_config.enabled)
    mcfg = model_config(cfg)
    mcfg = dataclasses.replace(mcfg, backend=resolve_backend(cfg.model.backend, mcfg, cfg.use_torch_compile, quantized))
    if mcfg.backend == "hf":
        from recipe.model.hf import prepare_config

        prepare_config(cfg)  # refuses what transformers' model cannot do; padded batches
    check_context_parallel(cfg.cp_size, info.world_size, info.device.type, mcfg.backend, cfg.dataset.layout)
    cfg.model.rope_kernel = resolve_rope_kernel(cfg.model.rope_kernel, mcfg.backend, cfg.cp_size)
    cfg.model.attention_kernel = resolve_attention_kernel(cfg.model.attention_kernel, mcfg, info.device, cfg.cp_size,
                                                          cfg.dataset.layout)  # fmt: skip
    if cfg.dataset.pad_to_multiple_of == "auto":
        multiple, why = config_lib.pad_multiple(cfg)
        log.info("dataset.pad_to_multiple_of=auto picked %d: %s", multiple, why)
        cfg.dataset.pad_to_multiple_of = multiple
    return mcfg


def auto_pick(key: str, pick: str, fallback: str, why_not: str | None) -> str:
    """What `key=auto` resolves to: `pick`, or `fallback` where `why_not` gives the reason; logged either way."""
    log.info("%s=auto picked %s", key, pick if why_not is None else f"{fallback}: {why_not}")
    return pick if why_not is None else fallback


def resolve_rope_kernel(kernel: str, backend: str, cp_size: int) -> str:
    """model.rope_kernel: `auto` -> triton where it can run, else te (logged); an explicit triton needs the te backend
    without context parallelism (under CP, TE's rope places each token of the dual-chunk layout itself) and Triton."""
    from recipe.model import rope_kernel

    if kernel == "auto":
        if backend != "te":
            return "te"  # unused: the torch and hf backends run their own rotary
        why: str | None = None
        if cp_size > 1:
            why = f"context parallelism (cp_size={cp_size}) needs TE's rope"
        elif not rope_kernel.available():
            why = "Triton is not installed"
        return auto_pick("model.rope_kernel", "triton", "te", why)
    if kernel == "te":
        return kernel
    if backend != "te":
        raise config_lib.ConfigError(
            f"model.rope_kernel={kernel} needs the te backend (resolved: {backend}); the {backend} backend runs its rotary "
            "in PyTorch: leave model.rope_kernel=auto"
        )
    if cp_size > 1:
        raise config_lib.ConfigError(f"model.rope_kernel={kernel} runs without context parallelism only (cp_size={cp_size})")
    if not rope_kernel.available():
        raise config_lib.ConfigError(f"model.rope_kernel={kernel} needs Triton (pip install triton)")
    return kernel


# Head dims at which our Triton attention was faster on an H200, per backend: than FlashAttention-2 (torch; levers 50
# and 52), than TE's cuDNN attention (te; lever 58). Elsewhere auto keeps the backend's own kernel.
TRITON_ATTENTION_HEAD_DIMS = {"torch": (16, 24, 32, 64), "te": (64,)}
OWN_ATTENTION = {"torch": "flash", "te": "te"}  # each backend's attention when not ours


def resolve_attention_kernel(kernel: str, mcfg: EsmConfig, device: torch.device, cp_size: int = 1, layout: str = "thd") -> str:
    """model.attention_kernel: `auto` -> triton on CUDA at the head dims where it was faster for the backend (te: without
    context parallelism, whose attention is TE's) and Triton imports, else the backend's own (logged); an explicit
    kernel must be one the backend runs, and triton needs CUDA and Triton (a ConfigError, never a silent swap). `flash`
    with the te backend is what `auto` resolved to there before the te backend could run ours (a run's saved
    config.yaml may hold it): TE's attention, said in the log. Where the setting changes nothing (the CPU, the hf
    backend, the torch backend's padded batches, which run SDPA) the log says so."""
    from recipe.model import rope_kernel

    own = OWN_ATTENTION.get(mcfg.backend)
    if kernel == "flash" and mcfg.backend == "te":
        log.warning("model.attention_kernel=flash with the te backend: TE's attention (te; flash is the torch backend's)")
        return "te"
    if kernel != "auto":
        kernel = _checked_kernel(kernel, mcfg, device, cp_size)
    padded = layout == "bshd" and mcfg.backend == "torch"  # the te backend unpads to THD itself
    if own is None or device.type != "cuda" or padded:  # the setting has no effect: said, and saved as the backend's own
        where = ("the hf backend runs transformers' attention" if own is None else
                 "on the CPU PyTorch's SDPA runs" if device.type != "cuda" else "padded batches (bshd) run SDPA")  # fmt: skip
        log.info("model.attention_kernel=%s has no effect here: %s", kernel, where)
        return own or "flash"
    if kernel != "auto":
        return kernel
    dims = TRITON_ATTENTION_HEAD_DIMS[mcfg.backend]
    why: str | None = None
    if mcfg.head_dim not in dims:
        why = f"head dim {mcfg.head_dim} (ours is faster at {', '.join(map(str, dims))} with the {mcfg.backend} backend)"
    elif cp_size > 1:
        why = f"context parallelism (cp_size={cp_size}) needs TE's attention"
    elif not rope_kernel.available():
        why = "Triton is not installed"
    return auto_pick("model.attention_kernel", "triton", own, why)


def _checked_kernel(kernel: str, mcfg: EsmConfig, device: torch.device, cp_size: int) -> str:
    """An explicit model.attention_kernel, refused where it cannot run; the message names the resolved backend (which
    model.backend=auto may have chosen)."""
    from recipe.model import rope_kernel

    backend = f"the {mcfg.backend} backend (the resolved model.backend)"
    if mcfg.backend not in OWN_ATTENTION and kernel != "flash":  # hf: flash is what auto resolves to, unused
        raise config_lib.ConfigError(f"model.attention_kernel={kernel}: {backend} runs transformers' attention; leave "
                                     "model.attention_kernel=auto")  # fmt: skip
    if kernel == "te" and mcfg.backend != "te":
        raise config_lib.ConfigError(f"model.attention_kernel=te is TE's attention, which {backend} does not run: use "
                                     "flash or auto, or model.backend=te on a GPU with TransformerEngine")  # fmt: skip
    if kernel == "triton":
        why = ("a CUDA GPU" if device.type != "cuda" else
               f"cp_size 1 (context parallelism runs TE's attention; cp_size={cp_size})" if cp_size > 1 else
               "Triton (pip install triton)" if not rope_kernel.available() else None)  # fmt: skip
        if why:
            raise config_lib.ConfigError(f"model.attention_kernel=triton needs {why}: leave model.attention_kernel=auto")
    return kernel


def model_name(cfg: DictConfig, mcfg: EsmConfig) -> str:
    """What the start-up log calls the model: the size preset, or what model.init_from holds (whose shape wins over
    model.size, so a size that disagrees is named as ignored rather than reported as the model)."""
    if cfg.model.init_from is None:
        return f"ESM-2 {cfg.model.size}"
    preset = next((size for size, shape in SIZES.items() if shape == {k: getattr(mcfg, k) for k in SHAPE_KEYS}), None)
    name = f"ESM-2 {preset}" if preset else "ESM-2 ({num_layers} layers, hidden {hidden_size})".format(**mcfg.shape_dict())
    if preset != cfg.model.size:
        name += f" (model.size={cfg.model.size} ignored: the shape comes from model.init_from)"
    return f"{name} from {cfg.model.init_from}"


def precision_plan(
    cfg: DictConfig, mcfg: EsmConfig, info: DistInfo, compute: torch.dtype
) -> tuple[quantization.PrecisionPlan, dict]:
    """Resolve the per-layer precision plan, refuse what this run cannot do, and build the TE recipes. Layers that
    are not quantized are named by the dtype they really compute in (fp32 on CPU, bf16 under autocast)."""
    base = {torch.bfloat16: "bf16", torch.float32: "fp32"}[compute]
    plan = quantization.resolve(mcfg.num_layers, cfg.fp8_config, cfg.fp8_layers, cfg.fp4_config, cfg.fp4_layers, base)
    quantization.check_quantized_init(plan, cfg.quantized_model_init)
    quant_stats.check(cfg, plan, mcfg.backend, info.device.type)
    if not plan.quantized:
        return plan, {}
    gpu = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
    cap = torch.cuda.get_device_capability(info.device) if info.device.type == "cuda" else None
    quantization.check_hardware(plan, mcfg.backend, info.device.type, gpu, cap)
    if mcfg.activation == "gelu":
        raise quantization.PrecisionError(
            "FP8/FP4 layers need TE's fused MLP, which has only the tanh GELU: set model.activation=gelu_tanh "
            "(it moves logits ~50x less than bf16 rounding, docs/numerics.md)"
        )
    sections = {"fp8": cfg.fp8_config, "fp4": cfg.fp4_config}
    return plan, {fmt: quantization.build_recipe(sections[fmt], fmt) for fmt in plan.recipes}


def build(
    cfg: DictConfig, strategy: Strategy, mcfg: EsmConfig, plan: quantization.PrecisionPlan, recipes: dict
) -> torch.nn.Module:
    """The model that trains: built with its run-time settings (context parallelism, layer recipes), parallelised
    (recipe/parallel.py `parallelize`), initialised (in place, shard by shard, when built on the meta device), and
    loaded from `model.init_from` if given."""
    info = strategy.info
    runtime = Runtime(
        context_parallel=info.cp,
        layer_recipes=tuple(recipes.get(p) for p in plan.layers) if plan.quantized else None,
        amax_group=torch.distributed.group.WORLD if plan.quantized and torch.distributed.is_initialized() else None,
        check_inputs=False,  # our packer guarantees the invariants; skipping saves a GPU sync per micro-batch
        rope_kernel=cfg.model.rope_kernel,
        attention_kernel=cfg.model.attention_kernel,
    )
    contexts = [quantization.init_context(recipes.get(p)) for p in plan.layers] if cfg.quantized_model_init else None
    # Quantized weights are made on the device (TE quantizes them as they are initialised), then sharded.
    on_meta = strategy.meta_init and contexts is None
    model: torch.nn.Module = build_model(
        mcfg,
        device="meta" if on_meta else info.device,
        seed=None if on_meta else cfg.seed,
        dtype=strategy.param_dtype,
        layer_init_contexts=contexts,
        runtime=runtime,
    )
    if cfg.model.init_from is not None and strategy.load_before_wrap:
        load_hf_into(model, cfg.model.init_from)
    model = parallelize(model, strategy, cfg.use_torch_compile)
    if on_meta:
        model.to_empty(device=info.device)
        init_weights(model, cfg.seed)
    raw = unwrap(model)
    if contexts is not None:
        from transformer_engine.pytorch import QuantizedTensor

        held = [n for n, p in raw.named_parameters() if isinstance(getattr(p, "_local_tensor", p), QuantizedTensor)]
        log.info("quantized model init: %d weights held quantized, FP32 master copies in the optimizer", len(held))
    if cfg.model.init_from is not None:
        if not strategy.load_before_wrap:
            load_hf_into(raw, cfg.model.init_from)
        log.info("initialised from %s", cfg.model.init_from)
    return model


# ====================================================================================== the data
@dataclass
class Data:
    """The training loader, the validation batches (None without dataset.val_path), the batch settings a resume must
    match, and `shard`: batch -> this rank's context-parallel share (identity without CP)."""

    loader: Any  # a StatefulDataLoader (recipe/data/dataset.py make_loader): iterable, state_dict, shutdown
    val: MLMBatches | None
    settings: BatchSettings
    shard: Callable[[dict], dict]


def cp_chunk(cfg: DictConfig) -> int:
    """Context parallelism pads every sequence to a multiple of 2 x cp_size x this (see `cp_shard`)."""
    return max(1, config_lib.pad_multiple(cfg)[0] // 2)


def batch_settings(cfg: DictConfig) -> BatchSettings:
    d = cfg.dataset
    return BatchSettings(
        max_seq_length=d.max_seq_length,
        layout=d.layout,
        token_micro_batch_size=config_lib.token_budget(cfg),
        micro_batch_size=d.micro_batch_size,
        pad_to_multiple_of=config_lib.pad_multiple(cfg)[0],
        pad_to_fixed=d.pad_to_fixed,
        sequence_multiple=2 * cfg.cp_size * cp_chunk(cfg) if cfg.cp_size > 1 else 1,
        mask_prob=d.mask_prob,
        seed=cfg.seed,
    )


def build_data(cfg: DictConfig, info: DistInfo) -> Data:
    d = cfg.dataset
    settings = batch_settings(cfg)
    if d.streaming:
        from recipe.data.streaming import StreamingMLMBatches, open_stream

        train: MLMBatches | StreamingMLMBatches = StreamingMLMBatches(
            open_stream(d.train_path, d.format),
            settings,
            info.dp_rank,
            info.dp_size,
            d.column,
            d.streaming_shuffle_buffer,
            source=str(d.train_path),
        )
        summary, cluster = f"{d.train_path} (streaming)", False
    else:
        train_store = load_sequences(d.train_path, d.format, d.column)
        cluster = d.cluster_sampling
        if cluster == "auto":
            cluster = "ur50_id" in train_store.clusters or bool(getattr(train_store, "manifest", {}).get("clusters"))
        train = MLMBatches(train_store, settings, info.dp_rank, info.dp_size, train=True, cluster_sampling=bool(cluster))
        summary = train_store.summary()
    prefetch, why = config_lib.prefetch_factor(cfg)
    if d.prefetch_factor == "auto" and d.num_workers > 0:
        log.info("dataset.prefetch_factor=auto picked %d: %s", prefetch, why)
    loader = make_loader(train, d.num_workers, d.pin_memory and info.device.type == "cuda", prefetch)
    val = None
    if d.val_path is not None:
        val_store = load_sequences(d.val_path, d.format, d.column, split="validation")
        val = MLMBatches(val_store, settings, info.dp_rank, info.dp_size, train=False)
    log.info("data: %s; cluster sampling %s", summary, "on" if cluster else "off")
    return Data(loader, val, settings, cp_shard(cfg, info))


def cp_shard(cfg: DictConfig, info: DistInfo) -> Callable[[dict], dict]:
    """Batch -> this rank's context-parallel share (identity without CP). Sequences are padded so that every
    rank's share is a multiple of 2 x (dataset.pad_to_multiple_of // 2) tokens: of pad_to_multiple_of itself when
    that is even (16 by default, what FP8 needs). The packer counted them padded (`batch_settings`), so the padded
    batch fits the token budget; with dataset.pad_to_fixed it is filled to exactly the budget."""
    if info.cp.size == 1:
        return lambda batch: batch
    pad_to = config_lib.token_budget(cfg) if cfg.dataset.pad_to_fixed else None
    return functools.partial(shard_batch, cp_size=info.cp.size, cp_rank=info.cp.rank, chunk_multiple=cp_chunk(cfg), pad_to=pad_to)


def resume_expectations(cfg: DictConfig, info: DistInfo, mcfg: EsmConfig, settings: BatchSettings, plan) -> dict:
    """What must not change between a run and its resumption (it is stored in every checkpoint). The world size,
    strategy and worker count may change: weights and optimizer are resharded by torch.distributed.checkpoint and
    the data position is global (`DataPosition`). The training data is compared by its resolved path."""
    unchecked_data = {"sequence_multiple"} | ({"pad_to_multiple_of"} if info.cp.size == 1 else set())
    return {
        "cp_size": info.cp.size,
        "model_shape": mcfg.shape_dict(),
        # sequence_multiple follows from cp_size and pad_to_multiple_of, both checked: left out, older checkpoints resume.
        # Without CP the pad multiple only pads each micro-batch's tail, never changes which sequences it holds: left
        # out, a run that resolves `auto` otherwise than the run it resumes (16 before FP8 block scaling's 128) goes on.
        "data": {k: v for k, v in dataclasses.asdict(settings).items() if k not in unchecked_data}
        | {"train_path": str(Path(cfg.dataset.train_path).resolve())},
        "precision": plan.to_dict(),
    }
