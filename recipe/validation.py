"""Validation: a full deterministic pass over the validation split (`evaluate`), and `Validator`, which owns when it
runs in training (validation.every_n_steps, and once at the end) and records its result."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from recipe.data.dataset import MLMBatches
from recipe.metrics import MetricsWriter
from recipe.model.esm import IGNORE_INDEX, labelled_positions
from recipe.parallel import all_reduce
from recipe.run_state import TrainState

log = logging.getLogger("recipe")

# The keys a batch may hand the model (the rest is bookkeeping: lengths, data position, counts).
MODEL_INPUTS = ("input_ids", "labels", "cu_seqlens", "cu_seqlens_padded", "attention_mask", "seq_mask_counts")


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The batch's model arguments on `device` (non-blocking copies). With labels on the host, also the positions of
    the labelled tokens (`masked_index`): the LM head runs on those only, and selecting them on the device from the
    labels would make the host wait there for the whole forward (a data-dependent size)."""
    out = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    if "max_seqlen" in batch:
        out["max_seqlen"] = batch["max_seqlen"]
    labels = batch.get("labels")
    if labels is not None and labels.device.type == "cpu":
        out["masked_index"] = labelled_positions(labels).to(device, non_blocking=True)
    return out


@torch.no_grad()
def evaluate(model, dataset: Iterable[dict], device, amp, max_batches: int | None, shard=lambda b: b) -> dict:
    """Full deterministic pass over this rank's share of the validation split; token-weighted across ranks.

    Ranks may hold different numbers of batches; a rank that has run out joins with a batch whose labels are all
    ignored, so sharded (FSDP2) forwards stay in lock-step.
    """
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, tokens, correct, real batches
    it, count = iter(dataset), 0
    spare: dict = {}
    while True:
        batch = next(it, None) if max_batches is None or count < max_batches else None
        batch = shard(batch) if batch is not None else None
        if not all_reduce(torch.tensor([batch is not None], device=device, dtype=torch.int32), dist.ReduceOp.MAX).item():
            break
        real = batch is not None
        if batch is None:
            batch = dict(spare, labels=torch.full_like(spare["labels"], IGNORE_INDEX))
        spare, count = batch, count + 1
        with amp:
            out = model(**model_inputs(batch, device))
        scored = [out.loss_sum.double(), out.num_tokens.double(), out.num_correct.double(), sums.new_tensor(float(real))]
        sums += torch.stack(scored)
    model.train()
    loss_sum, tokens, correct, batches = all_reduce(sums).tolist()
    if tokens == 0:
        source = getattr(getattr(dataset, "store", None), "source", "the validation split")
        why = (
            "it yielded no batches"
            if batches == 0
            else (
                f"its {int(batches)} micro-batch(es) hold no masked residue (no standard residue selected at "
                f"dataset.mask_prob={getattr(getattr(dataset, 'settings', None), 'mask_prob', '?')}: "
                "sequences too short or of unknown characters only)"
            )
        )
        raise RuntimeError(f"validation on {source} gave no masked token to score: {why}")
    val_loss = loss_sum / tokens
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50)),
        "val_accuracy": correct / tokens,
        "val_tokens": int(tokens),
    }


class Validator:
    """Runs `evaluate` on the run's schedule and writes the result to the metrics; does nothing without a
    validation split. Its time is left out of the training clock."""

    def __init__(
        self,
        model,
        data: MLMBatches | None,
        device: torch.device,
        amp,
        max_batches: int | None,
        shard: Callable[[dict], dict],
        every_n_steps: int | None,
        last_step: int,
        metrics: MetricsWriter,
    ):
        self.model, self.data, self.device, self.amp, self.max_batches, self.shard = model, data, device, amp, max_batches, shard
        self.every, self.last_step, self.metrics = every_n_steps, last_step, metrics

    def should_validate(self, step: int) -> bool:
        """On validation.every_n_steps during training; the last step's validation is `finish`'s."""
        return self.every is not None and self.every > 0 and step % self.every == 0 and step < self.last_step

    def run(self, state: TrainState) -> None:
        if self.data is None:
            return
        seconds = state.clock.seconds
        with state.clock.pause():
            result = evaluate(self.model, self.data, self.device, self.amp, self.max_batches, self.shard)
        self.metrics.log({"step": state.step, "train_seconds": seconds, **result})
        log.info(
            "validation at step %d: loss %.4f, perplexity %.3f, accuracy %.4f",
            state.step,
            result["val_loss"],
            result["val_perplexity"],
            result["val_accuracy"],
        )

    def done_at(self, step: int) -> bool:
        """Whether the metrics already hold a validation of `step` (a finished run, resumed), agreed by all ranks."""
        mine = torch.tensor([float(self.metrics.has_record(step, "val_loss"))], device=self.device)
        return bool(all_reduce(mine, dist.ReduceOp.MAX).item())
