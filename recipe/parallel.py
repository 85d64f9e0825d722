"""Process groups, context parallelism and the two data-parallel strategies. What differs between DDP and FSDP2
lives here, nowhere else.

- DDP: the model is built and initialised on the device, replicated, gradients all-reduced.
- FSDP2: the model is built on the meta device, `fully_shard` per transformer layer then the root, materialised
  shard by shard and initialised in place (init_weights gives the same numbers as an unsharded init). On a single
  process there is nothing to shard, and FSDP2's per-layer gather, cast and reduce hooks only cost time, so the model
  trains unsharded there, under the trainer's autocast as DDP's does (docs/benchmarks.md has the measurement).
- Context parallelism (cp_size > 1): the world is a (dp, cp) mesh, cp innermost, so a CP group is cp_size
  neighbouring ranks (one NVLink domain). Only attention talks inside a CP group. Parameters are replicated (DDP) or
  sharded (FSDP2) over the *flattened* dp x cp world, and gradients are averaged over all of it: every rank's
  gradient is that of its own tokens' loss, so the sum over the world is the full batch's gradient, whatever split
  of dp and cp made it. Data is read per dp rank; the ranks of a CP group read the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recipe.config import ConfigError
from recipe.model.config import ContextParallel

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cp: ContextParallel = field(default_factory=ContextParallel)
    mesh: Any = None  # the one (dp, cp) DeviceMesh of a multi-process run (setup_mesh); None on one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which share of the data this rank reads (CP peers read the same)."""
        return self.rank // self.cp.size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp.size


class ContextParallelError(ValueError):
    pass


def check_context_parallel(cp_size: int, world_size: int, device_type: str, backend: str, layout: str) -> None:
    """Refuse a context-parallel run that cannot work, before anything is built (`backend` may still be 'auto')."""
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ContextParallelError(f"cp_size={cp_size!r} must be a positive integer")
    if cp_size == 1:
        return
    if world_size % cp_size:
        raise ContextParallelError(
            f"cp_size={cp_size} does not divide the world size {world_size}: the ranks form a (dp, cp) grid, "
            f"so the number of processes must be a multiple of cp_size"
        )
    if device_type != "cuda":
        raise ContextParallelError(
            f"context parallelism (cp_size={cp_size}) needs CUDA GPUs: it runs on TransformerEngine's context-parallel "
            f"attention, and this run is on {device_type}"
        )
    if backend in ("torch", "hf"):
        raise ContextParallelError(
            f"context parallelism (cp_size={cp_size}) needs model.backend=te (TransformerEngine's context-parallel "
            f"attention); the {backend} backend has no context-parallel attention"
        )
    if layout != "thd":
        raise ContextParallelError(
            f"context parallelism (cp_size={cp_size}) needs packed batches: dataset.layout=thd, not {layout}"
        )


def setup_mesh(info: DistInfo, cp_size: int, comm_type: str = "p2p") -> DistInfo:
    """Build the run's one device mesh, (dp, cp) with cp innermost, and record this rank's CP group in `info`
    (checked by check_context_parallel). Every process group the run uses comes from it: FSDP2 shards over the
    flattened mesh, context parallelism talks over its cp dimension. A single process needs none."""
    if info.world_size == 1:
        return info
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    info.mesh = mesh
    if cp_size == 1:
        return info
    group = mesh.get_group("cp")
    info.cp = ContextParallel(cp_size, mesh.get_local_rank("cp"), group, tuple(dist.get_process_group_ranks(group)), comm_type)
    if info.cp.rank != info.rank % cp_size or info.dp_rank != mesh.get_local_rank("dp"):
        raise RuntimeError(f"device mesh layout is not (dp, cp) row-major: rank {info.rank} got cp rank {info.cp.rank}")
    return info


