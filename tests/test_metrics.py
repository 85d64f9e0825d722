"""metrics.jsonl and the optional wandb mirror (offline: never touches the network)."""

import json

from omegaconf import OmegaConf

from recipe.metrics import MetricsWriter

CFG = OmegaConf.create({"wandb": {"enabled": False, "mode": "offline", "project": "esm2-test", "name": None}})


def test_jsonl_fresh_and_resumed(tmp_path):
    w = MetricsWriter(tmp_path, CFG, True, None)
    for step in (1, 2, 3):
        w.log({"step": step, "loss": 1.0 / step})
    w.close()
    w = MetricsWriter(tmp_path, CFG, True, resume_step=2)  # resumed from a step-2 checkpoint: step 3 is redone
    w.log({"step": 3, "loss": 0.25})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    MetricsWriter(tmp_path, CFG, True, None).close()  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = OmegaConf.merge(CFG, {"wandb": {"enabled": True}})
    w = MetricsWriter(tmp_path, cfg, True, None)
    w.log({"step": 1, "loss": 2.0, "mfu": None})
    w.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))

