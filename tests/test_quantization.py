"""Layer-wise FP8/FP4 resolution rules and every refusal message (CPU; the GPU side is in test_gpu.py)."""

import pytest

from recipe.quantization import PrecisionError, check_hardware, recipe_name, resolve

FP8 = {"enabled": True, "fp8_recipe": "transformer_engine.common.recipe.Float8BlockScaling"}
FP4 = {"enabled": True, "fp4_recipe": "transformer_engine.common.recipe.NVFP4BlockScaling"}
OFF8, OFF4 = {"enabled": False, "fp8_recipe": "DelayedScaling"}, {"enabled": False, "fp4_recipe": "NVFP4BlockScaling"}


@pytest.mark.parametrize(
    "fp8, fp8_layers, fp4, fp4_layers, expected",
    [
        (OFF8, None, OFF4, None, ["bf16"] * 4),
        (FP8, None, OFF4, None, ["fp8"] * 4),  # enabled, no list: every layer
        (OFF8, None, FP4, None, ["fp4"] * 4),
        (FP8, [1, 4], OFF4, None, ["fp8", "bf16", "bf16", "fp8"]),
        (FP8, [2], FP4, None, ["fp4", "fp8", "fp4", "fp4"]),  # one list: the other format takes the rest
        (FP8, None, FP4, [4], ["fp8", "fp8", "fp8", "fp4"]),
        (FP8, [1], FP4, [3], ["fp8", "bf16", "fp4", "bf16"]),
    ],
)
@pytest.mark.parametrize("base", ["bf16", "fp32"])  # unquantized layers carry the run's compute dtype
def test_resolution_rules(fp8, fp8_layers, fp4, fp4_layers, expected, base):
    plan = resolve(4, fp8, fp8_layers, fp4, fp4_layers, base=base)
    assert plan.layers == [base if p == "bf16" else p for p in expected]
    assert plan.quantized == any(p != "bf16" for p in expected)


@pytest.mark.parametrize("dtype, name", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_trainer_plan_names_the_compute_dtype(tmp_path, dtype, name):
    """A CPU run computes in FP32: its logged and exported plan must say fp32, not bf16."""
    import torch
    from hydra import compose, initialize_config_dir

    from recipe.build import model_config, precision_plan
    from recipe.config import CONFIG_DIR
    from recipe.parallel import DistInfo

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("L0_sanity", overrides=[f"output_dir={tmp_path}"])
    plan, _ = precision_plan(cfg, model_config(cfg), DistInfo(0, 1, 0, torch.device("cpu")), getattr(torch, dtype))
    assert plan.layers == [name] * 4 and plan.describe() == f"layers 1-4: {name}"


def test_plan_description_and_record():
    plan = resolve(6, FP8, [1, 2, 3], FP4, None)
    assert plan.describe() == "layers 1-3: fp8 (Float8BlockScaling); layers 4-6: fp4 (NVFP4BlockScaling)"
    assert plan.to_dict() == {
        "layers": ["fp8"] * 3 + ["fp4"] * 3,
        "recipes": {"fp8": "Float8BlockScaling", "fp4": "NVFP4BlockScaling"},
    }


@pytest.mark.parametrize(
    "args, match",
    [
        ((FP8, None, FP4, None), "both enabled with no fp8_layers/fp4_layers"),
        ((FP8, [1, 2], FP4, [2, 3]), r"overlap at layers \[2\]"),
        ((FP8, [0], OFF4, None), r"fp8_layers has layer indices \[0\] outside 1..4 \(layers are 1-indexed\)"),
        ((FP8, [5], OFF4, None), r"outside 1..4"),
        ((FP8, [1, 1], OFF4, None), "lists a layer twice"),
        ((OFF8, [1], OFF4, None), "fp8_layers is set but fp8_config.enabled=false"),
        (({"enabled": True, "fp8_recipe": "FancyScaling"}, None, OFF4, None), "unknown TransformerEngine recipe 'FancyScaling'"),
        (({"enabled": True, "fp8_recipe": "NVFP4BlockScaling"}, None, OFF4, None), "is a fp4 recipe, not fp8"),
    ],
)
def test_resolution_errors(args, match):
    with pytest.raises(PrecisionError, match=match):
        resolve(4, *args)


@pytest.mark.parametrize(
    "recipe, device, backend, gpu, cap, match",
    [
        (
            "DelayedScaling",
            "cpu",
            "torch",
            None,
            None,
            r"fp8_config.enabled=true \(DelayedScaling\) needs a CUDA GPU with TransformerEngine; this run is on cpu",
        ),
        (
            "Float8CurrentScaling",
            "cuda",
            "torch",
            "NVIDIA H100",
            (9, 0),
            "needs model.backend=te; this run uses the torch backend",
        ),
        (
            "MXFP8BlockScaling",
            "cuda",
            "te",
            "NVIDIA H200",
            (9, 0),
            r"MXFP8BlockScaling needs MXFP8 \(Blackwell, compute capability 10.0, or newer\), "
            r"i.e. compute capability 10.0 or newer; NVIDIA H200 has compute capability 9.0",
        ),
        (
            "Float8BlockScaling",
            "cuda",
            "te",
            "NVIDIA A100",
            (8, 0),
            "Float8BlockScaling needs FP8 block scaling .* NVIDIA A100 has compute capability 8.0",
        ),
        ("DelayedScaling", "cuda", "te", "NVIDIA L4", (8, 9), None),
        ("Float8BlockScaling", "cuda", "te", "NVIDIA H100", (9, 0), None),
    ],
)
def test_hardware_refusals(recipe, device, backend, gpu, cap, match):
    plan = resolve(2, {"enabled": True, "fp8_recipe": recipe}, None)
    if match is None:
        check_hardware(plan, backend, device, gpu, cap)
        return
    with pytest.raises(PrecisionError, match=match):
        check_hardware(plan, backend, device, gpu, cap)


def test_nvfp4_refused_on_hopper():
    plan = resolve(2, OFF8, None, FP4, None)
    with pytest.raises(PrecisionError, match="NVFP4BlockScaling needs NVFP4 .* NVIDIA H100 80GB HBM3 has compute capability 9.0"):
        check_hardware(plan, "te", "cuda", "NVIDIA H100 80GB HBM3", (9, 0))


def test_recipe_names():
    assert recipe_name("transformer_engine.common.recipe.DelayedScaling") == "DelayedScaling"
    assert recipe_name("Float8CurrentScaling") == "Float8CurrentScaling"


def test_fp8_on_cpu_fails_at_start(tmp_path):
    from conftest import torchrun

    r = torchrun("train_fsdp2.py", 1, "fp8_config.enabled=true", f"output_dir={tmp_path}")
    assert r.returncode != 0
    refused = "fp8_config.enabled=true (DelayedScaling)"
    message = f"PrecisionError: {refused} needs a CUDA GPU with TransformerEngine; this run is on cpu"
    assert message in r.stderr
    assert "Traceback" not in r.stderr  # a refusal is its message, not our internals
    assert message in (tmp_path / "train.log").read_text()


def test_quantized_model_init_needs_quantized_layers():
    from recipe.quantization import check_quantized_init

    check_quantized_init(resolve(2, {"enabled": True, "fp8_recipe": "DelayedScaling"}, None), True)
    check_quantized_init(resolve(2, OFF8, None), False)
    with pytest.raises(PrecisionError, match="quantized_model_init=true needs FP8 or FP4 layers"):
        check_quantized_init(resolve(2, OFF8, None), True)
