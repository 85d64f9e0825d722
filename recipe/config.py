"""Checking a composed hydra config before any work starts: unknown keys, impossible values, unusable paths.

Each error names the key (as `a.b.c`) or the path. Hydra's struct mode already rejects unknown keys given on the
command line; keys added by a config *file* slip past it, so we compare against hydra_config/defaults.yaml too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "hydra_config"
# Nodes whose contents are free-form (passed through to a library).
OPEN_NODES = {"fp8_config.fp8_recipe_kwargs", "fp4_config.fp4_recipe_kwargs", "hydra"}


class ConfigError(ValueError):
    pass


def _keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Dotted paths of all keys, without resolving interpolations (which may need hydra's runtime)."""
    out = set()
    for key in node.keys():
        path = f"{prefix}{key}"
        out.add(path)
        child = node._get_node(key)
        if path not in OPEN_NODES and isinstance(child, DictConfig):
            out |= _keys(child, path + ".")
    return out


def check_known_keys(cfg: DictConfig) -> None:
    reference = OmegaConf.load(CONFIG_DIR / "defaults.yaml")
    known = _keys(reference)
    unknown = sorted(k for k in _keys(cfg) - known if not k.startswith("hydra"))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (every key is listed in hydra_config/defaults.yaml)")


@dataclass(frozen=True)
class Rule:
    """What one key may hold: a type (float accepts integers; bool is never a number), for numbers an interval
    such as "[0, inf)" or "(0, 1]", words allowed instead (or beside a number), null or not, and for a list the
    number of items (each checked as above)."""

    type: type
    interval: str | None = None
    words: tuple[str, ...] = ()
    null: bool = False
    length: int | None = None


