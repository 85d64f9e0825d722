"""Training throughput side by side, in one process on one GPU: transformers' EsmForMaskedLM (padded batches, SDPA,
BF16 autocast, fused AdamW) against our torch backend (eager and torch.compile), our te backend in BF16 and with FP8
block scaling; for the large sizes also each Hopper FP8 recipe and FP8
on only some layers. Every row accumulates gradients over 4 micro-batches per optimizer step, as training does
(--accum; 3B: 1, whose fp32 gradients would not stay resident in 80 GB). Lever rows outside the default table: the
residual stream in fp32 (`torch_fp32res_compile`) and bf16 parameters (`torch_bf16params_compile`).

    python bench/throughput.py --data .device/data/swissprot14_train_100k.fasta.xz --docs docs/benchmarks.md

With --docs the table, with date, GPU and command, replaces this GPU's section of that file (or is appended).
A row that runs out of memory is retried without gradient accumulation, then with half the micro-batch; the batch
column says what ran (micro-batch × micro-batches per optimizer step).

Same sequences and masking for every implementation (our loader, BSHD batches for the baseline). Each row: warm-up
optimizer steps, then timed optimizer steps between CUDA events. Prints a markdown table: unpadded tokens/s, TFLOP/s and
MFU per GPU
(against 989 TFLOP/s dense BF16 and against the bf16 matmul rate measured here at start), peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipe.build import resolve_attention_kernel, resolve_rope_kernel  # noqa: E402
from recipe.data.dataset import BatchSettings, MLMBatches  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.model import EsmConfig, Runtime, build_model  # noqa: E402
from recipe.model.flops import batch_flops  # noqa: E402

DATASHEET_TFLOPS = 989.0
# FP8 rows: the TE recipe on every layer, or on the middle layers only (first and last two layers in BF16).
FP8_ROWS = {
    "te_fp8": ("Float8BlockScaling", "all"),
    "te_fp8_delayed": ("DelayedScaling", "all"),
    "te_fp8_current": ("Float8CurrentScaling", "all"),
    "te_fp8_partial": ("Float8BlockScaling", "middle"),
}
LABELS = {
    "hf": "transformers EsmForMaskedLM (padded, SDPA)",
    "torch": "ours, torch (THD, varlen)",
    "torch_compile": "ours, torch + torch.compile (fixed-size THD)",
    "te": "ours, te BF16 (THD)",
    "te_fp8": "ours, te FP8 block scaling, all layers",
    "te_fp8_delayed": "ours, te FP8 delayed scaling, all layers",
    "te_fp8_current": "ours, te FP8 current scaling, all layers",
    "te_fp8_partial": "ours, te FP8 block scaling, layers 3..L-2 (first/last two BF16)",
    # Precision levers (not in the default table): the residual stream in fp32 as transformers keeps it
    # (model.fp32_residual), and bf16 parameters with AdamW stepping them directly, an upper bound on what bf16
    # parameters with fp32 master weights could give (those add a gradient and a weight copy per optimizer step).
    "torch_fp32res_compile": "ours, torch + torch.compile, fp32 residual stream",
    "torch_bf16params_compile": "ours, torch + torch.compile, bf16 parameters (speed bound, no master weights)",
}
# Sequences per padded baseline batch (the reference point in issue 7) and our THD token budget per micro-batch.
BASELINE_SEQS = {"8M": 64, "35M": 64, "150M": 32, "650M": 16, "3B": 8}
TOKEN_BUDGET = {"8M": 131072, "35M": 131072, "150M": 65536, "650M": 32768, "3B": 8192}


def matmul_peak() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def hf_model(cfg: EsmConfig):
    from transformers import EsmConfig as HFConfig
    from transformers import EsmForMaskedLM

    from recipe.model.convert import hf_config_dict

    d = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("recipe", "architectures", "model_type", "torch_dtype")}
    return EsmForMaskedLM(HFConfig(**d, attn_implementation="sdpa")).cuda()


def batches_for(store, impl: str, batch: int, n: int) -> list[dict]:
    """`n` training batches in the layout `impl` takes, already on the GPU (copies stay out of the timed steps)."""
    if impl == "hf":
        s = BatchSettings(max_seq_length=1024, layout="bshd", micro_batch_size=batch, seed=0)
    else:  # compiled rows get fixed-size batches: static shapes
        s = BatchSettings(max_seq_length=1024, token_micro_batch_size=batch, seed=0, pad_to_fixed=impl.endswith("compile"))
    it = iter(MLMBatches(store, s, train=True))
    return [{k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()} for _ in range(n)]


def step_fn(model, impl: str, opt, accum: int = 1):
    """One micro-batch already on the GPU: BF16 autocast forward and backward; every `accum`-th call also the
    optimizer update (gradient accumulation, as the trainer's grad_acc_steps)."""
    calls = 0

    def step(b):
        nonlocal calls
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if impl == "hf":
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            else:
                out = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], labels=b["labels"])
        (out.loss / accum).backward()
        calls += 1
        if calls % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def timed_seconds(step, batches: list) -> float:
    """GPU time of running `step` over `batches`, between CUDA events."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for b in batches:
        step(b)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def fp8_layer_recipes(impl: str, num_layers: int) -> list:
    import transformer_engine.common.recipe as te_recipe

    name, which = FP8_ROWS[impl]
    recipe = getattr(te_recipe, name)()
    return [recipe if which == "all" or 2 <= i < num_layers - 2 else None for i in range(num_layers)]


def make_model(size: str, impl: str):
    """(config, model) for one implementation, on the GPU, ready to train."""
    cfg = EsmConfig.from_size(size, backend="te" if impl.startswith("te") else "torch", fp32_residual="_fp32res" in impl)
    if impl in FP8_ROWS:
        cfg = dataclasses.replace(cfg, activation="gelu_tanh")
    recipes = tuple(fp8_layer_recipes(impl, cfg.num_layers)) if impl in FP8_ROWS else None
    # The rope and attention kernels the trainer's `auto` picks (Triton's where they were faster and Triton imports).
    attention = resolve_attention_kernel("auto", cfg, torch.device("cuda")) if impl != "hf" else "flash"
    runtime = Runtime(layer_recipes=recipes, check_inputs=False, rope_kernel=resolve_rope_kernel("auto", cfg.backend, 1),
                      attention_kernel=attention)  # fmt: skip
    model = hf_model(cfg) if impl == "hf" else build_model(cfg, device="cuda", seed=0, runtime=runtime)
    if "_bf16params" in impl:
        model.to(torch.bfloat16)
    if impl.endswith("compile"):
        model.compile_layers()
    return cfg, model


def run_row(store, size: str, impl: str, a, peak_measured: float, batch: int, accum: int) -> dict:
    """Warm-up, then `a.steps` timed optimizer steps of `accum` micro-batches each."""
    warmup = (a.warmup + 3 if impl.endswith("compile") else a.warmup) * accum  # compilation happens in the first steps
    cfg, model = make_model(size, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    data = batches_for(store, impl, batch, warmup + a.steps * accum)
    step = step_fn(model, impl, opt, accum)
    torch.cuda.reset_peak_memory_stats()
    for b in data[:warmup]:
        step(b)
    seconds = timed_seconds(step, data[warmup:])
    timed = data[warmup:]
    tokens = sum(b["num_real_tokens"] for b in timed)
    flops = sum(batch_flops(cfg, b["seq_lengths"].tolist()) for b in timed)
    row = {
        "size": size,
        "impl": impl,
        "batch": (f"{batch} seqs" if impl == "hf" else f"{batch:,} tokens") + f" × {accum}",
        "tokens_per_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    row["mfu"] = row["tflops"] / DATASHEET_TFLOPS
    row["mfu_measured"] = row["tflops"] / peak_measured
    del model, opt, data
    gc.collect()
    torch.cuda.empty_cache()
    return row


def attempts(batch: int, accum: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) to try in turn: as asked; on out-of-memory without accumulation (whose gradients
    stay resident through the next micro-batch's forward); then with half the micro-batch."""
    return list(dict.fromkeys([(batch, accum), (batch, 1), (batch // 2, 1)]))


def measure(store, size: str, impl: str, a, peak: float) -> dict | None:
    """One row; on out-of-memory, the fallbacks of `attempts`. The batch column says what ran."""
    for batch, accum in attempts(BASELINE_SEQS[size] if impl == "hf" else a.budget[size], a.accum[size]):
        t0 = time.time()
        try:
            r = run_row(store, size, impl, a, peak, batch, accum)
            print(
                f"{size:>5} {impl:15} {r['tokens_per_s']:>12,.0f} tok/s {r['tflops']:7.1f} TFLOP/s mfu {r['mfu']:.1%} "
                f"peak {r['peak_gb']:.1f} GB, batch {r['batch']} ({time.time() - t0:.0f} s)",
                flush=True,
            )
            return r
        except Exception as exc:  # a failed row (OOM, missing TE) is reported; the others still run
            print(
                f"{size:>5} {impl:15} failed with batch {batch} × {accum}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}",
                flush=True,
            )
            gc.collect()
            torch.cuda.empty_cache()
            if not isinstance(exc, torch.OutOfMemoryError):
                return None
    return None


def per_size(items: list[str], sizes: list[str]) -> dict[str, int]:
    """["4", "3B=1"] -> {size: 4 for every size, but 3B: 1}."""
    default = [int(x) for x in items if "=" not in x]
    out = {size: default[-1] if default else 1 for size in sizes}
    out.update({k: int(v) for k, v in (x.split("=") for x in items if "=" in x)})
    return out


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| size | implementation | batch | unpadded tokens/s | TFLOP/s | MFU (989) | MFU (measured peak) | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {LABELS[r['impl']]} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
            f"{r['mfu']:.1%} | {r['mfu_measured']:.1%} | {r['peak_gb']:.1f} GB |"
        )
    return "\n".join(lines) + "\n"


def write_docs(path: Path, gpu: str, text: str, tool: str = "throughput.py") -> None:
    """Replace this tool's and GPU's generated section of the benchmarks document (between its markers), or append it."""
    begin, end = f"<!-- {tool}: {gpu} -->", f"<!-- end {tool}: {gpu} -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}{end}\n"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) + 1 :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", nargs="+", default=["8M", "35M", "150M", "650M", "3B"])
    p.add_argument("--impls", nargs="+", default=["hf", "torch", "torch_compile", "te", "te_fp8"], choices=list(LABELS))
    p.add_argument("--fp8-sizes", nargs="*", default=["650M", "3B"], help="sizes that also get every FP8 recipe row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--accum",
        nargs="+",
        default=["4", "3B=1"],
        metavar="N|SIZE=N",
        help="micro-batches per optimizer step (every row of a size, baseline too); SIZE=N for one size",
    )
    p.add_argument(
        "--budget", nargs="*", default=[], metavar="SIZE=TOKENS", help="our THD tokens per micro-batch, e.g. 650M=32768"
    )
    p.add_argument("--docs", type=Path, help="write the table into this markdown file")
    a = p.parse_args()
    a.budget = {**TOKEN_BUDGET, **{k: int(v) for k, v in (item.split("=") for item in a.budget)}}
    a.accum = per_size(a.accum, a.sizes)
    with contextlib.suppress(ImportError):  # before any CUDA work: TE loads the system cuDNN, which fails once torch has its own
        import transformer_engine.pytorch  # noqa: F401
    store = load_sequences(a.data)
    peak = matmul_peak()
    name = torch.cuda.get_device_name()
    print(f"{name}: bf16 8192^3 matmul {peak:.0f} TFLOP/s measured here", flush=True)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    header = (
        f"**{name}**, {datetime.date.today()}, torch {torch.__version__}: `{command}`. Matmul peak measured here: "
        f"{peak:.0f} TFLOP/s. Per row {a.warmup} warm-up (+3 for compiled rows) and {a.steps} timed optimizer steps, "
        "each of the micro-batches in the batch column (tokens or sequences × micro-batches per optimizer step)."
    )
    rows = []
    for size in a.sizes:
        impls = a.impls + ([i for i in FP8_ROWS if i not in a.impls] if size in a.fp8_sizes else [])
        rows += [r for impl in impls if (r := measure(store, size, impl, a, peak)) is not None]
        if a.docs:  # after every size, so that an interrupted run keeps what it measured
            write_docs(a.docs, name, table(rows, header))
    print("\n" + table(rows, header))
    if a.docs:
        print(f"wrote {a.docs}")


if __name__ == "__main__":
    main()
