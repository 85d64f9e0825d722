"""The baseline training loop users run today, for time-to-quality comparisons against our trainer:
`transformers.EsmForMaskedLM` (its own initialisation), batches padded to the longest sequence, SDPA attention, BF16
autocast, fused AdamW. Same sequences, masking, validation split and LR schedule (`recipe.optim.lr_at`) as ours.

    python bench/hf_baseline.py --size 35M --train .device/data/swissprot14_train_100k.fasta.xz \
        --val .device/data/swissprot14_val.fasta.gz --minutes 10 --eval-every 300 --out /tmp/hf35m.jsonl

Writes one JSON line per log/validation point with `train_seconds` (training wall-clock; validation excluded),
the same fields our trainer writes to metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.throughput import hf_model  # noqa: E402
from recipe.data.dataset import BatchSettings, MLMBatches, make_loader  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.model import EsmConfig  # noqa: E402
from recipe.optim import lr_at, set_lr  # noqa: E402
from recipe.run_state import TrainClock  # noqa: E402


@torch.no_grad()
def validate(model, data: MLMBatches) -> float:
    model.eval()
    loss_sum, tokens = 0.0, 0
    for b in data:
        b = {k: v.cuda(non_blocking=True) for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        n = int((b["labels"] != -100).sum())
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), reduction="sum").item()
        tokens += n
    model.train()
    return loss_sum / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="35M")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--batch-seqs", type=int, default=64, help="sequences per padded batch")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--schedule-steps", type=int, default=20000, help="num_train_steps of the LR schedule")
    p.add_argument("--eval-every", type=int, default=300, help="validate every N steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    settings = BatchSettings(max_seq_length=1024, layout="bshd", micro_batch_size=a.batch_seqs, seed=a.seed)
    # Two loader workers and pinned memory, as a user's DataLoader would have: the baseline is not starved of data.
    train = iter(make_loader(MLMBatches(load_sequences(a.train), settings, train=True), num_workers=2, pin_memory=True))
    val = MLMBatches(load_sequences(a.val), settings, train=False)
    torch.manual_seed(a.seed)
    model = hf_model(EsmConfig.from_size(a.size))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, fused=True)
    out = open(a.out, "w", buffering=1)  # noqa: SIM115 (open for the whole run; line-buffered, so each record is on disk)
    clock, step, tokens = TrainClock(), 0, 0  # training time; validation pauses it, as in our trainer

    def log(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    while clock.seconds < a.minutes * 60:
        b = next(train)
        set_lr(opt, lr_at(step, a.lr, a.warmup, a.schedule_steps))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(
                input_ids=b["input_ids"].cuda(non_blocking=True),
                attention_mask=b["attention_mask"].cuda(non_blocking=True),
                labels=b["labels"].cuda(non_blocking=True),
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + b["num_real_tokens"]
        if step % 50 == 0:
            seconds = clock.seconds
            log({"step": step, "loss": loss.item(), "train_seconds": seconds, "tokens_per_second_per_gpu": tokens / seconds})
        if step % a.eval_every == 0:
            seconds = clock.seconds
            with clock.pause():
                log({"step": step, "train_seconds": seconds, "val_loss": validate(model, val)})
    seconds = clock.seconds
    val_loss = validate(model, val)
    log({"step": step, "train_seconds": seconds, "val_loss": val_loss, "final": True})
    print(
        f"EsmForMaskedLM {a.size}: {step} steps, {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:,.0f} tokens/s), "
        f"final validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