# One place that knows each key's type and range (a later refactor turns this into typed dataclasses).
RULES = {
    "seed": Rule(int, "[0, inf)"),
    "num_train_steps": Rule(int, "[1, inf)"),
    "max_train_minutes": Rule(float, "(0, inf)", null=True),
    "grad_acc_steps": Rule(int, "[1, inf)"),
    "max_grad_norm": Rule(float, "(0, inf)", null=True),
    "log_every_n_steps": Rule(int, "[1, inf)"),
    "use_torch_compile": Rule(bool),
    "device": Rule(str, words=("auto", "cuda", "cpu")),
    "precision": Rule(str, words=("auto", "bf16", "fp32")),
    "peak_tflops_per_gpu": Rule(float, "(0, inf)", words=("auto",), null=True),
    "detect_anomaly": Rule(bool),
    "cp_size": Rule(int, "[1, inf)"),
    "cp_comm_type": Rule(str, words=("p2p", "all_gather", "a2a")),
    "quantized_model_init": Rule(bool),
    "model.backend": Rule(str, words=("auto", "torch", "te", "hf")),
    "model.activation": Rule(str, words=("gelu", "gelu_tanh"), null=True),  # null: the model's own (preset or init_from)
    **{f"model.{k}": Rule(int, "[1, inf)", null=True) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")},
    "model.layer_norm_eps": Rule(float, "(0, inf)", null=True),
    "model.token_dropout": Rule(bool, null=True),
    "model.fp32_residual": Rule(bool),
    "dataset.streaming": Rule(bool),
    "dataset.streaming_shuffle_buffer": Rule(int, "[0, inf)"),
    "dataset.layout": Rule(str, words=("thd", "bshd")),
    "dataset.max_seq_length": Rule(int, "[3, inf)"),
    "dataset.micro_batch_size": Rule(int, "[1, inf)"),
    "dataset.token_micro_batch_size": Rule(int, "[1, inf)", null=True),
    "dataset.pad_to_multiple_of": Rule(int, "[1, inf)"),
    "dataset.pad_to_fixed": Rule(bool),
    "dataset.mask_prob": Rule(float, "(0, 1)"),
    "dataset.num_workers": Rule(int, "[0, inf)"),
    "dataset.pin_memory": Rule(bool),
    "dataset.prefetch_factor": Rule(int, "[1, inf)"),
    "validation.every_n_steps": Rule(int, "[0, inf)", null=True),  # null and 0: see defaults.yaml (negative was "every step")
    "validation.max_batches": Rule(int, "[1, inf)", null=True),
    "optimizer.lr": Rule(float, "[0, inf)"),
    "optimizer.betas": Rule(float, "[0, 1)", length=2),
    "optimizer.eps": Rule(float, "(0, inf)"),
    "optimizer.weight_decay": Rule(float, "[0, inf)"),
    "optimizer.fused": Rule(bool, words=("auto",)),
    "lr_scheduler.warmup_steps": Rule(int, "[0, inf)"),
    "lr_scheduler.decay_end_fraction": Rule(float, "(0, 1]"),
    "lr_scheduler.min_lr_ratio": Rule(float, "[0, 1]"),
    "overwrite_output_dir": Rule(bool),
    "checkpoint.save_every_n_steps": Rule(int, "[0, inf)", null=True),
    "checkpoint.resume_from_checkpoint": Rule(bool),
    "checkpoint.save_final_model": Rule(bool),
    "checkpoint.save_final_checkpoint": Rule(bool),
    "checkpoint.max_checkpoints": Rule(int, "[0, inf)", null=True),  # -1 used to delete each checkpoint right after it was saved
    "checkpoint.async_save": Rule(bool),
    "fsdp.fp32_master_weights": Rule(bool),
    "fsdp.reshard_after_forward": Rule(bool),
    "tensorboard.enabled": Rule(bool),
    "tensorboard.log_dir": Rule(str, null=True),
    "quant_stats_config.enabled": Rule(bool),
    "quant_stats_config.quant_stats_file": Rule(str, null=True),
    "quant_stats_config.quant_log_dir": Rule(str, null=True),
    "quant_stats_config.log_to_wandb": Rule(bool),
}


def _fits(value, rule: Rule) -> bool:
    if rule.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
    elif not isinstance(value, rule.type) or (isinstance(value, bool) and rule.type is not bool):
        return False
    if rule.interval is None:
        return rule.type is not str or not rule.words  # a word-only key takes nothing but its words
    lo, hi = (float(x) for x in rule.interval[1:-1].split(","))
    return (lo <= value if rule.interval[0] == "[" else lo < value) and (value <= hi if rule.interval[-1] == "]" else value < hi)


def describe(rule: Rule) -> str:
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[rule.type]
    if rule.interval:
        lo, hi = rule.interval[1:-1].split(", ")
        kind += f" {'>=' if rule.interval[0] == '[' else '>'} {lo}" if hi == "inf" else f" in {rule.interval}"
    if rule.length is not None:
        kind = f"a list of {rule.length} items, each {kind}"
    if rule.words:
        kind = f"one of {rule.words}" if rule.type is str else f"{kind} or one of {rule.words}"
    return kind + (" or null" if rule.null else "")


def check_types(cfg: DictConfig) -> None:
    """Every key of RULES holds what its rule allows; else a ConfigError naming the key, the value and the rule."""
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key)
        if (value is None and rule.null) or (isinstance(value, str) and value in rule.words):
            continue
        if rule.length is None:
            ok = _fits(value, rule)
        else:
            ok = isinstance(value, (list, ListConfig)) and len(value) == rule.length and all(_fits(v, rule) for v in value)
        if not ok:
            shown = list(value) if isinstance(value, ListConfig) else value
            raise ConfigError(f"{key}={shown!r} must be {describe(rule)}")


def check_splits_apart(train_path, val_path, fmt: str) -> None:
    """The validation split must not be read as training data: refuse val_path equal to train_path or inside it
    (a directory of training shards is read recursively), and train_path inside val_path. The one legitimate
    sharing is a datasets DatasetDict directory, whose "train" and "validation" splits are apart by name."""
    if val_path is None:
        return
    train, val = Path(train_path).resolve(), Path(val_path).resolve()
    if train == val and (train / "dataset_dict.json").exists() and fmt in ("auto", "hf"):
        return
    if train == val or train in val.parents or val in train.parents:
        relation = "is the same path as" if train == val else "contains" if train in val.parents else "lies inside"
        raise ConfigError(
            f"dataset.train_path={train_path} {relation} dataset.val_path={val_path}: training and validation data "
            "would overlap; give them separate files or directories"
        )


