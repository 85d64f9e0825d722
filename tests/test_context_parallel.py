"""Dual-chunk-swap CP sharding (CPU): shards re-assemble to the batch, every token exactly once, positions global."""

import numpy as np
import pytest
import torch

from recipe.data.context_parallel import padded_lengths, shard_batch, unshard
from recipe.data.dataset import BatchSettings, MLMBatches
from recipe.data.sources import load_sequences
from recipe.data.tokenizer import PAD_ID


def odd_batch(lengths):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (sum(lengths),), generator=g)
    labels = torch.where(torch.rand(sum(lengths), generator=g) < 0.15, ids, torch.tensor(-100))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("lengths", [[7, 1, 33, 16], [1022, 5, 300], [8, 8]])
@pytest.mark.parametrize("chunk_multiple", [1, 2])
def test_shards_reassemble_exactly(cp_size, lengths, chunk_multiple):
    batch = odd_batch(lengths)
    shards = [shard_batch(batch, cp_size, r, chunk_multiple) for r in range(cp_size)]
    sizes = {len(s["input_ids"]) for s in shards}
    assert len(sizes) == 1  # every rank holds the same number of tokens
    padded = padded_lengths(np.array(lengths), cp_size, chunk_multiple)
    assert all(p % (2 * cp_size * chunk_multiple) == 0 for p in padded)
    full = unshard(shards)
    cu_pad = full["cu_seqlens_padded"].tolist()
    assert cu_pad == [0, *np.cumsum(padded).tolist()]
    assert (full["input_ids"] >= 0).all()  # every slot written by exactly one rank: no -1 left
    for i, n in enumerate(lengths):
        a, b = cu_pad[i], cu_pad[i + 1]
        src = slice(int(batch["cu_seqlens"][i]), int(batch["cu_seqlens"][i + 1]))
        assert torch.equal(full["input_ids"][a : a + n], batch["input_ids"][src])
        assert torch.equal(full["labels"][a : a + n], batch["labels"][src])
        assert (full["input_ids"][a + n : b] == PAD_ID).all() and (full["labels"][a + n : b] == -100).all()
        assert torch.equal(full["position_ids"][a:b], torch.arange(b - a))  # positions in the full sequence
    # each rank's positions: chunk r then chunk 2cp-1-r of every sequence
    c = padded[0] // (2 * cp_size)
    assert shards[0]["position_ids"][:c].tolist() == list(range(c))
    assert shards[0]["position_ids"][c : 2 * c].tolist() == list(range((2 * cp_size - 1) * c, 2 * cp_size * c))


def test_real_batch_every_token_once():
    ds = MLMBatches(load_sequences("data/uniprot_sample/validation"), BatchSettings(max_seq_length=1024, token_micro_batch_size=8192), train=False)
    batch = next(iter(ds))
    n = len(batch["seq_lengths"])
    batch = {"input_ids": batch["input_ids"][: batch["num_real_tokens"]], "labels": batch["labels"][: batch["num_real_tokens"]],
             "cu_seqlens": batch["cu_seqlens"][: n + 1]}
    shards = [shard_batch(batch, 4, r) for r in range(4)]
    real = sum(int((s["input_ids"] != PAD_ID).sum()) for s in shards)
    assert real == batch["input_ids"].numel()
    assert sum(int((s["labels"] != -100).sum()) for s in shards) == int((batch["labels"] != -100).sum())


def test_bad_rank():
    with pytest.raises(ValueError, match="cp_rank 2 is not in 0..1"):
        shard_batch(odd_batch([4]), 2, 2)
