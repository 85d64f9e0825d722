"""AdamW with ESM-2's settings and its learning-rate schedule.

The schedule is a pure function of the step (no scheduler object to checkpoint): linear warmup from 0 to the peak,
linear decay to `min_lr_ratio` x peak at `decay_end_fraction` of training, constant afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from recipe.config import LRSchedulerConfig, OptimizerConfig
from recipe.model.layers import param_kind


def lr_at(step: int, peak: float, warmup: int, total: int, decay_end_fraction: float = 0.9, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0))."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_end = max(int(total * decay_end_fraction), warmup + 1)
    if step >= decay_end:
        return peak * min_ratio
    frac = (step - warmup) / (decay_end - warmup)
    return peak * (1.0 - (1.0 - min_ratio) * frac)


NO_DECAY_KINDS = ("bias", "norm", "embedding")


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Weight decay for matrices; none for the kinds listed in `no_decay`: bias (every bias, LayerNorm biases
    included), norm (LayerNorm weights), embedding (the word embeddings, also the tied decoder)."""
    unknown = set(no_decay) - set(NO_DECAY_KINDS)
    if unknown:
        raise ValueError(f"optimizer.no_decay has unknown entries {sorted(unknown)}; choose from {NO_DECAY_KINDS}")
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        kind = "embedding" if name.endswith("embed_tokens.weight") else param_kind(name)
        if p.requires_grad:
            (plain if kind in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def scheduled_lr(step: int, peak: float, schedule: LRSchedulerConfig, num_train_steps: int) -> float:
    """`lr_at` with the config's lr_scheduler section."""
    return lr_at(step, peak, schedule.warmup_steps, num_train_steps, schedule.decay_end_fraction, schedule.min_lr_ratio)


def build_optimizer(
    model: nn.Module,
    settings: OptimizerConfig,
    schedule: LRSchedulerConfig,
    num_train_steps: int,
    device: torch.device,
    master_weights: bool = False,
) -> torch.optim.Optimizer:
    """AdamW with the optimizer section's settings, at the schedule's first learning rate. With `master_weights`
    (quantized model init: FP8 weights in the model) it is TransformerEngine's FusedAdam, which keeps an FP32 master
    copy of every weight and re-quantizes after each update."""
    groups = param_groups(model, settings.weight_decay, list(settings.no_decay))
    lr = scheduled_lr(0, settings.lr, schedule, num_train_steps)
    betas = (float(settings.betas[0]), float(settings.betas[1]))
    if master_weights:
        from transformer_engine.pytorch.optimizers import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, eps=settings.eps, adam_w_mode=True, master_weights=True)
    fused = device.type == "cuda" if settings.fused == "auto" else bool(settings.fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=settings.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
