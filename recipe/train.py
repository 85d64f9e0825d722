"""The training loop, shared by every entrypoint: a train_*.py file calls `entrypoint(strategy)`, which calls `run`.

`fit` reads top to bottom: set-up (model, optimizer, data, the components), then one optimizer step per iteration,
then the end of the run (final checkpoint, export, validation). The components own their schedules and state:
`RunCheckpointer` (recipe/run_state.py) when to save and what a checkpoint holds, `Validator` (recipe/validation.py)
when to validate, `MetricsWriter` (recipe/metrics.py) when to log. What a config builds is in recipe/build.py, how
the model is parallelised in recipe/parallel.py.

One optimizer step (`train_step`): `grad_acc_steps` micro-batches, their labelled tokens counted on the CPU and
all-reduced once with the step's other counters (`StepCounter`), then forward/backward on each with the loss scaled to
a token-weighted mean over the whole global step (so DDP, FSDP2, any world size and any accumulation give the same
gradient), then clip. The loop checks for non-finite values before anything is written: before the update, or right
after queuing it where the optimizer skips a non-finite step on the GPU itself (optim.guard_update).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from recipe import config as config_lib
from recipe import quant_stats, run_dir
from recipe.build import build, build_data, compute_dtype, model_name, precision_plan, resolved_model_config, resume_expectations
from recipe.checkpoint import CheckpointError
from recipe.data.sources import DataError
from recipe.data.store import StoreError
from recipe.metrics import MetricsWriter, Throughput, peak_tflops
from recipe.model import BackendUnavailable, EsmConfig
from recipe.model.convert import export_hf
from recipe.model.esm import IGNORE_INDEX
from recipe.model.flops import batch_flops
from recipe.model.hf import HFBackendError
from recipe.optim import build_optimizer, describe_optimizer, guard_update, scheduled_lr, set_lr
from recipe.parallel import (
    STRATEGIES,
    ContextParallelError,
    DistInfo,
    Strategy,
    all_reduce,
    barrier,
    init_distributed,
    setup_mesh,
    unwrap,
)
from recipe.preemption import Preemption
from recipe.profiling import StepProfiler
from recipe.quantization import PrecisionError
from recipe.run_state import RunCheckpointer, TrainState
from recipe.validation import Validator, model_inputs

log = logging.getLogger("recipe")


class NonFiniteError(RuntimeError):
    pass


class GarbageCollection:
    """Python's garbage collector on the loop's schedule (`every_n_steps` > 0): set-up's objects (the model, the
    data, imported modules) are frozen out of every later collection, automatic collection is off, and `step`
    collects every n steps at the point where the host waits for the GPU anyway. Left automatic, a collection
    starts whenever allocations pass its threshold, mid-step, and stalls the host that feeds the GPU.

    Each collection freezes what survived it, so the next one scans only what the steps since allocated: what the
    first steps build (torch.compile's graphs and guards) made every full collection scan it all again, a stall that
    short steps feel (docs/benchmarks.md, lever 55). The cost: a reference cycle among survivors that later becomes
    garbage is freed only when the run ends (`restored`)."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        if self.every:
            gc.collect()
            gc.freeze()
            gc.disable()

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect()
            gc.freeze()

    @staticmethod
    @contextmanager
    def restored() -> Iterator[None]:
        """Python's collector as it was before the run, however the run ends; what was frozen is unfrozen and collected
        once (a cycle among survivors that became garbage during the run is freed here)."""
        enabled = gc.isenabled()
        try:
            yield
        finally:
            gc.unfreeze()
            gc.collect()
            if enabled:
                gc.enable()


# ====================================================================================== one step
class StepCounts(NamedTuple):
    """One step's counters, summed over all ranks: the loss's denominator, the throughput numerators, and the stop
    votes (one rank's signal or time limit stops every rank after the same step)."""

    masked_tokens: float  # labelled tokens of the global step: the loss is their mean
    real_tokens: float  # unpadded tokens trained on
    flops: float
    samples: float  # sequences trained on
    stop: float  # > 0: some rank was asked to stop (a signal)
    time_up: float  # > 0: max_train_minutes reached on some rank


def local_counts(batches: list[dict], mcfg: EsmConfig, info: DistInfo, stop: bool, time_up: bool) -> list[float]:
    """This rank's StepCounts, from the batches on the host. Under context parallelism each rank of a CP group counts
    the whole batch's sequences: divided by cp_size."""
    cp = info.cp.size
    return [
        sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
        sum(b["num_real_tokens"] for b in batches),
        sum(batch_flops(mcfg, b["seq_lengths"].tolist()) for b in batches) / cp,
        sum(len(b["seq_lengths"]) for b in batches) / cp,
        float(stop),
        float(time_up),
    ]


class HostReadback:
    """Device values read on the host without draining the GPU's queue: `send` queues a non-blocking copy into a
    pinned buffer and an event, `get` waits for that event only. The host can queue more work between the two (the
    optimizer step, the next step's counts) instead of waiting for all of it. The buffer is reused: each `get` comes
    before the next `send`."""

    def __init__(self, device: torch.device, n: int):
        cuda = device.type == "cuda"
        self.buffer = torch.zeros(n, dtype=torch.float64, pin_memory=cuda)
        self.copied = torch.cuda.Event() if cuda else None

    def send(self, values: torch.Tensor) -> None:
        self.buffer.copy_(values.detach().double(), non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def get(self) -> list[float]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.buffer.tolist()


class StepCounter:
    """Each step's StepCounts in one all-reduce, without making the host wait for the GPU: the counts go up through
    a pinned buffer (a non-blocking copy) and come back through a HostReadback, so neither the upload before the
    forward nor the read after the optimizer step waits for the step's GPU work. The loss denominator is used on the
    device (`start`'s tensor). The upload buffer is reused: safe because the step's loss readback waits for the GPU
    to pass this step's copies before the next step writes it again."""

    def __init__(self, device: torch.device):
        self.device = device
        self.up = torch.zeros(len(StepCounts._fields), dtype=torch.float64, pin_memory=device.type == "cuda")
        self.down = HostReadback(device, len(StepCounts._fields))

    def start(self, local: list[float]) -> torch.Tensor:
        """All-reduce this rank's counts; returns the summed counts on the device."""
        self.up.copy_(torch.tensor(local, dtype=torch.float64))
        summed = all_reduce(self.up.to(self.device, non_blocking=True))
        self.down.send(summed)
        return summed

    def result(self) -> StepCounts:
        """The summed counts on the host (waits only for their own copy, queued before the step's forward)."""
        return StepCounts(*self.down.get())


def train_step(model, strategy: Strategy, batches: list[dict], masked_tokens: torch.Tensor, amp, max_norm, optimizer):
    """Forward/backward over the micro-batches of one step, then clip (into `optimizer`'s update where it can take
    the coefficient: Strategy.clip_grad_norm). Returns (global mean loss, grad norm)."""
    device, world = strategy.info.device, strategy.info.world_size
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        with strategy.sync_gradients(model, i == len(batches) - 1), amp:
            out = model(**model_inputs(batch, device))
            (out.loss_sum * (world / masked_tokens)).backward()  # DDP/FSDP average over ranks: undo it
        loss_sum += out.loss_sum.detach()
    grad_norm = strategy.clip_grad_norm(model, max_norm, optimizer)
    return all_reduce(loss_sum) / masked_tokens, grad_norm


def check_finite(loss: float, grad_norm: float, step: int) -> None:
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
            f"(loss {loss}, grad norm {grad_norm}); nothing of this step was written"
        )


# ====================================================================================== the run
def fit(cfg: DictConfig, strategy: Strategy):
    """Train as `cfg` says; returns the (wrapped) model. The output directory is this run's alone while it runs,
    and a fresh run never mixes with another's outputs (recipe/run_dir.py)."""
    config_lib.validate(cfg)
    with run_dir.claim(cfg, strategy.info), GarbageCollection.restored():
        try:
            return _fit(cfg, strategy)
        finally:
            quant_stats.shutdown()  # the debug API is process-wide: a later run in this process starts clean


def _fit(cfg: DictConfig, strategy: Strategy):
    info = strategy.info
    # Set-up. The model's config and precision plan first: they refuse what cannot run before memory is spent.
    mcfg = resolved_model_config(cfg, info)
    strategy.check(cfg, mcfg.backend)
    plan, recipes = precision_plan(cfg, mcfg, info, strategy.compute_dtype)
    setup_mesh(info, cfg.cp_size, cfg.cp_comm_type)
    write_run_config(cfg, info)
    torch.manual_seed(cfg.seed)
    # Quantization statistics: TE's debug API must be on before the first TE module is built.
    stats = quant_stats.QuantStats.start(cfg, plan, info.rank, barrier) if cfg.quant_stats_config.enabled else None
    model = build(cfg, strategy, mcfg, plan, recipes)
    if stats is not None:
        stats.name_layers(unwrap(model))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr_scheduler, cfg.num_train_steps, info.device,
                                cfg.quantized_model_init, strategy.triton_adamw)  # fmt: skip
    optimizer = strategy.wrap_optimizer(model, optimizer)
    data = build_data(cfg, info)
    log_start(cfg, mcfg, plan, model, strategy, optimizer)

    # The components: each owns its schedule. A resume restores the TrainState, weights, optimizer, data and RNG.
    expect = resume_expectations(cfg, info, mcfg, data.settings, plan)
    ckpt = RunCheckpointer(cfg, strategy, mcfg, expect, model, optimizer, data.loader)
    state = ckpt.resume() if cfg.checkpoint.resume_from_checkpoint else TrainState()
    start_step, resumed = state.step, ckpt.resumed_from is not None
    metrics = MetricsWriter(Path(cfg.output_dir), info.is_main, state.step if resumed else None, cfg.log_every_n_steps,
                            cfg.wandb, cfg.tensorboard, config_lib.resolved(cfg))  # fmt: skip
    if stats is not None:
        stats.attach(metrics, cfg)
        stats.set_step(state.step)
    amp = autocast(info.device, strategy.compute_dtype)
    validator = Validator(model, data.val, info.device, amp, cfg.validation.max_batches, data.shard,
                          cfg.validation.every_n_steps, cfg.num_train_steps, metrics)  # fmt: skip
    throughput = Throughput(info.world_size, peak_tflops(cfg.peak_tflops_per_gpu, info.device), info.device, state.clock)
    preempt = Preemption()
    time_limit = cfg.max_train_minutes * 60 if cfg.max_train_minutes is not None else math.inf
    bar = progress_bar(cfg, info, state.step)
    profiler = StepProfiler(cfg.profiler, Path(cfg.output_dir), info.rank, info.device, state.step)
    train_iter = iter(data.loader)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    model.train()

    counts, counter, readback = StepCounts(0, 0, 0, 0, 0, 0), StepCounter(info.device), HostReadback(info.device, 2)
    collector = GarbageCollection(cfg.gc_every_n_steps)
    while state.step < cfg.num_train_steps:
        # The step's micro-batches: the data position counts what reaches the model; then this rank's CP share.
        batches = [next(train_iter) for _ in range(cfg.grad_acc_steps)]
        ckpt.consume(batches)
        batches = [data.shard(b) for b in batches]
        reduced = counter.start(local_counts(batches, mcfg, info, preempt.requested, state.clock.seconds >= time_limit))

        # Forward, backward, clip; stop before the update on a non-finite loss or gradient.
        lr = scheduled_lr(state.step, cfg.optimizer.lr, cfg.lr_scheduler, cfg.num_train_steps)
        set_lr(optimizer, lr)
        loss, grad_norm = train_step(model, strategy, batches, reduced[0].clamp(min=1).float(), amp, cfg.max_grad_norm, optimizer)
        readback.send(torch.stack([loss, grad_norm.float()]))
        checked_on_gpu = cfg.detect_anomaly and guard_update(optimizer, loss, grad_norm)  # a non-finite step skips itself
        if cfg.detect_anomaly and not checked_on_gpu:  # the update waits for the host's check
            loss_v, norm_v = readback.get()
            check_finite(loss_v, norm_v, state.step + 1)
        optimizer.step()  # unless the check above ran, queued before the host waits for the loss
        optimizer.zero_grad(set_to_none=True)
        collector.step(state.step + 1)  # while the GPU runs the step's tail
        loss_v, norm_v = readback.get()
        if checked_on_gpu:
            check_finite(loss_v, norm_v, state.step + 1)

        # Count it, then whatever the schedules ask for at this step.
        counts = counter.result()
        state.step += 1
        if stats is not None:
            stats.step()  # logs the statistics this step collected
        with state.clock.pause():  # its trace export is not training time (as validation and checkpoint writes)
            profiler.step()
        state.consumed_tokens += int(counts.real_tokens)
        state.consumed_samples += round(counts.samples)
        throughput.add(counts.real_tokens, counts.flops)
        bar.update(1)
        if metrics.should_log(state.step, last=state.step == cfg.num_train_steps or counts.stop > 0 or counts.time_up > 0):
            record = {
                "step": state.step,
                "loss": loss_v,
                "lr": lr,
                "grad_norm": norm_v,
                **throughput.record(),
                "consumed_tokens": state.consumed_tokens,
                "consumed_samples": state.consumed_samples,
                "train_seconds": state.clock.seconds,
            }
            metrics.log(record)
            bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{record['tokens_per_second_per_gpu']:.3g}", refresh=False)
        if validator.should_validate(state.step) and not counts.time_up:
            validator.run(state)
        if counts.time_up:
            log.info("max_train_minutes=%s reached at step %d: finishing", cfg.max_train_minutes, state.step)
            break
        if counts.stop:
            ckpt.save(state)
            ckpt.wait()
            log.warning(
                "preemption signal: checkpoint saved at step %d; resume with checkpoint.resume_from_checkpoint=true", state.step
            )
            break
        ckpt.maybe_save(state)
    bar.close()
    profiler.close()
    data.loader.shutdown()  # its workers ignore stop signals: they end when told to

    # The end of the run (not after a stop): a finished run that is resumed only does what it had not done yet.
    if state.step == cfg.num_train_steps or counts.time_up:
        finish(
            cfg,
            model,
            mcfg,
            plan,
            state,
            ckpt,
            validator,
            resumed_finished=resumed and state.step == start_step,
            strategy=strategy,
        )
    ckpt.wait()
    metrics.close()
    preempt.close()
    return model


