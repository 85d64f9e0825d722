"""Bad configs fail at start, naming the key or the path; the shipped configs are complete and consistent."""

import dataclasses
import re
import shutil
import typing

import pytest
from conftest import torchrun
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from recipe.config import CONFIG_DIR, ConfigError, TrainConfig, check_values, token_budget, validate

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults")


def load(name="L0_sanity", *overrides, out="/tmp/esm-config-test"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=[f"output_dir={out}", *overrides])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["+model.depth=3"], r"unknown config key\(s\): model.depth"),  # `+` appends past OmegaConf: validate refuses it
        (["dataset.train_path=/nonexistent/x.fasta"], r"dataset.train_path=/nonexistent/x.fasta: no such file"),
        (["dataset.val_path=/nonexistent/v"], r"dataset.val_path=/nonexistent/v: no such file"),
        (
            ["dataset.micro_batch_size=64", "dataset.token_micro_batch_size=4096"],
            r"dataset.micro_batch_size=64 x dataset.max_seq_length=256 .* does not fit dataset.token_micro_batch_size=4096",
        ),
        (
            ["dataset.token_micro_batch_size=4100", "dataset.micro_batch_size=1"],
            r"multiple of dataset.pad_to_multiple_of=auto \(at least 16\)",
        ),
        (["num_train_steps=0"], r"num_train_steps=0 must be an integer >= 1"),
        (["precision=fp16"], r"precision='fp16' must be one of"),
        (["model.init_from=/nonexistent/model"], r"model.init_from=/nonexistent/model"),
        # ranges, each of which used to pass silently or end in a bare library exception
        (["max_grad_norm=-1"], r"max_grad_norm=-1.0 must be a number > 0 or null"),  # was gradient ascent
        (["optimizer.lr=-1e-4"], r"optimizer.lr=-0.0001 must be a number >= 0"),
        (["optimizer.weight_decay=-0.01"], r"optimizer.weight_decay=-0.01 must be a number >= 0"),
        (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas=\[0.9, 1.5\] must be a list of 2 items, each a number in \[0, 1\)"),
        (["optimizer.betas=[0.9]"], r"optimizer.betas=\[0.9\] must be a list of 2 items"),
        (["optimizer.no_decay=[bias,LayerNorm]"], r"optimizer.no_decay=\['bias', 'LayerNorm'\] must be a list, each item one of"),
        (["optimizer.fused=maybe"], r"optimizer.fused='maybe' must be true or false or one of \('auto', 'triton'\)"),
        (["dataset.cluster_sampling=2"], r"dataset.cluster_sampling=2 must be true or false or one of \('auto',\)"),
        (["peak_tflops_per_gpu=abc"], r"peak_tflops_per_gpu='abc' must be a number > 0 or one of \('auto',\) or null"),
        (["peak_tflops_per_gpu=0"], r"peak_tflops_per_gpu=0 must be a number > 0"),
        (["dataset.pad_to_multiple_of=0"], r"dataset.pad_to_multiple_of=0 must be an integer >= 1"),
        (["dataset.prefetch_factor=0"], r"dataset.prefetch_factor=0 must be an integer >= 1"),
        (["dataset.mask_prob=1.0"], r"dataset.mask_prob=1.0 must be a number in \(0, 1\)"),
        (["dataset.max_seq_length=2"], r"dataset.max_seq_length=2 must be an integer >= 3"),
        (["validation.max_batches=0"], r"validation.max_batches=0 must be an integer >= 1 or null"),
        (["model.backend=jax"], r"model.backend='jax' must be one of \('auto', 'torch', 'te', 'hf'\)"),
        # the validation split read as training data
        (["dataset.train_path=${dataset.val_path}"], r"dataset.train_path=\S+/validation is the same path as dataset.val_path"),
        (
            ["dataset.train_path=${dataset.val_path}/.."],
            r"dataset.train_path=\S+ contains dataset.val_path=\S+: training and validation data would overlap",
        ),
        (["dataset.val_path=${dataset.train_path}/.."], r"dataset.train_path=\S+ lies inside dataset.val_path"),
        (["checkpoint.max_checkpoints=-1"], r"checkpoint.max_checkpoints=-1 must be an integer >= 0 or null"),
        (["checkpoint.save_every_n_steps=-1"], r"checkpoint.save_every_n_steps=-1 must be an integer >= 0 or null"),
        (["validation.every_n_steps=-5"], r"validation.every_n_steps=-5 must be an integer >= 0 or null"),
    ],
)
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(load("L0_sanity", *overrides))


