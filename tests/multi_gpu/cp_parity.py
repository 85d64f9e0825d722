"""Context parallelism against none, on the same batch and weights (torchrun --nproc_per_node=N, N = cp_size).

Every rank builds the same seeded model twice: one runs the whole batch (cp=1), the other its dual-chunk-swap share
with TE's context-parallel attention. Compared: the token-weighted loss, the re-assembled logits and every gradient
(the CP gradients summed over the group, as DDP/FSDP do). Token dropout is on, so the per-sequence mask ratio must
be taken over the whole sequence across ranks. Prints the numbers; exits non-zero past the issue's thresholds.

    torchrun --standalone --nproc_per_node=2 tests/multi_gpu/cp_parity.py [size]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformer_engine.pytorch  # noqa: F401  (before any CUDA work: TE loads its cuDNN first)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipe.data.context_parallel import padded_lengths, real_lengths, real_token_slots, shard_batch, unshard  # noqa: E402
from recipe.data.dataset import BatchSettings, MLMBatches  # noqa: E402
from recipe.data.sources import load_sequences  # noqa: E402
from recipe.model import EsmConfig, Runtime, build_model  # noqa: E402
from recipe.parallel import init_distributed, setup_mesh  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "uniprot_sample" / "validation"


def run(model, batch: dict, cp: bool):
    kw = {k: batch[k].cuda() for k in ("cu_seqlens", "labels")}
    if cp:
        kw |= {k: batch[k].cuda() for k in ("cu_seqlens_padded", "seq_mask_counts")}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(batch["input_ids"].cuda(), max_seqlen=batch["max_seqlen"], return_logits=True, **kw)


def main(size: str) -> None:
    info = setup_mesh(init_distributed("cuda"), int(dist.get_world_size()))
    cp, rank = info.cp.size, info.cp.rank
    cfg = EsmConfig.from_size(size, backend="te")
    ref = build_model(cfg, device="cuda", seed=0)
    cpm = build_model(cfg, device="cuda", seed=0, runtime=Runtime(context_parallel=info.cp))

    batch = next(
        iter(
            MLMBatches(
                load_sequences(DATA), BatchSettings(max_seq_length=1024, token_micro_batch_size=16384, seed=3), train=False
            )
        )
    )
    out_ref = run(ref, batch, cp=False)
    out_ref.loss.backward()

    shard = shard_batch(batch, cp, rank, chunk_multiple=8)
    out = run(cpm, shard, cp=True)
    count = out.num_tokens.float()
    dist.all_reduce(count)
    (out.loss_sum / count).backward()
    loss_sum = out.loss_sum.detach().clone()
    dist.all_reduce(loss_sum)
    loss_cp, loss_ref = (loss_sum / count).item(), out_ref.loss.item()
    for p in cpm.parameters():
        dist.all_reduce(p.grad)

    # Re-assemble the logits in full-batch order, then keep each sequence's real tokens.
    parts = [torch.empty_like(out.logits) for _ in range(cp)]
    dist.all_gather(parts, out.logits.contiguous())
    full = unshard([{"logits": p, "cu_seqlens_padded": shard["cu_seqlens_padded"]} for p in parts], keys=("logits",))["logits"]
    lengths = real_lengths(batch)
    rows = torch.from_numpy(real_token_slots(lengths, padded_lengths(lengths, cp, 8))).cuda()
    cp_logits, ref_logits = full[rows].float(), out_ref.logits[: int(lengths.sum())].float()
    cosine = F.cosine_similarity(cp_logits.flatten(), ref_logits.flatten(), dim=0).item()
    per_token = F.cosine_similarity(cp_logits, ref_logits, dim=-1).min().item()

    ref_grads = dict(ref.named_parameters())
    grad_cos = {
        n: F.cosine_similarity(p.grad.float().flatten(), ref_grads[n].grad.float().flatten(), dim=0).item()
        for n, p in cpm.named_parameters()
        if ref_grads[n].grad.norm() > 0
    }
    worst = min(grad_cos, key=grad_cos.get)
    rel = abs(loss_cp - loss_ref) / loss_ref
    if info.rank == 0:
        print(
            f"cp={cp} vs cp=1, ESM-2 {size} te bf16, {len(lengths)} sequences ({int(lengths.sum())} tokens, longest "
            f"{int(lengths.max())}), token dropout on: loss {loss_cp:.6f} vs {loss_ref:.6f} (relative difference {rel:.2e}); "
            f"logits cosine {cosine:.6f} (worst token {per_token:.5f}); worst gradient cosine {grad_cos[worst]:.5f} ({worst}), "
            f"{len(grad_cos)} tensors",
            flush=True,
        )
    failed = rel > 1e-3 or cosine < 0.999 or grad_cos[worst] < 0.99
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "8M")
