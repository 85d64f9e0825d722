"""Quantization statistics on CPU: which layers the shipped YAML tracks for a precision plan, the JSON lines they are
read from, and every refusal (the statistics themselves need TE on a GPU: tests/test_gpu.py)."""

import dataclasses
import importlib.util
import json
import re
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from recipe.build import model_config, precision_plan
from recipe.config import CONFIG_DIR, ConfigError, shipped_configs
from recipe.parallel import DistInfo
from recipe.quant_stats import DEFAULT_FILE, layer_regex, load_template, read_stats, resolve, tracked_layers, with_frequency
from recipe.quantization import resolve as resolve_plan

FP8 = {"enabled": True, "fp8_recipe": "Float8CurrentScaling"}
FP4 = {"enabled": True, "fp4_recipe": "NVFP4BlockScaling"}
OFF8, OFF4 = {"enabled": False, "fp8_recipe": "DelayedScaling"}, {"enabled": False, "fp4_recipe": "NVFP4BlockScaling"}
GEMMS = ("attention.layernorm_qkv", "attention.proj", "mlp.fc1", "mlp.fc2")  # the names TE's debug API logs under


def module_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{gemm}" for i in range(num_layers) for gemm in GEMMS]


def matched_layers(pattern: str, num_layers: int) -> list[int]:
    """1-indexed config layers whose four GEMMs `pattern` selects (all four or none, else the test fails)."""
    hits = {name for name in module_names(num_layers) if re.search(pattern, name)}
    layers = sorted({int(name.split(".")[2]) + 1 for name in hits})
    assert hits == {f"model.layers.{i - 1}.{gemm}" for i in layers for gemm in GEMMS}, f"{pattern} splits a layer: {sorted(hits)}"
    return layers


@pytest.mark.parametrize(
    "fp8, fp8_layers, fp4, fp4_layers, want_fp8, want_fp4",
    [
        (FP8, None, OFF4, None, list(range(1, 13)), None),  # every layer FP8
        (FP8, [3, 4, 5], OFF4, None, [3, 4, 5], None),  # FP8 only in layers 3-5: only those
        (FP8, [1, 10, 12], OFF4, None, [1, 10, 12], None),  # layer 1 must not pull in 10-12 (model.layers.0 vs .9)
        (FP8, [2], OFF4, None, [2], None),  # model.layers.1 must not match model.layers.10 / .11
        (OFF8, None, FP4, [11, 12], None, [11, 12]),
        (FP8, [1, 2], FP4, None, [1, 2], list(range(3, 13))),  # FP4 takes the rest
        (FP8, [6], FP4, [7], [6], [7]),
    ],
)
def test_shipped_yaml_tracks_exactly_the_quantized_layers(fp8, fp8_layers, fp4, fp4_layers, want_fp8, want_fp4):
    plan = resolve_plan(12, fp8, fp8_layers, fp4, fp4_layers)
    resolved = resolve(yaml.safe_load(DEFAULT_FILE.read_text()), plan)
    for section, want in (("fp8_layer_stats", want_fp8), ("fp4_layer_stats", want_fp4)):
        pattern = resolved[section]["layers"]["layer_name_regex_pattern"]
        assert resolved[section]["enabled"] is (want is not None), section
        assert matched_layers(pattern, 12) == (want or []), section
    assert tracked_layers(plan) == {k: v for k, v in (("fp8", want_fp8), ("fp4", want_fp4)) if v}


def test_shipped_yaml_is_not_a_training_config_and_names_te_features():
    assert "layer_stats" not in [name for name, _ in shipped_configs()]  # `--help` lists hydra_config/*.yaml only
    raw = yaml.safe_load(DEFAULT_FILE.read_text())
    assert raw["fp8_layer_stats"]["transformer_engine"]["LogFp8TensorStats"]["enabled"] is True
    assert raw["fp4_layer_stats"]["transformer_engine"]["LogNvfp4TensorStats"]["enabled"] is True
    freqs = {
        entry["freq"]
        for section in raw.values()
        for feature in section["transformer_engine"].values()
        for entry in feature["tensors_struct"]
    }
    assert freqs == {10}
    assert {
        entry["freq"]
        for section in with_frequency(raw, 1).values()
        for feature in section["transformer_engine"].values()
        for entry in feature["tensors_struct"]
    } == {1}


def test_a_yaml_without_placeholders_is_used_as_written():
    own = {
        "mine": {"enabled": True, "layers": {"layer_types": ["fc2"]}, "transformer_engine": {"LogTensorStats": {"enabled": True}}}
    }
    assert resolve(own, resolve_plan(4, FP8, [2], OFF4, None)) == own


