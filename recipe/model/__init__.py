"""ESM-2 model: configuration, the two backends, initialisation, HF conversion and FLOPs."""

from __future__ import annotations

import dataclasses
import logging

import torch

from recipe.model.config import SIZES, EsmConfig
from recipe.model.esm import EsmForMaskedLM, EsmOutput, init_weights

log = logging.getLogger(__name__)

__all__ = ["SIZES", "EsmConfig", "EsmForMaskedLM", "EsmOutput", "build_model", "init_weights", "resolve_backend"]


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


def resolve_backend(requested: str) -> str:
    """'auto' -> 'te' where TE and a Hopper+ GPU exist, else 'torch'; an explicit 'te' that cannot run is an error."""
    if requested == "torch":
        return "torch"
    usable, why = te_status()
    if requested == "te":
        if not usable:
            raise RuntimeError(f"model.backend=te cannot run here: {why}")
        return "te"
    if requested != "auto":
        raise ValueError(f"model.backend={requested!r} is not one of auto, torch, te")
    choice = "te" if usable else "torch"
    log.info("model.backend=auto picked %s: %s", choice, why)
    return choice


def build_model(config: EsmConfig, device: torch.device | str = "cpu", seed: int | None = 0, dtype=None, layer_init_contexts=None) -> EsmForMaskedLM:
    """Resolve the backend, build on `device` ('meta' builds without memory) and, unless meta, initialise."""
    config = dataclasses.replace(config, backend=resolve_backend(config.backend))
    model = EsmForMaskedLM(config, device=device, dtype=dtype, layer_init_contexts=layer_init_contexts)
    if str(device) != "meta" and seed is not None:
        init_weights(model, seed)
    return model
