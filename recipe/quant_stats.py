"""Quantization statistics (`quant_stats_config`): what FP8/FP4 does to each quantized layer's activations, weights
and gradients (underflow share, scale range, quantization error, amax), logged through TransformerEngine's debug
API (`transformer_engine.debug` on NVIDIA's `nvdlfw_inspect`).

Which statistics and how often is a YAML in nvdlfw_inspect's format (hydra_config/quant_stats/layer_stats.yaml by
default). Its sections may name their layers by the placeholders "{fp8_layers}" / "{fp4_layers}"
(`layer_name_regex_pattern`); at start each is replaced by a regex of the layers the precision plan runs in that
format, so the statistics follow the plan (FP8 only in layers 3-5 tracks only those), and a section whose format no
layer uses is switched off. A YAML without placeholders is used as written. The resolved YAML is written beside
the logs, so a reader sees exactly what was tracked.

The debug API must be initialised before the first TE module is built, and it names layers by their module path:
`model.layers.<i>.attention.layernorm_qkv`, `.attention.proj`, `.mlp.fc1`, `.mlp.fc2` with i 0-indexed as in
`named_modules()` (config layer 3 is `model.layers.2`). The statistics of optimizer step s are logged as step s, the
step numbering of metrics.jsonl, in quant_stats.jsonl under quant_log_dir.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import yaml

from recipe.config import CONFIG_DIR, ConfigError
from recipe.quantization import QUANTIZED, PrecisionPlan

log = logging.getLogger(__name__)

DEFAULT_FILE = CONFIG_DIR / "quant_stats" / "layer_stats.yaml"
PLACEHOLDERS = {f"{{{fmt}_layers}}": fmt for fmt in QUANTIZED}  # "{fp8_layers}" -> "fp8"


def stats_file(section) -> Path:
    return Path(section.quant_stats_file) if section.quant_stats_file is not None else DEFAULT_FILE


def log_dir(cfg) -> Path:
    section = cfg.quant_stats_config
    return Path(section.quant_log_dir) if section.quant_log_dir is not None else Path(cfg.output_dir) / "quant_stats"


def layer_regex(layers: list[int]) -> str:
    """A regex for the TE modules of config layers `layers` (1-indexed), as the debug API names them (0-indexed)."""
    return r"^model\.layers\.(" + "|".join(str(i - 1) for i in sorted(layers)) + r")\."


def tracked_layers(plan: PrecisionPlan) -> dict[str, list[int]]:
    """Per quantized format, the 1-indexed layers the plan runs in it (formats no layer uses are left out)."""
    out: dict[str, list[int]] = {}
    for i, precision in enumerate(plan.layers, 1):
        if precision in QUANTIZED:
            out.setdefault(precision, []).append(i)
    return out


def check(cfg, plan: PrecisionPlan, backend: str, device_type: str) -> None:
    """Refuse, before anything is built, statistics this run cannot collect."""
    section = cfg.quant_stats_config
    if not section.enabled:
        return
    why = None
    if device_type != "cuda":
        why = f"this run is on {device_type}; the statistics come from TransformerEngine's debug API, which needs a CUDA GPU"
    elif backend != "te":
        why = f"this run uses the {backend} backend; the statistics come from TransformerEngine's modules (model.backend=te)"
    elif cfg.quantized_model_init:
        why = (
            "quantized_model_init=true keeps the weights in FP8/FP4 only, and the weight statistics (underflows, "
            "quantization error) need their high-precision values; train without quantized_model_init to inspect"
        )
    elif not plan.quantized:
        why = (
            f"no layer is quantized (layer precision: {plan.describe()}); enable fp8_config or fp4_config: "
            "the statistics describe FP8/FP4 layers"
        )
    if why:
        raise ConfigError(f"quant_stats_config.enabled=true: {why}")
    if importlib.util.find_spec("nvdlfw_inspect") is None:
        raise ConfigError("quant_stats_config.enabled=true needs NVIDIA's nvdlfw-inspect: pip install -e '.[quant-stats]'")
    path = stats_file(section)
    if not path.is_file():
        raise ConfigError(f"quant_stats_config.quant_stats_file={path}: no such file")
    if section.log_to_wandb and not cfg.wandb.enabled:
        raise ConfigError("quant_stats_config.log_to_wandb=true needs wandb.enabled=true (the statistics go to that run)")


def resolve(template: dict, plan: PrecisionPlan, source: str = "the quant stats file") -> dict:
    """The YAML (parsed) with its placeholders replaced by the plan's layers; a section whose format no layer uses is
    disabled. Refuses a file that, so resolved, tracks nothing."""
    if not isinstance(template, dict) or not template:
        raise ConfigError(f"quant_stats_config.quant_stats_file={source}: not a YAML mapping of nvdlfw_inspect sections")
    layers = tracked_layers(plan)
    out = {}
    for name, section in template.items():
        if not isinstance(section, dict) or not isinstance(section.get("layers"), dict):
            raise ConfigError(f"quant_stats_config.quant_stats_file={source}: section {name!r} has no 'layers' mapping")
        section = {**section, "layers": dict(section["layers"])}
        pattern = section["layers"].get("layer_name_regex_pattern")
        if pattern in PLACEHOLDERS:
            fmt = PLACEHOLDERS[pattern]
            if fmt in layers:
                section["layers"]["layer_name_regex_pattern"] = layer_regex(layers[fmt])
            else:
                section["enabled"] = False
                section["layers"]["layer_name_regex_pattern"] = r"^$"  # matches no layer name
        out[name] = section
    if not any(s.get("enabled", True) for s in out.values()):
        raise ConfigError(
            f"quant_stats_config.quant_stats_file={source} tracks no layer of this run: its sections are for "
            f"formats the precision plan does not use ({plan.describe()})"
        )
    return out


def load_template(path: Path) -> dict:
    """The statistics YAML as written (placeholders unresolved); invalid YAML is a ConfigError naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"quant_stats_config.quant_stats_file={path}: not valid YAML: {exc}") from exc


