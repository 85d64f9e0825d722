"""ESM-2 model configuration: the published sizes and the knobs our backends add."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from recipe.data.tokenizer import MASK_ID, PAD_ID, VOCAB

# Layer / hidden / head / FFN counts as published with the facebook/esm2_* checkpoints (Lin et al. 2023).
# "tiny" is ours: a 4-layer model for CPU smoke runs and tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=4, hidden_size=128, num_heads=8, intermediate_size=512),
    "8M": dict(num_layers=6, hidden_size=320, num_heads=20, intermediate_size=1280),
    "35M": dict(num_layers=12, hidden_size=480, num_heads=20, intermediate_size=1920),
    "150M": dict(num_layers=30, hidden_size=640, num_heads=20, intermediate_size=2560),
    "650M": dict(num_layers=33, hidden_size=1280, num_heads=20, intermediate_size=5120),
    "3B": dict(num_layers=36, hidden_size=2560, num_heads=40, intermediate_size=10240),
    "15B": dict(num_layers=48, hidden_size=5120, num_heads=40, intermediate_size=20480),
}

# "hf" is transformers' EsmForMaskedLM in our loop (recipe/model/hf.py), for comparison with the reference.
BACKENDS = ("auto", "torch", "te", "hf")
# "gelu" is ESM-2's exact erf GELU; "gelu_tanh" is the tanh approximation TE fuses into LayerNormMLP.
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class EsmConfig:
    """Everything that fixes the parameter layout and the numerics of one ESM-2 model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = len(VOCAB)
    pad_token_id: int = PAD_ID
    mask_token_id: int = MASK_ID
    layer_norm_eps: float = 1e-5  # the facebook checkpoints' value, not transformers' class default 1e-12
    token_dropout: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1026  # only written into exported HF configs; rotary has no length limit
    initializer_range: float = 0.02
    backend: str = "auto"
    activation: str = "gelu"
    # Under bf16/fp16 autocast the residual stream runs in the autocast dtype, as under FSDP2's mixed precision and in
    # Megatron; True keeps it in fp32 as transformers' EsmForMaskedLM does (slower: docs/benchmarks.md). No effect
    # without autocast.
    fp32_residual: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r} is not one of {BACKENDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r} is not one of {ACTIVATIONS}")
        for key in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("rotary embeddings need an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> EsmConfig:
        if size not in SIZES:
            raise ValueError(f"model.size={size!r} is not a known ESM-2 size; choose one of {sorted(SIZES)}")
        fields: dict[str, Any] = dict(SIZES[size])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shape_dict(self) -> dict[str, int]:
        """The fields that decide tensor shapes: a checkpoint only loads into a model that agrees on these."""
        return {k: getattr(self, k) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size")}


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in the group of ranks that share each sequence (size 1: no context parallelism)."""

    size: int = 1
    rank: int = 0
    group: Any = None  # torch ProcessGroup of the `size` ranks
    ranks: tuple[int, ...] = ()  # their global ranks
    comm_type: str = "p2p"  # TE's context-parallel communication: p2p, all_gather, a2a


@dataclass(frozen=True)
class Runtime:
    """How the model runs, fixed when it is built (never set afterwards): context parallelism, the per-layer
    quantization recipes, the rotary and attention kernels, and whether forward checks its inputs. The trainer's packer guarantees
    what the checks test, so it builds the model without them (each costs a GPU sync per micro-batch); anyone else
    keeps them."""

    context_parallel: ContextParallel = field(default_factory=ContextParallel)
    layer_recipes: tuple | None = None  # te backend: one TE recipe per layer, None for a BF16 layer
    amax_group: Any = None  # process group over which FP8 amaxes are reduced (all ranks)
    check_inputs: bool = True
    rope_kernel: str = "te"  # te backend: "te" (TE's fused THD rope) or "triton" (recipe/model/rope_kernel.py)
    # Packed attention on CUDA: "triton" (attention.py) or the backend's own, "flash" (torch: varlen_attn) or "te" (TE's
    # DotProductAttention); the te backend takes "flash" as "te"
    attention_kernel: str = "flash"
