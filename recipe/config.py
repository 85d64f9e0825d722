"""The run's configuration: every key, its type, default, range and meaning, in one typed dataclass per section.

`TrainConfig` is registered with hydra's ConfigStore as `schema`; hydra_config/defaults.yaml pulls it in through its
defaults list, so every shipped or user config file and every command-line override is merged into the typed
config. OmegaConf then refuses, naming the key, a key the dataclasses do not define and a value of the wrong type.
What a type cannot say is checked before any work starts, each error naming the key (as `a.b.c`) or the path:
- a field's range (an interval, allowed words, null, a list's length) lives in the field's metadata (`checked`) and
  `check_values` tests every such field generically;
- `validate` adds the checks that span several keys or touch the filesystem.
A few keys take a number or bool *or* a word (`peak_tflops_per_gpu: auto`, `optimizer.fused: auto`): OmegaConf has no
such Union, so they are typed `Any` and their rule names the type. Booleans follow OmegaConf: true/false, and also
yes/no, on/off and integers (0 is false).
"""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from recipe.quantization import recipe_name

CONFIG_DIR = Path(__file__).resolve().parent.parent / "hydra_config"


class ConfigError(ValueError):
    pass


# ====================================================================================== ranges
@dataclass(frozen=True)
class Rule:
    """What one key may hold beyond its type: for numbers an interval such as "[0, inf)" or "(0, 1]", words allowed
    instead of (or beside) a value, and for a list its length (each item is checked as above). `kind`, `null` and
    `items` come from the field's annotation (see `_rule_for`), except for `Any` fields, which name them here."""

    kind: type | None = None  # int, float (integers accepted; bool is never a number), bool or str
    interval: str | None = None
    words: tuple[str, ...] = ()
    null: bool = False
    length: int | None = None
    items: bool = False  # the value is a list and every item must fit