def with_frequency(template: dict, freq: int) -> dict:
    """The YAML with every `freq` set to `freq` (bench/quant_stats_cost.py times 1 against 10)."""
    if isinstance(template, dict):
        return {k: freq if k == "freq" else with_frequency(v, freq) for k, v in template.items()}
    if isinstance(template, list):
        return [with_frequency(v, freq) for v in template]
    return template


class QuantStats:
    """The debug API over one run: `start` before the model is built, `name_layers` once it is, `set_step` with the
    steps already trained, `step` after every optimizer step; `shutdown` ends it. Rank 0 writes each logged step's
    statistics as one JSON line to quant_stats.jsonl (full precision; nvdlfw_inspect's own per-rank text logs round
    to 4 decimals) and, once `attach` has the metrics writer, to wandb (log_to_wandb) and TensorBoard
    (tensorboard.enabled) as `quant/<layer>_<tensor>_<stat>`. Activation and gradient statistics are reduced over
    all ranks by TE; weight statistics are rank 0's."""

    def __init__(self, directory: Path, rank: int):
        self.directory, self.rank = directory, rank
        self.path = directory / "quant_stats.jsonl"
        self.pending: dict[int, dict[str, float]] = {}
        self.sinks: list = []

    @classmethod
    def start(cls, cfg, plan: PrecisionPlan, rank: int, barrier) -> QuantStats:
        import nvdlfw_inspect.api as debug_api
        import transformer_engine
        from nvdlfw_inspect.logging import BaseLogger
        from transformer_engine.debug.pytorch.debug_state import TEDebugState

        section = cfg.quant_stats_config
        source = stats_file(section)
        resolved = resolve(load_template(source), plan, str(source))
        stats = cls(log_dir(cfg), rank)
        config_path = stats.directory / "quant_stats.yaml"
        if rank == 0:
            stats.directory.mkdir(parents=True, exist_ok=True)
            header = f"# {source}, resolved for the precision plan: {plan.describe()}\n"
            config_path.write_text(header + yaml.safe_dump(resolved, sort_keys=False))
        barrier()

        class Collect(BaseLogger):  # nvdlfw_inspect accepts loggers of its own base class only
            def log_scalar(self, name: str, value: float, iteration: int, **kwargs) -> None:
                stats.pending.setdefault(int(iteration), {})[name] = float(value)

        TEDebugState._reset()  # a TE module built earlier in this process (without the debug API) would refuse it
        features = str(Path(transformer_engine.__file__).parent / "debug" / "features")
        debug_api.initialize(
            config_file=str(config_path),
            feature_dirs=[features],
            log_dir=str(stats.directory),
            statistics_logger=Collect(),
            default_logging_enabled=True,
        )
        log.info("quantization statistics: %s for layers %s, logged to %s", source, tracked_layers(plan), stats.path)
        return stats

    def name_layers(self, model) -> None:
        """Give every module its path as debug-API name (`model.layers.2.mlp`); `model` is the unwrapped ESM-2."""
        import nvdlfw_inspect.api as debug_api

        debug_api.infer_and_assign_layer_names(model)

    def attach(self, metrics, cfg) -> None:
        """Mirror the statistics into the metrics writer's wandb run and TensorBoard (rank 0 has them)."""
        if cfg.quant_stats_config.log_to_wandb and metrics.wandb is not None:
            self.sinks.append(lambda values, step: metrics.wandb.log({f"quant/{k}": v for k, v in values.items()}, step=step))
        if metrics.tensorboard is not None:

            def to_tensorboard(values: dict, step: int) -> None:
                for key, value in values.items():
                    metrics.tensorboard.add_scalar(f"quant/{key}", value, global_step=step)

            self.sinks.append(to_tensorboard)

    def set_step(self, completed_steps: int) -> None:
        """The next step's statistics are logged as step `completed_steps + 1`: a resumed run continues the count,
        and quant_stats.jsonl keeps only the records its checkpoint covers (a fresh run starts it empty)."""
        import nvdlfw_inspect.api as debug_api

        debug_api.initialize_training_step(completed_steps + 1)
        if self.rank == 0:
            kept = [
                line
                for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                if line.strip() and json.loads(line)["step"] <= completed_steps
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def step(self) -> None:
        """After an optimizer step: TE reduces and logs what the step collected (a collective on every rank)."""
        import nvdlfw_inspect.api as debug_api

        debug_api.step()
        if self.rank == 0 and self.pending:
            with open(self.path, "a") as f:
                for step, values in sorted(self.pending.items()):
                    f.write(json.dumps({"step": step, **values}) + "\n")
                    for sink in self.sinks:
                        sink(values, step)
        self.pending.clear()


def shutdown() -> None:
    """End the debug API if a run started it (fit's `finally`: after an error too), so that a later run in the same
    process neither meets it half-initialised nor has TE modules that still think it is on."""
    api = sys.modules.get("nvdlfw_inspect.api")
    if api is None or api.DEBUG_MANAGER is None:
        return
    from transformer_engine.debug.pytorch.debug_state import TEDebugState

    api.end_debug()
    TEDebugState._reset()


def read_stats(path: Path) -> dict[str, dict[int, float]]:
    """quant_stats.jsonl as {statistic name: {step: value}} (what the GPU test checks; any JSON reader does the same)."""
    out: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for name, value in record.items():
                if name != "step":
                    out.setdefault(name, {})[record["step"]] = value
    return out
