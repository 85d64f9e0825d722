"""ESM-2 model: configuration, the two backends, initialisation, HF conversion and FLOPs."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from recipe.model.config import SIZES, ContextParallel, EsmConfig, Runtime
from recipe.model.esm import EsmForMaskedLM, EsmOutput, init_weights

if TYPE_CHECKING:
    from recipe.model.hf import HFEsmForMaskedLM

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """model.backend asks for a backend this machine cannot run (the message says why)."""


__all__ = [
    "SIZES",
    "BackendUnavailable",
    "ContextParallel",
    "EsmConfig",
    "Runtime",
    "EsmForMaskedLM",
    "EsmOutput",
    "build_model",
    "init_weights",
    "resolve_backend",
]


def te_status() -> tuple[bool, str]:
    """(usable, why): TE imports and a Hopper-or-newer GPU is present."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install that fails to load its library
        return False, f"transformer_engine does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < (9, 0):
        return False, f"{name} has compute capability {cap[0]}.{cap[1]}; the te backend needs 9.0 (Hopper) or newer"
    return True, f"transformer_engine imports and {name} has compute capability {cap[0]}.{cap[1]}"


# `backend: auto` follows measurements, not habit (docs/benchmarks.md: the harness tables and the trainer levers):
# the plain PyTorch layer is faster below hidden size 1280, TE from 650M up; the torch layer under torch.compile
# was measured at least as fast as TE at every size; FP8/FP4 layers need TE.
TE_FASTER_FROM_HIDDEN = 1280


def auto_backend(hidden_size: int, compiled: bool, quantized: bool) -> tuple[str, str]:
    """(backend, reason) for `auto` on a GPU where TE runs."""
    if quantized:
        return "te", "FP8/FP4 layers run on TransformerEngine only"
    if compiled:
        return "torch", "with use_torch_compile the compiled torch layer was measured fastest at every size"
    if hidden_size >= TE_FASTER_FROM_HIDDEN:
        return "te", f"TE was measured faster from hidden size {TE_FASTER_FROM_HIDDEN} (650M) up"
    return "torch", f"the torch layer was measured faster below hidden size {TE_FASTER_FROM_HIDDEN} (650M)"


def resolve_backend(requested: str, config: EsmConfig | None = None, compiled: bool = False, quantized: bool = False) -> str:
    """'auto' -> by measurement where TE and a Hopper+ GPU exist (see auto_backend), else 'torch' (never 'hf', the
    reference model); an explicit 'te' that cannot run is an error."""
    if requested in ("torch", "hf"):
        return requested
    usable, why = te_status()
    if requested == "te":
        if not usable:
            raise BackendUnavailable(f"model.backend=te cannot run here: {why}")
        return "te"
    if requested != "auto":
        raise ValueError(f"model.backend={requested!r} is not one of auto, torch, te, hf")
    if not usable:
        log.info("model.backend=auto picked torch: %s", why)
        return "torch"
    hidden = config.hidden_size if config is not None else TE_FASTER_FROM_HIDDEN
    choice, reason = auto_backend(hidden, compiled, quantized)
    log.info("model.backend=auto picked %s: %s", choice, reason)
    return choice


def build_model(
    config: EsmConfig,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    dtype=None,
    layer_init_contexts=None,
    runtime: Runtime | None = None,
) -> EsmForMaskedLM | HFEsmForMaskedLM:
    """Resolve the backend, build on `device` ('meta' builds without memory) and, unless meta or `seed` is None,
    initialise. `runtime`: context parallelism, per-layer quantization and input checks (fixed at construction)."""
    config = dataclasses.replace(config, backend=resolve_backend(config.backend, config))
    if config.backend == "hf":
        if layer_init_contexts is not None:
            raise ValueError("model.backend=hf has no quantized (FP8/FP4) layers to initialise")
        from recipe.model.hf import HFEsmForMaskedLM

        model: EsmForMaskedLM | HFEsmForMaskedLM = HFEsmForMaskedLM(config, device=device, dtype=dtype, runtime=runtime)
    else:
        model = EsmForMaskedLM(config, device=device, dtype=dtype, layer_init_contexts=layer_init_contexts, runtime=runtime)
    if str(device) != "meta" and seed is not None:
        init_weights(model, seed)
    return model