@pytest.mark.parametrize(
    "template, match",
    [
        ({"fp4_only": {"enabled": True, "layers": {"layer_name_regex_pattern": "{fp4_layers}"}}}, "tracks no layer of this run"),
        ({}, "not a YAML mapping"),
        ([1, 2], "not a YAML mapping"),
        ({"broken": {"enabled": True}}, "section 'broken' has no 'layers' mapping"),
    ],
)
def test_unusable_yaml_is_refused(template, match):
    with pytest.raises(ConfigError, match=match):
        resolve(template, resolve_plan(4, FP8, None, OFF4, None), "my.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fp8_layer_stats: [unclosed\n")
    with pytest.raises(ConfigError, match=f"quant_stats_config.quant_stats_file={bad}: not valid YAML"):
        load_template(bad)


@pytest.mark.parametrize(
    "layers, names", [([3], ["model.layers.2.mlp.fc1"]), ([1, 10], ["model.layers.0.attention.proj", "model.layers.9.mlp.fc2"])]
)
def test_layer_regex_is_zero_indexed_like_module_paths(layers, names):
    assert all(re.search(layer_regex(layers), n) for n in names)
    assert not re.search(layer_regex([1]), "model.layers.10.mlp.fc1")


def test_statistics_file_is_json_lines_by_step(tmp_path):
    path = tmp_path / "quant_stats.jsonl"
    path.write_text(
        json.dumps({"step": 10, "model.layers.1.mlp.fc1_activation_mse": 1.5e-9})
        + "\n"
        + json.dumps({"step": 20, "model.layers.1.mlp.fc1_activation_mse": 2e-9})
        + "\n"
    )
    assert read_stats(path) == {"model.layers.1.mlp.fc1_activation_mse": {10: 1.5e-9, 20: 2e-9}}


