"""Packed (THD) attention kernels side by side at each ESM-2 size's head count and head dim, on real Swiss-Prot
packings: FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`, what the torch backend runs), our Triton
kernels (`triton`: recipe/model/attention.py, launch settings --fwd and --bwd), TransformerEngine's
`DotProductAttention` (cuDNN, what the te backend runs), and cuDNN's ragged attention through PyTorch's private ATen
ops (`aten._cudnn_attention_forward/backward` with cumulative sequence lengths, the path of nested-tensor SDPA;
`varlen_attn` has it switched off). Forward plus backward of one layer's attention, and the largest difference of
each kernel's output and gradients from FA2's.

    python bench/attention_kernels.py --data .device/data/swissprot14_train_100k.fasta.xz --sizes 8M 35M 150M 650M

--sweep instead times the Triton forward and backward alone at each launch setting of `sweep_launches()` (block
sizes, warps, stages) on each size's batch, with each setting's largest difference from FA2, and prints the fastest
of each as one line `BEST size=... fwd=... bwd=...` (settings as --fwd/--bwd take them: block_m,block_n,warps,stages).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # before any CUDA work (TE loads its cuDNN first)
    import transformer_engine.pytorch as te
except ImportError:
    te = None
import torch  # noqa: E402

from bench.throughput import TOKEN_BUDGET, batches_for, timed_seconds  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.model import EsmConfig, attention  # noqa: E402


class CudnnVarlen(torch.autograd.Function):
    """cuDNN ragged attention on [T, H, D] through the ATen ops that nested-tensor SDPA calls (scale 1/sqrt(D))."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, 0.0, False, False
        )[:2]
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu = ctx.saved_tensors
        no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed and offset, unused
        m = ctx.max_seqlen
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, no_dropout, no_dropout, None, cu, cu, m, m, 0.0, False
        )
        return dq, dk, dv, None, None


def parse_launch(text: str) -> attention.Launch:
    """'block_m,block_n,warps,stages' (as the BEST line prints them) as attention.Launch."""
    parts = text.split(",")
    if len(parts) != 4 or not all(x.strip().isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"expected block_m,block_n,warps,stages (four integers), got {text!r}")
    return attention.Launch(*(int(x) for x in parts))


def launch_text(launch: attention.Launch) -> str:
    return ",".join(str(x) for x in launch)


def sweep_launches(backward: bool) -> list[attention.Launch]:
    """The settings --sweep times: own block 64 or 128 rows, loop tiles 64 or 128 (also 32 in the backward, whose
    tiles hold more live values), 4 or 8 warps, 2 or 3 stages."""
    tiles = (32, 64, 128) if backward else (64, 128)
    return [attention.Launch(m, n, w, s) for m in (64, 128) for n in tiles for w in (4, 8) for s in (2, 3)]


def kernels_flash2():
    """FA2 (varlen_attn, what the torch backend runs): the reference of every difference printed."""
    from torch.nn.attention.varlen import varlen_attn

    return lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m)


def kernels(cfg: EsmConfig, fwd: attention.Launch = attention.FORWARD, bwd: attention.Launch = attention.BACKWARD) -> dict:
    out = {
        "flash2": kernels_flash2(),
        "triton": lambda q, k, v, cu, m: attention.varlen_attention(q, k, v, cu, m, fwd=fwd, bwd=bwd),
        "cudnn_aten": lambda q, k, v, cu, m: CudnnVarlen.apply(q, k, v, cu, m),
    }
    if te is not None:
        dpa = te.DotProductAttention(
            cfg.num_heads,
            cfg.head_dim,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding",
            softmax_scale=cfg.head_dim**-0.5,
        )
        out["te"] = lambda q, k, v, cu, m: dpa(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m).view(
            q.shape
        )
    return out


def run(fn, q, k, v, cu, m, grad):
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v, cu, m)
    o.backward(grad)
    return o, q.grad, k.grad, v.grad


def time_ms(fn, args, iters: int) -> float:
    for _ in range(3):
        run(fn, *args)
    return timed_seconds(lambda _: run(fn, *args), list(range(iters))) * 1e3 / iters


