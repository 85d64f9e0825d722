"""Layer-wise low precision: resolve `fp8_config`/`fp4_config` and `fp8_layers`/`fp4_layers` into one precision per
transformer layer, build the TransformerEngine recipes, and refuse what the hardware cannot run, before training.

Rules (layers are 1-indexed in the config):
- a format that is enabled with no list takes every layer;
- both formats enabled and neither has a list: error (which layers get which?);
- one format has a list and the other is enabled without one: the other takes the remaining layers;
- lists that overlap, indices out of range, and a list for a disabled format are errors.
Embeddings, the LM head and the loss are never quantized.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# What each TE recipe needs: the format it quantizes to and the least compute capability that runs it.
RECIPES: dict[str, tuple[str, tuple[int, int], str]] = {
    "DelayedScaling": ("fp8", (8, 9), "FP8 (Ada, Hopper or newer)"),
    "Float8CurrentScaling": ("fp8", (8, 9), "FP8 (Ada, Hopper or newer)"),
    "Float8BlockScaling": ("fp8", (9, 0), "FP8 block scaling (Hopper or newer)"),
    "MXFP8BlockScaling": ("fp8", (10, 0), "MXFP8 (Blackwell, compute capability 10.0, or newer)"),
    "NVFP4BlockScaling": ("fp4", (10, 0), "NVFP4 (Blackwell, compute capability 10.0, or newer)"),
}


QUANTIZED = ("fp8", "fp4")


class PrecisionError(ValueError):
    pass


@dataclass
class PrecisionPlan:
    layers: list[str]  # per layer: "fp8", "fp4", or the run's compute dtype ("bf16", or "fp32" without autocast)
    recipes: dict[str, str] = field(default_factory=dict)  # format -> TE recipe class name

    @property
    def quantized(self) -> bool:
        return any(p in QUANTIZED for p in self.layers)

    def describe(self) -> str:
        runs, start = [], 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                fmt = self.layers[start]
                name = f"{fmt} ({self.recipes[fmt]})" if fmt in self.recipes else fmt
                runs.append(f"layers {start + 1}-{i}: {name}" if i - start > 1 else f"layer {i}: {name}")
                start = i
        return "; ".join(runs)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "recipes": dict(self.recipes)}


def recipe_name(path: str) -> str:
    """`transformer_engine.common.recipe.DelayedScaling` or `DelayedScaling` -> DelayedScaling (checked)."""
    name = str(path).rsplit(".", 1)[-1]
    if name not in RECIPES:
        raise PrecisionError(f"unknown TransformerEngine recipe {path!r}; choose one of {sorted(RECIPES)}")
    return name


def _check_list(key: str, layers, num_layers: int) -> list[int]:
    out = [int(i) for i in layers]
    bad = [i for i in out if not 1 <= i <= num_layers]
    if bad:
        raise PrecisionError(f"{key} has layer indices {bad} outside 1..{num_layers} (layers are 1-indexed)")
    if len(set(out)) != len(out):
        raise PrecisionError(f"{key} lists a layer twice: {out}")
    return out


def resolve(num_layers: int, fp8_config, fp8_layers, fp4_config=None, fp4_layers=None, base: str = "bf16") -> PrecisionPlan:
    """One precision per layer from the config sections (dict-like, with `enabled` and the recipe path). A layer
    neither format takes runs in `base`, the run's compute dtype: a CPU (fp32) run must not be described as bf16."""
    enabled = {"fp8": bool(fp8_config and fp8_config.get("enabled")), "fp4": bool(fp4_config and fp4_config.get("enabled"))}
    lists = {"fp8": fp8_layers, "fp4": fp4_layers}
    for fmt in ("fp8", "fp4"):
        if lists[fmt] is not None and not enabled[fmt]:
            raise PrecisionError(f"{fmt}_layers is set but {fmt}_config.enabled=false: enable the format or drop the list")
    recipes = {}
    for fmt, section in (("fp8", fp8_config), ("fp4", fp4_config)):
        if enabled[fmt]:
            name = recipe_name(section.get(f"{fmt}_recipe"))
            if RECIPES[name][0] != fmt:
                raise PrecisionError(f"{fmt}_config.{fmt}_recipe={name} is a {RECIPES[name][0]} recipe, not {fmt}")
            recipes[fmt] = name
    plan = [base] * num_layers
    if enabled["fp8"] and enabled["fp4"] and lists["fp8"] is None and lists["fp4"] is None:
        raise PrecisionError(
            "fp8_config and fp4_config are both enabled with no fp8_layers/fp4_layers: say which layers get which"
        )
    given = {fmt: _check_list(f"{fmt}_layers", lists[fmt], num_layers) for fmt in ("fp8", "fp4") if lists[fmt] is not None}
    if len(given) == 2:
        overlap = sorted(set(given["fp8"]) & set(given["fp4"]))
        if overlap:
            raise PrecisionError(f"fp8_layers and fp4_layers overlap at layers {overlap}")
    for fmt, layers in given.items():
        for i in layers:
            plan[i - 1] = fmt
    for fmt in ("fp8", "fp4"):
        if enabled[fmt] and fmt not in given:  # no list: every layer the other format did not take
            plan = [fmt if p == base else p for p in plan]
    return PrecisionPlan(plan, recipes)


