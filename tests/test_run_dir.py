"""The run-directory scheme: one run at a time per directory, no fresh run over another run's outputs."""

import os
import socket

import pytest
import torch
from hydra import compose, initialize_config_dir

from recipe.config import CONFIG_DIR, ConfigError
from recipe.parallel import DistInfo
from recipe.run_dir import LOCK_FILE, RunDirError, claim

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def cfg_for(out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("L0_sanity", overrides=[f"output_dir={out}", *overrides])


LEFTOVERS = {
    "metrics": lambda out: (out / "metrics.jsonl").write_text('{"step": 1}\n'),
    "checkpoint": lambda out: (out / "checkpoints" / "step_4").mkdir(parents=True),
    "torn checkpoint": lambda out: (out / "checkpoints" / ".tmp_step_8").mkdir(parents=True),
    "final model": lambda out: (out / "final_model").mkdir(parents=True),
}


@pytest.mark.parametrize("kind", LEFTOVERS)
def test_a_fresh_run_refuses_another_runs_outputs(tmp_path, kind):
    LEFTOVERS[kind](tmp_path)
    refused = (
        rf"output_dir={tmp_path} holds another run's outputs .*checkpoint.resume_from_checkpoint=true"
        r".*overwrite_output_dir=true"
    )
    with pytest.raises(RunDirError, match=refused), claim(cfg_for(tmp_path), INFO):
        pass


@pytest.mark.parametrize("kind", LEFTOVERS)
def test_resume_continues_and_overwrite_deletes(tmp_path, kind):
    LEFTOVERS[kind](tmp_path)
    with claim(cfg_for(tmp_path, "checkpoint.resume_from_checkpoint=true"), INFO):
        pass
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with claim(cfg_for(tmp_path, "overwrite_output_dir=true"), INFO):
        pass
    gone = set(before) - {p.name for p in tmp_path.rglob("*")}
    assert gone and gone <= {"metrics.jsonl", "step_4", ".tmp_step_8", "final_model"}
    with claim(cfg_for(tmp_path), INFO):  # now empty of outputs: a fresh run may start
        pass


def test_resume_and_overwrite_together_is_a_config_error(tmp_path):
    both = cfg_for(tmp_path, "overwrite_output_dir=true", "checkpoint.resume_from_checkpoint=true")
    contradiction = "overwrite_output_dir=true and checkpoint.resume_from_checkpoint=true"
    with pytest.raises(ConfigError, match=contradiction), claim(both, INFO):
        pass


def test_hydra_and_config_files_alone_do_not_count(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "metrics.jsonl").write_text("")  # a run that stopped before its first record
    with claim(cfg_for(tmp_path), INFO):
        pass


@pytest.mark.parametrize("ckpt_elsewhere", [False, True])
def test_a_second_run_in_a_locked_directory_is_refused(tmp_path, ckpt_elsewhere):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    extra = [f"checkpoint.ckpt_dir={ckpt}"] if ckpt_elsewhere else []
    with claim(cfg_for(out, *extra), INFO):
        other = cfg_for(tmp_path / "other" if ckpt_elsewhere else out, *extra, "checkpoint.resume_from_checkpoint=true")
        locked = ckpt if ckpt_elsewhere else out
        holder = rf"{locked} is in use by another run \(pid {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(RunDirError, match=holder), claim(other, INFO):
            pass
    assert (out / LOCK_FILE).exists()
    with claim(cfg_for(out, *extra, "checkpoint.resume_from_checkpoint=true"), INFO):  # released with the first run
        pass