def checked(
    default: Any,
    interval: str | None = None,
    *,
    words: tuple[str, ...] = (),
    length: int | None = None,
    kind: type | None = None,
    null: bool = False,
) -> Any:
    """A dataclass field whose value `check_values` holds to a range (see `Rule`); a list default is copied per
    instance. `kind` and `null` are given only for an `Any` field, whose annotation cannot say them."""
    metadata = {"rule": Rule(kind, interval, words, null, length)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ====================================================================================== the schema
# One dataclass per section. A comment says what each key means; hydra_config/*.yaml override a few of them.
@dataclass
class ModelConfig:
    size: str = "8M"  # tiny, 8M, 35M, 150M, 650M, 3B, 15B (ESM-2's published shapes)
    # auto (by measurement: te from 650M up, torch below or with torch.compile; FP8 -> te), torch, te,
    # hf (transformers' EsmForMaskedLM, SDPA, padded batches: the reference, for comparison)
    backend: str = checked("auto", words=("auto", "torch", "te", "hf"))
    # activation, layer_norm_eps, token_dropout: null = the model's own value, i.e. ESM-2's (gelu, 1e-5, true) or, with
    # init_from, the checkpoint's config.json. A value given replaces it (with init_from the log says so).
    # gelu = ESM-2's exact erf GELU; gelu_tanh = TE's fused approximation (te only).
    activation: str | None = checked(None, words=("gelu", "gelu_tanh"))
    # The preset's shape, overridden (null keeps it; with init_from the checkpoint fixes it).
    num_layers: int | None = checked(None, "[1, inf)")
    hidden_size: int | None = checked(None, "[1, inf)")
    num_heads: int | None = checked(None, "[1, inf)")
    intermediate_size: int | None = checked(None, "[1, inf)")
    layer_norm_eps: float | None = checked(None, "(0, inf)")  # LayerNorm epsilon (ESM-2's facebook checkpoints: 1e-5)
    token_dropout: bool | None = None  # ESM's <mask> embedding dropout with per-sequence rescaling (ESM-2: true)
    fp32_residual: bool = False  # under bf16 autocast keep the residual stream in fp32 (as transformers); false = bf16, faster
    # The te backend's rotary of q and k. te = TE's fused THD rope; triton = one Triton pass over the fused QKV forward
    # and one backward (recipe/model/rope_kernel.py; te backend at cp_size 1 only); auto = triton where it can run
    # (te backend, cp_size 1, Triton importable), else te; the start-up log and the run's saved config.yaml record the
    # pick. Measured: docs/benchmarks.md.
    rope_kernel: str = checked("auto", words=("auto", "te", "triton"))
    # Packed (THD) attention on CUDA. triton = our kernels (recipe/model/attention.py), either backend (te: without
    # context parallelism); flash = PyTorch's FlashAttention-2 (varlen_attn), torch backend; te = TE's
    # DotProductAttention (cuDNN), te backend. auto = triton where it was measured faster and Triton imports (torch
    # backend: head dims 16, 24, 32, 64 against FA2; te backend: head dim 64 against cuDNN, cp_size 1), else the
    # backend's own (flash, te); logged and saved in the run's config.yaml. Measured: docs/benchmarks.md. On the CPU
    # auto gives the backend's own and PyTorch's SDPA runs; the hf backend runs transformers' attention (auto only).
    attention_kernel: str = checked("auto", words=("auto", "flash", "te", "triton"))
    # A local Hugging Face ESM-2 directory to start from (continued pretraining); its shape wins over model.size, and
    # shape keys given with it are an error.
    init_from: str | None = None


@dataclass
class DatasetConfig:
    train_path: str = "data/uniprot_sample/train"  # FASTA(.gz/.xz), parquet file/dir, CSV, datasets dir, or a prepared store
    val_path: str | None = "data/uniprot_sample/validation"  # null: no validation
    format: str = "auto"  # auto, fasta, parquet, csv, hf, store
    column: str = "sequence"  # column that holds sequences (parquet, csv, hf)
    streaming: bool = False  # stream train_path through datasets.IterableDataset instead of loading it into memory
    # >0: shuffle the stream through a buffer (datasets cannot checkpoint it: inexact resume).
    streaming_shuffle_buffer: int = checked(0, "[0, inf)")
    # auto (when the data has ur50_id), true, false: sample UniRef50 clusters, then members.
    # Any: a bool or the word auto (OmegaConf has no Union of bool and str).
    cluster_sampling: Any = checked("auto", words=("auto",), kind=bool)
    layout: str = checked("thd", words=("thd", "bshd"))  # thd (packed sequences, cu_seqlens) or bshd (padded batches)
    # Tokens per sequence incl. <cls>/<eos>; longer ones are cropped (at random in training).
    max_seq_length: int = checked(1024, "[3, inf)")
    micro_batch_size: int = checked(16, "[1, inf)")  # sequences per micro-batch (bshd); with thd, sets the default token budget
    # thd token budget per micro-batch; null = micro_batch_size * max_seq_length.
    token_micro_batch_size: int | None = checked(None, "[1, inf)")
    # thd: each micro-batch's token count padded to a multiple of this. auto: 128 where layers run FP8 block scaling
    # without context parallelism and the token budget is a multiple of 128 (TE's block-scaling quantization takes
    # its fast path on whole 128-token tiles only), else 16 (what FP8 GEMMs need); the pick is logged.
    pad_to_multiple_of: Any = checked("auto", "[1, inf)", words=("auto",), kind=int)
    pad_to_fixed: bool = False  # thd: pad every micro-batch to exactly token_micro_batch_size (static shapes)
    mask_prob: float = checked(0.15, "(0, 1)")  # MLM: share of residues selected (80 % <mask>, 10 % random, 10 % kept)
    num_workers: int = checked(1, "[0, inf)")  # loader worker processes (0 = in the training process)
    pin_memory: bool = True  # pinned host memory + non-blocking copies (cuda only)
    # Batches each worker prepares ahead. auto: enough for two optimizer steps' micro-batches (2 x grad_acc_steps)
    # over the workers, at least 4, so that a step's batches are ready when it starts (the step takes them all before
    # its first forward; the pick is logged).
    prefetch_factor: Any = checked("auto", "[1, inf)", words=("auto",), kind=int)


@dataclass
class ValidationConfig:
    # Also runs after the last step; null or 0 = only at the end (negative used to mean every step: now an error).
    every_n_steps: int | None = checked(500, "[0, inf)")
    max_batches: int | None = checked(None, "[1, inf)")  # cap on validation micro-batches per rank (null = the full split)


@dataclass
class OptimizerConfig:
    lr: float = checked(4.0e-4, "[0, inf)")  # peak learning rate
    betas: list[float] = checked([0.9, 0.98], "[0, 1)", length=2)  # AdamW's (beta1, beta2)
    eps: float = checked(1.0e-8, "(0, inf)")  # AdamW's epsilon
    weight_decay: float = checked(0.01, "[0, inf)")  # decoupled (AdamW) weight decay of the matrices
    # Kinds without weight decay: bias, norm (LayerNorm weights), embedding.
    no_decay: list[str] = checked(["bias", "norm"], words=("bias", "norm", "embedding"))
    # AdamW's update: triton = one Triton launch per parameter group (FP32 CUDA parameters; optim.TritonAdamW), true =
    # torch's fused kernel, false = torch's foreach; auto = triton on CUDA for whole (unsharded) FP32 parameters,
    # else true; false on the CPU. Any: a bool or a word (OmegaConf has no such Union).
    fused: Any = checked("auto", words=("auto", "triton"), kind=bool)


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = checked(2000, "[0, inf)")  # linear warmup: step s (0-based) uses lr x (s+1)/warmup_steps, never 0
    decay_end_fraction: float = checked(0.9, "(0, 1]")  # linear decay ends at this fraction of num_train_steps ...
    min_lr_ratio: float = checked(0.1, "[0, 1]")  # ... at this share of the peak, constant afterwards


@dataclass
class CheckpointConfig:
    ckpt_dir: str | None = None  # null = ${output_dir}/checkpoints
    # 0 or null: only the final / preemption checkpoints (negative: an error).
    save_every_n_steps: int | None = checked(1000, "[0, inf)")
    resume_from_checkpoint: bool = False  # resume from the newest complete checkpoint under ckpt_dir that verifies (else older)
    save_final_model: bool = True  # write ${output_dir}/final_model (Hugging Face format) at the end
    save_final_checkpoint: bool = True  # also write a resumable checkpoint after the last step
    # Keep this run's newest N complete checkpoints (null or 0 = all; negative, which used to delete each checkpoint
    # right after it was saved, is an error).
    max_checkpoints: int | None = checked(3, "[0, inf)")
    async_save: bool = False  # write model/optimizer shards in the background (torch.distributed.checkpoint)


@dataclass
class FSDPConfig:
    fp32_master_weights: bool = True  # keep fp32 parameters and compute in bf16 (MixedPrecisionPolicy); false = bf16 params
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2 like)
    # With grad_acc_steps > 1 and sharded parameters: reduce-scatter each micro-batch's gradients and accumulate the
    # shards (memory: a shard per rank); false accumulates whole FP32 gradients on every rank (4 bytes per parameter:
    # 60 GB at 15B) and reduce-scatters once per step. FSDP2 only: Megatron-FSDP always reduces each micro-batch, DDP
    # holds whole gradients anyway and all-reduces once per step.
    reduce_every_micro_batch: bool = True


