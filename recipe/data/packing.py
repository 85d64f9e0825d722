"""Collating samples into batches: packed THD (no padding waste) and padded BSHD (for the HF-compatible path).

A THD batch is whole sequences laid end to end, `cu_seqlens` marking their starts. Its length is padded up to a
multiple of `pad_to_multiple_of` (FP8 GEMMs need 16) or to a fixed size (static shapes for torch.compile); the pad
tokens form one extra segment of `<pad>` with labels -100, so no real sequence ever attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recipe.data.mlm import IGNORE_INDEX
from recipe.data.tokenizer import PAD_ID


@dataclass
class Sample:
    index: int  # row in the source (the key of its randomness)
    input_ids: np.ndarray  # int64, with <cls>/<eos>
    labels: np.ndarray  # int64, -100 where not predicted


def padded_length(n: int, multiple: int, fixed: int | None) -> int:
    if fixed is not None:
        if n > fixed:
            raise ValueError(f"packed batch of {n} tokens exceeds the fixed size {fixed}")
        return fixed
    return -(-n // multiple) * multiple if multiple > 1 else n


def collate_thd(samples: list[Sample], pad_to_multiple_of: int = 16, pad_to: int | None = None) -> dict:
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    real = int(lengths.sum())
    total = padded_length(real, pad_to_multiple_of, pad_to)
    ids = np.full(total, PAD_ID, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    ids[:real] = np.concatenate([s.input_ids for s in samples])
    labels[:real] = np.concatenate([s.labels for s in samples])
    seg = lengths if total == real else np.append(lengths, total - real)
    cu = np.zeros(len(seg) + 1, dtype=np.int32)
    np.cumsum(seg, out=cu[1:])
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(seg.max()),
        "num_real_tokens": real,
        "seq_lengths": torch.from_numpy(lengths),
        "sample_index": torch.tensor([s.index for s in samples], dtype=torch.int64),
    }


def collate_bshd(samples: list[Sample], pad_to_multiple_of: int = 8) -> dict:
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    width = padded_length(int(lengths.max()), pad_to_multiple_of, None)
    ids = np.full((len(samples), width), PAD_ID, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = s.input_ids, s.labels, 1
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
        "num_real_tokens": int(lengths.sum()),
        "seq_lengths": torch.from_numpy(lengths),
        "sample_index": torch.tensor([s.index for s in samples], dtype=torch.int64),
    }


def padding_waste(batches: list[dict]) -> float:
    """Share of pad tokens among all tokens the model computes on."""
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(b["num_real_tokens"] for b in batches)
    return 1.0 - real / total if total else 0.0