def check_hardware(
    plan: PrecisionPlan, backend: str, device_type: str, gpu_name: str | None = None, capability: tuple[int, int] | None = None
) -> None:
    """Refuse, before the first step, a plan this run cannot execute; the message names the GPU and what it lacks."""
    if not plan.quantized:
        return
    keys = " and ".join(f"{fmt}_config.enabled=true" for fmt in plan.recipes)
    wanted = f"{keys} ({' and '.join(plan.recipes.values())})"
    if device_type != "cuda":
        raise PrecisionError(f"{wanted} needs a CUDA GPU with TransformerEngine; this run is on {device_type}")
    if backend != "te":
        raise PrecisionError(f"{wanted} needs model.backend=te; this run uses the {backend} backend")
    for name in plan.recipes.values():
        need = RECIPES[name][1]
        if capability is not None and tuple(capability) < need:
            raise PrecisionError(
                f"{name} needs {RECIPES[name][2]}, i.e. compute capability {need[0]}.{need[1]} or newer; "
                f"{gpu_name} has compute capability {capability[0]}.{capability[1]}"
            )


def check_quantized_init(plan: PrecisionPlan, enabled: bool) -> None:
    if enabled and not plan.quantized:
        raise PrecisionError("quantized_model_init=true needs FP8 or FP4 layers (fp8_config.enabled / fp4_config.enabled)")


def init_context(recipe):
    """Where a layer is built: TE's quantized-weight init for a quantized layer, nothing special for a BF16 one."""
    import transformer_engine.pytorch as te

    return te.quantized_model_init(enabled=recipe is not None, recipe=recipe)


def build_recipe(section, fmt: str):
    """The TE recipe object for one config section (e.g. fp8_config): class, format and extra kwargs."""
    te_recipe = importlib.import_module("transformer_engine.common.recipe")
    name = recipe_name(section.get(f"{fmt}_recipe"))
    kwargs = dict(section.get(f"{fmt}_recipe_kwargs") or {})
    fmt_name = section.get(f"{fmt}_format")
    if fmt_name:
        if fmt_name not in te_recipe.Format.__members__:
            raise PrecisionError(f"{fmt}_config.{fmt}_format={fmt_name!r} is not one of {list(te_recipe.Format.__members__)}")
        kwargs[f"{fmt}_format"] = te_recipe.Format[fmt_name]
    try:
        return getattr(te_recipe, name)(**kwargs)
    except (TypeError, AssertionError) as exc:
        raise PrecisionError(f"{fmt}_config: {name}({kwargs}) failed: {exc}") from exc
