"""metrics.jsonl and the optional wandb and TensorBoard mirrors (offline: never touch the network)."""

import json

import pytest
from omegaconf import OmegaConf

from recipe.config import TensorBoardConfig, WandbConfig
from recipe.metrics import MetricsWriter


def test_jsonl_fresh_and_resumed(tmp_path):
    w = MetricsWriter(tmp_path, True, None)
    for step in (1, 2, 3):
        w.log({"step": step, "loss": 1.0 / step})
    w.close()
    w = MetricsWriter(tmp_path, True, resume_step=2)  # resumed from a step-2 checkpoint: step 3 is redone
    w.log({"step": 3, "loss": 0.25})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    MetricsWriter(tmp_path, True, None).close()  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    w = MetricsWriter(tmp_path, True, None, wandb=WandbConfig(enabled=True, project="esm2-test"), run_config={"seed": 1})
    w.log({"step": 1, "loss": 2.0, "mfu": None})
    w.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def write_log(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)


def test_a_torn_last_line_is_dropped_on_resume(tmp_path, caplog):
    """Killed mid-write: the last line is half a record. Resume drops it (with a warning) instead of failing."""
    write_log(tmp_path, '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    w = MetricsWriter(tmp_path, True, resume_step=2)
    w.log({"step": 3, "loss": 1.25})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 1.25
    assert "torn last line 3" in caplog.text


def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    write_log(tmp_path, '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics record"):
        MetricsWriter(tmp_path, True, resume_step=3)


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under log_dir, as tag -> [(step, value)], read back by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# The writer takes its own sections: a plain dataclass, or the typed node of a composed config (what the trainer passes).
@pytest.mark.parametrize(
    "section", [TensorBoardConfig(enabled=True), OmegaConf.structured(TensorBoardConfig(enabled=True))], ids=["dataclass", "node"]
)
def test_tensorboard_holds_the_logged_scalars(tmp_path, section):
    w = MetricsWriter(tmp_path, True, None, tensorboard=section)
    for step in (1, 2, 3):
        w.log({"step": step, "loss": 1.0 / step, "lr": 0.1 * step, "mfu": None})
    w.log({"step": 3, "val_loss": 0.5, "val_tokens": 7})
    w.close()
    w = MetricsWriter(tmp_path, True, resume_step=2, tensorboard=section)  # resumed at step 2: the step-3 events are redone
    w.log({"step": 3, "loss": 0.25, "lr": 0.3})
    w.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "lr", "val_loss", "val_tokens"}  # None values are not written
    assert scalars["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]  # the interrupted run's step 3 is purged
    assert scalars["lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert scalars["val_loss"] == scalars["val_tokens"] == []  # past the checkpoint, as in metrics.jsonl
