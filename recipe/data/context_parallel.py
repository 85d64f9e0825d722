"""Dual-chunk-swap sharding of packed THD batches for context parallelism (cp_size ranks share each sequence).

Each sequence is padded to a multiple of 2·cp_size (times `chunk_multiple`, e.g. so that shards suit FP8) and cut
into 2·cp_size equal chunks; rank r keeps chunks r and 2·cp_size−1−r. With causal or bidirectional attention this
balances work across ranks, and it is the layout TransformerEngine's THD context-parallel attention expects. Every
rank can compute its shard from the same full batch, deterministically, so a CP group needs no scatter.

What a rank gets: its tokens (`input_ids`, `labels`), `position_ids` that are positions in the *full* sequence (for
rotary embeddings), and the full-batch `cu_seqlens` (real lengths) and `cu_seqlens_padded` that TE's CP attention
takes, with `max_seqlen` of the padded sequences.
"""

from __future__ import annotations

import numpy as np
import torch

from recipe.data.mlm import IGNORE_INDEX
from recipe.data.tokenizer import PAD_ID


def padded_lengths(lengths: np.ndarray, cp_size: int, chunk_multiple: int = 1) -> np.ndarray:
    unit = 2 * cp_size * chunk_multiple
    return -(-lengths // unit) * unit


def _chunk_index(lengths: np.ndarray, padded: np.ndarray, cp_size: int, cp_rank: int):
    """For rank `cp_rank`: the source index (into the padded full batch) of every token it keeps."""
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
    pieces = []
    for start, plen in zip(starts, padded):
        c = plen // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(np.arange(start + chunk * c, start + (chunk + 1) * c))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def pad_batch(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, chunk_multiple: int = 1):
    """The full batch with every sequence padded for CP: (ids, labels, positions, cu_seqlens_padded)."""
    cu = cu_seqlens.cpu().numpy().astype(np.int64)
    lengths = np.diff(cu)
    padded = padded_lengths(lengths, cp_size, chunk_multiple)
    total = int(padded.sum())
    ids = np.full(total, PAD_ID, dtype=np.int64)
    lab = np.full(total, IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros(total, dtype=np.int64)
    cu_pad = np.concatenate([[0], np.cumsum(padded)])
    src_ids, src_lab = input_ids.cpu().numpy(), labels.cpu().numpy()
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        ids[cu_pad[i] : cu_pad[i] + (b - a)] = src_ids[a:b]
        lab[cu_pad[i] : cu_pad[i] + (b - a)] = src_lab[a:b]
        pos[cu_pad[i] : cu_pad[i + 1]] = np.arange(padded[i])
    return ids, lab, pos, cu_pad, lengths, padded


def shard_batch(batch: dict, cp_size: int, cp_rank: int, chunk_multiple: int = 1) -> dict:
    """This rank's share of a packed batch (dict with input_ids, labels, cu_seqlens)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is not in 0..{cp_size - 1}")
    ids, lab, pos, cu_pad, lengths, padded = pad_batch(batch["input_ids"], batch["labels"], batch["cu_seqlens"], cp_size, chunk_multiple)
    keep = _chunk_index(lengths, padded, cp_size, cp_rank)
    return {
        "input_ids": torch.from_numpy(ids[keep]),
        "labels": torch.from_numpy(lab[keep]),
        "position_ids": torch.from_numpy(pos[keep]),
        "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
        "cu_seqlens_padded": torch.from_numpy(cu_pad.astype(np.int32)),
        "max_seqlen": int(padded.max()),
        "cp_size": cp_size,
        "cp_rank": cp_rank,
    }


def unshard(shards: list[dict]) -> dict:
    """Inverse of shard_batch over all ranks of a CP group: the padded full batch (for tests and logit checks)."""
    cp_size = len(shards)
    cu_pad = shards[0]["cu_seqlens_padded"].numpy().astype(np.int64)
    padded = np.diff(cu_pad)
    lengths = np.diff(shards[0]["cu_seqlens"].numpy().astype(np.int64))
    out = {k: np.full(int(cu_pad[-1]), -1, dtype=np.int64) for k in ("input_ids", "labels", "position_ids")}
    for rank, shard in enumerate(shards):
        idx = _chunk_index(lengths, padded, cp_size, rank)
        for k in out:
            out[k][idx] = shard[k].numpy()
    return {k: torch.from_numpy(v) for k, v in out.items()} | {"cu_seqlens_padded": shards[0]["cu_seqlens_padded"]}
