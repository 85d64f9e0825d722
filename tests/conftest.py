import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUNDLED_TRAIN = ROOT / "data" / "uniprot_sample" / "train"
BUNDLED_VAL = ROOT / "data" / "uniprot_sample" / "validation"
SHARED_DATA = ROOT.parent / "shared" / "data"
# Overrides that make any training run a few-second CPU job (tiny model, short sequences, per-step metrics).
TINY = [
    "model.size=tiny",
    "dataset.max_seq_length=128",
    "dataset.micro_batch_size=4",
    "validation.max_batches=2",
    "validation.every_n_steps=0",
    "log_every_n_steps=1",
    "checkpoint.save_final_model=false",
    "lr_scheduler.warmup_steps=2",
]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def hf_config(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, token_dropout=True):
    """A facebook/esm2-like transformers config (rotary, eps 1e-5, no dropout)."""
    from transformers import EsmConfig

    return EsmConfig(
        vocab_size=33,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        position_embedding_type="rotary",
        token_dropout=token_dropout,
        mask_token_id=32,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
    )


def run_cmd(args, timeout=300, env=None, cwd=ROOT):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(script, nproc, *overrides, timeout=300):
    args = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        if nproc > 1
        else [sys.executable, script]
    )
    return run_cmd(args + list(overrides), timeout=timeout)


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """A run's metrics.jsonl as (training records, validation records); both empty if it wrote none."""
    path = Path(out_dir) / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [x for x in records if "loss" in x], [x for x in records if "val_loss" in x]


def losses(out_dir: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_metrics(out_dir)[0]}


def compare_curves(a: dict[int, float], b: dict[int, float], names=("a", "b")) -> tuple[float, str]:
    """The largest relative per-step loss difference of two runs' curves, and a line that shows both around it (for
    failure messages). The two must have logged the same steps."""
    assert sorted(a) == sorted(b), f"{names[0]} logged steps {sorted(a)}, {names[1]} logged {sorted(b)}"
    gaps = {s: abs(a[s] - b[s]) / abs(b[s]) for s in a}
    worst = max(gaps, key=gaps.get)
    shown = ", ".join(f"{s}: {a[s]:.5f} vs {b[s]:.5f}" for s in sorted(a) if abs(s - worst) <= 2 or s in (min(a), max(a)))
    return gaps[worst], f"worst at step {worst} ({gaps[worst]:.2e}); {names[0]} vs {names[1]} losses {shown}"


def te_available() -> bool:
    """TransformerEngine imports and the GPU is Hopper or newer (what model.backend=te needs)."""
    from recipe.model import te_status

    return te_status()[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def interpreted(monkeypatch):
    """Our Triton kernels through Triton's interpreter (CPU tensors): each kernel module is loaded again under it,
    and again after the test, so that no kernel defined for one mode runs in the other."""
    from recipe import optim
    from recipe.model import fused_kernels, rope_kernel

    caches = (rope_kernel._kernels, fused_kernels._gelu_kernel, fused_kernels._layer_norm_kernels, optim._adamw_kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine)")
    config.addinivalue_line("markers", "slow: multi-process or end-to-end training runs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
