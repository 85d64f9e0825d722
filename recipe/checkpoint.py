"""Resumable checkpoints: model and optimizer through torch.distributed.checkpoint (sharded under FSDP2), plus what
makes a resume exact: step, consumed tokens, every RNG state, and each rank's StatefulDataLoader state.

Layout of one checkpoint, `CKPT_DIR/step_N/`:
  dcp/            model + optimizer (torch.distributed.checkpoint)
  rank_R.pt       rank R's data loader state and RNG states
  meta.json       step, consumed tokens, world size, model shape, config
  COMPLETE        written last; then the directory is renamed from `.tmp_step_N` to `step_N`

A save goes to `.tmp_step_N` first and is renamed once every rank has finished, so a crash mid-save leaves the
previous checkpoint as the newest complete one. Loading is strict: missing or unexpected tensors are errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from recipe.parallel import DistInfo, barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "COMPLETE").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def extra_state_to_bytes(model_sd: dict) -> dict:
    """TransformerEngine's `_extra_state` (FP8 scales and amax history) is a uint8 tensor whose size changes once
    FP8 runs (empty in a fresh model); DCP needs fixed sizes for tensors, so it travels as an opaque bytes object."""
    return {k: bytes(v.cpu().numpy().tobytes()) if k.endswith("_extra_state") and isinstance(v, torch.Tensor) else v
            for k, v in model_sd.items()}


def extra_state_from_bytes(model_sd: dict) -> dict:
    return {k: _bytes_to_tensor(v) if k.endswith("_extra_state") and isinstance(v, bytes) else v for k, v in model_sd.items()}


def _bytes_to_tensor(b: bytes) -> torch.Tensor:
    # torch.frombuffer refuses an empty buffer; a BF16 TE module's extra state is empty.
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


class Checkpointer:
    def __init__(self, root: Path, info: DistInfo, max_checkpoints: int | None = 3, async_save: bool = False):
        self.root, self.info, self.max_checkpoints, self.async_save = Path(root), info, max_checkpoints, async_save
        self._pending: tuple | None = None  # (future, tmp dir, final dir) of an async save not yet finalised
        self._async_group = None
        if async_save and dist.is_initialized():
            # DCP's background writer coordinates over a CPU group so it never contends with NCCL training traffic.
            self._async_group = dist.new_group(backend="gloo")

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, meta: dict, rank_state: dict) -> Path:
        self.wait()
        final, tmp = self.root / f"step_{step}", self.root / f".tmp_step_{step}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": extra_state_to_bytes(model_sd), "optim": optim_sd}
        torch.save(rank_state, tmp / f"rank_{self.info.rank}.pt")
        if self.info.is_main:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp / "dcp"), process_group=self._async_group)
            self._pending = (future, tmp, final)
        else:
            dcp.save(state, checkpoint_id=str(tmp / "dcp"))
            self._finalize(tmp, final)
        return final

    def wait(self) -> None:
        """Finish an async save: wait for the writer, then mark complete and rename."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        barrier()  # every rank's shards and rank file are on disk
        if self.info.is_main:
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
            log.info("checkpoint saved: %s", final)
        barrier()

    def _prune(self) -> None:
        if not self.max_checkpoints:
            return
        for _, path in complete_checkpoints(self.root)[: -self.max_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model, optimizer, expect: dict) -> tuple[dict, dict]:
        """Restore model and optimizer in place; return (meta, this rank's state). `expect` must match meta."""
        meta = json.loads((path / "meta.json").read_text())
        changed = [f"{key}: checkpoint {meta.get(key)} vs this run {want}" for key, want in expect.items() if meta.get(key) != want]
        if changed:
            raise RuntimeError(f"cannot resume from {path}: " + "; ".join(changed))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        model_sd = extra_state_to_bytes(self._check_keys(path, model_sd))
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        state["model"] = extra_state_from_bytes(state["model"])
        # Keys were checked above (strictly, but for TE's _extra_state); let set_state_dict accept that subset.
        # TE keeps delayed-scaling FP8 metadata as a pickle and refuses to unpickle it unless told the source is
        # trusted: a checkpoint this trainer wrote is (its rank files are pickles too), so allow it for this load.
        with _env(NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE="1"):
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(strict=False))
        rank_file = path / f"rank_{self.info.rank}.pt"
        if not rank_file.exists():
            raise RuntimeError(f"cannot resume from {path}: no {rank_file.name} (saved with another world size?)")
        return meta, torch.load(rank_file, weights_only=False)

    @staticmethod
    def _check_keys(path: Path, model_sd: dict) -> dict:
        """Strict key and shape check. TransformerEngine's `_extra_state` entries (FP8 metadata) are the one
        exception: a checkpoint of the other backend lacks or carries them, and they are skipped."""
        stored = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
        saved = {k.removeprefix("model.") for k in stored if k.startswith("model.")}
        missing = sorted(k for k in set(model_sd) - saved if not k.endswith("_extra_state"))
        unexpected = sorted(k for k in saved - set(model_sd) if not k.endswith("_extra_state"))
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for key, value in model_sd.items():
            if key.endswith("_extra_state"):  # opaque, variable-size bytes (empty before TE's first FP8 forward)
                continue
            md = stored.get(f"model.{key}")
            if hasattr(md, "size") and hasattr(value, "shape") and tuple(md.size) != tuple(value.shape):
                raise RuntimeError(f"checkpoint {path}: tensor {key} has shape {tuple(md.size)}, model has {tuple(value.shape)}")
        return {k: v for k, v in model_sd.items() if k in saved}