def composition_error(exc: BaseException) -> str:
    """Hydra's message and the OmegaConf error under it (a command-line override's key is named in the latter)."""
    return f"{exc}\n{exc.__cause__}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=abc", "seed"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("optimizer.betas=0.9", "optimizer.betas"),
        ("dataset.streaming=maybe", "dataset.streaming"),
        ("checkpoint.max_checkpoints=2.5", "checkpoint.max_checkpoints"),
        ("checkpoint.resume_from_checkpoint=maybe", "checkpoint.resume_from_checkpoint"),
        ("tensorboard.enabled=maybe", "tensorboard.enabled"),
        ("fp8_layers=3", "fp8_layers"),
        ("dataset.train_path=null", "dataset.train_path"),  # not Optional: a training run needs data
    ],
)
def test_wrong_type_on_the_command_line_names_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as caught:
        load("L0_sanity", override)
    assert f"full_key: {key}" in composition_error(caught.value)


@pytest.mark.parametrize(
    "override, key", [("model.depth=3", "model.depth"), ("wandb.team=x", "wandb.team"), ("batch=4", "batch")]
)
def test_unknown_key_on_the_command_line_names_the_key(override, key):
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        load("L0_sanity", override)


@pytest.mark.parametrize(
    "body, key, problem",
    [
        ("seed: abc\n", "seed", "could not be converted to Integer"),
        ("dataset:\n  num_workers: many\n", "dataset.num_workers", "could not be converted to Integer"),
        ("optimizer:\n  betas: 0.9\n", "optimizer.betas", "is not a ListConfig"),
        ("model:\n  depth: 3\n", "model.depth", "Key 'depth' not in 'ModelConfig'"),
        ("batch_size: 4\n", "batch_size", "Key 'batch_size' not in 'TrainConfig'"),
        ("fp8_config:\n  recipe_kwargs: {}\n", "fp8_config.recipe_kwargs", "not in 'FP8Config'"),
    ],
)
def test_bad_key_or_type_in_a_config_file_names_the_key(tmp_path, body, key, problem):
    """A user's own config file (beside the shipped ones) is merged into the same typed schema."""
    shutil.copytree(CONFIG_DIR, tmp_path / "conf")
    (tmp_path / "conf" / "mine.yaml").write_text("defaults:\n  - L0_sanity\n  - _self_\n" + body)
    with (
        initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as caught,
    ):
        compose("mine", overrides=[f"output_dir={tmp_path}"])
    message = composition_error(caught.value)
    assert "In 'mine'" in message and f"full_key: {key}" in message and problem in message, message


