"""The state of a training run beyond weights and optimizer (its counters, its clock, where the data is, the RNG),
and `RunCheckpointer`, which saves it with every checkpoint on the run's schedule and restores all of it on resume.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from recipe import config as config_lib
from recipe.checkpoint import Checkpointer, rng_state, set_rng_state
from recipe.data.dataset import MLMBatches
from recipe.data.order import DataPosition
from recipe.model import EsmConfig
from recipe.parallel import Strategy

log = logging.getLogger("recipe")


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


@dataclass
class TrainState:
    """What the loop advances each step and every checkpoint stores: the optimizer step, the unpadded tokens and
    sequences trained on (summed over data-parallel ranks), and the training clock."""

    step: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0
    clock: TrainClock = field(default_factory=TrainClock)

    def to_meta(self) -> dict:
        return {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "consumed_samples": self.consumed_samples,
            "train_seconds": self.clock.seconds,
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
        gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        merged = DataPosition.from_dict(p.to_dict())
        for rank, cursors, next_worker in gathered:
            for t, c in cursors.items():
                merged.cursors[t] = c
            merged.next_worker[rank] = next_worker
        return merged.to_dict()


class RunCheckpointer:
    """Checkpoints of one run: when to save (`maybe_save`), what each holds besides weights and optimizer (the
    TrainState, the config, the resolved model, what a resume must match, the data position, each rank's RNG), and
    the resume that restores all of it (`resume`)."""

    def __init__(self, cfg: DictConfig, strategy: Strategy, mcfg: EsmConfig, expect: dict, model, optimizer, loader):
        c, info = cfg.checkpoint, strategy.info
        # The strategy also says whose state dicts the checkpoints hold (torch's own unless Megatron-FSDP's).
        self.ckpt = Checkpointer(config_lib.ckpt_dir(cfg), info, c.max_checkpoints, c.async_save, strategy=strategy)
        self.every, self.last_step, self.seed = c.save_every_n_steps, cfg.num_train_steps, cfg.seed
        self.info, self.model, self.optimizer, self.loader, self.expect = info, model, optimizer, loader, expect
        self.static_meta = {
            "world_size": info.world_size,
            "strategy": strategy.name,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "model_config": mcfg.to_dict(),
        }  # the resolved model: what recipe.evaluate builds
        self.num_workers = cfg.dataset.num_workers
        self.tracker = self._tracker() if isinstance(loader.dataset, MLMBatches) else None
        self.resumed_from: Path | None = None

    def _tracker(self) -> DataTracker:
        return DataTracker(self.loader.dataset.layout_position(self.num_workers), self.info.dp_rank)

    def consume(self, batches: list[dict]) -> None:
        """Record the batches that reached the model (the data position a checkpoint stores)."""
        if self.tracker is not None:
            for batch in batches:
                self.tracker.consume(batch)

    def maybe_save(self, state: TrainState) -> None:
        """Save on the schedule (checkpoint.save_every_n_steps); the last step's checkpoint is `finish`'s."""
        if self.every and state.step % self.every == 0 and state.step < self.last_step:
            self.save(state)

    def save(self, state: TrainState) -> None:
        with state.clock.pause():
            meta = state.to_meta() | self.expect | self.static_meta
            rank_state: dict = {"rng": rng_state()}
            if self.tracker is not None:
                meta["data_position"] = self.tracker.global_state()
            else:
                rank_state["loader"] = self.loader.state_dict()
            self.ckpt.save(state.step, self.model, self.optimizer, meta, rank_state)

    def wait(self) -> None:
        self.ckpt.wait()

    def resume(self) -> TrainState:
        """The state of the newest checkpoint that verifies, with model, optimizer, data position and RNG restored;
        a fresh TrainState if there is none."""
        latest = self.ckpt.latest_verified()
        if latest is None:
            log.info("checkpoint.resume_from_checkpoint=true but no complete checkpoint under %s: starting fresh", self.ckpt.root)
            return TrainState()
        meta, rank_state = self.ckpt.load(latest, self.model, self.optimizer, self.expect)
        step = meta["step"]
        if step > self.last_step:
            raise config_lib.ConfigError(
                f"num_train_steps={self.last_step} is below the step of the checkpoint to resume, "
                f"{latest} (step {step}): raise num_train_steps to train on from it"
            )
        if "train_seconds" not in meta:
            log.warning("%s was written without train_seconds: train_seconds restarts from 0", latest)
        self._resume_data(meta, rank_state, latest)
        self._restore_rng(meta, rank_state, step)
        self.resumed_from = latest
        log.info(
            "resumed from %s at step %d (written by %s processes, now %d)",
            latest,
            step,
            meta.get("world_size"),
            self.info.world_size,
        )
        if step == self.last_step:
            log.info("that checkpoint ends this run (num_train_steps=%d): nothing left to train", step)
        return TrainState(
            step, meta["consumed_tokens"], meta.get("consumed_samples", 0), TrainClock(meta.get("train_seconds", 0.0))
        )

    def _resume_data(self, meta: dict, rank_state: dict | None, path: Path) -> None:
        """Put the training data where the checkpoint left it: the global position (any world size and worker count),
        or, for a stream, this rank's loader state (the same world size only)."""
        if self.tracker is not None:
            if "data_position" not in meta:
                raise RuntimeError(
                    f"cannot resume from {path}: it has no global data position (written by an older version "
                    "with per-rank loader state); resume it with that version"
                )
            self.loader.dataset.position = DataPosition.from_dict(meta["data_position"])
            self.tracker = self._tracker()
            return
        if meta.get("world_size") != self.info.world_size or rank_state is None or "loader" not in rank_state:
            raise RuntimeError(
                f"cannot resume from {path}: dataset.streaming=true resumes only with the world size that wrote it "
                f"({meta.get('world_size')}, this run has {self.info.world_size}); the prepared store resumes at any size"
            )
        self.loader.load_state_dict(rank_state["loader"])

    def _restore_rng(self, meta: dict, rank_state: dict | None, step: int) -> None:
        """The same layout restores each rank's RNG states; another world size has no state for some ranks, so all
        are derived from (seed, step, rank) instead. (The data needs none: it is a function of seed and position.)"""
        info = self.info
        if meta.get("world_size") == info.world_size:
            if rank_state is None:
                raise RuntimeError(f"cannot resume: the checkpoint of {info.world_size} processes has no rank_{info.rank}.pt")
            set_rng_state(rank_state["rng"])
            return
        derived = (self.seed * 1_000_003 + step * 7919 + info.rank) % 2**63
        random.seed(derived)
        np.random.seed(derived % 2**32)
        torch.manual_seed(derived)
