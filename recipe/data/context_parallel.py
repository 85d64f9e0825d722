"""Dual-chunk-swap sharding of packed THD batches for context parallelism (cp_size ranks share each sequence).

Each sequence is padded to a multiple of 2·cp_size (times `chunk_multiple`, so that every rank's share suits FP8)
and cut into 2·cp_size equal chunks; rank r keeps chunks r and 2·cp_size−1−r. With bidirectional (or causal)
attention this balances work across ranks, and it is the layout TransformerEngine's THD context-parallel attention
and its fused rope expect. Every rank computes its shard from the same full batch, deterministically, so a CP group
needs no scatter: its ranks load the same batch (they share a data-parallel rank) and each keeps its part.

What a rank gets: its tokens (`input_ids`, `labels`), `position_ids` that are positions in the *full* sequence, the
full-batch `cu_seqlens` (real lengths) and `cu_seqlens_padded` that TE's CP attention takes, `max_seqlen` of the
padded sequences, `seq_mask_counts` (`<mask>` tokens per full sequence: ESM's token dropout rescales each sequence by
its own mask ratio, which no rank could count from its share alone), and `num_real_tokens` (its share of real
tokens, for throughput). The packer's trailing pad
segment is dropped: only real sequences are sharded. The packer counts each sequence at its padded length
(`BatchSettings.sequence_multiple`), so the padded batch stays within the token budget; with `pad_to` (the budget,
under `dataset.pad_to_fixed`) a trailing `<pad>` segment fills it, so every rank holds exactly pad_to / cp_size tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from recipe.data.mlm import IGNORE_INDEX
from recipe.data.tokenizer import MASK_ID, PAD_ID


def padded_lengths(lengths: np.ndarray, cp_size: int, chunk_multiple: int = 1) -> np.ndarray:
    unit = 2 * cp_size * chunk_multiple
    return -(-lengths // unit) * unit


def rank_token_index(padded: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """For rank `cp_rank`: where each of its tokens sits in the padded full batch (its two chunks per sequence)."""
    chunk = padded // (2 * cp_size)
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    firsts = np.stack([starts + cp_rank * chunk, starts + (2 * cp_size - 1 - cp_rank) * chunk], axis=1).reshape(-1)
    sizes = np.repeat(chunk, 2)
    if not len(sizes):
        return np.zeros(0, dtype=np.int64)
    return np.repeat(firsts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))


def real_lengths(batch: dict) -> np.ndarray:
    """Lengths of the real sequences of a packed batch (without the packer's pad segment)."""
    if "seq_lengths" in batch:
        return np.asarray(batch["seq_lengths"], dtype=np.int64)
    return np.diff(batch["cu_seqlens"].cpu().numpy().astype(np.int64))


def real_token_slots(lengths: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """For each real token of the unpadded batch, in order: its slot in the padded full batch."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    cu_pad = np.concatenate([[0], np.cumsum(padded)])
    seq = np.repeat(np.arange(len(lengths)), lengths)
    return np.arange(int(cu[-1])) - cu[seq] + cu_pad[seq]


def pad_batch(input_ids: torch.Tensor, labels: torch.Tensor, lengths: np.ndarray, cp_size: int, chunk_multiple: int = 1):
    """The full batch with every sequence padded for CP: (ids, labels, positions, cu_seqlens_padded, padded)."""
    padded = padded_lengths(lengths, cp_size, chunk_multiple)
    cu_pad = np.concatenate([[0], np.cumsum(padded)])
    dest, real = real_token_slots(lengths, padded), int(lengths.sum())
    ids = np.full(int(cu_pad[-1]), PAD_ID, dtype=np.int64)
    lab = np.full(int(cu_pad[-1]), IGNORE_INDEX, dtype=np.int64)
    ids[dest] = input_ids[:real].cpu().numpy()
    lab[dest] = labels[:real].cpu().numpy()
    pos = np.arange(int(cu_pad[-1])) - np.repeat(cu_pad[:-1], padded)
    return ids, lab, pos, cu_pad, padded


def shard_batch(batch: dict, cp_size: int, cp_rank: int, chunk_multiple: int = 1, pad_to: int | None = None) -> dict:
    """This rank's share of a packed batch (a dict with input_ids, labels, cu_seqlens and optionally seq_lengths);
    with `pad_to`, of the batch filled to exactly `pad_to` tokens by one `<pad>` segment (labels -100)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is not in 0..{cp_size - 1}")
    lengths = real_lengths(batch)
    ids, lab, pos, cu_pad, padded = pad_batch(batch["input_ids"], batch["labels"], lengths, cp_size, chunk_multiple)
    segments = lengths
    if pad_to is not None:
        extra, unit = pad_to - int(cu_pad[-1]), 2 * cp_size * chunk_multiple
        if extra < 0 or extra % unit:
            raise ValueError(
                f"cannot fill a context-parallel batch of {int(cu_pad[-1])} padded tokens to {pad_to}: the fixed size "
                f"must be at least that and differ from it by a multiple of {unit}"
            )
        if extra:
            ids, lab = np.append(ids, np.full(extra, PAD_ID)), np.append(lab, np.full(extra, IGNORE_INDEX))
            pos, padded = np.append(pos, np.arange(extra)), np.append(padded, extra)
            cu_pad, segments = np.append(cu_pad, pad_to), np.append(lengths, extra)
    keep = rank_token_index(padded, cp_size, cp_rank)
    is_mask = (batch["input_ids"][: int(lengths.sum())].cpu() == MASK_ID).numpy()
    masks = np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=is_mask, minlength=len(segments))
    counted = np.append(lengths, np.zeros(len(padded) - len(lengths), dtype=np.int64))  # the pad segment is not real
    real = pos[keep] < np.repeat(counted, padded // cp_size)  # position inside the real part of its sequence
    return {
        "input_ids": torch.from_numpy(ids[keep]),
        "labels": torch.from_numpy(lab[keep]),
        "position_ids": torch.from_numpy(pos[keep]),
        "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)),
        "cu_seqlens_padded": torch.from_numpy(cu_pad.astype(np.int32)),
        "max_seqlen": int(padded.max()),
        "seq_mask_counts": torch.from_numpy(masks.astype(np.int32)),
        "num_real_tokens": int(real.sum()),
        "seq_lengths": torch.from_numpy(lengths),
    }


def unshard(shards: list[dict], keys=("input_ids", "labels", "position_ids")) -> dict:
    """Inverse of shard_batch over all ranks of a CP group: the padded full batch (tests, logit checks)."""
    cp_size = len(shards)
    cu_pad = shards[0]["cu_seqlens_padded"].numpy().astype(np.int64)
    padded = np.diff(cu_pad)
    out = {}
    for k in keys:
        first = shards[0][k]
        full = first.new_full((int(cu_pad[-1]), *first.shape[1:]), -1)
        for rank, shard in enumerate(shards):
            full[torch.from_numpy(rank_token_index(padded, cp_size, rank)).to(full.device)] = shard[k]
        out[k] = full
    return out | {"cu_seqlens_padded": shards[0]["cu_seqlens_padded"]}