def test_a_config_file_outside_the_schema_is_refused(tmp_path):
    """A file that does not start from `defaults` (or `schema`) would escape the types: refused, saying how to fix it."""
    (tmp_path / "standalone.yaml").write_text("seed: 1\nnum_train_steps: 5\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("standalone")
    with pytest.raises(ConfigError, match=r"not built on the typed schema .* list `defaults`"):
        validate(cfg)


def test_free_form_recipe_kwargs_take_any_key():
    cfg = load("L0_sanity", "+fp8_config.fp8_recipe_kwargs.amax_history_len=16", "+fp4_config.fp4_recipe_kwargs.x.y=1")
    validate(cfg)
    assert cfg.fp8_config.fp8_recipe_kwargs == {"amax_history_len": 16}


def ranged_fields():
    """(dotted key, lowest value out of range) of every schema field whose rule has an interval."""

    def walk(schema, prefix=""):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            elif "rule" in f.metadata and f.metadata["rule"].interval is not None:
                yield prefix + f.name, f.metadata["rule"].interval

    return list(walk(TrainConfig))


@pytest.mark.parametrize("key, interval", ranged_fields())
def test_out_of_range_names_the_key_and_the_range(key, interval):
    """Just outside each interval's lower end: the error names the key and the interval."""
    lo, hi = interval[1:-1].split(", ")
    name, schema = key.split(".")[-1], section_of(key)
    value = float(lo) - 1 if interval[0] == "[" else float(lo)
    if typing.get_type_hints(schema)[name] in (int, int | None):
        value = int(value)
    is_list = next(f for f in dataclasses.fields(schema) if f.name == name).metadata["rule"].length is not None
    override = f"{key}=[{value},{value}]" if is_list else f"{key}={value}"
    bound = f"{'>=' if interval[0] == '[' else '>'} {lo}" if hi == "inf" else interval
    with pytest.raises(ConfigError, match=re.escape(f"{key}=") + r".+ must be .*" + re.escape(bound)):
        validate(load("L0_sanity", override))


def section_of(key: str) -> type:
    schema = TrainConfig
    for part in key.split(".")[:-1]:
        schema = typing.get_type_hints(schema)[part]
    return schema


def test_every_checked_default_is_in_range():
    """The schema's own defaults pass its rules (a rule typo would otherwise fail every run)."""
    check_values(OmegaConf.structured(TrainConfig))


@pytest.mark.parametrize(
    "value",
    [
        "peak_tflops_per_gpu=989",
        "peak_tflops_per_gpu=null",
        "optimizer.lr=0",
        "max_grad_norm=null",
        "optimizer.fused=true",
        "dataset.num_workers=0",
        "dataset.token_micro_batch_size=null",
        "model.backend=hf",
        "tensorboard.enabled=true",
        "tensorboard.log_dir=/tmp/tb",
        "optimizer.fused=false",
        "dataset.cluster_sampling=true",
        "optimizer.no_decay=[]",
        "fp8_layers=[1,2]",
        "max_train_minutes=1",
    ],
)
def test_legitimate_values_pass(value):
    validate(load("L0_sanity", value))


def test_a_datasets_directory_may_hold_both_splits(tmp_path):
    """A DatasetDict directory keeps "train" and "validation" apart by name: the same path is not leakage."""
    import datasets

    split = datasets.Dataset.from_dict({"sequence": ["MKTAYIAK", "MLLAVLYC"]})
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(tmp_path / "hf"))
    validate(load("L0_sanity", f"dataset.train_path={tmp_path / 'hf'}", f"dataset.val_path={tmp_path / 'hf'}"))


def test_init_from_config_that_is_not_json_names_the_file(tmp_path):
    from recipe.model.convert import config_from_hf

    (tmp_path / "config.json").write_text("model_type: esm\n")
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: not a JSON file"):
        config_from_hf(tmp_path)


@pytest.mark.parametrize("value", ["null", "0", "2"])
def test_null_and_zero_cadences_and_retention_are_valid(value):
    keys = ("checkpoint.max_checkpoints", "checkpoint.save_every_n_steps", "validation.every_n_steps")
    validate(load("L0_sanity", *(f"{k}={value}" for k in keys)))


def test_unwritable_output_dir():
    with pytest.raises(ConfigError, match=r"output_dir=/proc/esm-out is not writable"):
        validate(load("L0_sanity", out="/proc/esm-out"))


def test_unknown_key_on_the_command_line_fails_at_start(tmp_path):
    r = torchrun("train_ddp.py", 1, "model.depth=3", f"output_dir={tmp_path}")
    assert r.returncode != 0 and "model.depth" in r.stderr


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name, tmp_path):
    cfg = load(name, out=str(tmp_path))
    validate(cfg)
    if name.startswith(("L1", "L2")):
        tokens_per_step = token_budget(cfg) * cfg.grad_acc_steps
        assert 1.9e6 <= tokens_per_step <= 2.2e6, "ESM-2 trained with ~2 M tokens per step"
        assert tuple(cfg.optimizer.betas) == (0.9, 0.98) and cfg.optimizer.eps == 1e-8 and cfg.optimizer.weight_decay == 0.01
        assert cfg.optimizer.lr == (1.6e-4 if name == "L2_15B" else 4e-4)
        assert (
            cfg.lr_scheduler.warmup_steps == 2000
            and cfg.lr_scheduler.decay_end_fraction == 0.9
            and cfg.lr_scheduler.min_lr_ratio == 0.1
        )


def test_lr_schedule_shape():
    from recipe.optim import lr_at

    peak, warm, total = 4e-4, 2000, 500_000
    assert lr_at(0, peak, warm, total) == pytest.approx(peak / warm)
    assert lr_at(warm - 1, peak, warm, total) == pytest.approx(peak)
    assert lr_at(int(0.9 * total), peak, warm, total) == pytest.approx(0.1 * peak)
    assert lr_at(total - 1, peak, warm, total) == pytest.approx(0.1 * peak)
    mid = (warm + int(0.9 * total)) // 2
    assert lr_at(mid, peak, warm, total) == pytest.approx(0.55 * peak, rel=1e-3)


