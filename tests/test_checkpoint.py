"""Checkpoint files: manifests and verification before anything is read, fallback to an older checkpoint, loading
that cannot run code, pruning that touches only this run's checkpoints, and failed writes (the full save/resume round
trips are in test_train.py)."""

import errno
import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recipe import checkpoint as ckpt_lib
from recipe.checkpoint import MANIFEST, Checkpointer, CheckpointError, extra_state_from_bytes, extra_state_to_bytes, rng_state
from recipe.parallel import DistInfo

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def test_te_extra_state_travels_as_bytes_including_empty():
    """TE's _extra_state (FP8 scales; empty for a BF16 module) crosses DCP as bytes and comes back unchanged."""
    sd = {
        "a._extra_state": torch.tensor([1, 2, 250], dtype=torch.uint8),
        "b._extra_state": torch.empty(0, dtype=torch.uint8),
        "w": torch.ones(2),
    }
    back = extra_state_from_bytes(extra_state_to_bytes(sd))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def model_and_optimizer(value: float):
    model = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(model.weight, value)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_steps(root: Path, steps, max_checkpoints=None, run_id=None) -> Checkpointer:
    """Checkpoints at `steps`; step s holds weights that remember s (weight[0, 0] == s before the optimizer step)."""
    saver = Checkpointer(root, INFO, max_checkpoints, run_id=run_id)
    for step in steps:
        model, optimizer = model_and_optimizer(float(step))
        saver.save(step, model, optimizer, {"step": step}, {"loader": {"cursor": step}, "rng": rng_state()})
    return saver


def resume(root: Path):
    """What a resuming trainer does: the newest verified checkpoint, loaded into a fresh model."""
    loader = Checkpointer(root, INFO)
    path = loader.latest_verified()
    model, optimizer = model_and_optimizer(0.0)
    meta, rank_state = loader.load(path, model, optimizer, {"step": int(path.name.split("_")[1])})
    return path, meta, rank_state, loader


def flip(path: Path, offset: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "64 bytes flipped in a shard": ("dcp/__0_0.distcp", lambda p: flip(p, 1000, 64), "contents differ"),
    "4 KiB flipped in a shard": ("dcp/__0_0.distcp", lambda p: flip(p, 0, 4096), "contents differ"),
    "truncated shard": ("dcp/__0_0.distcp", lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated or replaced"),
    "zero-length rank file": ("rank_0.pt", lambda p: p.write_bytes(b""), "truncated or replaced"),
    "DCP metadata flipped": ("dcp/.metadata", lambda p: flip(p, 50, 8), "contents differ"),
    "meta.json edited": ("meta.json", lambda p: p.write_text(p.read_text().replace('"step": 3', '"step": 9')), "contents differ"),
    "shard deleted": ("dcp/__0_0.distcp", lambda p: p.unlink(), "listed in the manifest but missing"),
    "file planted": ("dcp/__0_1.distcp", lambda p: p.write_bytes(b"x"), "not listed in the manifest"),
    "manifest deleted": (MANIFEST, lambda p: p.unlink(), "missing or unreadable"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog, name):
    """The newest checkpoint is damaged: nothing of it is loaded, the error names the file, the older one is
    resumed (loudly), the damaged one is set aside, and the good older one survives the next saves' pruning."""
    save_steps(tmp_path, [1, 2, 3], max_checkpoints=2)
    target, damage, why = CORRUPTIONS[name]
    damage(tmp_path / "step_3" / target)
    with caplog.at_level(logging.WARNING):
        path, meta, rank_state, loader = resume(tmp_path)
    assert path.name == "step_2" and meta["step"] == 2 and rank_state["loader"] == {"cursor": 2}
    assert str(tmp_path / "step_3" / target) in caplog.text and why in caplog.text
    assert "RESUMING FROM AN OLDER CHECKPOINT" in caplog.text
    assert not (tmp_path / "step_3").exists() and len(list(tmp_path.glob("corrupt_step_3_*"))) == 1
    model, optimizer = model_and_optimizer(7.0)
    loader.save(3, model, optimizer, {"step": 3}, {"rng": rng_state()})  # the resumed run saves again: same id
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_2", "step_3"]


def test_no_verified_checkpoint_is_a_clear_error(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / f"step_{step}" / "rank_0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"no checkpoint under {tmp_path} verifies"):
        Checkpointer(tmp_path, INFO).latest_verified()
    assert f"{tmp_path}/step_2/rank_0.pt: 0 bytes" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]  # nothing renamed or deleted


def test_load_refuses_an_unverified_path(tmp_path):
    save_steps(tmp_path, [1])
    flip(tmp_path / "step_1" / "dcp" / ".metadata", 10, 4)
    model, optimizer = model_and_optimizer(0.0)
    with pytest.raises(CheckpointError, match="does not verify"):
        Checkpointer(tmp_path, INFO).load(tmp_path / "step_1", model, optimizer, {})


class Planted:
    """A pickle that runs code when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def rewrite_manifest(path: Path) -> None:
    """What an attacker with write access can do: make the manifest match the planted file."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (path / name).stat().st_size, "digest": ckpt_lib.file_digest(path / name)}
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["rank_0.pt", "dcp/.metadata"])
def test_a_planted_pickle_is_never_unpickled_unverified(tmp_path, target):
    save_steps(tmp_path, [1])
    marker = tmp_path / "marker"
    with open(tmp_path / "step_1" / target, "wb") as f:
        pickle.dump(Planted(marker), f)
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        resume(tmp_path)
    assert not marker.exists()


def test_rank_files_load_weights_only_even_under_a_matching_manifest(tmp_path):
    """Even with the manifest rewritten to match, a planted rank file cannot run code: it is loaded weights-only."""
    save_steps(tmp_path, [1])
    marker = tmp_path / "marker"
    torch.save({"loader": Planted(marker)}, tmp_path / "step_1" / "rank_0.pt")
    rewrite_manifest(tmp_path / "step_1")
    with pytest.raises(CheckpointError, match=r"rank_0.pt does not load as plain data"):
        resume(tmp_path)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    ckpt_lib.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    """Another run's checkpoints, with higher step numbers, are neither counted nor deleted; this run keeps its own."""
    save_steps(tmp_path, [10, 20, 30], run_id="old")
    save_steps(tmp_path, [1, 2, 3], max_checkpoints=2, run_id="new")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10", "step_2", "step_20", "step_3", "step_30"]


def test_max_checkpoints_keeps_the_newest(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], max_checkpoints=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_4"]


def no_space_left(path):
    return SimpleNamespace(total=2**30, used=2**30, free=0)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_zip_writer_failure(*args, **kwargs):
    raise RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    )


