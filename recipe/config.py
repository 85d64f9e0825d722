"""Checking a composed hydra config before any work starts: unknown keys, impossible values, unusable paths.

Each error names the key (as `a.b.c`) or the path. Hydra's struct mode already rejects unknown keys given on the
command line; keys added by a config *file* slip past it, so we compare against hydra_config/defaults.yaml too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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
    positive = {
        "num_train_steps": cfg.num_train_steps,
        "grad_acc_steps": cfg.grad_acc_steps,
        "log_every_n_steps": cfg.log_every_n_steps,
        "dataset.max_seq_length": cfg.dataset.max_seq_length,
        "dataset.micro_batch_size": cfg.dataset.micro_batch_size,
    }
    for key, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if cfg.max_train_minutes is not None and not cfg.max_train_minutes > 0:
        raise ConfigError(f"max_train_minutes={cfg.max_train_minutes} must be positive (or null)")
    if cfg.dataset.num_workers < 0:
        raise ConfigError(f"dataset.num_workers={cfg.dataset.num_workers} must be >= 0")
    d = cfg.dataset
    if d.layout not in ("thd", "bshd"):
        raise ConfigError(f"dataset.layout={d.layout!r} must be thd or bshd")
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
    for key in ("device", "precision", "cp_comm_type"):
        allowed = {"device": ("auto", "cuda", "cpu"), "precision": ("auto", "bf16", "fp32"), "cp_comm_type": ("p2p", "all_gather", "a2a")}[key]
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} must be one of {allowed}")
    for key in ("train_path", "val_path"):
        path = d[key]
        if path is None and key == "val_path":
            continue
        if path is None or not Path(path).exists():
            raise ConfigError(f"dataset.{key}={path}: no such file or directory")
    if cfg.model.init_from is not None and not (Path(cfg.model.init_from) / "config.json").exists():
        raise ConfigError(f"model.init_from={cfg.model.init_from}: not a Hugging Face model directory (no config.json)")
    sched = cfg.lr_scheduler
    if not 0 < sched.decay_end_fraction <= 1 or not 0 <= sched.min_lr_ratio <= 1:
        raise ConfigError("lr_scheduler.decay_end_fraction must be in (0, 1] and lr_scheduler.min_lr_ratio in [0, 1]")
    check_writable(Path(cfg.output_dir), "output_dir")
    if cfg.checkpoint.ckpt_dir is not None:
        check_writable(Path(cfg.checkpoint.ckpt_dir), "checkpoint.ckpt_dir")


def ckpt_dir(cfg: DictConfig) -> Path:
    return Path(cfg.checkpoint.ckpt_dir) if cfg.checkpoint.ckpt_dir is not None else Path(cfg.output_dir) / "checkpoints"