def finish(
    cfg: DictConfig,
    model,
    mcfg: EsmConfig,
    plan,
    state: TrainState,
    ckpt: RunCheckpointer,
    validator: Validator,
    resumed_finished: bool,
    strategy: Strategy,
) -> None:
    """Final checkpoint, Hugging Face export, then final validation, so that nothing that fails after the last step
    (a validation split without a maskable residue, say) can lose the first two. A finished run that is resumed
    (`resumed_finished`) has its checkpoint, and maybe its validation, already."""
    if cfg.checkpoint.save_final_checkpoint and not resumed_finished:
        ckpt.save(state)
    if cfg.checkpoint.save_final_model:
        export(cfg, model, mcfg, plan, state.step, strategy)
    if not (resumed_finished and validator.done_at(state.step)):
        validator.run(state)


def export(cfg: DictConfig, model, mcfg: EsmConfig, plan, step: int, strategy: Strategy) -> None:
    """output_dir/final_model: the full weights gathered to rank 0, in Hugging Face's format (transformers loads it)."""
    full = strategy.full_state_dict(model)
    if dist.get_rank() == 0:
        if mcfg.backend == "hf":
            from recipe.model.hf import ours_from_adapter

            full = ours_from_adapter(full, mcfg.num_layers)
        extra = {"trained_steps": step, "layer_precision": plan.to_dict()}
        path = export_hf(full, mcfg, Path(cfg.output_dir) / "final_model", extra=extra)
        log.info("final model (Hugging Face format): %s", path)
    barrier()