def check_writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}={path} is not writable: {exc.strerror or exc}") from exc


def token_budget(cfg: DictConfig) -> int:
    d = cfg.dataset
    return int(d.token_micro_batch_size) if d.token_micro_batch_size is not None else int(d.micro_batch_size * d.max_seq_length)


def validate(cfg: DictConfig) -> None:
    """Every check that can fail before the first step. Raises ConfigError naming the key or path."""
    check_known_keys(cfg)
    check_types(cfg)
    d = cfg.dataset
    if d.token_micro_batch_size is not None and d.micro_batch_size * d.max_seq_length > d.token_micro_batch_size:
        raise ConfigError(
            f"dataset.micro_batch_size={d.micro_batch_size} x dataset.max_seq_length={d.max_seq_length} = "
            f"{d.micro_batch_size * d.max_seq_length} tokens does not fit dataset.token_micro_batch_size={d.token_micro_batch_size}"
        )
    if d.layout == "thd" and token_budget(cfg) % d.pad_to_multiple_of:
        raise ConfigError(
            f"the token budget {token_budget(cfg)} (dataset.token_micro_batch_size) must be a multiple of "
            f"dataset.pad_to_multiple_of={d.pad_to_multiple_of}"
        )
    for key in ("train_path", "val_path"):
        path = d[key]
        if path is None and key == "val_path":
            continue
        if path is None or not Path(path).exists():
            raise ConfigError(f"dataset.{key}={path}: no such file or directory")
    check_splits_apart(d.train_path, d.val_path, d.format)
    if cfg.model.init_from is not None and not (Path(cfg.model.init_from) / "config.json").exists():
        raise ConfigError(f"model.init_from={cfg.model.init_from}: not a Hugging Face model directory (no config.json)")
    check_writable(Path(cfg.output_dir), "output_dir")
    if cfg.checkpoint.ckpt_dir is not None:
        check_writable(Path(cfg.checkpoint.ckpt_dir), "checkpoint.ckpt_dir")


def shipped_configs() -> list[tuple[str, str]]:
    """(name, purpose) of every config file in hydra_config/ but defaults.yaml; the purpose is the file's first line,
    a comment (tests/test_help.py holds every shipped file to that)."""
    found = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.stem != "defaults":
            first = (path.read_text().splitlines() or [""])[0]
            found.append((path.stem, first.lstrip("#").strip() if first.startswith("#") else ""))
    return found


def help_text(script: str, default_config: str) -> str:
    """What `python train_*.py --help` prints: the shipped configs and where every key is documented."""
    width = max(len(name) for name, _ in shipped_configs())
    configs = "\n".join(f"  {name:<{width}}  {purpose}" for name, purpose in shipped_configs())
    return f"""usage: python {script} [--config-name NAME] [key=value ...]
       torchrun --nproc_per_node N {script} [--config-name NAME] [key=value ...]

Shipped configs (hydra_config/NAME.yaml; without --config-name this script runs {default_config}):
{configs}

Every key, with its meaning and default, is documented in hydra_config/defaults.yaml; override any of them on the
command line as key=value (e.g. num_train_steps=200 model.backend=hf tensorboard.enabled=true). A key that
defaults.yaml does not list is an error.

  --cfg job       print the composed config and exit
  --hydra-help    hydra's own options

After training: python -m recipe.evaluate --help (score a model on a protein file), python -m recipe.plot --help
(loss curves from metrics.jsonl)."""


def ckpt_dir(cfg: DictConfig) -> Path:
    return Path(cfg.checkpoint.ckpt_dir) if cfg.checkpoint.ckpt_dir is not None else Path(cfg.output_dir) / "checkpoints"

