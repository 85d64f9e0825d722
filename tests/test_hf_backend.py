"""model.backend=hf: transformers' EsmForMaskedLM trained in our loop. The adapter against our torch backend
(same initial weights, same outputs), its refusals, and end-to-end runs (train, resume, FSDP2, export, evaluate)."""

import json

import pytest
import torch
from conftest import BUNDLED_VAL, TINY, losses, read_metrics, torchrun
from omegaconf import OmegaConf

from recipe.config import TrainConfig
from recipe.data.dataset import BatchSettings, MLMBatches
from recipe.data.sources import load_sequences
from recipe.model import EsmConfig, build_model, init_weights
from recipe.model.hf import HFBackendError, HFEsmForMaskedLM, prepare_config

CONFIG = EsmConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)


def padded_batch(layout="bshd"):
    settings = BatchSettings(max_seq_length=96, layout=layout, micro_batch_size=6, token_micro_batch_size=576, seed=1)
    return next(iter(MLMBatches(load_sequences(BUNDLED_VAL), settings, train=False)))


def forward(model, batch):
    keys = ("input_ids", "attention_mask", "labels", "cu_seqlens", "max_seqlen")
    return model(**{k: batch[k] for k in keys if k in batch})


@pytest.mark.parametrize("meta", [False, True], ids=["direct", "meta-then-init"])
def test_starts_from_the_torch_backends_weights_and_computes_the_same(meta):
    """Same seed -> the same initial weights in transformers' names (also when built on the meta device and
    initialised in place, as FSDP2 does), and the same loss, counts and gradients as our torch backend."""
    ours = build_model(EsmConfig(**{**CONFIG.__dict__, "backend": "torch"}), seed=3)
    if meta:
        hf = build_model(EsmConfig(**{**CONFIG.__dict__, "backend": "hf"}), device="meta")
        hf.to_empty(device="cpu")
        init_weights(hf, 3)
    else:
        hf = build_model(EsmConfig(**{**CONFIG.__dict__, "backend": "hf"}), seed=3)
    assert isinstance(hf, HFEsmForMaskedLM) and len(hf.layers) == 2 and hf.hf.config._attn_implementation == "sdpa"
    batch = padded_batch()
    a, b = forward(ours, batch), forward(hf, batch)
    assert int(a.num_tokens) == int(b.num_tokens) > 0 and int(a.num_correct) == int(b.num_correct)
    torch.testing.assert_close(b.loss_sum, a.loss_sum, rtol=1e-5, atol=1e-5)
    a.loss_sum.backward()
    b.loss_sum.backward()
    torch.testing.assert_close(
        hf.hf.esm.embeddings.word_embeddings.weight.grad, ours.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_state_dict_names_every_tensor_once():
    hf = build_model(EsmConfig(**{**CONFIG.__dict__, "backend": "hf"}), seed=0)
    keys = list(hf.state_dict())
    assert all(k.startswith("hf.") for k in keys) and not any(k.startswith("layers.") or "contact_head" in k for k in keys)


def test_packed_batches_are_refused():
    hf = build_model(EsmConfig(**{**CONFIG.__dict__, "backend": "hf"}), seed=0)
    with pytest.raises(HFBackendError, match="dataset.layout=bshd"):
        forward(hf, padded_batch("thd"))


def config(**overrides):
    cfg = OmegaConf.structured(TrainConfig)  # the schema's defaults
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("fp8_config.enabled", True, "FP8/FP4"),
        ("cp_size", 2, "context parallelism"),
        ("use_torch_compile", True, "use_torch_compile"),
        ("model.activation", "gelu_tanh", "gelu_tanh"),
    ],
)
def test_refuses_what_it_cannot_do(key, value, expected):
    with pytest.raises(HFBackendError, match=expected):
        prepare_config(config(**{key: value}))


def test_switches_packed_layout_to_padded_and_says_so(caplog):
    cfg = config()
    with caplog.at_level("WARNING"):
        prepare_config(cfg)
    assert cfg.dataset.layout == "bshd" and "dataset.layout thd -> bshd" in caplog.text


# ---------------------------------------------------------------------------------------------- end to end
def check(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


RUN = [*TINY, "num_train_steps=6", "checkpoint.save_every_n_steps=3"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "run"
    r = check(
        torchrun(
            "train_ddp.py",
            1,
            *RUN,
            "model.backend=hf",
            "checkpoint.save_final_model=true",
            "tensorboard.enabled=true",
            f"output_dir={out}",
        )
    )
    assert "dataset.layout thd -> bshd" in r.stderr and "backend hf" in r.stderr
    return out


@pytest.mark.slow
def test_trains_like_the_torch_backend_and_exports_a_model_transformers_loads(hf_run, tmp_path):
    """L0_sanity (tiny overrides): loss falls, step by step equal to the torch backend on the same padded batches
    (the same initial weights: only the implementation differs); final_model loads in transformers."""
    torch_run = tmp_path / "torch"
    check(torchrun("train_ddp.py", 1, *RUN, "model.backend=torch", "dataset.layout=bshd", f"output_dir={torch_run}"))
    hf, ours = losses(hf_run), losses(torch_run)
    assert sorted(hf) == list(range(1, 7)) and hf[6] < hf[1] - 0.2
    for step in hf:
        assert hf[step] == pytest.approx(ours[step], rel=1e-4), step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(hf_run / "final_model", output_loading_info=True)
    assert type(model).__name__ == "EsmForMaskedLM" and not info["missing_keys"] and not info["unexpected_keys"]
    events = EventAccumulator(str(hf_run / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == sorted(hf.items())
    assert [e.step for e in events.Scalars("val_loss")] == [6]


@pytest.mark.slow
def test_checkpoint_and_export_evaluate_the_same(hf_run, capsys):
    """The step-6 checkpoint (transformers' names, loaded into the adapter) and the export (loaded into our torch
    backend) give the same evaluation; the run's directory stands for its newest checkpoint."""
    from recipe import evaluate

    results = []
    for model in (hf_run / "checkpoints" / "step_6", hf_run / "final_model", hf_run):
        assert (
            evaluate.main([str(model), str(BUNDLED_VAL), "--limit", "16", "--max-length", "128", "--json", "--no-progress"]) == 0
        )
        results.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert [r["backend"] for r in results] == ["hf", "torch", "hf"]
    assert results[0]["tokens"] == results[1]["tokens"] and results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert "step_6 (checkpoint, step 6)" in results[2]["model"] and results[2]["loss"] == results[0]["loss"]


@pytest.mark.slow
def test_resume_is_exact(hf_run, tmp_path):
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(hf_run / "checkpoints" / "step_3", run / "checkpoints" / "step_3")
    check(torchrun("train_ddp.py", 1, *RUN, "model.backend=hf", "checkpoint.resume_from_checkpoint=true", f"output_dir={run}"))
    assert losses(run) == {s: v for s, v in losses(hf_run).items() if s > 3}


@pytest.mark.slow
def test_fsdp2_matches_ddp(tmp_path):
    """FSDP2 shards the adapter's encoder layers; 2 gloo processes give DDP's losses."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        runs[strategy] = tmp_path / strategy
        check(
            torchrun(
                f"train_{strategy}.py",
                2,
                *TINY,
                "num_train_steps=3",
                "model.backend=hf",
                "dataset.num_workers=0",
                f"output_dir={runs[strategy]}",
            )
        )
    ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp2"])
    assert sorted(ddp) == [1, 2, 3]
    assert all(fsdp[s] == pytest.approx(ddp[s], rel=1e-5) for s in ddp), (ddp, fsdp)
    assert read_metrics(runs["fsdp2"])[1]
