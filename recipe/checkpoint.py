"""Resumable checkpoints: model and optimizer through torch.distributed.checkpoint (sharded under FSDP2), plus what
makes a resume exact: step, consumed tokens, every RNG state, and each rank's StatefulDataLoader state.

Layout of one checkpoint, `CKPT_DIR/step_N/`:
  dcp/            model + optimizer (torch.distributed.checkpoint)
  rank_R.pt       rank R's data loader state and RNG states
  meta.json       step, consumed tokens, world size, model shape, config
  MANIFEST.json   run id, step, and the size and xxh3-128 digest of every other file; written atomically
  COMPLETE        written last; then the directory is renamed from `.tmp_step_N` to `step_N`

A save goes to `.tmp_step_N` first and is renamed once every rank has finished, so a crash mid-save leaves the
previous checkpoint as the newest complete one. Loading is strict: missing or unexpected tensors are errors.

Before anything of a checkpoint is read (DCP's `.metadata` is a pickle), every file is checked against the
manifest; a checkpoint that fails is skipped, loudly, for the next older one that passes, and the failed ones are
renamed `corrupt_step_N...` so that pruning can never delete a good older checkpoint to make room beside them. The
digest detects corruption (bit flips, truncation, a partial copy), not tampering: whoever can write the directory
can rewrite the manifest too (README, "Verification and trust model"). Rank files hold plain types and tensors only and are loaded
with `weights_only=True`. Pruning touches only checkpoints whose manifest carries this run's id.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions

from recipe.parallel import STRATEGIES, DistInfo, Strategy, all_reduce, barrier

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"
DIGEST = "xxh3_128"  # non-cryptographic on purpose: it guards against corruption, not an attacker (see the module doc)
_PARTIAL = ".digests_rank_"  # per-rank digests, merged into the manifest by rank 0 and removed
_UNLISTED = {MANIFEST, "COMPLETE"}
# The rank that wrote a file hashes it at save time (its page cache is warm) and checks it at load time.
_OWNER = (re.compile(r"^rank_(\d+)\.pt$"), re.compile(r"^__(\d+)_\d+\.distcp$"))


def differences(meta: dict, expect: dict) -> list[str]:
    """What a checkpoint's meta has otherwise than this run expects. A section given as a dict is compared by the
    keys this run expects, so that a setting a newer version no longer compares (one that cannot change what
    training sees) does not refuse older checkpoints that still record it."""

    def differs(stored, want) -> bool:
        if isinstance(want, dict) and isinstance(stored, dict):
            return any(stored.get(k) != v for k, v in want.items())
        return stored != want

    changed = [key for key, want in expect.items() if differs(meta.get(key), want)]
    return [f"{key}: checkpoint {meta.get(key)} vs this run {expect[key]}" for key in changed]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the path."""


def rng_state() -> dict:
    """Every RNG state, as plain types and tensors so that rank files load with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_digest(path: Path) -> str:
    """The file's xxh3-128, read in 8 MiB pieces (hashlib.file_digest would do it, but only from Python 3.11)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while piece := f.read(1 << 23):
            h.update(piece)
    return f"{DIGEST}:" + h.hexdigest()


def _owner(name: str, world_size: int) -> int:
    """Rank that hashes (at save) and checks (at load) a file: its writer where the name says, else rank 0."""
    for pattern in _OWNER:
        m = pattern.match(name)
        if m and int(m.group(1)) < world_size:
            return int(m.group(1))
    return 0


def _files(path: Path) -> list[str]:
    """Every file under a checkpoint directory, relative and sorted, but the manifest's own bookkeeping."""
    return sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name not in _UNLISTED and not p.name.startswith(_PARTIAL)
    )