@pytest.mark.parametrize(
    "where, patch",
    [
        ("DCP shard writer, ENOSPC", lambda mp: mp.setattr("torch.distributed.checkpoint.filesystem._write_item", enospc)),
        (
            "rank file, torch's zip writer",
            lambda mp: (
                mp.setattr(ckpt_lib.torch, "save", torch_zip_writer_failure),
                mp.setattr(ckpt_lib.shutil, "disk_usage", no_space_left),
            ),
        ),
        ("manifest, ENOSPC", lambda mp: mp.setattr(ckpt_lib, "_write_atomically", enospc)),
    ],
)
def test_disk_full_is_named_cleaned_up_and_spares_older_checkpoints(tmp_path, monkeypatch, where, patch):
    saver = save_steps(tmp_path, [1, 2], max_checkpoints=2)
    patch(monkeypatch)
    model, optimizer = model_and_optimizer(3.0)
    with pytest.raises(CheckpointError, match=rf"disk full \(No space left on device\) while writing {tmp_path}/.tmp_step_3"):
        saver.save(3, model, optimizer, {"step": 3}, {"rng": rng_state()})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]
    assert resume(tmp_path)[0].name == "step_2"


def test_differences_compare_a_section_by_the_keys_this_run_expects():
    """A checkpoint may record a setting this version no longer compares (it resumes), never a different value of
    one it compares, nor a different scalar."""
    from recipe.checkpoint import differences

    meta = {"cp_size": 1, "data": {"max_seq_length": 1024, "pad_to_multiple_of": 16}}
    assert differences(meta, {"cp_size": 1, "data": {"max_seq_length": 1024}}) == []
    assert differences(meta, {"cp_size": 1, "data": {"max_seq_length": 512}}) == [
        "data: checkpoint {'max_seq_length': 1024, 'pad_to_multiple_of': 16} vs this run {'max_seq_length': 512}"
    ]
    assert differences(meta, {"cp_size": 2}) == ["cp_size: checkpoint 1 vs this run 2"]
    assert differences(meta, {"data": {"pad_to_multiple_of": 128}}) != []


@pytest.mark.parametrize("cp_size, compared", [(1, False), (2, True)])
def test_pad_multiple_is_compared_on_resume_under_context_parallelism_only(cp_size, compared, tmp_path):
    """Without CP the pad multiple only pads each micro-batch's tail (which sequences a batch holds does not
    change), so a run that resolves dataset.pad_to_multiple_of=auto to 128 resumes one that had 16; under CP it
    pads every sequence, and a change is refused."""
    import torch
    from hydra import compose, initialize_config_dir

    from recipe.build import batch_settings, resume_expectations
    from recipe.config import CONFIG_DIR
    from recipe.model import EsmConfig
    from recipe.model.config import ContextParallel
    from recipe.parallel import DistInfo
    from recipe.quantization import PrecisionPlan

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("L0_sanity", overrides=[f"output_dir={tmp_path}", f"cp_size={cp_size}", "dataset.pad_to_multiple_of=16"])
    info = DistInfo(rank=0, world_size=cp_size, local_rank=0, device=torch.device("cpu"), cp=ContextParallel(size=cp_size))
    mcfg = EsmConfig.from_size("tiny")
    expect = resume_expectations(cfg, info, mcfg, batch_settings(cfg), PrecisionPlan(["bf16"] * mcfg.num_layers))
    assert ("pad_to_multiple_of" in expect["data"]) == compared