# ====================================================================================== start-up
def autocast(device: torch.device, dtype: torch.dtype):
    """The context every forward runs in: autocast to `dtype`, or nothing for FP32 runs."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def write_run_config(cfg: DictConfig, info: DistInfo) -> None:
    if info.is_main:
        out_dir = Path(cfg.output_dir)
        print(f"output_dir: {out_dir.resolve()}", flush=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def log_start(cfg: DictConfig, mcfg: EsmConfig, plan, model, strategy: Strategy, optimizer: Any) -> None:
    info = strategy.info
    log.info("layer precision: %s", plan.describe())
    log.info("optimizer: %s (optimizer.fused=%s)", describe_optimizer(optimizer), cfg.optimizer.fused)
    log.info(
        "model: %s, backend %s, %s, %.1fM parameters; strategy %s over %d ranks (dp %d x cp %d), compute %s",
        model_name(cfg, mcfg),
        mcfg.backend,
        mcfg.activation,
        sum(p.numel() for p in model.parameters()) / 1e6,
        strategy.name,
        info.world_size,
        info.dp_size,
        info.cp.size,
        strategy.compute_dtype,
    )


def progress_bar(cfg: DictConfig, info: DistInfo, step: int):
    from tqdm import tqdm

    return tqdm(
        total=cfg.num_train_steps, initial=step, disable=not info.is_main, desc="train", dynamic_ncols=True, mininterval=1.0
    )


# Refusals of a config, of input data, of an output directory or checkpoint, and a stop on a non-finite loss: the
# entrypoint prints their one-line message (to stderr and train.log) and exits 1. Anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    config_lib.ConfigError,
    PrecisionError,
    DataError,
    StoreError,
    ContextParallelError,
    HFBackendError,
    BackendUnavailable,
    run_dir.RunDirError,
    CheckpointError,
    NonFiniteError,
)


def entrypoint(strategy_name: str, config_name: str = "L0_sanity"):
    """The hydra `main` of a train_*.py file: configs from hydra_config/, `config_name` unless --config-name."""
    import hydra

    @hydra.main(config_path=str(config_lib.CONFIG_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        cfg.output_dir = run_dir.multirun_output_dir(cfg)  # -m: each job its own directory
        try:
            run(cfg, strategy_name)
        except USER_ERRORS as exc:  # what the message says is the whole story: no traceback of our internals
            log.error("%s: %s", type(exc).__name__, exc)
            raise SystemExit(1) from None
        except torch.OutOfMemoryError:  # the traceback stays (where it ran out); the way out is said first
            log.error(out_of_memory_hint(cfg))
            raise

    def main_or_help() -> None:
        """--help / -h lists the shipped configs (hydra's own help cannot read their comments); --hydra-help stays."""
        if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
            print(config_lib.help_text(Path(sys.argv[0]).name, config_name))
            return
        main()

    return main_or_help


def out_of_memory_hint(cfg: DictConfig) -> str:
    """What to change when a run does not fit its GPU: the tokens of a micro-batch, not of a step. The shipped L1
    configs use the micro-batch that was fastest on the GPU they were measured on, larger than an 80 GB card holds at
    some sizes (their comments say what fits there)."""
    return (
        f"out of GPU memory with {config_lib.token_budget(cfg):,} tokens per micro-batch: lower "
        f"dataset.micro_batch_size (now {cfg.dataset.micro_batch_size}) and raise grad_acc_steps (now "
        f"{cfg.grad_acc_steps}) by the same factor to keep the tokens per optimizer step; the shipped configs' "
        "comments say what fits an 80 GB GPU"
    )


def run(cfg: DictConfig, strategy_name: str) -> None:
    info = init_distributed(cfg.device)
    setup_logging(info.is_main)
    if info.device.type == "cpu":
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), cfg.dataset.num_workers)
    strategy = STRATEGIES[strategy_name](
        info,
        compute_dtype(cfg, info.device),
        cfg.fsdp.fp32_master_weights,
        cfg.fsdp.reshard_after_forward,
        cfg.fsdp.reduce_every_micro_batch,
    )
    try:
        fit(cfg, strategy)
        barrier()  # no rank tears down its connections while another still uses them (gloo aborts on that)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_cpu_threads(local_processes: int, loader_workers: int) -> None:
    """On CPU, unless OMP_NUM_THREADS says otherwise: the cores this process may use, shared with the other
    training processes of this machine and left free for the loader workers (each runs one thread), so that compute
    threads do not fight the data pipeline for cores (oversubscription slows a small CPU run severalfold)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(local_processes, 1) - loader_workers)
    torch.set_num_threads(threads)
    log.info(
        "cpu: %d compute thread(s) for %d core(s), %d loader worker(s) (set OMP_NUM_THREADS to choose)",
        threads,
        cores,
        loader_workers,
    )


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
