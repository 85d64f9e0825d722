"""Packed (THD) attention kernels side by side at each ESM-2 size's head count and head dim, on real Swiss-Prot
packings: FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`, what the torch backend ran), our Triton
kernels (`triton`: recipe/model/attention.py, launch settings --fwd and --bwd), TransformerEngine's
`DotProductAttention` (cuDNN, what the te backend runs at head dims other than 64 and under context parallelism),
cuDNN's ragged attention through PyTorch's private ATen ops (`aten._cudnn_attention_forward/backward` with
cumulative sequence lengths, the path of nested-tensor SDPA; `varlen_attn` has it switched off), and PyTorch's
FlexAttention over the packed tokens as one sequence with a document mask (compiled; the block mask's build, once
per micro-batch for all layers, timed apart). Forward plus backward of one layer's attention, and the largest
difference of each kernel's output and gradients from FA2's.

    python bench/attention_kernels.py --data .device/data/swissprot14_train_100k.fasta.xz --sizes 8M 35M 150M 650M
    python bench/attention_kernels.py --data ... --sizes 8M 35M 150M --kernels flash2 triton flex flex_bs64 flex_ranges

--sweep instead times the Triton forward and backward alone at each launch setting of `sweep_launches()` (block
sizes, warps, stages) on each size's batch, with each setting's largest difference from FA2, and prints the fastest
of each as one line `BEST size=... fwd=... bwd=...` (settings as --fwd/--bwd take them: block_m,block_n,warps,stages).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # before any CUDA work (TE loads its cuDNN first)
    import transformer_engine.pytorch as te
except ImportError:
    te = None
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: E402

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


# FlexAttention: the packed [T, H, D] tokens as one [1, H, T, D] sequence, each token attending to the tokens of its
# own packed sequence (bidirectional). Column name: (sparse block size of the BlockMask, pad the head dim to a power
# of 2, how the mask is built). Flex's Triton template takes any head dim (it rounds up inside); flex_pad zero-pads
# q, k and v instead, to see whether that is faster at head dim 24 (35M), and is skipped where the head dim is a
# power of 2 already. flex_ranges: the same mask as flex, built from block ends instead of create_block_mask.
FLEX_VARIANTS = {
    "flex": (128, False, "mask_mod"),
    "flex_bs64": (64, False, "mask_mod"),
    "flex_pad": (128, True, "mask_mod"),
    "flex_ranges": (128, False, "ranges"),
}


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per token of a packed batch of `total` tokens, the index of its sequence in `cu_seqlens`. Tokens past
    cu_seqlens[-1] (padding to a fixed token count) get one more index, so they attend only among themselves and
    no real token sees them. Sync-free (no .item()), so it can run ahead of the GPU like the rest of the step."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


def same_document(doc: torch.Tensor):
    """Flex mask_mod: query and key in the same document (bidirectional within it)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return mask_mod


def document_block_mask(doc: torch.Tensor, block_size: int = 128) -> BlockMask:
    """Flex's BlockMask for bidirectional attention within each document of `doc` (from `document_ids`): blocks
    whose queries and keys share no document are skipped, blocks inside one document run without the mask_mod."""
    t = doc.numel()
    return create_block_mask(same_document(doc), None, None, t, t, device=doc.device, BLOCK_SIZE=block_size)


def document_block_mask_from_ranges(doc: torch.Tensor, block_size: int = 128) -> BlockMask:
    """The same BlockMask as `document_block_mask`, from block ends alone: documents are contiguous runs of tokens,
    so two blocks share a document iff their document ranges overlap, and a block pair is full iff both lie in one
    and the same document (a last, shorter block counts as partial, as create_block_mask has it). Work in blocks²
    instead of the mask_mod's T², for when building the mask per micro-batch costs."""
    t = doc.numel()
    starts = torch.arange(0, t, block_size, device=doc.device)
    first, last = doc[starts], doc[(starts + block_size).clamp(max=t) - 1]
    whole = (first == last) & (starts + block_size <= t)
    touch = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    full = whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
    partial = touch & ~full

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # counts and indices, present first
        order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return blocks.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=same_document(doc), seq_lengths=(t, t)
    )


def flex_packed(q, k, v, block_mask: BlockMask, pad_head_dim: bool = False) -> torch.Tensor:
    """Flex attention on packed [T, H, D] q, k, v (views as [1, H, T, D], no copies) with a document `block_mask`;
    scale 1/sqrt(D) as FA2. `pad_head_dim` zero-pads D to the next power of 2 (scores unchanged: the padded columns
    add zeros to q·k, the output's padded columns are sliced off). Returns [T, H, D] (a view)."""
    d = q.shape[-1]
    q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    if pad_head_dim:
        q, k, v = (F.pad(x, (0, (1 << (d - 1).bit_length()) - d)) for x in (q, k, v))
    out = flex_attention(q, k, v, block_mask=block_mask, scale=d**-0.5)
    return out[..., :d].transpose(1, 2).squeeze(0)


