"""Megatron-FSDP (train_mfsdp.py) on CPU. It needs CUDA (its buffers and streams are CUDA's), so here: every refusal,
the command line's refusal on the CPU, and the pieces our strategy adds around it that run without a GPU (the
optimizer wrapping leaves AdamW fresh, sharded-gradient clipping equals torch's). Training, exact resume and export
run on the GPU: tests/test_gpu.py and tests/test_gpu_multi.py."""

import copy
import importlib.util
import sys

import pytest
import torch
from conftest import TINY, run_cmd
from hydra import compose, initialize_config_dir

from recipe.config import CONFIG_DIR, ConfigError
from recipe.model import EsmConfig, build_model
from recipe.optim import build_optimizer
from recipe.parallel import STRATEGIES, DistInfo, MegatronFSDPStrategy

CUDA = DistInfo(0, 2, 0, torch.device("cuda"))  # check() makes no CUDA call: a pretended device reaches every refusal


def config(tmp_path, *overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("L0_sanity", overrides=[f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    "info, backend, overrides, match",
    [
        (DistInfo(0, 1, 0, torch.device("cpu")), "torch", [], "device=cpu: Megatron-FSDP needs CUDA GPUs"),
        (CUDA, "te", ["cp_size=2"], "cp_size=2: context parallelism runs with train_cp.py"),
        (CUDA, "hf", [], "model.backend=hf"),
        (CUDA, "te", ["quantized_model_init=true"], "quantized_model_init=true"),
        (CUDA, "te", ["fsdp.fp32_master_weights=false"], "fsdp.fp32_master_weights=false"),
        (CUDA, "te", ["fsdp.reduce_every_micro_batch=false"], "fsdp.reduce_every_micro_batch=false"),
        (CUDA, "torch", ["use_torch_compile=true"], "use_torch_compile=true"),
        (CUDA, "te", ["checkpoint.async_save=true"], "checkpoint.async_save=true"),
    ],
)
def test_refusals_name_the_key(tmp_path, info, backend, overrides, match):
    with pytest.raises(ConfigError, match=f"train_mfsdp.py cannot run with {match}"):
        MegatronFSDPStrategy(info, torch.bfloat16).check(config(tmp_path, *overrides), backend)


@pytest.mark.parametrize("backend", ["te", "torch"])
def test_supported_settings_pass(tmp_path, backend):
    MegatronFSDPStrategy(CUDA, torch.bfloat16).check(config(tmp_path, "fp8_config.enabled=true", "grad_acc_steps=4"), backend)


def test_refused_without_the_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "megatron_fsdp" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install -e '.\[mfsdp\]'"):
        MegatronFSDPStrategy(CUDA, torch.bfloat16).check(config(tmp_path), "te")


def test_command_line_refuses_on_cpu(tmp_path):
    r = run_cmd([sys.executable, "train_mfsdp.py", *TINY, "num_train_steps=2", f"output_dir={tmp_path}"], timeout=180)
    assert r.returncode != 0
    assert "train_mfsdp.py cannot run with device=cpu: Megatron-FSDP needs CUDA GPUs" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert STRATEGIES["mfsdp"] is MegatronFSDPStrategy


class FakeMegatronFSDP:
    """What fully_shard_optimizer calls on the model its parameters belong to."""

    model_auto_sync = True

    def finish_grad_sync(self):
        pass

    def install_optimized_model_weights(self):
        pass

    def zero_grad_buffer(self):
        pass


@pytest.mark.skipif(importlib.util.find_spec("megatron_fsdp") is None, reason="megatron-fsdp not installed")
def test_wrapped_optimizer_steps_like_a_fresh_adamw(tmp_path):
    """fully_shard_optimizer takes one step with zero gradients to create AdamW's state; weight decay at the real
    learning rate would shrink the weights, and the step count would change the first update's bias correction."""
    cfg = config(tmp_path, "optimizer.weight_decay=0.1", "optimizer.fused=false")
    ours, reference = (build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0) for _ in range(2))
    for p in ours.parameters():
        p._megatron_fsdp_model = FakeMegatronFSDP()
    sections = (cfg.optimizer, cfg.lr_scheduler, cfg.num_train_steps, torch.device("cpu"))
    wrapped = MegatronFSDPStrategy(CUDA, torch.float32).wrap_optimizer(ours, build_optimizer(ours, *sections))
    fresh = build_optimizer(reference, *sections)
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b), "wrapping the optimizer changed the weights"
    ids = torch.randint(4, 24, (40,))
    batch = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 15, 40], dtype=torch.int32), "max_seqlen": 25, "labels": ids}
    for model, opt in ((ours, wrapped), (reference, fresh)):
        model(**batch).loss.backward()
        opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), reference.parameters()))
    assert worst == 0.0, f"first step after wrapping differs from a fresh AdamW's by up to {worst:.3g}"


@pytest.mark.parametrize("max_norm", [None, 1e-3, 1e6])
def test_sharded_clipping_equals_torch_clipping(max_norm):
    """One process, plain tensors: the sum of local squared norms is the whole norm, and the scale is torch's."""
    torch.manual_seed(0)
    model = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    twin = copy.deepcopy(model)
    ids = torch.randint(4, 24, (40,))
    for m in (model, twin):
        m(ids, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32), max_seqlen=40, labels=ids).loss.backward()
    norm = MegatronFSDPStrategy(DistInfo(0, 1, 0, torch.device("cpu")), torch.float32).clip_grad_norm(model, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm if max_norm else float("inf"))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_checkpoint_keys_drop_the_wrapper_prefix():
    """Megatron-FSDP's state dict says module.<name>; checkpoints use the plain names DDP and FSDP2 write, which
    recipe.evaluate loads into an unwrapped model."""
    inner = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    wrapper = torch.nn.Module()
    wrapper.module = inner
    opt = torch.optim.AdamW(inner.parameters())
    model_sd, optim_sd = MegatronFSDPStrategy(CUDA, torch.float32).get_state_dict(wrapper, opt)
    assert set(model_sd) == set(inner.state_dict()) and "param_groups" in optim_sd


@pytest.mark.parametrize("written_by, resumed_by", [("fsdp2", "mfsdp"), ("ddp", "mfsdp"), ("mfsdp", "fsdp2"), ("mfsdp", "ddp")])
def test_checkpoints_do_not_cross_to_or_from_megatron_fsdp(tmp_path, written_by, resumed_by):
    """Megatron-FSDP's optimizer state is keyed by parameter index, DDP's and FSDP2's by name: refused at resume,
    before anything is read into the model."""
    from recipe.checkpoint import Checkpointer

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(tmp_path, info).save(1, model, optimizer, {"step": 1, "strategy": written_by}, {})
    loader = Checkpointer(tmp_path, info, strategy=STRATEGIES[resumed_by](info, torch.float32))
    with pytest.raises(RuntimeError, match=f"written by strategy {written_by} and this run uses {resumed_by}"):
        loader.load(loader.latest_verified(), model, optimizer, {"step": 1})


def test_ddp_and_fsdp2_checkpoints_still_cross(tmp_path):
    from recipe.checkpoint import Checkpointer

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(tmp_path, info).save(1, model, optimizer, {"step": 1, "strategy": "ddp"}, {})
    loader = Checkpointer(tmp_path, info, strategy=STRATEGIES["fsdp2"](info, torch.float32))
    meta, _ = loader.load(loader.latest_verified(), model, optimizer, {"step": 1})
    assert meta["strategy"] == "ddp"
