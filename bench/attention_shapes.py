"""How long TransformerEngine's THD attention spends on the host when the packed batch's shape changes.

The 650M trace showed the first attention call of some steps stalling 71-75 ms on the host before its first kernel.
This probe separates the three things that change between packed batches: the number of sequences (`b`, the length
of `cu_seqlens` minus one), the longest sequence (`max_seqlen`) and the number of tokens (`T`). It runs one layer's
attention (forward and backward) at the 650M shape, first repeating one shape, then changing one of the three at a
time, and prints the host time of each call (the GPU is idle meanwhile, so host time over a few ms is a stall).

    source .device/setup.sh && python bench/attention_shapes.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: off
import transformer_engine
import transformer_engine.pytorch  # noqa: F401  (before torch touches CUDA: TE loads its cuDNN first)
import torch
# isort: on

from recipe.model import EsmConfig  # noqa: E402
from recipe.model.te_layers import TEEsmLayer  # noqa: E402


def te_layer(heads: int, head_dim: int, rope_kernel: str = "te") -> tuple[EsmConfig, TEEsmLayer]:
    """The te backend's ESM-2 layer (and its config) at this head shape, on the GPU: the probes run its own code."""
    cfg = EsmConfig.from_size("650M", backend="te", hidden_size=heads * head_dim, num_heads=heads)
    return cfg, TEEsmLayer(cfg, device="cuda", rope_kernel=rope_kernel)


def cu_seqlens(num_tokens: int, num_seqs: int, max_seqlen: int, device) -> torch.Tensor:
    """num_seqs segments covering num_tokens, the first of length max_seqlen, the rest as even as they can be."""
    rest = num_tokens - max_seqlen
    lengths = [max_seqlen] + [rest // (num_seqs - 1) + (i < rest % (num_seqs - 1)) for i in range(num_seqs - 1)]
    assert max(lengths) == max_seqlen and sum(lengths) == num_tokens, (num_tokens, num_seqs, max_seqlen)
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def host_ms(attn, shape: tuple[int, int, int], heads: int, head_dim: int) -> tuple[float, float]:
    num_tokens, num_seqs, max_seqlen = shape
    dev = torch.device("cuda")
    q, k, v = (torch.randn(num_tokens, heads, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    cu = cu_seqlens(num_tokens, num_seqs, max_seqlen, dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    grad = torch.ones_like(out)
    t2 = time.perf_counter()
    out.backward(grad)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3, (t3 - t2) * 1e3


def shape_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a one-layer probe: a size's head shape and a packed batch (defaults: 650M, 49,152 tokens)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=49152)
    p.add_argument("--seqs", type=int, default=135)
    return p


def main() -> None:
    p = shape_arguments(__doc__)
    p.add_argument("--max-seqlen", type=int, default=1024)
    a = p.parse_args()
    attn = te_layer(a.heads, a.head_dim)[1].core_attention  # the model's attention module, as the layer builds it
    T, b, s = a.tokens, a.seqs, a.max_seqlen
    cases = [("first call", (T, b, s))] + [("same shape", (T, b, s))] * 3
    cases += [(f"b {b}->{b + d}", (T, b + d, s)) for d in (1, 2, 40)] + [(f"b back to {b + 1}", (T, b + 1, s))]
    cases += [(f"max_seqlen {s}->{s - d}", (T, b, s - d)) for d in (7, 64)] + [(f"max_seqlen back to {s - 7}", (T, b, s - 7))]
    cases += [(f"T {T}->{T - d}", (T - d, b, s)) for d in (16, 32, 4096)] + [(f"T back to {T - 16}", (T - 16, b, s))]
    print(f"TE {transformer_engine.__version__}, {torch.cuda.get_device_name()}, heads {a.heads} x {a.head_dim}")
    print(f"{'case':24s} {'T':>6s} {'b':>4s} {'max_seqlen':>10s} {'fwd host ms':>12s} {'bwd host ms':>12s}")
    for name, shape in cases:
        fwd, bwd = host_ms(attn, shape, a.heads, a.head_dim)
        print(f"{name:24s} {shape[0]:6d} {shape[1]:4d} {shape[2]:10d} {fwd:12.2f} {bwd:12.2f}", flush=True)


if __name__ == "__main__":
    main()
