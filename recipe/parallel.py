"""Process groups and the two data-parallel strategies. What differs between DDP and FSDP2 lives here, nowhere else.

- DDP: the model is built and initialised on the device, replicated, gradients all-reduced.
- FSDP2: the model is built on the meta device, `fully_shard` per transformer layer then the root, materialised
  shard by shard and initialised in place (init_weights gives the same numbers as an unsharded init).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join (or, for a plain `python train_*.py`, create) the process group: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:  # single process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA GPU is visible")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local, device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Strategy:
    """Builds the wrapped model and switches gradient synchronisation for gradient accumulation."""

    name = "base"
    meta_init = False

    def __init__(self, info: DistInfo, compute_dtype: torch.dtype, fp32_master_weights: bool = True, reshard_after_forward: bool = True):
        self.info, self.compute_dtype = info, compute_dtype
        self.fp32_master_weights, self.reshard_after_forward = fp32_master_weights, reshard_after_forward

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def sync_gradients(self, model: nn.Module, enabled: bool):
        raise NotImplementedError

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_gradients(self, model, enabled: bool):
        return contextlib.nullcontext() if enabled else model.no_sync()


class FSDP2Strategy(Strategy):
    name = "fsdp2"
    meta_init = True

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32 if self.fp32_master_weights else self.compute_dtype

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,), mesh_dim_names=("dp",))
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # The root unit holds the word embeddings, which the LM head reuses as its decoder at the very end of the
        # forward; backward needs them at once, so they stay gathered (resharding them frees storage the head's
        # backward still reads).
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        return model

    @contextlib.contextmanager
    def sync_gradients(self, model, enabled: bool):
        model.set_requires_gradient_sync(enabled)
        yield


STRATEGIES = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy}


def unwrap(model: nn.Module) -> nn.Module:
    """The ESM-2 module inside a DDP wrapper (FSDP2 shards in place and has no wrapper)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "layers") else model
