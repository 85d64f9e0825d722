"""The training loop, shared by every entrypoint. `run(cfg, "ddp" | "fsdp2")` is all a train_*.py file calls.

One optimizer step (`train_step`): take `grad_acc_steps` micro-batches, count their masked tokens on the CPU and
all-reduce the count once, then run forward/backward on each with the loss scaled to a token-weighted mean over the
whole global step (so DDP, FSDP2, any world size and any accumulation give the same gradient), clip, check for
non-finite values, and update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from recipe import config as config_lib
from recipe import quantization, run_dir
from recipe.checkpoint import Checkpointer, rng_state, set_rng_state
from recipe.data.context_parallel import shard_batch
from recipe.data.dataset import BatchSettings, MLMBatches, make_loader
from recipe.data.order import DataPosition
from recipe.data.sources import load_sequences
from recipe.metrics import MetricsWriter, max_memory_gb, peak_tflops
from recipe.model import EsmConfig, build_model, init_weights, resolve_backend
from recipe.model.config import SIZES
from recipe.model.convert import config_from_hf, export_hf, load_hf_into
from recipe.model.esm import IGNORE_INDEX
from recipe.model.flops import batch_flops
from recipe.optim import build_optimizer, lr_at, set_lr
from recipe.parallel import (
    STRATEGIES, DistInfo, Strategy, all_reduce, barrier, check_context_parallel, init_distributed, setup_context_parallel, unwrap,
)

log = logging.getLogger("recipe")


class NonFiniteError(RuntimeError):
    pass


# ====================================================================================== the step
def model_inputs(batch: dict, device: torch.device) -> dict:
    keys = ("input_ids", "labels", "cu_seqlens", "cu_seqlens_padded", "attention_mask")
    out = {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    if "max_seqlen" in batch:
        out["max_seqlen"] = batch["max_seqlen"]
    return out


def train_step(model, optimizer, strategy: Strategy, batches: list[dict], global_labels: torch.Tensor, amp, max_norm):
    """Forward/backward over the micro-batches of one step, then clip. Returns (global mean loss, grad norm)."""
    device, world = strategy.info.device, strategy.info.world_size
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        with strategy.sync_gradients(model, i == len(batches) - 1), amp:
            out = model(**model_inputs(batch, device))
            (out.loss_sum * (world / global_labels)).backward()  # DDP/FSDP average over ranks: undo it
        loss_sum += out.loss_sum.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss = all_reduce(loss_sum) / global_labels
    return loss, grad_norm


# ====================================================================================== validation
@torch.no_grad()
def evaluate(model, dataset: MLMBatches, device, amp, max_batches: int | None, shard=lambda b: b) -> dict:
    """Full deterministic pass over this rank's share of the validation split; token-weighted across ranks.

    Ranks may hold different numbers of batches; a rank that has run out joins with a batch whose labels are all
    ignored, so sharded (FSDP2) forwards stay in lock-step.
    """
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, tokens, correct, real batches
    it, spare, count = iter(dataset), None, 0
    while True:
        batch = next(it, None) if max_batches is None or count < max_batches else None
        batch = shard(batch) if batch is not None else None
        if not all_reduce(torch.tensor([batch is not None], device=device, dtype=torch.int32), dist.ReduceOp.MAX).item():
            break
        real = batch is not None
        if batch is None:
            batch = dict(spare, labels=torch.full_like(spare["labels"], IGNORE_INDEX))
        spare, count = batch, count + 1
        with amp:
            out = model(**model_inputs(batch, device))
        scored = [out.loss_sum.double(), out.num_tokens.double(), out.num_correct.double(), sums.new_tensor(float(real))]
        sums += torch.stack(scored)
    model.train()
    loss_sum, tokens, correct, batches = all_reduce(sums).tolist()
    if tokens == 0:
        source = getattr(getattr(dataset, "store", None), "source", "the validation split")
        why = "it yielded no batches" if batches == 0 else (
            f"its {int(batches)} micro-batch(es) hold no masked residue (no standard residue selected at "
            f"dataset.mask_prob={dataset.settings.mask_prob}: sequences too short or of unknown characters only)")
        raise RuntimeError(f"validation on {source} gave no masked token to score: {why}")
    val_loss = loss_sum / tokens
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)), "val_accuracy": correct / tokens, "val_tokens": int(tokens)}


# ====================================================================================== set-up
class TrainClock:
    """Wall-clock seconds spent training, continued from `offset` (what a resumed checkpoint had trained); validation
    and checkpoint writes are left out (they pause it), so rates and time-to-quality curves measure training alone."""

    def __init__(self, offset: float = 0.0):
        self.start, self.paused = time.perf_counter() - offset, 0.0

    @contextlib.contextmanager
    def pause(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused


class Throughput:
    """Unpadded tokens and model FLOPs since the last log line, turned into per-GPU rates (training time only)."""

    def __init__(self, world_size: int, peak_tflops: float | None, device: torch.device, clock: TrainClock):
        self.world_size, self.peak, self.device, self.clock = world_size, peak_tflops, device, clock
        self.reset()

    def reset(self) -> None:
        self.tokens, self.flops, self.t0 = 0.0, 0.0, self.clock.seconds

    def add(self, tokens: float, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def record(self) -> dict:
        elapsed = self.clock.seconds - self.t0
        tflops = self.flops / self.world_size / elapsed / 1e12
        rates = {
            "tokens_per_second_per_gpu": self.tokens / self.world_size / elapsed,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "max_memory_gb": max_memory_gb(self.device),
        }
        self.reset()
        return rates


class Preemption:
    """SIGTERM (Kubernetes, schedulers, torchrun passing one on), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's warning
    signal) ask for a checkpoint at the next step boundary; the request is all-reduced with the step's counts, so
    every rank stops after the same step. A second SIGINT aborts at once, without a checkpoint. Loader workers
    ignore all of these (`ignore_stop_signals`), so a signal sent to the whole process group stops only the loop.
    `close()` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
        if not self.requested:
            name = signal.Signals(signum).name
            log.warning("%s: stopping with a checkpoint after this step (a second Ctrl-C aborts without one)", name)
        self.requested = True

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resolve_precision(cfg: DictConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


# Model settings that a checkpoint carries in its config.json; null in the config means "the model's own".
OWN_SETTINGS = ("activation", "layer_norm_eps", "token_dropout")
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "intermediate_size")


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