def free_port() -> int:
    """A TCP port free on this host now (the rendezvous of a process group started here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join (or, for a plain `python train_*.py`, create) the process group: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:  # single process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
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
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if use_cuda else None)
    return DistInfo(rank, world, local, device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Strategy:
    """Builds the wrapped model and switches gradient synchronisation for gradient accumulation. The defaults of
    the optimizer, clipping and state-dict hooks are torch's own, which DDP and FSDP2 share."""

    name = "base"
    meta_init = False
    own_checkpoints = False  # its checkpoints resume under this strategy only (DDP's and FSDP2's resume under either)
    load_before_wrap = False  # model.init_from goes into the plain module before `wrap` (it cannot go into the wrapped one)
    triton_adamw = True  # optimizer.fused=triton can update its parameters (optim.TritonAdamW)

    def __init__(
        self,
        info: DistInfo,
        compute_dtype: torch.dtype,
        fp32_master_weights: bool = True,
        reshard_after_forward: bool = True,
        reduce_every_micro_batch: bool = True,
    ):
        self.info, self.compute_dtype = info, compute_dtype
        self.fp32_master_weights, self.reshard_after_forward = fp32_master_weights, reshard_after_forward
        self.reduce_every_micro_batch = reduce_every_micro_batch

    def wrap(self, model: Any) -> nn.Module:
        raise NotImplementedError

    def sync_gradients(self, model: nn.Module, enabled: bool):
        raise NotImplementedError

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32

    def check(self, cfg, backend: str) -> None:
        """Refuse, before anything is built, what this strategy cannot do (`backend` resolved)."""

    def wrap_optimizer(self, model: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def clip_grad_norm(self, model: Any, max_norm: float | None, optimizer: Any = None) -> torch.Tensor:
        """Clip the gradients to `max_norm` (None: no clipping) and return their total L2 norm before clipping.

        Where `optimizer` applies a grad scale (`optimizer_applies_grad_scale`), the clip is not a pass over every
        gradient of its own: the coefficient's reciprocal goes to the update as the divisor of the AMP grad-scale
        protocol (`optimizer.grad_scale`), which the update applies as it reads each gradient (torch's fused kernel
        also writes the clipped gradient back; TritonAdamW leaves the gradients unclipped). The same update to within
        float rounding, one read of the gradients fewer."""
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        folds = optimizer_applies_grad_scale(optimizer, grads)
        if folds:
            optimizer.grad_scale = None  # this step's divisor, if any, is set below
        if max_norm and not folds:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not max_norm:
            return norm
        # 1 / clip_grad_norm_'s clamped coefficient, in FP32 whatever the gradients' dtype (the fused kernel reads a float)
        optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
        return norm

    def get_state_dict(self, model: Any, optimizer) -> tuple[dict, dict]:
        """(model, optimizer) state dicts for torch.distributed.checkpoint, loaded into in place on resume."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, optimizer)

    def set_state_dict(self, model: Any, optimizer, model_sd: dict, optim_sd: dict) -> None:
        """Load in place. The optimizer keeps the implementation this run's config chose (`optimizer.fused`): torch's
        load takes a parameter group's `fused` and `foreach` flags from the checkpoint, which a run with another
        setting wrote."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
        set_state_dict(
            model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=StateDictOptions(strict=False)
        )
        for group, keys in zip(optimizer.param_groups, chosen, strict=True):
            group.update(keys)
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            place_step_counts(optimizer)

    def full_state_dict(self, model: Any) -> dict:
        """The whole model's weights on the CPU, for the Hugging Face export (a collective; rank 0 uses them)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local shard (a view of its storage), else `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")  # how torch's AdamW runs, not its state


def place_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's `step` count where its group's kernel reads it: on the parameter's device for the fused
    or capturable kernels, else on the CPU (torch's load places it by the checkpoint's flags; the foreach kernel would
    read a GPU count back every step, the fused one cannot read a CPU count)."""
    for group in optimizer.param_groups:
        device = None if group.get("fused") or group.get("capturable") else torch.device("cpu")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device or p.device, torch.float32)


def optimizer_applies_grad_scale(optimizer: Any, grads: list[torch.Tensor]) -> bool:
    """Whether `optimizer.step()` divides each of these gradients by `optimizer.grad_scale`: TritonAdamW always;
    torch's fused Adam and AdamW for plain tensors (not DTensors)."""
    from recipe.optim import TritonAdamW

    if isinstance(optimizer, TritonAdamW):
        return True
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
    return fused and not any(hasattr(g, "to_local") for g in grads)


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: Any) -> nn.Module:
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

    @property
    def shards(self) -> bool:
        """Whether parameters are sharded: only with more than one process (see the module docstring)."""
        return self.info.world_size > 1

    def wrap(self, model: Any) -> nn.Module:
        if not self.shards:
            log.info("fsdp2 on one process: nothing to shard, so the model trains unsharded (as DDP on one GPU)")
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # The run's (dp, cp) mesh flattened: each parameter is sharded over every GPU (no hybrid sharding).
        if self.info.mesh is None:
            raise RuntimeError("FSDP2 over several processes needs the run's device mesh: call setup_mesh first")
        mesh = self.info.mesh._flatten("dp_cp")
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # The root unit holds the word embeddings, which the LM head reuses as its decoder at the very end of the
        # forward; backward needs them at once, so they stay gathered (resharding them frees storage the head's
        # backward still reads).
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        log.info("fsdp2 over %d ranks: %s", self.info.world_size, "gradients reduce-scattered every micro-batch, accumulated "
                 "as shards" if self.reduce_every_micro_batch else "whole FP32 gradients accumulated over a step's "
                 "micro-batches, reduce-scattered at its last (fsdp.reduce_every_micro_batch=false)")  # fmt: skip
        return model

    @contextlib.contextmanager
    def sync_gradients(self, model, enabled: bool):
        """Every micro-batch's gradients are reduce-scattered and accumulated as shards unless
        fsdp.reduce_every_micro_batch=false, which skips the collective until the step's last micro-batch and keeps
        whole FP32 gradients on every rank meanwhile (FSDP2's set_requires_gradient_sync)."""
        if self.shards:
            model.set_requires_gradient_sync(enabled or self.reduce_every_micro_batch)
        yield


