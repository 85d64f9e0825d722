"""How far TE's fused tanh-GELU moves ESM-2's outputs from the exact erf GELU, on real sequences.

    python bench/gelu_numerics.py --model outputs/L0_sanity/final_model [--val data/uniprot_sample/validation]

Loads a Hugging Face ESM-2 directory into our model twice (activation gelu and gelu_tanh), runs the same masked
validation batches, and prints the logits difference and the loss of each. With TE and a GPU it also compares
TE's fused LayerNormMLP (tanh) against the exact path in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from recipe.data.dataset import BatchSettings, MLMBatches
from recipe.data.sources import load_sequences
from recipe.model import build_model
from recipe.model.convert import config_from_hf, load_hf_into


def run(model, batches, device, dtype):
    losses, logits = [], []
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), ctx:
        for b in batches:
            out = model(
                b["input_ids"].to(device),
                cu_seqlens=b["cu_seqlens"].to(device),
                max_seqlen=b["max_seqlen"],
                labels=b["labels"].to(device),
                return_logits=True,
            )
            losses.append((out.loss_sum.item(), out.num_tokens.item()))
            logits.append(out.logits[: b["num_real_tokens"]].float().cpu())
    return sum(x for x, _ in losses) / sum(n for _, n in losses), torch.cat(logits)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--val", default="data/uniprot_sample/validation")
    p.add_argument("--batches", type=int, default=8)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = MLMBatches(load_sequences(a.val), BatchSettings(max_seq_length=1024, token_micro_batch_size=8192, seed=0), train=False)
    batches = [b for _, b in zip(range(a.batches), ds)]
    n_tokens = sum(b["num_real_tokens"] for b in batches)
    base = config_from_hf(a.model)
    rows = []
    variants = [("torch", "gelu", torch.float32), ("torch", "gelu_tanh", torch.float32)]
    if device.type == "cuda":
        variants += [("torch", "gelu", torch.bfloat16)]
        try:
            import transformer_engine.pytorch  # noqa: F401

            variants += [("te", "gelu", torch.bfloat16), ("te", "gelu_tanh", torch.bfloat16)]
        except ImportError:
            pass
    results = {}
    for backend, act, dtype in variants:
        model = build_model(dataclasses.replace(base, backend=backend, activation=act), device=device, seed=None).eval()
        load_hf_into(model, a.model)
        results[(backend, act, dtype)] = run(model, batches, device, dtype)
    ref_loss, ref_logits = results[("torch", "gelu", torch.float32)]
    print(f"model {a.model}, {n_tokens} real tokens of {a.val}; reference: torch backend, exact GELU, fp32 (loss {ref_loss:.5f})")
    print(f"{'backend':8} {'activation':10} {'dtype':9} {'loss':>9} {'d loss':>10} {'max |d logit|':>14} {'rel. err':>9}")
    for (backend, act, dtype), (loss, logits) in results.items():
        d = (logits - ref_logits).abs().max().item()
        rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        rows.append((backend, act, str(dtype).split(".")[-1], loss, loss - ref_loss, d, rel))
        print(f"{backend:8} {act:10} {rows[-1][2]:9} {loss:9.5f} {loss - ref_loss:+10.2e} {d:14.3e} {rel:9.2e}")


if __name__ == "__main__":
    main()