def build(cfg: DictConfig, strategy: Strategy, mcfg: EsmConfig):
    """The wrapped, initialised model and its per-layer precision plan (`mcfg` has its backend resolved)."""
    info = strategy.info
    plan, recipes = precision_plan(cfg, mcfg, info, strategy.compute_dtype)  # refuses before any memory is spent on the model
    contexts = [quantization.init_context(recipes.get(p)) for p in plan.layers] if cfg.quantized_model_init else None
    if strategy.meta_init and contexts is None:
        model = build_model(mcfg, device="meta", dtype=strategy.param_dtype)
    else:  # quantized weights are made on the device (TE quantizes as they are initialised), then sharded
        model = build_model(mcfg, device=info.device, seed=cfg.seed, dtype=strategy.param_dtype, layer_init_contexts=contexts)
    if cfg.use_torch_compile:
        model.compile_layers()
    model = strategy.wrap(model)
    if strategy.meta_init and contexts is None:
        model.to_empty(device=info.device)
        init_weights(model, cfg.seed)
    raw = unwrap(model)
    if info.cp.size > 1:
        raw.set_context_parallel(info.cp.group, info.cp.ranks, info.cp.rank, cfg.cp_comm_type)
    if plan.quantized:
        raw.set_layer_precision([recipes.get(p) for p in plan.layers], dist.group.WORLD if dist.is_initialized() else None)
    if contexts is not None:
        from transformer_engine.pytorch import QuantizedTensor

        held = [n for n, p in raw.named_parameters() if isinstance(getattr(p, "_local_tensor", p), QuantizedTensor)]
        log.info("quantized model init: %d weights held quantized, FP32 master copies in the optimizer", len(held))
    if cfg.model.init_from is not None:
        load_hf_into(raw, cfg.model.init_from)
        log.info("initialised from %s", cfg.model.init_from)
    raw.check_inputs = False  # our packer guarantees the invariants; skipping saves a GPU sync per micro-batch
    return model, plan


