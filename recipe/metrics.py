"""Rank-0 outputs: metrics.jsonl (the contract our checks read), optional wandb and TensorBoard mirrors of it."""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path
from typing import Any

import torch

from recipe.config import TensorBoardConfig, WandbConfig

log = logging.getLogger(__name__)

# Dense BF16 peak of the GPUs we know, TFLOP/s (datasheets). MFU elsewhere needs peak_tflops_per_gpu set.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops(setting, device: torch.device) -> float | None:
    if setting not in (None, "auto"):
        return float(setting)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def max_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch; on CPU, the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class Throughput:
    """Unpadded tokens and model FLOPs since the last log line, turned into per-GPU rates (training time only:
    `clock` is the run's TrainClock, which validation and checkpoint writes pause)."""

    def __init__(self, world_size: int, peak_tflops: float | None, device: torch.device, clock):
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


class MetricsWriter:
    """metrics.jsonl on rank 0 (`enabled`), mirrored to wandb and TensorBoard where their sections enable them;
    `should_log` is the training-record schedule (log_every_n_steps). `resume_step`: the step of the checkpoint a
    resumed run starts from (None for a fresh run); `run_config` is the resolved config that wandb records with the run."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        resume_step: int | None,
        log_every_n_steps: int = 1,
        wandb: WandbConfig | None = None,
        tensorboard: TensorBoardConfig | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        wandb = wandb if wandb is not None else WandbConfig()
        tensorboard = tensorboard if tensorboard is not None else TensorBoardConfig()
        self.enabled, self.every = enabled, log_every_n_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb: Any = None
        self.tensorboard: Any = None
        if not enabled:
            return
        if self.path.exists():  # a fresh run starts a fresh log; a resumed one keeps what the checkpoint covers
            kept = [] if resume_step is None else [line for line in self._records() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run; close() closes it)
        if wandb.enabled:
            os.environ.setdefault("WANDB_MODE", wandb.mode)
            import wandb as wandb_lib

            self.wandb = wandb_lib.init(
                project=wandb.project,
                name=wandb.name,
                dir=str(output_dir),
                mode=wandb.mode,  # type: ignore[arg-type]  # a str of the config; wandb checks the word
                config=run_config,
                resume="allow",
            )
        if tensorboard.enabled:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(tensorboard.log_dir) if tensorboard.log_dir is not None else Path(output_dir) / "tensorboard"
            # A resumed run appends a new event file; purge_step hides the old file's events past the checkpoint, as
            # metrics.jsonl drops them.
            self.tensorboard = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step is not None else None)

    def _records(self) -> list[str]:
        """The log's lines. A torn last line (the process was killed mid-write) is dropped with a warning; a bad
        line anywhere else means the file was damaged or edited, and is an error naming the line."""
        lines = [(n, line) for n, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]
        good = []
        for i, (n, line) in enumerate(lines):
            try:
                record = json.loads(line)
                problem = None if isinstance(record, dict) and isinstance(record.get("step"), int) else "no integer 'step'"
            except ValueError as exc:
                problem = str(exc)
            if problem is not None:
                if i == len(lines) - 1:
                    log.warning("%s: dropping its torn last line %d (the run was stopped mid-write): %.80r", self.path, n, line)
                    break
                raise ValueError(
                    f"{self.path}, line {n}: not a metrics record ({problem}): {line[:80]!r}; fix or remove that line to resume"
                )
            good.append(line)
        return good

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, global_step=record["step"])

    def should_log(self, step: int, last: bool) -> bool:
        """A training record every log_every_n_steps steps, and at the run's last step (its end or a stop)."""
        return last or step % self.every == 0

    def has_record(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl holds a record of `step` with `key` (rank 0; False elsewhere)."""
        if not self.enabled:
            return False
        self.file.flush()
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line)
        return any(r.get("step") == step and key in r for r in records)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
            if self.tensorboard is not None:
                self.tensorboard.close()