@dataclass
class FP8Config:
    """TransformerEngine FP8 for the transformer layers (te backend, GPU)."""

    enabled: bool = False  # FP8 layers (which ones: fp8_layers)
    # Or Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling (same module).
    fp8_recipe: str = "transformer_engine.common.recipe.DelayedScaling"
    fp8_format: str = "HYBRID"  # HYBRID (E4M3 forward, E5M2 backward) or E4M3
    # Extra arguments for the recipe class (free-form, passed through; e.g. amax_history_len).
    fp8_recipe_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class FP4Config:
    """TransformerEngine NVFP4 (Blackwell)."""

    enabled: bool = False  # FP4 layers (which ones: fp4_layers)
    fp4_recipe: str = "transformer_engine.common.recipe.NVFP4BlockScaling"  # the TransformerEngine recipe class
    fp4_format: str = "E2M1"  # the recipe's Format member
    fp4_recipe_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for the recipe class (free-form)


@dataclass
class QuantStatsConfig:
    """FP8/FP4 quantization statistics per quantized layer (TE debug API; te backend, GPU; docs/quant_stats.md)."""

    enabled: bool = False  # collect and log the statistics
    # nvdlfw_inspect YAML of what to log and how often; null = hydra_config/quant_stats/layer_stats.yaml, whose
    # "{fp8_layers}"/"{fp4_layers}" become the layers the precision plan quantizes.
    quant_stats_file: str | None = None
    # null = ${output_dir}/quant_stats: quant_stats.jsonl (a line per logged step), the resolved YAML.
    quant_log_dir: str | None = None
    # Also to the wandb run as quant/<layer>_<tensor>_<stat> (needs wandb.enabled; TensorBoard gets them whenever
    # tensorboard.enabled).
    log_to_wandb: bool = False