def block_mask_cost(build, cu: torch.Tensor, total: int, block_size: int, iters: int) -> tuple[BlockMask, str]:
    """Build the block mask from cu_seqlens (document ids, then the compiled build; warmed up) and say what a build
    costs: ms per build on the GPU and on the host's clock (launches and guards included), the peak memory it adds
    above what was allocated before (a mask materialised at T × T would show here), and the size of its tensors."""

    def step(_=None):
        return build(document_ids(cu, total), block_size)

    for _ in range(2):  # compiles
        mask = step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ms = timed_seconds(step, list(range(iters))) * 1e3 / iters
    wall = (time.perf_counter() - start) * 1e3 / iters
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    size = sum(x.numel() * x.element_size() for x in mask.as_tuple() if isinstance(x, torch.Tensor)) / 2**20
    return mask, f"; mask {ms:.2f} ms GPU, {wall:.2f} ms wall, peak +{peak:.0f} MiB, holds {size:.1f} MiB"


def flex_kernels(cfg: EsmConfig, cu: torch.Tensor, total: int, names: list[str], mode: str | None, iters: int):
    """The selected flex columns at this packing: kernels for `compare` (the block mask built once beforehand, as the
    model would per micro-batch), and per column a note on the mask build, or why a column did not run. flex_packed
    is compiled whole (fullgraph, static shapes), as a model under torch.compile would run it; so is the mask build."""
    attend = torch.compile(flex_packed, fullgraph=True, dynamic=False, mode=mode)
    builders = {
        "mask_mod": torch.compile(document_block_mask, fullgraph=True, dynamic=False),
        "ranges": torch.compile(document_block_mask_from_ranges, fullgraph=True, dynamic=False),
    }
    fns, notes = {}, {}
    for name in names:
        block, pad, builder = FLEX_VARIANTS[name]
        d = cfg.head_dim
        if pad and d & (d - 1) == 0:
            notes[name] = f"(head dim {d} needs no padding: = flex)"
            continue
        try:
            mask, notes[name] = block_mask_cost(builders[builder], cu, total, block, iters)
        except Exception as exc:  # reported in the column, the other kernels still run
            notes[name] = f"mask build fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            torch.cuda.empty_cache()
            continue
        fns[name] = lambda q, k, v, cu, m, mask=mask, pad=pad: attend(q, k, v, mask, pad)
    return fns, notes


KERNELS = ("flash2", "triton", "te", "cudnn_aten", *FLEX_VARIANTS)


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
    p.add_argument(
        "--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="columns (FA2 runs anyway: the reference)"
    )
    p.add_argument("--flex-mode", default=None, help="torch.compile mode for flex, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--fwd", type=parse_launch, default=attention.FORWARD, help="our forward's block_m,block_n,warps,stages")
    p.add_argument("--bwd", type=parse_launch, default=attention.BACKWARD, help="our backward's block_m,block_n,warps,stages")
    p.add_argument("--sweep", action="store_true", help="time our kernels' launch settings; print the best per size")
    a = p.parse_args()
    for size in a.sizes:
        EsmConfig.from_size(size)  # an unknown size fails here, before any data is read
    names = [n for n in KERNELS if n in a.kernels]
    flex_names = [n for n in names if n in FLEX_VARIANTS]
    # Every size and flex column compiles flex_packed anew (static shapes): more than dynamo's default of 8 per
    # function, past which it would fall back to eager flex (the T × T scores materialised).
    torch._dynamo.config.recompile_limit = 64
    store = load_sequences(a.data)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms per forward + backward, and in brackets the "
        "largest difference from FA2 of out, dq, dk, dv (random bf16 inputs); flex: compiled, one [1, H, T, D] "
        f"sequence with a document BlockMask (flex_bs64: sparse block 64; flex_pad: head dim zero-padded to a power "
        f"of 2; flex_ranges: mask built from block ends), compile mode {a.flex_mode or 'default'}, and the mask's "
        "build per micro-batch"
    )
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
        fns = {n: f for n, f in kernels(cfg, a.fwd, a.bwd).items() if n in names or n == "flash2"}
        notes = {}
        if flex_names:
            flex_fns, notes = flex_kernels(cfg, cu, t, flex_names, a.flex_mode, a.iters)
            fns.update(flex_fns)
        cells = compare(fns, (q, k, v, cu, m, grad), a.iters)
        print(
            f"| {size} | {cfg.num_heads} × {cfg.head_dim} | {t:,} | "
            + " | ".join(cells.get(n, "—") + notes.get(n, "") for n in names)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