def read_manifest(path: Path) -> dict | None:
    """A checkpoint's manifest, or None if it has none or it is not one (JSON only: nothing is unpickled)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    well_formed = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("digest"), str)
        for entry in files.values()
    )
    return manifest if well_formed else None


def verify(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems of checkpoint `path` against its manifest, each naming the file ([] = it verifies). Sizes and the
    set of files are checked by every rank; digests only of the files this rank owns (`_owner`), so that the
    ranks share the reading."""
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{path / MANIFEST}: missing or unreadable (a checkpoint without a manifest cannot be verified)"]
    listed, present = manifest["files"], _files(path)
    problems = [f"{path / name}: listed in the manifest but missing" for name in sorted(set(listed) - set(present))]
    problems += [f"{path / name}: not listed in the manifest" for name in sorted(set(present) - set(listed))]
    for name in sorted(set(listed) & set(present)):
        size = (path / name).stat().st_size
        if size != listed[name]["size"]:
            problems.append(f"{path / name}: {size} bytes, the manifest says {listed[name]['size']} (truncated or replaced)")
        elif _owner(Path(name).name, world_size) == rank and file_digest(path / name) != listed[name]["digest"]:
            problems.append(f"{path / name}: contents differ from the manifest's digest (corrupted)")
    return problems


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_write_error(exc: BaseException, where: Path) -> str:
    """Say "disk full" where that is the cause: torch's zip writer reports ENOSPC only as an `enforce fail`."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " / ".join(str(e) for e in chain)
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) or "No space left" in text
    left = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
    if full or (free is not None and free < 2**20):
        return f"disk full (No space left on device) while writing {where}; {left}"
    return f"writing {where} failed ({left}): {type(exc).__name__}: {text[:1000]}"


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
    return {
        k: bytes(v.cpu().numpy().tobytes()) if k.endswith("_extra_state") and isinstance(v, torch.Tensor) else v
        for k, v in model_sd.items()
    }


def extra_state_from_bytes(model_sd: dict) -> dict:
    return {k: _bytes_to_tensor(v) if k.endswith("_extra_state") and isinstance(v, bytes) else v for k, v in model_sd.items()}


def _bytes_to_tensor(b: bytes) -> torch.Tensor:
    # torch.frombuffer refuses an empty buffer; a BF16 TE module's extra state is empty.
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


class Checkpointer:
    def __init__(
        self,
        root: Path,
        info: DistInfo,
        max_checkpoints: int | None = 3,
        async_save: bool = False,
        run_id: str | None = None,
        strategy: Strategy | None = None,
    ):
        self.root, self.info, self.max_checkpoints, self.async_save = Path(root), info, max_checkpoints, async_save
        self.strategy = strategy or Strategy(info, torch.float32)  # whose state dicts (torch's own unless Megatron-FSDP)
        # Pruning only ever touches checkpoints that carry this id; a resume adopts the id of what it loads.
        self.run_id = run_id or uuid.uuid4().hex
        self._pending: tuple | None = None  # (future, tmp dir, final dir) of an async save not yet finalised
        self._verified: Path | None = None
        self._async_group = None
        if async_save and dist.is_initialized():
            # DCP's background writer coordinates over a CPU group so it never contends with NCCL training traffic.
            self._async_group = dist.new_group(backend="gloo")

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def latest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files all match its manifest (None if there is no complete one).
        Newer ones that fail are reported file by file and set aside (renamed), never loaded, never pruned in
        favour of; if none verifies, CheckpointError."""
        found = complete_checkpoints(self.root)
        failed: list[Path] = []
        for _, path in reversed(found):
            if self._verify_everywhere(path):
                if failed:
                    log.warning(
                        "RESUMING FROM AN OLDER CHECKPOINT: %s, because %s failed verification (errors above)",
                        path,
                        ", ".join(p.name for p in failed),
                    )
                    self._set_aside(failed)
                return path
            failed.append(path)
        if failed:
            raise CheckpointError(
                f"no checkpoint under {self.root} verifies against its manifest (errors above: "
                f"{', '.join(p.name for p in failed)}); nothing was loaded"
            )
        return None

    def _verify_everywhere(self, path: Path) -> bool:
        """Every rank checks its share of the files; all agree on the outcome."""
        problems = verify(path, self.info.rank, self.info.world_size)
        for problem in problems:
            log.error("checkpoint %s failed verification: %s", path.name, problem)
        bad = all_reduce(torch.tensor([float(bool(problems))], device=self.info.device), dist.ReduceOp.MAX).item() > 0
        if not bad:
            self._verified = path
        return not bad

    def _set_aside(self, paths: list[Path]) -> None:
        if self.info.is_main:
            for path in paths:
                target = path.with_name(f"corrupt_{path.name}_{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(target)
                log.warning("set aside the checkpoint that failed verification: %s -> %s", path, target.name)
        barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, meta: dict, rank_state: dict) -> Path:
        self.wait()
        final, tmp = self.root / f"step_{step}", self.root / f".tmp_step_{step}"
        with self._cleanup_on_failure(tmp):
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
                tmp.mkdir(parents=True)
            barrier()
            model_sd, optim_sd = self.strategy.get_state_dict(model, optimizer)
            state = {"model": extra_state_to_bytes(model_sd), "optim": optim_sd}
            torch.save(rank_state, tmp / f"rank_{self.info.rank}.pt")
            if self.info.is_main:
                (tmp / "meta.json").write_text(json.dumps(meta | {"run_id": self.run_id}, indent=2, default=str) + "\n")
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
            with self._cleanup_on_failure(tmp):
                future.result()
                self._finalize(tmp, final)

    @contextlib.contextmanager
    def _cleanup_on_failure(self, tmp: Path):
        """A failed write (a full disk, above all) removes its temporary directory and stops the run with an error
        that says why and where; complete checkpoints are left alone."""
        try:
            yield
        except (OSError, RuntimeError, CheckpointException) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint not saved: {_describe_write_error(exc, tmp)}; removed {tmp}, "
                f"older checkpoints under {self.root} are untouched"
            ) from exc

    def _finalize(self, tmp: Path, final: Path) -> None:
        barrier()  # every rank's shards and rank file are on disk
        files = _files(tmp)
        mine = {
            name: {"size": (tmp / name).stat().st_size, "digest": file_digest(tmp / name)}
            for name in files
            if _owner(Path(name).name, self.info.world_size) == self.info.rank
        }
        if not self.info.is_main:
            _write_atomically(tmp / f"{_PARTIAL}{self.info.rank}.json", json.dumps(mine))
        barrier()
        if self.info.is_main:
            for partial in sorted(tmp.glob(f"{_PARTIAL}*.json")):
                mine |= json.loads(partial.read_text())
                partial.unlink()
            if sorted(mine) != files:
                raise CheckpointError(f"{tmp}: the ranks' digests do not cover its files ({sorted(set(files) ^ set(mine))})")
            manifest = {"run_id": self.run_id, "step": int(final.name.split("_")[1]), "files": mine}
            _write_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
            log.info("checkpoint saved: %s", final)
        barrier()

    def _prune(self) -> None:
        """Keep this run's newest `max_checkpoints`; another run's checkpoints (another id, or none) are not ours."""
        if not self.max_checkpoints:
            return
        ours = [path for _, path in complete_checkpoints(self.root) if (read_manifest(path) or {}).get("run_id") == self.run_id]
        for path in ours[: -self.max_checkpoints]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model, optimizer, expect: dict) -> tuple[dict, dict | None]:
        """Restore model and optimizer in place, resharded by DCP to this run's world size and strategy; return
        (meta, this rank's state, None for a rank the writing run did not have). `expect` must match meta.
        Nothing is read before every file has been checked against the manifest."""
        if path != self._verified and not self._verify_everywhere(path):
            raise CheckpointError(f"cannot resume from {path}: it does not verify against its manifest (errors above)")
        self.run_id = (read_manifest(path) or {}).get("run_id", self.run_id)
        meta = json.loads((path / "meta.json").read_text())
        changed = differences(meta, expect)
        if changed:
            raise RuntimeError(f"cannot resume from {path}: " + "; ".join(changed))
        self._check_strategy(path, meta.get("strategy"))
        model_sd, optim_sd = self.strategy.get_state_dict(model, optimizer)
        model_sd = extra_state_to_bytes(self._check_keys(path, model_sd))
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        state["model"] = extra_state_from_bytes(state["model"])
        # Keys were checked above (strictly, but for TE's _extra_state); let set_state_dict accept that subset.
        # TE keeps delayed-scaling FP8 metadata as a pickle and refuses to unpickle it unless told the source is
        # trusted: every file of this checkpoint matched its manifest above, so allow it for this load.
        with _env(NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE="1"):
            self.strategy.set_state_dict(model, optimizer, state["model"], state["optim"])
        rank_file = path / f"rank_{self.info.rank}.pt"
        if not rank_file.exists():  # a rank the writing run did not have: its state is re-derived (train.restore_rng)
            return meta, None
        try:
            rank_state = torch.load(rank_file, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot resume from {path}: {rank_file.name} does not load as plain data and "
                f"tensors ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        return meta, rank_state

    def _check_strategy(self, path: Path, written_by: str | None) -> None:
        """DDP's and FSDP2's checkpoints resume under either; a strategy with state dicts of its own (Megatron-FSDP)
        resumes only its own checkpoints, and its checkpoints only under it."""
        own = {name for name, cls in STRATEGIES.items() if cls.own_checkpoints}
        mine = self.strategy.name
        if written_by != mine and (written_by in own or self.strategy.own_checkpoints):
            raise RuntimeError(
                f"cannot resume from {path}: it was written by strategy {written_by} and this run uses {mine}; "
                f"{', '.join(sorted(own))} checkpoints hold state dicts of their own and resume only under "
                "the strategy that wrote them"
            )

    @staticmethod
    def _check_keys(path: Path, model_sd: dict) -> dict:
        """Strict key and shape check. TransformerEngine's `_extra_state` entries (FP8 metadata) are the one
        exception: a checkpoint of the other backend lacks or carries them, and they are skipped."""
        stored = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
        saved = {k.removeprefix("model.") for k in stored if k.startswith("model.")}
        missing = sorted(k for k in set(model_sd) - saved if not k.endswith("_extra_state"))
        unexpected = sorted(k for k in saved - set(model_sd) if not k.endswith("_extra_state"))
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        for key, value in model_sd.items():
            if key.endswith("_extra_state"):  # opaque, variable-size bytes (empty before TE's first FP8 forward)
                continue
            size = getattr(stored.get(f"model.{key}"), "size", None)
            if size is not None and hasattr(value, "shape") and tuple(size) != tuple(value.shape):
                raise RuntimeError(f"checkpoint {path}: tensor {key} has shape {tuple(size)}, model has {tuple(value.shape)}")
        return {k: v for k, v in model_sd.items() if k in saved}


def load_model_weights(path: Path, model) -> dict:
    """The model weights alone from checkpoint `path` into an unwrapped model, without a process group or the
    optimizer (for evaluation). Keys are checked as on resume; returns the checkpoint's meta.json."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = json.loads((path / "meta.json").read_text())
    model_sd = extra_state_to_bytes(Checkpointer._check_keys(path, get_model_state_dict(model)))
    state = {"model": model_sd}
    with warnings.catch_warnings():  # DCP warns that it loads in one process without a process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    with _env(NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE="1"):
        set_model_state_dict(model, extra_state_from_bytes(state["model"]), options=StateDictOptions(strict=False))
    return meta