def test_weight_decay_exclusions():
    from recipe.model import EsmConfig, build_model
    from recipe.optim import param_groups

    model = build_model(EsmConfig.from_size("tiny", backend="torch"))
    decay, plain = param_groups(model, 0.01, ["bias", "norm"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "layer_norm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"final_layer_norm.weight", "lm_head.bias", "layers.0.mlp.fc1_bias"}
    assert "layers.0.attention.layernorm_qkv.weight" in {names[id(p)] for p in decay["params"]}  # a matrix despite its name
    with pytest.raises(ValueError, match="optimizer.no_decay has unknown entries"):
        param_groups(model, 0.01, ["LayerNorm"])
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


@pytest.mark.parametrize("source", ["dataclass", "composed"])
def test_the_optimizer_takes_its_own_sections(source):
    """build_optimizer reads the optimizer and lr_scheduler sections (plain dataclasses or the composed config's
    typed nodes), not the whole config."""
    import torch

    from recipe.config import LRSchedulerConfig, OptimizerConfig
    from recipe.model import EsmConfig, build_model
    from recipe.optim import build_optimizer, lr_at

    if source == "dataclass":
        settings = OptimizerConfig(lr=1e-3, betas=[0.8, 0.9], no_decay=["bias"], fused=False)
        schedule = LRSchedulerConfig(warmup_steps=4)
    else:
        cfg = load(
            "L0_sanity",
            "optimizer.betas=[0.8,0.9]",
            "optimizer.no_decay=[bias]",
            "optimizer.fused=false",
            "lr_scheduler.warmup_steps=4",
        )
        settings, schedule = cfg.optimizer, cfg.lr_scheduler
    model = build_model(EsmConfig.from_size("tiny", backend="torch"))
    optimizer = build_optimizer(model, settings, schedule, 100, torch.device("cpu"))
    decay, plain = optimizer.param_groups
    assert decay["lr"] == plain["lr"] == pytest.approx(lr_at(0, settings.lr, 4, 100))
    assert decay["betas"] == (0.8, 0.9) and optimizer.defaults["fused"] is False
    names = {id(p): n for n, p in model.named_parameters()}
    assert "final_layer_norm.weight" in {names[id(p)] for p in decay["params"]}  # norm is not in no_decay here
    assert all(names[id(p)].endswith("bias") for p in plain["params"])


# ------------------------------------------------------------------ model.init_from keeps the checkpoint's own settings
@pytest.fixture
def own_settings_export(tmp_path):
    """A tiny model exported with settings unlike ESM-2's: no token dropout, LayerNorm eps 1e-6, tanh GELU."""
    from recipe.model import EsmConfig, build_model
    from recipe.model.convert import export_hf

    mcfg = EsmConfig.from_size("tiny", token_dropout=False, layer_norm_eps=1e-6, activation="gelu_tanh", backend="torch")
    return export_hf(build_model(mcfg).state_dict(), mcfg, tmp_path / "hf")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], dict(token_dropout=False, layer_norm_eps=1e-6, activation="gelu_tanh")),
        (
            ["model.token_dropout=true", "model.layer_norm_eps=1e-5"],
            dict(token_dropout=True, layer_norm_eps=1e-5, activation="gelu_tanh"),
        ),
        (["model.activation=gelu"], dict(token_dropout=False, layer_norm_eps=1e-6, activation="gelu")),
    ],
)
def test_init_from_keeps_the_checkpoint_settings_unless_overridden(own_settings_export, tmp_path, caplog, overrides, expected):
    from recipe.build import model_config

    with caplog.at_level("INFO", logger="recipe"):
        mcfg = model_config(load("L0_sanity", f"model.init_from={own_settings_export}", *overrides, out=str(tmp_path)))
    assert {k: getattr(mcfg, k) for k in expected} == expected
    replaced = [line for line in caplog.messages if "replaces" in line]
    assert len(replaced) == len(overrides)  # each explicit override is named in the log, nothing else
    for override in overrides:
        key = override.split("=")[0]
        assert any(line.startswith(key) and str(own_settings_export) in line for line in replaced), (key, replaced)


