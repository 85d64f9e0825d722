"""AdamW with ESM-2's settings and its learning-rate schedule.

The schedule is a pure function of the step (no scheduler object to checkpoint): linear warmup from 0 to the peak,
linear decay to `min_lr_ratio` x peak at `decay_end_fraction` of training, constant afterwards.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from recipe.config import ConfigError, LRSchedulerConfig, OptimizerConfig
from recipe.model.layers import param_kind
from recipe.parallel import local_tensor


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


@functools.cache
def _adamw_kernel() -> Any:
    from recipe.model import rope_kernel

    return rope_kernel.kernel_module("recipe.adamw_triton").adamw_step


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None  # the step skips parameters without one
    return p.grad


class TritonAdamW(torch.optim.AdamW):
    """torch's AdamW whose step is one Triton launch per parameter group (recipe/adamw_triton.py).

    Why: torch's fused AdamW streams each parameter's weight, gradient and two moments at a fraction of the memory
    bandwidth, and with the clip folded in (`grad_scale`, the AMP protocol) it also writes every gradient back. This
    step reads the four and writes three, nothing else; `grad_scale` divides the gradient as it is read and the
    gradients are left as they were (unclipped). The same arithmetic as torch's fused kernel in fp32 (IEEE division
    and square root); the state (`step` on the CPU, `exp_avg`, `exp_avg_sq`) and its checkpoints are torch AdamW's.
    A non-zero `found_inf` (the AMP protocol's name; `guard_update` sets it) skips the update on the GPU; only the
    host's step counts advance, and the loop stops the run before anything is written.
    Every parameter and gradient must be FP32 and contiguous, on one device (a DTensor's local shard counts)."""

    BLOCK, WARPS = 2048, 8  # elements per program, warps per program (bench/adamw_kernels.py)

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, fused=False)
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self._layouts: dict[tuple, tuple] = {}  # tensor sizes -> their programs' layout on the device
        self._offsets: dict[tuple, tuple] = {}  # (aligned, sizes) -> (base and addresses, offsets on the device)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("TritonAdamW.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        states = [self._state(p) for p in params]
        rows = [[local_tensor(t) for t in (p, _grad(p), s["exp_avg"], s["exp_avg_sq"])] for p, s in zip(params, states)]
        for row in rows:  # checked before any state changes
            if row[0].device != rows[0][0].device or any(not t.is_contiguous() or t.numel() != row[0].numel() for t in row):
                raise ValueError("TritonAdamW: parameters, gradients and moments must be contiguous, of one size, on one device")
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        by_step: dict[float, list[list[torch.Tensor]]] = {}  # one bucket unless some parameters missed steps
        for row, step in zip(rows, torch.stack(steps).tolist()):
            by_step.setdefault(step, []).append(row)
        beta1, beta2 = group["betas"]
        lr, decay = float(group["lr"]), float(group["weight_decay"])
        kernel = _adamw_kernel()
        for step, tensors in by_step.items():
            scalars = (lr, beta1, beta2, group["eps"], decay, lr / (1 - beta1**step), math.sqrt(1 - beta2**step))
            for aligned, base, table, numels, first, blocks in self._launches(tensors):
                scale, found_inf = self.grad_scale, self.found_inf
                kernel[(blocks.numel(),)](base, table, numels, first, blocks, base if scale is None else scale,
                                          base if found_inf is None else found_inf, *scalars,
                                          HAS_SCALE=scale is not None, HAS_INF=found_inf is not None, DECAY=decay != 0,
                                          ALIGNED=aligned, BLOCK=self.BLOCK, num_warps=self.WARPS)  # fmt: skip

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            if p.dtype != torch.float32 or _grad(p).dtype != torch.float32:
                raise TypeError(
                    f"optimizer.fused=triton needs FP32 parameters and gradients; got a {p.dtype} parameter with a "
                    f"{_grad(p).dtype} gradient: use optimizer.fused=true"
                )
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].is_cuda:  # a checkpoint of torch's fused AdamW keeps it on the GPU
            state["step"] = state["step"].cpu()
        return state

    def _launches(self, tensors: list[list[torch.Tensor]]) -> list[tuple]:
        """The kernel's arguments for these tensors: those whose four addresses are 16-byte aligned and whose size is
        a multiple of four elements in one launch (addressed from its first parameter, so every offset is a multiple
        of four elements too), the others in a second. What depends on the sizes only (each program's tensor) is
        made once; the address offsets again when an address changes (a gradient freed and allocated elsewhere),
        copied to the GPU without waiting for it."""
        split: dict[bool, list[list[torch.Tensor]]] = {True: [], False: []}
        for row in tensors:
            split[all(t.data_ptr() % 16 == 0 for t in row) and row[0].numel() % 4 == 0].append(row)
        launches = []
        for aligned, rows in split.items():
            if not rows:
                continue
            base = rows[0][0]
            sizes = tuple(row[0].numel() for row in rows)
            if sizes not in self._layouts:
                self._layouts[sizes] = self._layout(sizes, base.device)
            addresses = (base.data_ptr(), *(t.data_ptr() for row in rows for t in row))
            if self._offsets.get((aligned, sizes), (None,))[0] != addresses:
                offsets = torch.tensor([(a - addresses[0]) // 4 for a in addresses[1:]], dtype=torch.int64)
                offsets = offsets.pin_memory() if base.is_cuda else offsets
                self._offsets[(aligned, sizes)] = (addresses, offsets.to(base.device, non_blocking=True))
            launches.append((aligned, base, self._offsets[(aligned, sizes)][1], *self._layouts[sizes]))
        return launches

    def _layout(self, sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(sizes, each tensor's first program, each program's tensor) on `device`."""
        numels = torch.tensor(sizes, dtype=torch.int64)
        per = (numels + self.BLOCK - 1) // self.BLOCK
        first = torch.cumsum(per, 0) - per
        blocks = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), per)
        return numels.to(device), first.to(device), blocks.to(device)


def build_optimizer(
    model: nn.Module,
    settings: OptimizerConfig,
    schedule: LRSchedulerConfig,
    num_train_steps: int,
    device: torch.device,
    master_weights: bool = False,
    triton_ok: bool = True,
) -> torch.optim.Optimizer:
    """AdamW with the optimizer section's settings, at the schedule's first learning rate. With `master_weights`
    (quantized model init: FP8 weights in the model) it is TransformerEngine's FusedAdam, which keeps an FP32 master
    copy of every weight and re-quantizes after each update. `triton_ok`: the strategy allows TritonAdamW."""
    groups = param_groups(model, settings.weight_decay, list(settings.no_decay))
    lr = scheduled_lr(0, settings.lr, schedule, num_train_steps)
    betas = (float(settings.betas[0]), float(settings.betas[1]))
    if master_weights:
        if settings.fused == "triton":
            raise ConfigError("optimizer.fused=triton cannot keep the FP32 master copies that quantized_model_init needs "
                             "(TransformerEngine's FusedAdam does): use optimizer.fused=auto")  # fmt: skip
        from transformer_engine.pytorch.optimizers import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, eps=settings.eps, adam_w_mode=True, master_weights=True)
    kind = adamw_kind(settings.fused, device, model, triton_ok)
    if kind == "triton":
        return TritonAdamW(groups, lr=lr, betas=betas, eps=settings.eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=settings.eps, fused=kind == "fused")


def adamw_kind(fused: Any, device: torch.device, model: nn.Module, triton_ok: bool = True) -> str:
    """Which AdamW `optimizer.fused` gives: "triton" (TritonAdamW), "fused" (torch's fused kernel) or "foreach".
    auto: on CUDA, triton where Triton imports, the strategy allows it and every parameter is FP32 and whole (not a
    DTensor shard), else fused; on the CPU foreach."""
    from recipe.model import rope_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    fp32 = all(p.dtype == torch.float32 for p in params)
    if fused == "triton":
        why = ("the CPU" if device.type != "cuda" else
               "this strategy (Megatron-FSDP keeps its own gradient buffers)" if not triton_ok else
               "BF16 parameters (fsdp.fp32_master_weights=false)" if not fp32 else
               "this install (Triton does not import)" if not rope_kernel.available() else None)  # fmt: skip
        if why:
            raise ConfigError(f"optimizer.fused=triton is not available on {why}: use optimizer.fused=true or auto")
        return "triton"
    if fused != "auto":
        return "fused" if fused else "foreach"
    if device.type != "cuda":
        return "foreach"
    # Not on DTensor shards: there torch's fused kernel measured faster through the trainer (docs/benchmarks.md, levers
    # 45 and 56), though TritonAdamW updates shards correctly (optimizer.fused=triton).
    sharded = any(hasattr(p, "to_local") for p in params)
    return "triton" if triton_ok and fp32 and not sharded and rope_kernel.available() else "fused"


def guard_update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Give an optimizer that can skip its own update on the GPU (TritonAdamW) this step's flag, non-zero when the
    loss or the gradient norm is not finite, and return True; False for the others, whose update must wait for the
    host's check. With the flag the host queues the update first and checks after: it does not wait for the
    backward to finish before it can queue the update and the next step (docs/benchmarks.md, lever 49)."""
    if not isinstance(optimizer, TritonAdamW):
        return False
    optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    return True


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """The update the run uses, for the start-up log."""
    if isinstance(optimizer, TritonAdamW):
        return "AdamW, one Triton launch per parameter group"
    if isinstance(optimizer, torch.optim.AdamW):
        return "AdamW, " + ("torch's fused kernel" if optimizer.defaults.get("fused") else "torch's unfused kernels")
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