@dataclass
class ProfilerConfig:
    """torch.profiler over a few optimizer steps of this run (recipe/profiling.py): a trace and a kernel-time summary."""

    # Profile steps start_step .. start_step + num_steps - 1. The profiled steps run slower (the trace export is left
    # out of the training clock): measure speed in a run without the profiler.
    enabled: bool = False
    start_step: int = checked(10, "[2, inf)")  # first profiled optimizer step (1-based); the steps before it warm up
    num_steps: int = checked(3, "[1, inf)")  # optimizer steps profiled
    dir: str | None = None  # null = ${output_dir}/profile: trace_rank<R>.json.gz and summary_rank<R>.txt per rank
    record_shapes: bool = False  # operator input shapes in the trace (larger trace)
    with_stack: bool = False  # Python stacks in the trace (much larger trace, slower steps)


@dataclass
class WandbConfig:
    enabled: bool = False  # log to Weights & Biases as well as metrics.jsonl
    mode: str = "offline"  # offline never touches the network; online needs WANDB_API_KEY
    project: str = "esm2-recipe"  # wandb project the run is filed under
    name: str | None = None  # run name (null = the config name)


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # also write metrics.jsonl's scalars as TensorBoard events (offline; `tensorboard --logdir DIR`)
    log_dir: str | None = None  # null = ${output_dir}/tensorboard


