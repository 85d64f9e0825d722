"""One run per output directory: what keeps a run's checkpoints, metrics and export from being clobbered.

- While a run is alive, rank 0 holds an exclusive lock (`fcntl.flock` on `<dir>/.run.lock`, which names the holder's
  pid and host) on `output_dir`, and on `checkpoint.ckpt_dir` when that lies elsewhere. A second run there is
  refused. The kernel drops the lock when the process dies, however it dies, so there is no stale lock to clean up.
- A fresh run refuses a directory that holds another run's outputs (checkpoints, metrics.jsonl, final_model/) unless
  told what to do with them: `checkpoint.resume_from_checkpoint=true` continues that run, `overwrite_output_dir=true`
  deletes them first.
- A hydra multirun (`-m`) gives each job its own directory, `<output_dir>/multirun/<job number>`.

The checks run on rank 0 (it alone writes these files) and its verdict is broadcast, so every rank stops with the
same message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch.distributed as dist
from omegaconf import DictConfig

from recipe import config as config_lib
from recipe.checkpoint import STEP_DIR
from recipe.parallel import DistInfo

log = logging.getLogger(__name__)
LOCK_FILE = ".run.lock"


class RunDirError(RuntimeError):
    """The output directory belongs to another run; the message says which and what to do."""


def multirun_output_dir(cfg: DictConfig) -> str:
    """Under `hydra -m` every job gets `<output_dir>/multirun/<job number>` (hydra's sweep directory); a single
    run keeps `output_dir`. Called by the hydra entrypoint only."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg.output_dir
    return HydraConfig.get().runtime.output_dir


def previous_outputs(output_dir: Path, ckpt_dir: Path) -> list[Path]:
    """What an earlier run left that a fresh one would overwrite, mix with or prune."""
    found = [p for p in (output_dir / "final_model",) if p.exists()]
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        found.append(metrics)
    if ckpt_dir.is_dir():
        found += sorted(p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) or p.name.startswith(".tmp_step_"))
    return found


def _lock(directory: Path) -> TextIO:
    """Take the directory's run lock or raise RunDirError naming who holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the run's life: closing it releases the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not yet written its name"
        f.close()
        raise RunDirError(
            f"{directory} is in use by another run ({holder}): wait for it to finish, or give this run "
            f"another output_dir (two runs in one directory would mix their metrics and checkpoints)"
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    return f


def _claim_on_main(cfg: DictConfig, stack: contextlib.ExitStack) -> None:
    output_dir, ckpt_dir = Path(cfg.output_dir), config_lib.ckpt_dir(cfg)
    stack.enter_context(_lock(output_dir))
    if not ckpt_dir.resolve().is_relative_to(output_dir.resolve()):
        stack.enter_context(_lock(ckpt_dir))
    found = previous_outputs(output_dir, ckpt_dir)
    if not found:
        return
    names = ", ".join(str(p) for p in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    if cfg.checkpoint.resume_from_checkpoint:  # continue that run from its newest verified checkpoint
        if not any(STEP_DIR.match(p.name) for p in found):
            log.warning(
                "checkpoint.resume_from_checkpoint=true but the earlier run in %s left no checkpoint: starting "
                "fresh, replacing %s",
                output_dir,
                names,
            )
        return
    if not cfg.overwrite_output_dir:
        raise RunDirError(
            f"output_dir={output_dir} holds another run's outputs ({names}). Resume that run with "
            f"checkpoint.resume_from_checkpoint=true, choose a new output_dir, or delete them with overwrite_output_dir=true"
        )
    log.warning("overwrite_output_dir=true: deleting the previous run's outputs: %s", names)
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def claim(cfg: DictConfig, info: DistInfo) -> Iterator[None]:
    """Hold the run directory for the life of the block (see the module doc); RunDirError on every rank if not."""
    if cfg.overwrite_output_dir and cfg.checkpoint.resume_from_checkpoint:
        raise config_lib.ConfigError(
            "overwrite_output_dir=true and checkpoint.resume_from_checkpoint=true contradict "
            "each other: resume continues the run in output_dir, overwrite deletes it"
        )
    with contextlib.ExitStack() as stack:
        verdict: list[str | None] = [None]
        if info.is_main:
            try:
                _claim_on_main(cfg, stack)
            except (RunDirError, OSError) as exc:
                verdict = [str(exc) if isinstance(exc, RunDirError) else f"output_dir={cfg.output_dir}: {exc}"]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RunDirError(verdict[0])
        yield