def test_init_from_names_the_model_it_loads(own_settings_export, tmp_path):
    """The shape comes from the checkpoint: model.size is named only when it agrees, shape keys are refused."""
    from recipe.build import model_config, model_name

    cfg = load("L0_sanity", f"model.init_from={own_settings_export}", out=str(tmp_path))
    assert model_name(cfg, model_config(cfg)) == f"ESM-2 tiny from {own_settings_export}"
    cfg = load("L0_sanity", f"model.init_from={own_settings_export}", "model.size=8M", out=str(tmp_path))
    expected = "ESM-2 tiny (model.size=8M ignored: the shape comes from model.init_from)"
    assert model_name(cfg, model_config(cfg)).startswith(expected)
    with pytest.raises(ConfigError, match="model.num_layers=3: model.init_from=.* fixes the shape"):
        model_config(load("L0_sanity", f"model.init_from={own_settings_export}", "model.num_layers=3", out=str(tmp_path)))


@pytest.mark.parametrize(
    "overrides, multiple, why",
    [
        ([], 16, "no FP8 block scaling"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=transformer_engine.common.recipe.DelayedScaling"], 16,
         "no FP8 block scaling"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=transformer_engine.common.recipe.Float8BlockScaling"], 128,
         "FP8 block scaling"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=Float8BlockScaling", "cp_size=2"], 16, "context parallelism"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=Float8BlockScaling", "dataset.token_micro_batch_size=4112",
          "dataset.micro_batch_size=1"], 16, "token budget 4112 is not a multiple of 128"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=Float8BlockScaling", "dataset.pad_to_multiple_of=64"], 64, "set"),
        (["fp8_config.enabled=true", "fp8_config.fp8_recipe=Float8BlockScaling", "dataset.layout=bshd"], 16, "bshd"),
    ],
)  # fmt: skip
def test_pad_multiple_auto_picks_128_for_fp8_block_scaling_only(overrides, multiple, why):
    """dataset.pad_to_multiple_of=auto: whole 128-token tiles where TE's FP8 block-scaling quantization needs them
    for its fast kernel (measured, docs/benchmarks.md lever 34), 16 elsewhere; an explicit value is kept."""
    from recipe.config import pad_multiple

    got, reason = pad_multiple(load("L0_sanity", *overrides))
    assert got == multiple and why in reason


def test_pad_multiple_auto_is_resolved_logged_and_saved(caplog, tmp_path):
    """The trainer resolves `auto` once, logs the pick and writes the number into the config it saves."""
    import logging

    import torch

    from recipe.build import resolved_model_config
    from recipe.parallel import DistInfo

    cfg = load("L0_sanity", "model.backend=torch", out=str(tmp_path))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="recipe"):
        resolved_model_config(cfg, info)
    assert cfg.dataset.pad_to_multiple_of == 16
    assert "dataset.pad_to_multiple_of=auto picked 16: no FP8 block scaling" in caplog.text


@pytest.mark.parametrize(
    "overrides, factor, why",
    [
        (["grad_acc_steps=16", "dataset.num_workers=1"], 32, "2 x grad_acc_steps=16 micro-batches over 1 worker"),
        (["grad_acc_steps=16", "dataset.num_workers=3"], 11, "over 3 worker"),
        (["grad_acc_steps=1", "dataset.num_workers=1"], 4, "2 x grad_acc_steps=1"),
        (["grad_acc_steps=16", "dataset.num_workers=0"], 32, "over 1 worker"),  # unused without workers
        (["grad_acc_steps=16", "dataset.prefetch_factor=2"], 2, "set"),
    ],
)
def test_prefetch_factor_auto_covers_two_steps_of_micro_batches(overrides, factor, why):
    """dataset.prefetch_factor=auto: a step takes all its micro-batches before its first forward, so the workers
    keep two steps' worth in flight (at least 4 each); with torch's fixed 4 per worker, a 16-micro-batch step
    waited on the workers for 12 of them (docs/benchmarks.md, lever 47). An explicit value is kept."""
    from recipe.config import prefetch_factor

    got, reason = prefetch_factor(load("L0_sanity", *overrides))
    assert got == factor and why in reason