@dataclass
class TrainConfig:
    """Every key the trainer reads."""

    # Where this run writes metrics.jsonl, checkpoints/ and final_model/. Printed at start. The same on every rank.
    # One run at a time (locked); a fresh run refuses a directory holding another run's outputs (README, "Outputs").
    # Under hydra -m each job writes to ${output_dir}/multirun/<job number>.
    output_dir: str = "outputs/${hydra:job.config_name}"
    overwrite_output_dir: bool = False  # true: a fresh run deletes the previous run's checkpoints, metrics.jsonl, final_model/
    seed: int = checked(42, "[0, inf)")  # weights, data order, masking and cropping all derive from it
    num_train_steps: int = checked(1000, "[1, inf)")  # optimizer steps (the LR schedule spans them)
    # Also stop (validate, save, export as at the end) after this much training time.
    max_train_minutes: float | None = checked(None, "(0, inf)")
    grad_acc_steps: int = checked(1, "[1, inf)")  # micro-batches per optimizer step (per rank)
    max_grad_norm: float | None = checked(1.0, "(0, inf)")  # gradient clipping (L2 over all parameters); null disables
    log_every_n_steps: int = checked(10, "[1, inf)")  # metrics.jsonl / wandb / progress bar cadence
    # torch.compile each transformer layer (torch backend; the te backend's layers run fused kernels: nothing to compile).
    use_torch_compile: bool = False
    device: str = checked("auto", words=("auto", "cuda", "cpu"))  # auto (cuda if present, else cpu), cuda, cpu
    precision: str = checked("auto", words=("auto", "bf16", "fp32"))  # auto (bf16 autocast on cuda, fp32 on cpu), bf16, fp32
    # MFU denominator: auto (989 for H100/H200 dense BF16, null elsewhere), a number, or null (no MFU).
    # Any: a number, the word auto or null (OmegaConf has no Union of float and str).
    peak_tflops_per_gpu: Any = checked("auto", "(0, inf)", words=("auto",), kind=float, null=True)
    detect_anomaly: bool = True  # stop on a non-finite loss or gradient, naming the step, before anything is written
    # >0: Python's garbage collector runs every this many steps, while the host waits for the GPU, instead of whenever
    # its allocation counters say (a pause of the host at any point of a step); what set-up built, and what each
    # collection leaves, is frozen out of the next (each scans only what the last steps allocated).
    # 0: Python's automatic collection.
    gc_every_n_steps: int = checked(50, "[0, inf)")
    # Context parallelism: ranks that share each sequence (te backend, GPUs); divides the world size.
    cp_size: int = checked(1, "[1, inf)")
    # TE context-parallel communication: p2p (ring, overlapped with compute), all_gather, a2a.
    cp_comm_type: str = checked("p2p", words=("p2p", "all_gather", "a2a"))

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    fp8_config: FP8Config = field(default_factory=FP8Config)
    fp8_layers: list[int] | None = None  # 1-indexed layers in FP8; null = every layer fp4_layers does not take
    fp4_config: FP4Config = field(default_factory=FP4Config)
    fp4_layers: list[int] | None = None  # 1-indexed layers in FP4; null = every layer fp8_layers does not take
    # FP8/FP4 layers hold only quantized weights (te.quantized_model_init); the optimizer (TE FusedAdam, master_weights)
    # keeps the FP32 master copy. Saves weight memory.
    quantized_model_init: bool = False
    quant_stats_config: QuantStatsConfig = field(default_factory=QuantStatsConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


# hydra_config/defaults.yaml lists `schema` first in its defaults: every config file is merged into TrainConfig.
ConfigStore.instance().store(name="schema", node=TrainConfig)


# ====================================================================================== checks
def _rule_for(rule: Rule, hint: Any) -> Rule:
    """`rule` completed from the field's annotation: the type, whether null is allowed, whether it is a list."""
    if hint is Any:
        return rule
    args = typing.get_args(hint)
    null = type(None) in args
    if null:
        hint = next(arg for arg in args if arg is not type(None))
    items = typing.get_origin(hint) is list
    return dataclasses.replace(rule, kind=typing.get_args(hint)[0] if items else hint, null=null, items=items)


def _fits(value: Any, rule: Rule) -> bool:
    if isinstance(value, str) and value in rule.words:
        return True
    if rule.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
    elif rule.kind is None or not isinstance(value, rule.kind) or (isinstance(value, bool) and rule.kind is not bool):
        return False
    if rule.interval is None:
        return rule.kind is not str or not rule.words  # a word-only key takes nothing but its words
    lo, hi = (float(x) for x in rule.interval[1:-1].split(","))
    return (lo <= value if rule.interval[0] == "[" else lo < value) and (value <= hi if rule.interval[-1] == "]" else value < hi)


def allows(rule: Rule, value: Any) -> bool:
    if value is None:
        return rule.null
    if rule.items:
        return (
            isinstance(value, (list, ListConfig))
            and (rule.length is None or len(value) == rule.length)
            and all(_fits(v, rule) for v in value)
        )
    return _fits(value, rule)


def describe(rule: Rule) -> str:
    assert rule.kind is not None, "an Any field's rule names its kind"
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[rule.kind]
    if rule.interval:
        lo, hi = rule.interval[1:-1].split(", ")
        kind += f" {'>=' if rule.interval[0] == '[' else '>'} {lo}" if hi == "inf" else f" in {rule.interval}"
    if rule.words:
        kind = f"one of {rule.words}" if rule.kind is str else f"{kind} or one of {rule.words}"
    if rule.items:
        kind = f"a list of {rule.length} items, each {kind}" if rule.length is not None else f"a list, each item {kind}"
    return kind + (" or null" if rule.null else "")


def _sections(cfg: DictConfig, schema: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig, type]]:
    """(key prefix, node, dataclass) of the root and every section below it."""
    yield prefix, cfg, schema
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(cfg[f.name], hints[f.name], f"{prefix}{f.name}.")


def check_known_keys(cfg: DictConfig) -> None:
    """OmegaConf refuses every key the schema lacks, except one added with hydra's `+key=value` (append): those."""
    unknown = sorted(
        prefix + str(key)
        for prefix, node, schema in _sections(cfg)
        for key in node
        if key not in {f.name for f in dataclasses.fields(schema)} and not (prefix == "" and key == "hydra")
    )
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (every key is defined in recipe/config.py)")


def check_values(cfg: DictConfig) -> None:
    """Every field with a rule (`checked`) holds what the rule allows; else a ConfigError naming the key, the value
    and the rule. (The type itself OmegaConf has already enforced, except for `Any` fields.)"""
    for prefix, node, schema in _sections(cfg):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if "rule" not in f.metadata:
                continue
            rule, value = _rule_for(f.metadata["rule"], hints[f.name]), node[f.name]
            if not allows(rule, value):
                shown = list(value) if isinstance(value, ListConfig) else value
                raise ConfigError(f"{prefix}{f.name}={shown!r} must be {describe(rule)}")


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


PAD_MULTIPLE = 16  # FP8 GEMMs need token counts divisible by 16
BLOCK_SCALING_TILE = 128  # rows of TE's FP8 block-scaling quantization tiles