def compare(fns: dict, args: tuple, iters: int) -> dict[str, str]:
    """Per kernel: 'ms (max |difference| from FA2 of out, dq, dk, dv)', or why it failed."""
    ref = [x.float() for x in run(fns["flash2"], *args)]
    cells = {}
    for name, fn in fns.items():
        try:
            ms = time_ms(fn, args, iters)
            diffs = [(r - x.float()).abs().max().item() for r, x in zip(ref, run(fn, *args))]
            cells[name] = f"{ms:.2f}" + ("" if name == "flash2" else " (" + ", ".join(f"{d:.1e}" for d in diffs) + ")")
        except Exception as exc:  # a kernel that fails at this shape is reported, the others still run
            cells[name] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            torch.cuda.empty_cache()
    return cells


def sweep(size: str, args: tuple, iters: int) -> str:
    """Times our forward and backward kernels alone at each of sweep_launches(), prints one line per setting (ms and
    the largest difference from FA2 of out, or of dq, dk, dv), and returns the BEST line."""
    q, k, v, cu, m, grad = args
    scale = q.shape[-1] ** -0.5
    ref = [x.float() for x in run(kernels_flash2(), *args)]
    q0, k0, v0 = (x.detach() for x in (q, k, v))
    out, lse = attention.attention_forward(q0, k0, v0, cu, scale)
    best = {}
    for phase in ("fwd", "bwd"):
        for launch in sweep_launches(phase == "bwd"):
            if phase == "fwd":
                step = lambda _, lc=launch: attention.attention_forward(q0, k0, v0, cu, scale, lc)  # noqa: E731
            else:
                step = lambda _, lc=launch: attention.attention_backward(grad, q0, k0, v0, out, lse, cu, scale, lc)  # noqa: E731
            try:
                got = step(None)
                for _ in range(2):
                    step(None)
                ms = timed_seconds(step, list(range(iters))) * 1e3 / iters
            except Exception as exc:  # a setting that does not compile or launch (shared memory) is skipped
                print(f"  {size} {phase} {launch_text(launch)}: fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            got = got[:1] if phase == "fwd" else got
            want = ref[:1] if phase == "fwd" else ref[1:]
            diff = max((r - x.float()).abs().max().item() for r, x in zip(want, got))
            print(f"  {size} {phase} {launch_text(launch)}: {ms:.3f} ms (max diff from FA2 {diff:.1e})", flush=True)
            if phase not in best or ms < best[phase][1]:
                best[phase] = (launch, ms)
    cells = [f"{ph}={launch_text(best[ph][0])} ({best[ph][1]:.3f} ms)" if ph in best else f"{ph}=none" for ph in ("fwd", "bwd")]
    return f"BEST size={size} " + " ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", nargs="+", default=["8M", "35M", "150M", "650M", "3B"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--fwd", type=parse_launch, default=attention.FORWARD, help="our forward's block_m,block_n,warps,stages")
    p.add_argument("--bwd", type=parse_launch, default=attention.BACKWARD, help="our backward's block_m,block_n,warps,stages")
    p.add_argument("--sweep", action="store_true", help="time our kernels' launch settings; print the best per size")
    a = p.parse_args()
    for size in a.sizes:
        EsmConfig.from_size(size)  # an unknown size fails here, before any data is read
    store = load_sequences(a.data)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms per forward + backward, and in brackets the "
        "largest difference from FA2 of out, dq, dk, dv (random bf16 inputs)"
    )
    names = ["flash2", "triton", "te", "cudnn_aten"]
    if a.sweep:
        print(f"sweep of our kernels' launch settings; {a.iters} iterations each")
    else:
        print(f"triton: fwd {launch_text(a.fwd)}, bwd {launch_text(a.bwd)} (block_m,block_n,warps,stages)")
        print("| size | heads × head dim | tokens | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
    for size in a.sizes:
        cfg = EsmConfig.from_size(size)
        b = batches_for(store, "torch", TOKEN_BUDGET[size], 1)[0]  # the torch row's first packed micro-batch
        cu, m = b["cu_seqlens"], int(b["max_seqlen"])
        t = int(cu[-1])
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, grad = (
            torch.randn(t, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
        )
        for x in (q, k, v):
            x.requires_grad_(True)
        if a.sweep:
            print(sweep(size, (q, k, v, cu, m, grad), a.iters), flush=True)
            continue
        cells = compare(kernels(cfg, a.fwd, a.bwd), (q, k, v, cu, m, grad), a.iters)
        print(
            f"| {size} | {cfg.num_heads} × {cfg.head_dim} | {t:,} | " + " | ".join(cells.get(n, "—") for n in names) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