def precision_plan(
    cfg: DictConfig, mcfg: EsmConfig, info: DistInfo, compute_dtype: torch.dtype
) -> tuple[quantization.PrecisionPlan, dict]:
    """Resolve the per-layer precision plan, refuse what this run cannot do, and build the TE recipes. Layers that
    are not quantized are named by the dtype they really compute in (fp32 on CPU, bf16 under autocast)."""
    base = {torch.bfloat16: "bf16", torch.float32: "fp32"}[compute_dtype]
    plan = quantization.resolve(mcfg.num_layers, cfg.fp8_config, cfg.fp8_layers, cfg.fp4_config, cfg.fp4_layers, base)
    quantization.check_quantized_init(plan, cfg.quantized_model_init)
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


def cp_chunk(cfg: DictConfig) -> int:
    """Context parallelism pads every sequence to a multiple of 2 x cp_size x this (see `cp_shard`)."""
    return max(1, cfg.dataset.pad_to_multiple_of // 2)


def batch_settings(cfg: DictConfig) -> BatchSettings:
    d = cfg.dataset
    return BatchSettings(
        max_seq_length=d.max_seq_length,
        layout=d.layout,
        token_micro_batch_size=config_lib.token_budget(cfg),
        micro_batch_size=d.micro_batch_size,
        pad_to_multiple_of=d.pad_to_multiple_of,
        pad_to_fixed=d.pad_to_fixed,
        sequence_multiple=2 * cfg.cp_size * cp_chunk(cfg) if cfg.cp_size > 1 else 1,
        mask_prob=d.mask_prob,
        seed=cfg.seed,
    )


def build_data(cfg: DictConfig, info: DistInfo):
    d = cfg.dataset
    settings = batch_settings(cfg)
    if d.streaming:
        from recipe.data.streaming import StreamingMLMBatches, open_stream

        train = StreamingMLMBatches(open_stream(d.train_path, d.format), settings, info.dp_rank, info.dp_size, d.column,
                                    d.streaming_shuffle_buffer, source=str(d.train_path))
        summary, cluster = f"{d.train_path} (streaming)", False
    else:
        train_store = load_sequences(d.train_path, d.format, d.column)
        cluster = d.cluster_sampling
        if cluster == "auto":
            cluster = "ur50_id" in train_store.clusters or bool(getattr(train_store, "manifest", {}).get("clusters"))
        train = MLMBatches(train_store, settings, info.dp_rank, info.dp_size, train=True, cluster_sampling=bool(cluster))
        summary = train_store.summary()
    loader = make_loader(train, d.num_workers, d.pin_memory and info.device.type == "cuda", d.prefetch_factor)
    val = None
    if d.val_path is not None:
        val = MLMBatches(load_sequences(d.val_path, d.format, d.column, split="validation"), settings, info.dp_rank, info.dp_size, train=False)
    log.info("data: %s; cluster sampling %s", summary, "on" if cluster else "off")
    return loader, val, settings


def cp_shard(cfg: DictConfig, info: DistInfo):
    """Batch -> this rank's context-parallel share (identity without CP). Sequences are padded so that every
    rank's share is a multiple of 2 x (dataset.pad_to_multiple_of // 2) tokens: of pad_to_multiple_of itself when
    that is even (16 by default, what FP8 needs). The packer counted them padded (`batch_settings`), so the padded
    batch fits the token budget; with dataset.pad_to_fixed it is filled to exactly the budget."""
    if info.cp.size == 1:
        return lambda batch: batch
    pad_to = config_lib.token_budget(cfg) if cfg.dataset.pad_to_fixed else None
    return functools.partial(shard_batch, cp_size=info.cp.size, cp_rank=info.cp.rank, chunk_multiple=cp_chunk(cfg), pad_to=pad_to)


def resume_expectations(cfg: DictConfig, info: DistInfo, mcfg: EsmConfig, settings: BatchSettings) -> dict:
    """What must not change between a run and its resumption (it is stored in every checkpoint). The world size,
    strategy and worker count may change: weights and optimizer are resharded by torch.distributed.checkpoint and
    the data position is global (`DataPosition`). The training data is compared by its resolved path."""
    return {
        "cp_size": info.cp.size,
        "model_shape": mcfg.shape_dict(),
        # sequence_multiple follows from cp_size and pad_to_multiple_of, both checked: left out, older checkpoints resume
        "data": {k: v for k, v in dataclasses.asdict(settings).items() if k != "sequence_multiple"}
        | {"train_path": str(Path(cfg.dataset.train_path).resolve())},
    }


class DataTracker:
    """The global data position as the trainer consumes batches: each batch names its stream and that stream's
    cursor after it, so the position counts exactly what reached the model (not what the loader prefetched)."""

    def __init__(self, position: DataPosition, dp_rank: int):
        self.position = DataPosition.from_dict(position.to_dict())  # a copy: the dataset keeps its own
        self.dp_rank = dp_rank

    def consume(self, batch: dict) -> None:
        if "data_stream" in batch:
            self.position.cursors[batch["data_stream"]] = batch["data_cursor"]
            self.position.next_worker[self.dp_rank] = (batch["data_worker"] + 1) % self.position.workers

    def global_state(self) -> dict:
        """Every rank's streams merged (a collective: every rank calls it at the same point)."""
        p, w = self.position, self.position.world_size
        mine = (self.dp_rank, {t: p.cursors[t] for t in range(self.dp_rank, p.streams, w)}, p.next_worker[self.dp_rank])
        gathered = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        merged = DataPosition.from_dict(p.to_dict())
        for rank, cursors, next_worker in gathered:
            for t, c in cursors.items():
                merged.cursors[t] = c
            merged.next_worker[rank] = next_worker
        return merged.to_dict()


def restore_rng(cfg: DictConfig, info: DistInfo, meta: dict, rank_state: dict | None, step: int) -> None:
    """The same layout restores each rank's RNG states; another world size has no state for some ranks, so all
    are derived from (seed, step, rank) instead. (The data needs none: it is a function of seed and position.)"""
    if meta.get("world_size") == info.world_size:
        if rank_state is None:
            raise RuntimeError(f"cannot resume: the checkpoint of {info.world_size} processes has no rank_{info.rank}.pt")
        set_rng_state(rank_state["rng"])
        return
    import random

    import numpy as np

    derived = (cfg.seed * 1_000_003 + step * 7919 + info.rank) % 2**63
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


# ====================================================================================== the run
def entrypoint(strategy_name: str, config_name: str = "L0_sanity"):
    """The hydra `main` of a train_*.py file: configs from hydra_config/, `config_name` unless --config-name."""
    import hydra

    @hydra.main(config_path=str(config_lib.CONFIG_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        cfg.output_dir = run_dir.multirun_output_dir(cfg)  # -m: each job its own directory
        run(cfg, strategy_name)

    def main_or_help() -> None:
        """--help / -h lists the shipped configs (hydra's own help cannot read their comments); --hydra-help stays."""
        if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
            print(config_lib.help_text(Path(sys.argv[0]).name, config_name))
            return
        main()

    return main_or_help


def run(cfg: DictConfig, strategy_name: str) -> None:
    info = init_distributed(cfg.device)
    setup_logging(info.is_main)
    try:
        fit(cfg, STRATEGIES[strategy_name](info, resolve_precision(cfg, info.device), cfg.fsdp.fp32_master_weights, cfg.fsdp.reshard_after_forward))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0 and warnings elsewhere, on stderr. Hydra's file handler (output_dir/train.log) is kept, so
    the log file holds what the console shows; only hydra's stdout console handler is replaced by ours."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:  # a console handler (a FileHandler is a StreamHandler subclass)
            root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def fit(cfg: DictConfig, strategy: Strategy):
    """Train as `cfg` says; returns the (wrapped) model. The output directory is this run's alone while it runs,
    and a fresh run never mixes with another's outputs (recipe/run_dir.py)."""
    config_lib.validate(cfg)
    with run_dir.claim(cfg, strategy.info):
        return _fit(cfg, strategy)


def _fit(cfg: DictConfig, strategy: Strategy):
    info = strategy.info
    check_context_parallel(cfg.cp_size, info.world_size, info.device.type, cfg.model.backend, cfg.dataset.layout)
    quantized = bool(cfg.fp8_config.enabled or cfg.fp4_config.enabled)
    mcfg = model_config(cfg)
    mcfg = dataclasses.replace(mcfg, backend=resolve_backend(cfg.model.backend, mcfg, cfg.use_torch_compile, quantized))
    if mcfg.backend == "hf":
        from recipe.model.hf import prepare_config

        prepare_config(cfg)  # refuses what transformers' model cannot do; padded batches
    check_context_parallel(cfg.cp_size, info.world_size, info.device.type, mcfg.backend, cfg.dataset.layout)  # auto may be torch
    setup_context_parallel(info, cfg.cp_size)
    out_dir = Path(cfg.output_dir)
    if info.is_main:
        print(f"output_dir: {out_dir.resolve()}", flush=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    model, plan = build(cfg, strategy, mcfg)
    optimizer = build_optimizer(model, cfg, info.device, master_weights=cfg.quantized_model_init)
    loader, val_data, settings = build_data(cfg, info)
    shard = cp_shard(cfg, info)
    ckpt = Checkpointer(config_lib.ckpt_dir(cfg), info, cfg.checkpoint.max_checkpoints, cfg.checkpoint.async_save)
    expect = resume_expectations(cfg, info, mcfg, settings) | {"precision": plan.to_dict()}
    log.info("layer precision: %s", plan.describe())
    log.info(
        "model: %s, backend %s, %s, %.1fM parameters; strategy %s over %d ranks (dp %d x cp %d), compute %s",
        model_name(cfg, mcfg), mcfg.backend, mcfg.activation, sum(p.numel() for p in model.parameters()) / 1e6,
        strategy.name, info.world_size, info.dp_size, info.cp.size, strategy.compute_dtype,
    )

    step, consumed, samples, trained_seconds = 0, 0, 0, 0.0
    latest = ckpt.latest_verified() if cfg.checkpoint.resume_from_checkpoint else None
    if latest is not None:
        meta, rank_state = ckpt.load(latest, model, optimizer, expect)
        step, consumed = meta["step"], meta["consumed_tokens"]
        if step > cfg.num_train_steps:
            raise config_lib.ConfigError(f"num_train_steps={cfg.num_train_steps} is below the step of the checkpoint to resume, "
                                         f"{latest} (step {step}): raise num_train_steps to train on from it")
        if "train_seconds" in meta:
            trained_seconds = meta["train_seconds"]
        else:
            log.warning("%s was written without train_seconds: train_seconds restarts from 0", latest)
        resume_data(cfg, info, meta, rank_state, loader, latest)
        samples = meta.get("consumed_samples", 0)
        restore_rng(cfg, info, meta, rank_state, step)
        log.info("resumed from %s at step %d (written by %s processes, now %d)", latest, step, meta.get("world_size"), info.world_size)
        if step == cfg.num_train_steps:
            log.info("that checkpoint ends this run (num_train_steps=%d): nothing left to train", step)
    elif cfg.checkpoint.resume_from_checkpoint:
        log.info("checkpoint.resume_from_checkpoint=true but no complete checkpoint under %s: starting fresh", ckpt.root)

    metrics = MetricsWriter(out_dir, cfg, info.is_main, resume_step=step if latest is not None else None)
    amp = torch.autocast(info.device.type, dtype=strategy.compute_dtype) if strategy.compute_dtype != torch.float32 else nullcontext()
    clock = TrainClock(trained_seconds)
    throughput = Throughput(info.world_size, peak_tflops(cfg.peak_tflops_per_gpu, info.device), info.device, clock)
    preempt = Preemption()
    fit_step = step  # the step this process started from
    time_limit = cfg.max_train_minutes * 60 if cfg.max_train_minutes is not None else math.inf

    tracker = DataTracker(loader.dataset.layout_position(cfg.dataset.num_workers), info.dp_rank) \
        if isinstance(loader.dataset, MLMBatches) else None

    def save(at_step: int) -> None:
        meta = {"step": at_step, "consumed_tokens": consumed, "consumed_samples": samples, "train_seconds": clock.seconds, **expect,
                "world_size": info.world_size, "strategy": strategy.name, "config": OmegaConf.to_container(cfg, resolve=True),
                "model_config": mcfg.to_dict()}  # the resolved model: what recipe.evaluate builds
        with clock.pause():
            rank_state = {"rng": rng_state()}
            if tracker is not None:
                meta["data_position"] = tracker.global_state()
            else:
                rank_state["loader"] = loader.state_dict()
            ckpt.save(at_step, model, optimizer, meta, rank_state)

    def validate_now(at_step: int) -> None:
        if val_data is not None:
            seconds = clock.seconds
            with clock.pause():
                result = evaluate(model, val_data, info.device, amp, cfg.validation.max_batches, shard)
            record = {"step": at_step, "train_seconds": seconds, **result}
            metrics.log(record)
            log.info("validation at step %d: loss %.4f, perplexity %.3f, accuracy %.4f", at_step, record["val_loss"], record["val_perplexity"], record["val_accuracy"])

    from tqdm import tqdm

    bar = tqdm(total=cfg.num_train_steps, initial=step, disable=not info.is_main, desc="train", dynamic_ncols=True, mininterval=1.0)
    train_iter = iter(loader)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    model.train()
    time_up = False
    while step < cfg.num_train_steps:
        batches = [next(train_iter) for _ in range(cfg.grad_acc_steps)]
        if tracker is not None:
            for b in batches:
                tracker.consume(b)
        num_samples = sum(len(b["seq_lengths"]) for b in batches)
        batches = [shard(b) for b in batches]
        local = [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches), sum(b["num_real_tokens"] for b in batches),
                 sum(batch_flops(mcfg, b["seq_lengths"].tolist()) for b in batches) / info.cp.size, float(preempt.requested),
                 float(clock.seconds >= time_limit), num_samples / info.cp.size]
        counts = all_reduce(torch.tensor(local, device=info.device, dtype=torch.float64))
        global_labels = counts[0].clamp(min=1).float()
        set_lr(optimizer, lr := lr_at(step, cfg.optimizer.lr, cfg.lr_scheduler.warmup_steps, cfg.num_train_steps,
                                      cfg.lr_scheduler.decay_end_fraction, cfg.lr_scheduler.min_lr_ratio))
        loss, grad_norm = train_step(model, optimizer, strategy, batches, global_labels, amp, cfg.max_grad_norm)
        loss_v, norm_v = loss.item(), grad_norm.item()
        if cfg.detect_anomaly and not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {step + 1} "
                                 f"(loss {loss_v}, grad norm {norm_v}); nothing of this step was written")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens, flops, stop, time_up = counts[1].item(), counts[2].item(), counts[3].item() > 0, counts[4].item() > 0
        consumed += int(tokens)
        samples += round(counts[5].item())
        throughput.add(tokens, flops)
        bar.update(1)
        if step % cfg.log_every_n_steps == 0 or step == cfg.num_train_steps or stop or time_up:
            record = {"step": step, "loss": loss_v, "lr": lr, "grad_norm": norm_v, **throughput.record(), "consumed_tokens": consumed,
                      "consumed_samples": samples, "train_seconds": clock.seconds}
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{record['tokens_per_second_per_gpu']:.3g}", refresh=False)
        every = cfg.validation.every_n_steps
        if every and step % every == 0 and step < cfg.num_train_steps and not time_up:
            validate_now(step)
        if time_up:
            log.info("max_train_minutes=%s reached at step %d: finishing", cfg.max_train_minutes, step)
            break
        if stop:
            save(step)
            ckpt.wait()
            log.warning("preemption signal: checkpoint saved at step %d; resume with checkpoint.resume_from_checkpoint=true", step)
            break
        every = cfg.checkpoint.save_every_n_steps
        if every and step % every == 0 and step < cfg.num_train_steps:
            save(step)
    bar.close()
    loader.shutdown()  # its workers ignore stop signals: they end when told to
    if step == cfg.num_train_steps or time_up:
        resumed_finished = latest is not None and step == fit_step  # a finished run, resumed: saved, maybe validated
        validated = resumed_finished and bool(
            all_reduce(torch.tensor([float(metrics.has_record(step, "val_loss"))], device=info.device), dist.ReduceOp.MAX).item()
        )
        finish(cfg, model, mcfg, step, save if not resumed_finished else None, validate_now if not validated else None, plan)
    ckpt.wait()
    metrics.close()
    preempt.close()
    return model


def resume_data(cfg: DictConfig, info: DistInfo, meta: dict, rank_state: dict, loader, path: Path) -> None:
    """Put the training data where the checkpoint left it: the global position (any world size and worker count),
    or, for a stream, this rank's loader state (the same world size only)."""
    if isinstance(loader.dataset, MLMBatches):
        if "data_position" not in meta:
            raise RuntimeError(f"cannot resume from {path}: it has no global data position (written by an older version "
                               "with per-rank loader state); resume it with that version")
        loader.dataset.position = DataPosition.from_dict(meta["data_position"])
        return
    if meta.get("world_size") != info.world_size or rank_state is None or "loader" not in rank_state:
        raise RuntimeError(f"cannot resume from {path}: dataset.streaming=true resumes only with the world size that wrote it "
                           f"({meta.get('world_size')}, this run has {info.world_size}); the prepared store resumes at any size")
    loader.load_state_dict(rank_state["loader"])


def finish(cfg: DictConfig, model, mcfg: EsmConfig, step: int, save, validate_now, plan) -> None:
    """End of training: final checkpoint, Hugging Face export, then final validation, so that nothing that fails
    after the last step (a validation split without a maskable residue, say) can lose the first two. `save` or
    `validate_now` is None where that part is already done (a finished run resumed)."""
    if cfg.checkpoint.save_final_checkpoint and save is not None:
        save(step)
    if cfg.checkpoint.save_final_model:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            if mcfg.backend == "hf":
                from recipe.model.hf import ours_from_adapter

                full = ours_from_adapter(full, mcfg.num_layers)
            extra = {"trained_steps": step, "layer_precision": plan.to_dict()}
            path = export_hf(full, mcfg, Path(cfg.output_dir) / "final_model", extra=extra)
            log.info("final model (Hugging Face format): %s", path)
        barrier()
    if validate_now is not None:
        validate_now(step)