# ------------------------------------------------------------------ refusals, through the trainer's own checks
def trainer_config(tmp_path, *overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("L0_sanity", overrides=[f"output_dir={tmp_path}", "quant_stats_config.enabled=true", *overrides])


@pytest.mark.parametrize(
    "device, backend, overrides, match",
    [
        ("cpu", "torch", [], "quant_stats_config.enabled=true: this run is on cpu"),
        ("cpu", "te", ["fp8_config.enabled=true"], "quant_stats_config.enabled=true: this run is on cpu"),
        ("cuda", "torch", ["fp8_config.enabled=true"], "this run uses the torch backend"),
        ("cuda", "hf", [], "this run uses the hf backend"),
        ("cuda", "te", [], r"no layer is quantized \(layer precision: layers 1-4: bf16\)"),
        ("cuda", "te", ["fp8_config.enabled=true", "quantized_model_init=true"], "quantized_model_init=true keeps the weights"),
        (
            "cuda",
            "te",
            ["fp8_config.enabled=true", "quant_stats_config.quant_stats_file=/nonexistent/stats.yaml"],
            "quant_stats_config.quant_stats_file=/nonexistent/stats.yaml: no such file",
        ),
        (
            "cuda",
            "te",
            ["fp8_config.enabled=true", "quant_stats_config.log_to_wandb=true"],
            "log_to_wandb=true needs wandb.enabled=true",
        ),
    ],
)
def test_refused_before_anything_is_built(tmp_path, device, backend, overrides, match):
    """The trainer's precision_plan runs these checks first; no CUDA call happens before they refuse, so a
    pretended CUDA device is enough to reach each one on this CPU machine."""
    cfg = trainer_config(tmp_path, *overrides)
    mcfg = dataclasses.replace(model_config(cfg), backend=backend)
    with pytest.raises(ConfigError, match=match):
        precision_plan(cfg, mcfg, DistInfo(0, 1, 0, torch.device(device)), torch.bfloat16)


def test_refused_without_nvdlfw_inspect(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvdlfw_inspect" else real(name, *a))
    cfg = trainer_config(tmp_path, "fp8_config.enabled=true")
    mcfg = dataclasses.replace(model_config(cfg), backend="te")
    with pytest.raises(ConfigError, match=r"needs NVIDIA's nvdlfw-inspect: pip install -e '.\[quant-stats\]'"):
        precision_plan(cfg, mcfg, DistInfo(0, 1, 0, torch.device("cuda")), torch.bfloat16)


@pytest.mark.parametrize("key, value", [("enabled", "maybe"), ("quant_stats_file", "[a,b]"), ("log_to_wandb", "maybe")])
def test_wrong_types_name_the_key(tmp_path, key, value):
    """The typed schema (recipe/config.py) refuses them as the config is composed, naming the key."""
    with pytest.raises(ConfigCompositionException) as caught:
        trainer_config(tmp_path, f"quant_stats_config.{key}={value}")
    assert f"full_key: quant_stats_config.{key}" in str(caught.value.__cause__)


def test_disabled_statistics_refuse_nothing(tmp_path):
    cfg = trainer_config(tmp_path, "quant_stats_config.enabled=false")
    plan, _ = precision_plan(cfg, model_config(cfg), DistInfo(0, 1, 0, torch.device("cpu")), torch.float32)
    assert not plan.quantized


# ------------------------------------------------------------------ the debug API's life cycle, with TE's namespace faked
FAKE_FEATURES = """
from nvdlfw_inspect.base import BaseNamespaceAPI
from nvdlfw_inspect.registry import Registry


@Registry.register_namespace_api(namespace="transformer_engine")
class FakeTransformerEngineAPI(BaseNamespaceAPI):
    def __init__(self):
        BaseNamespaceAPI.__init__(self)

    def input_assertions_hook(self, api_name, **kwargs):
        pass

    def routing_condition(self, api_name, config, layer_name, feature_obj, **kwargs):
        return True

    def output_assertions_hook(self, api_name, ret, **kwargs):
        pass

    def is_multiple_feature_invocation_allowed(self, api_name):
        return True


for name in ("LogFp8TensorStats", "LogTensorStats", "LogNvfp4TensorStats"):
    Registry.register_feature(namespace="transformer_engine")(type(name, (), {}))
"""


@pytest.fixture
def fake_te(tmp_path, monkeypatch):
    """`transformer_engine` as QuantStats imports it, with its debug features replaced by stubs registered under the
    same namespace and names: nvdlfw_inspect then parses our YAML exactly as on the GPU (sections, layer selection,
    feature names); only the statistics themselves are missing."""
    import types

    root = tmp_path / "fake_te"
    (root / "debug" / "features").mkdir(parents=True)
    (root / "debug" / "features" / "fake_features.py").write_text(FAKE_FEATURES)
    resets = []
    state = types.SimpleNamespace(_reset=lambda: resets.append(1))
    te = types.ModuleType("transformer_engine")
    te.__file__ = str(root / "__init__.py")
    debug_state = types.ModuleType("transformer_engine.debug.pytorch.debug_state")
    debug_state.TEDebugState = state
    for name, module in {
        "transformer_engine": te,
        "transformer_engine.debug": types.ModuleType("x"),
        "transformer_engine.debug.pytorch": types.ModuleType("y"),
        "transformer_engine.debug.pytorch.debug_state": debug_state,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield resets
    from recipe.quant_stats import shutdown

    shutdown()


def test_life_cycle_logs_each_step_once_and_resumes(tmp_path, fake_te):
    import nvdlfw_inspect.api as debug_api
    from nvdlfw_inspect.logging import MetricLogger

    from recipe.quant_stats import QuantStats, shutdown

    cfg = trainer_config(tmp_path, "fp8_config.enabled=true", "fp8_layers=[2,3]")
    plan = resolve_plan(4, cfg.fp8_config, [2, 3])
    stats = QuantStats.start(cfg, plan, 0, lambda: None)
    written = (tmp_path / "quant_stats" / "quant_stats.yaml").read_text()
    assert r"^model\.layers\.(1|2)\." in written and "layers 2-3: fp8" in written
    assert debug_api.DEBUG_MANAGER is not None and fake_te  # the TE debug state was reset before initialising
    mirrored = []
    stats.sinks.append(lambda values, step: mirrored.append((step, values)))

    stats.set_step(0)
    assert debug_api.DEBUG_MANAGER._trainer_iteration_count == 1  # what TE stamps on step 1's statistics
    for step in (1, 2):
        MetricLogger.log_scalar("model.layers.1.mlp.fc1_activation_underflows%", 1e-7 * step, step)  # as TE's buffers do
        stats.step()
    assert debug_api.DEBUG_MANAGER._trainer_iteration_count == 3
    path = tmp_path / "quant_stats" / "quant_stats.jsonl"
    assert read_stats(path) == {"model.layers.1.mlp.fc1_activation_underflows%": {1: 1e-7, 2: 2e-7}}  # full precision
    assert [s for s, _ in mirrored] == [1, 2]

    stats.set_step(1)  # resumed from a step-1 checkpoint: step 2's record goes, step 2 is logged afresh
    assert read_stats(path) == {"model.layers.1.mlp.fc1_activation_underflows%": {1: 1e-7}}
    assert debug_api.DEBUG_MANAGER._trainer_iteration_count == 2
    shutdown()
    assert debug_api.DEBUG_MANAGER is None and len(fake_te) == 2
    shutdown()  # idempotent: fit calls it after every run