class MegatronFSDPStrategy(Strategy):
    """NVIDIA's Megatron-FSDP (the `megatron-fsdp` package, `pip install .[mfsdp]`): every transformer layer an FSDP
    unit, parameters, gradients and optimizer state sharded over all ranks (ZeRO-3; fsdp.reshard_after_forward=false
    keeps parameters whole: ZeRO-2). Parameters and gradients stay FP32 and compute runs under the trainer's
    autocast, as with DDP, so the two give the same arithmetic. Megatron-FSDP needs CUDA (it builds CUDA streams
    and buffers), so it is refused on the CPU. The model is built on the device with its initial weights, then
    sharded; its optimizer is wrapped (`fully_shard_optimizer`), and checkpoints hold its own state dicts (uneven
    DTensors; the optimizer's state is keyed by parameter index, so a checkpoint resumes under Megatron-FSDP only)."""

    name = "mfsdp"
    load_before_wrap = True
    own_checkpoints = True
    triton_adamw = False  # its wrapped optimizer swaps in its own gradient buffers

    def check(self, cfg, backend: str) -> None:
        device = self.info.device.type
        refusals = {
            "device": (
                device != "cuda",
                (
                    f"{device}: Megatron-FSDP needs CUDA GPUs (it allocates CUDA streams and buffers); "
                    "use train_ddp.py or train_fsdp2.py"
                ),
            ),
            "cp_size": (cfg.cp_size > 1, f"{cfg.cp_size}: context parallelism runs with train_cp.py (FSDP2)"),
            "model.backend": (
                backend == "hf",
                (
                    "hf: transformers' model (its tied decoder) is not supported under Megatron-FSDP; "
                    "use model.backend=te or torch, or train_fsdp2.py"
                ),
            ),
            "quantized_model_init": (
                cfg.quantized_model_init,
                (
                    "true: Megatron-FSDP would have to shard TE's quantized weights "
                    "and FusedAdam's master copies; use train_fsdp2.py"
                ),
            ),
            "fsdp.fp32_master_weights": (
                not cfg.fsdp.fp32_master_weights,
                ("false: Megatron-FSDP here keeps FP32 parameters (BF16 compute under autocast); use train_fsdp2.py"),
            ),
            "fsdp.reduce_every_micro_batch": (
                not cfg.fsdp.reduce_every_micro_batch,
                "false: Megatron-FSDP with sharded gradients reduce-scatters every micro-batch; use train_fsdp2.py",
            ),
            "use_torch_compile": (cfg.use_torch_compile, "true: compiled layers under Megatron-FSDP's hooks are not supported"),
            "checkpoint.async_save": (
                cfg.checkpoint.async_save,
                ("true: Megatron-FSDP's unevenly sharded checkpoints are written synchronously"),
            ),
        }
        for key, (refused, why) in refusals.items():
            if refused:
                raise ConfigError(f"train_mfsdp.py cannot run with {key}={why}")
        import importlib.util

        if importlib.util.find_spec("megatron_fsdp") is None:
            raise ImportError("train_mfsdp.py needs the megatron-fsdp package: pip install -e '.[mfsdp]' (or megatron-fsdp)")

    def wrap(self, model: Any) -> nn.Module:
        from megatron_fsdp import MixedPrecisionPolicy, fully_shard_model
        from torch.distributed.device_mesh import init_device_mesh

        # Megatron-FSDP wants a tensor-parallel mesh dimension next to the sharding one (TE's layers assume TP=1).
        mesh = init_device_mesh("cuda", (self.info.world_size, 1), mesh_dim_names=("dp", "tp"))
        units = list({type(layer) for layer in model.layers})
        return fully_shard_model(
            model,
            device_mesh=mesh,
            dp_shard_dim="dp",
            tp_dim="tp",
            fsdp_unit_modules=units,
            device=self.info.device,
            zero_dp_strategy="optim_grads_params" if self.reshard_after_forward else "optim_grads",
            # FP32 main weights (the optimizer's shard, copied into the training weights after each step, as
            # Megatron-FSDP does by default) and FP32 gradients, reduced in FP32.
            mixed_precision_policy=MixedPrecisionPolicy(main_params_dtype=torch.float32, main_grads_dtype=torch.float32),
            sync_model_each_microbatch=False,  # gradients are finished on the last micro-batch (sync_gradients)
        )

    def wrap_optimizer(self, model: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`fully_shard_optimizer` steps once with zero gradients to create the optimizer state; at learning rate 0 and
        with that state reset afterwards, the first real step is exactly a fresh AdamW's (as under DDP and FSDP2)."""
        from megatron_fsdp import fully_shard_optimizer

        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer = fully_shard_optimizer(optimizer)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        with torch.no_grad():
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
        return optimizer

    def sync_gradients(self, model, enabled: bool):
        # The last micro-batch's backward finishes the reduce-scatter and hands the gradient shards to the
        # parameters, so clipping sees them; earlier ones only accumulate.
        return model.sync() if enabled else model.no_sync()

    def clip_grad_norm(self, model: Any, max_norm: float | None, optimizer: Any = None) -> torch.Tensor:
        """Each rank holds a disjoint row block of every gradient: the squared norm is the sum of the local ones over
        all ranks. (torch's clip_grad_norm_ on these unevenly sharded DTensors is avoided: NVIDIA's recipe reports
        it hanging under multi-process Megatron-FSDP.) The clip is a pass of its own here: `optimizer` is not used."""
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
            squares = torch.zeros((), device=self.info.device, dtype=torch.float32)
            for g in grads:
                squares += g.float().pow(2).sum()
            norm = all_reduce(squares).sqrt()
            if max_norm:
                coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
        return norm

    def get_state_dict(self, model: Any, optimizer) -> tuple[dict, dict]:
        # Keys without the wrapper's "module." prefix: the same names as DDP's and FSDP2's checkpoints, so that
        # recipe.evaluate reads the weights of any of them.
        model_sd = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
        return model_sd, optimizer.state_dict()

    def set_state_dict(self, model: Any, optimizer, model_sd: dict, optim_sd: dict) -> None:
        # DCP loaded in place into the main-weight shards; loading them into the module as well copies them into the
        # training weights (Megatron-FSDP's load hook). TE's _extra_state is not in its state dict.
        model.load_state_dict({f"module.{k}": v for k, v in model_sd.items()}, strict=False)
        optimizer.load_state_dict(optim_sd)
        model.install_optimized_model_weights()

    def full_state_dict(self, model: Any) -> dict:
        from megatron_fsdp.uneven_dtensor import gather_uneven_dtensor_to_full_tensor
        from torch.distributed.tensor import DTensor

        full = {}
        for key, value in model.state_dict().items():
            if isinstance(value, DTensor):
                value = gather_uneven_dtensor_to_full_tensor(value).to_local()
            full[key.removeprefix("module.")] = value.detach().cpu()
        return full


STRATEGIES = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "mfsdp": MegatronFSDPStrategy}


def parallelize(model: Any, strategy: Strategy, compile_layers: bool) -> nn.Module:
    """Everything that turns a built model into the one that trains, in one place and in this order:

    1. torch.compile per transformer layer (before wrapping, so that FSDP2's per-layer hooks stay outside the
       compiled regions and each layer compiles once);
    2. the strategy's wrap: DDP replicates; FSDP2 shards each layer, then the root, over the run's mesh;
       Megatron-FSDP shards every layer as its own unit.

    Context parallelism and per-layer precision are not applied here: they are the model's own settings, given to it
    at construction (`recipe.model.Runtime`), because TE's attention takes its CP group when it is built and the
    precision plan decides how each layer's weights are made. The run's mesh comes first (`setup_mesh`)."""
    if compile_layers:
        model.compile_layers()
    return strategy.wrap(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The ESM-2 module inside a DDP wrapper (FSDP2 shards in place and has no wrapper)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and not hasattr(model, "layers") else model