def pad_multiple(cfg: DictConfig) -> tuple[int, str]:
    """dataset.pad_to_multiple_of as a number, and why (for the log when it was `auto`). Measured: FP8 block
    scaling on token counts of whole 128-token tiles runs TE's aligned quantization kernel; on others its unaligned
    one, much slower (docs/benchmarks.md, lever 34). BF16 runs gain nothing from it and keep 16."""
    given = cfg.dataset.pad_to_multiple_of
    if given != "auto":
        return int(given), "set"
    if cfg.dataset.layout != "thd":
        return PAD_MULTIPLE, "bshd batches pad each row instead"
    fp8 = cfg.fp8_config
    if not (fp8.enabled and recipe_name(fp8.fp8_recipe) == "Float8BlockScaling"):
        return PAD_MULTIPLE, "no FP8 block scaling"
    if cfg.cp_size > 1:
        return PAD_MULTIPLE, "context parallelism pads each sequence instead"
    if token_budget(cfg) % BLOCK_SCALING_TILE:
        return PAD_MULTIPLE, f"the token budget {token_budget(cfg)} is not a multiple of {BLOCK_SCALING_TILE}"
    return BLOCK_SCALING_TILE, "FP8 block scaling quantizes whole 128-token tiles fastest"


MIN_PREFETCH = 4  # batches per worker: torch's DataLoader default is 2, more costs nothing at our batch sizes


def prefetch_factor(cfg: DictConfig) -> tuple[int, str]:
    """dataset.prefetch_factor as a number, and why (for the log when it was `auto`). A step fetches its
    grad_acc_steps micro-batches before its first forward: with fewer in flight, the GPU waits while the workers
    make the rest (docs/benchmarks.md, lever 47). Two steps' worth keeps the workers busy while the host takes one."""
    given = cfg.dataset.prefetch_factor
    if given != "auto":
        return int(given), "set"
    workers = max(1, cfg.dataset.num_workers)
    per_worker = max(MIN_PREFETCH, -(-2 * cfg.grad_acc_steps // workers))
    return per_worker, f"2 x grad_acc_steps={cfg.grad_acc_steps} micro-batches over {workers} worker(s)"


def validate(cfg: DictConfig) -> None:
    """Every check that can fail before the first step. Raises ConfigError naming the key or path."""
    if OmegaConf.get_type(cfg) is not TrainConfig:  # a config file without the defaults chain: nothing typed it
        raise ConfigError(
            "the config is not built on the typed schema (recipe/config.py's TrainConfig): list `defaults` (or `schema`) "
            "first in the config file's defaults list, as every file in hydra_config/ does"
        )
    check_known_keys(cfg)
    check_values(cfg)
    d = cfg.dataset
    if d.token_micro_batch_size is not None and d.micro_batch_size * d.max_seq_length > d.token_micro_batch_size:
        raise ConfigError(
            f"dataset.micro_batch_size={d.micro_batch_size} x dataset.max_seq_length={d.max_seq_length} = "
            f"{d.micro_batch_size * d.max_seq_length} tokens does not fit "
            f"dataset.token_micro_batch_size={d.token_micro_batch_size}"
        )
    multiple = PAD_MULTIPLE if d.pad_to_multiple_of == "auto" else d.pad_to_multiple_of
    if d.layout == "thd" and token_budget(cfg) % multiple:
        given = f"auto (at least {PAD_MULTIPLE})" if d.pad_to_multiple_of == "auto" else multiple
        raise ConfigError(
            f"the token budget {token_budget(cfg)} (dataset.token_micro_batch_size) must be a multiple of "
            f"dataset.pad_to_multiple_of={given}"
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

Every key, with its meaning, type, default and range, is documented in recipe/config.py (TrainConfig, one dataclass
per section); override any of them in a config file or on the command line as key=value (e.g. num_train_steps=200
model.backend=hf tensorboard.enabled=true). A key defined nowhere there, a wrong type or a value out of its range is
an error naming the key.

  --cfg job       print the composed config and exit
  --hydra-help    hydra's own options

After training: python -m recipe.evaluate --help (score a model on a protein file), python -m recipe.plot --help
(loss curves from metrics.jsonl)."""


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python containers, interpolations resolved (what wandb records with the run)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(key): value for key, value in container.items()}


def ckpt_dir(cfg: DictConfig) -> Path:
    return Path(cfg.checkpoint.ckpt_dir) if cfg.checkpoint.ckpt_dir is not None else Path(cfg.output_dir) / "checkpoints"