@pytest.mark.parametrize(
    "kernel, backend, size, device, expected, cp_size",
    [
        ("auto", "torch", "8M", "cuda", "triton", 1),  # head dim 16
        ("auto", "torch", "150M", "cuda", "triton", 1),  # 32
        ("auto", "torch", "35M", "cuda", "triton", 1),  # 24: faster once its loads were 16 bytes wide (lever 52)
        ("auto", "torch", "15B", "cuda", "flash", 1),  # 128: not measured
        ("auto", "torch", "8M", "cpu", "flash", 1),
        ("auto", "te", "8M", "cuda", "te", 1),  # head dim 16: TE's attention
        ("auto", "te", "650M", "cuda", "triton", 1),  # 64: faster than TE's cuDNN (lever 58)
        ("auto", "te", "3B", "cuda", "triton", 1),
        ("auto", "te", "15B", "cuda", "te", 1),  # 128: not measured
        ("auto", "te", "650M", "cuda", "te", 2),  # context parallelism: TE's attention
        ("auto", "te", "650M", "cpu", "te", 1),
        ("flash", "torch", "8M", "cuda", "flash", 1),
        ("te", "te", "650M", "cuda", "te", 1),
        ("triton", "torch", "35M", "cuda", "triton", 1),
        ("triton", "te", "8M", "cuda", "triton", 1),
        ("triton", "te", "650M", "cuda", "model.attention_kernel=triton needs cp_size 1", 2),
        ("triton", "hf", "8M", "cuda", "model.attention_kernel=triton: the hf backend", 1),
        ("te", "hf", "8M", "cuda", "model.attention_kernel=te: the hf backend", 1),
        ("flash", "hf", "8M", "cuda", "flash", 1),  # what auto resolves to with hf (a saved config.yaml holds it)
        ("auto", "hf", "8M", "cuda", "flash", 1),
        ("triton", "torch", "8M", "cpu", "model.attention_kernel=triton needs a CUDA GPU", 1),
        ("flash", "te", "650M", "cuda", "te", 1),  # what auto resolved to with te before lever 58: TE's, logged
        ("te", "torch", "8M", "cuda", "model.attention_kernel=te is TE's attention, which the torch backend", 1),
        ("te", "torch", "8M", "cpu", "model.attention_kernel=te is TE's attention, which the torch backend", 1),
    ],
)
def test_attention_kernel_auto_picks_triton_where_it_was_faster(kernel, backend, size, device, expected, cp_size):
    """model.attention_kernel=auto: our Triton attention on CUDA where it was measured faster than the backend's own
    (torch: FA2 at head dims 16, 24, 32 and 64, levers 50 and 52; te: TE's cuDNN at 64 without context parallelism,
    lever 58), the backend's own elsewhere; an explicit kernel where it cannot run is a ConfigError, not a silent swap
    (needs Triton: the dev extra has it)."""
    import torch

    from recipe.build import resolve_attention_kernel
    from recipe.model import EsmConfig

    pytest.importorskip("triton")
    mcfg = dataclasses.replace(EsmConfig.from_size(size), backend=backend)
    if expected.startswith("model."):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            resolve_attention_kernel(kernel, mcfg, torch.device(device), cp_size)
    else:
        assert resolve_attention_kernel(kernel, mcfg, torch.device(device), cp_size) == expected


@pytest.mark.parametrize(
    "kernel, backend, device, layout, said",
    [
        ("auto", "torch", "cpu", "thd", "on the CPU PyTorch's SDPA runs"),
        ("flash", "hf", "cuda", "bshd", "the hf backend runs transformers' attention"),
        ("auto", "torch", "cuda", "bshd", "padded batches (bshd) run SDPA"),
    ],
)
def test_attention_kernel_without_effect_is_said(caplog, kernel, backend, device, layout, said):
    """Where model.attention_kernel changes nothing (the CPU, the hf backend), the log says so: the saved config's
    value alone would not tell a reader that no kernel of that name ran."""
    import torch

    from recipe.build import resolve_attention_kernel
    from recipe.model import EsmConfig

    mcfg = dataclasses.replace(EsmConfig.from_size("8M"), backend=backend)
    with caplog.at_level("INFO", logger="recipe"):
        picked = resolve_attention_kernel(kernel, mcfg, torch.device(device), layout=layout)
    assert f"model.attention_kernel={kernel} has no effect here: {said}" in caplog.text
    assert picked == "flash" and "picked triton" not in caplog.text
