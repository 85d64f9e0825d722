"""Training throughput side by side, in one process on one GPU: transformers' EsmForMaskedLM (padded batches, SDPA,
BF16 autocast, fused AdamW) against our torch backend, our te backend in BF16 and with FP8 block scaling.

    python bench/throughput.py --data .device/data/swissprot14_train_100k.fasta.xz --sizes 8M 150M 650M

Same sequences and masking for every implementation (our loader, BSHD batches for the baseline). Each row: warm-up
steps, then timed steps between CUDA events. Prints a markdown table: unpadded tokens/s, TFLOP/s and MFU per GPU
(against 989 TFLOP/s dense BF16 and against the bf16 matmul rate measured here at start), peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipe.data.dataset import BatchSettings, MLMBatches  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.model import EsmConfig, build_model  # noqa: E402
from recipe.model.flops import batch_flops  # noqa: E402

DATASHEET_TFLOPS = 989.0
# Sequences per padded baseline batch (the reference point in issue 7) and our THD token budget per micro-batch.
BASELINE_SEQS = {"8M": 64, "35M": 64, "150M": 32, "650M": 16, "3B": 8}
TOKEN_BUDGET = {"8M": 65536, "35M": 65536, "150M": 32768, "650M": 16384, "3B": 8192}


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


def batches_for(store, impl: str, size: str, n: int):
    if impl == "hf":
        s = BatchSettings(max_seq_length=1024, layout="bshd", micro_batch_size=BASELINE_SEQS[size], seed=0)
    else:  # compiled rows get fixed-size batches: static shapes
        s = BatchSettings(max_seq_length=1024, token_micro_batch_size=TOKEN_BUDGET[size], seed=0, pad_to_fixed=impl.endswith("compile"))
    it = iter(MLMBatches(store, s, train=True))
    return [next(it) for _ in range(n)]


def step_fn(model, impl: str):
    def step(b):
        if impl == "hf":
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        else:
            out = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], labels=b["labels"])
        out.loss.backward()

    return step


def run_row(store, size: str, impl: str, warmup: int, steps: int, peak_measured: float) -> dict:
    cfg = EsmConfig.from_size(size, backend="te" if impl.startswith("te") else "torch")
    warmup = warmup + 3 if impl.endswith("compile") else warmup  # compilation happens in the first steps
    if impl == "te_fp8":
        cfg = dataclasses.replace(cfg, activation="gelu_tanh")
    model = hf_model(cfg) if impl == "hf" else build_model(cfg, device="cuda", seed=0)
    if impl == "te_fp8":
        from transformer_engine.common.recipe import Float8BlockScaling

        model.set_layer_precision([Float8BlockScaling()] * cfg.num_layers)
    if impl != "hf":
        model.check_inputs = False
    if impl.endswith("compile"):
        for layer in model.layers:
            layer.compile(dynamic=True)  # max_seqlen varies per batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    data = [{k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in batches_for(store, impl, size, warmup + steps)]
    step = step_fn(model, impl)
    torch.cuda.reset_peak_memory_stats()
    for b in data[:warmup]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(b)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for b in data[warmup:]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(b)
        opt.step()
        opt.zero_grad(set_to_none=True)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    timed = data[warmup:]
    tokens = sum(b["num_real_tokens"] for b in timed)
    flops = sum(batch_flops(cfg, b["seq_lengths"].tolist()) for b in timed)
    row = {
        "size": size, "impl": impl, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    row["mfu"] = row["tflops"] / DATASHEET_TFLOPS
    row["mfu_measured"] = row["tflops"] / peak_measured
    del model, opt, data
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", nargs="+", default=["8M", "35M", "150M", "650M", "3B"])
    p.add_argument("--impls", nargs="+", default=["hf", "torch", "te", "te_fp8"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    try:  # before any CUDA work: TE loads the system cuDNN, which fails once torch has loaded its own
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        pass
    store = load_sequences(a.data)
    peak = matmul_peak()
    name = torch.cuda.get_device_name()
    print(f"{name}: bf16 8192^3 matmul {peak:.0f} TFLOP/s measured here", flush=True)
    rows = []
    for size in a.sizes:
        for impl in a.impls:
            t0 = time.time()
            try:
                rows.append(run_row(store, size, impl, a.warmup, a.steps, peak))
                r = rows[-1]
                print(f"{size:>5} {impl:7} {r['tokens_per_s']:>12,.0f} tok/s {r['tflops']:7.1f} TFLOP/s mfu {r['mfu']:.1%} "
                      f"peak {r['peak_gb']:.1f} GB ({time.time() - t0:.0f} s)", flush=True)
            except Exception as exc:  # a row that fails (OOM, missing TE) is reported, the others still run
                print(f"{size:>5} {impl:7} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    print(f"\n{name}, {datetime.date.today()}, `python bench/throughput.py --data {a.data} --sizes {' '.join(a.sizes)} "
          f"--warmup {a.warmup} --steps {a.steps}`; matmul peak measured {peak:.0f} TFLOP/s\n")
    print("| size | implementation | unpadded tokens/s | TFLOP/s | MFU (989) | MFU (measured peak) | peak memory |")
    print("|---|---|---|---|---|---|---|")
    labels = {"hf": "transformers EsmForMaskedLM (padded, SDPA)", "torch": "ours, torch (THD, varlen)",
              "te": "ours, te BF16 (THD)", "te_fp8": "ours, te FP8 block scaling",
              "torch_compile": "ours, torch + torch.compile (fixed-size THD)"}
    for r in rows:
        print(f"| {r['size']} | {labels[r['impl']]} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} | "
              f"{r['mfu_measured']:.1%} | {r['peak_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
