"""Dual-chunk-swap CP sharding (CPU): shards re-assemble to the batch, every token exactly once, positions global."""

import re

import numpy as np
import pytest
import torch
from conftest import TINY, torchrun

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
    ds = MLMBatches(
        load_sequences("data/uniprot_sample/validation"),
        BatchSettings(max_seq_length=1024, token_micro_batch_size=8192),
        train=False,
    )
    batch = next(iter(ds))
    n = len(batch["seq_lengths"])
    batch = {
        "input_ids": batch["input_ids"][: batch["num_real_tokens"]],
        "labels": batch["labels"][: batch["num_real_tokens"]],
        "cu_seqlens": batch["cu_seqlens"][: n + 1],
    }
    shards = [shard_batch(batch, 4, r) for r in range(4)]
    real = sum(int((s["input_ids"] != PAD_ID).sum()) for s in shards)
    assert real == batch["input_ids"].numel()
    assert sum(int((s["labels"] != -100).sum()) for s in shards) == int((batch["labels"] != -100).sum())


def test_bad_rank():
    with pytest.raises(ValueError, match="cp_rank 2 is not in 0..1"):
        shard_batch(odd_batch([4]), 2, 2)


def test_pad_segment_is_not_sharded_and_real_tokens_counted():
    """A packer batch (with its trailing pad segment): only real sequences are split, every real token lands once."""
    ds = MLMBatches(
        load_sequences("data/uniprot_sample/validation"),
        BatchSettings(max_seq_length=1024, token_micro_batch_size=8192),
        train=False,
    )
    batch = next(iter(ds))
    assert batch["input_ids"].numel() > batch["num_real_tokens"]  # has a pad segment
    for cp in (2, 4):
        shards = [shard_batch(batch, cp, r, chunk_multiple=8) for r in range(cp)]
        assert len(shards[0]["cu_seqlens"]) == len(batch["seq_lengths"]) + 1
        assert sum(s["num_real_tokens"] for s in shards) == batch["num_real_tokens"]
        assert all(len(s["input_ids"]) % 16 == 0 for s in shards)  # FP8-ready shares with chunk_multiple 8


# ------------------------------------------------------------------ refusals and the (dp, cp) layout
@pytest.mark.parametrize(
    "cp_size, world, device, backend, layout, message",
    [
        (3, 4, "cuda", "te", "thd", "cp_size=3 does not divide the world size 4"),
        (2, 2, "cpu", "te", "thd", "context parallelism (cp_size=2) needs CUDA GPUs"),
        (2, 2, "cuda", "torch", "thd", "needs model.backend=te"),
        (2, 2, "cuda", "te", "bshd", "needs packed batches: dataset.layout=thd"),
        (0, 2, "cuda", "te", "thd", "cp_size=0 must be a positive integer"),
    ],
)
def test_context_parallel_refusals(cp_size, world, device, backend, layout, message):
    from recipe.parallel import ContextParallelError, check_context_parallel

    with pytest.raises(ContextParallelError, match=re.escape(message)):
        check_context_parallel(cp_size, world, device, backend, layout)


def test_context_parallel_accepted():
    from recipe.parallel import check_context_parallel

    check_context_parallel(1, 3, "cpu", "torch", "bshd")  # cp_size 1 is plain data parallelism
    check_context_parallel(2, 4, "cuda", "auto", "thd")  # auto is checked again once resolved


@pytest.mark.slow
def test_train_cp_refused_on_cpu(tmp_path):
    r = torchrun("train_cp.py", 2, *TINY, "model.backend=torch", f"output_dir={tmp_path}")
    assert r.returncode != 0
    assert "context parallelism (cp_size=2) needs CUDA GPUs" in r.stderr


def test_cu_seqlens_padded_refused_on_torch_backend():
    from recipe.model import EsmConfig, build_model

    model = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    shard = shard_batch(odd_batch([7, 9]), 1, 0, chunk_multiple=8)
    with pytest.raises(ValueError, match="needs the te backend"):
        model(
            shard["input_ids"],
            cu_seqlens=shard["cu_seqlens"],
            max_seqlen=shard["max_seqlen"],
            cu_seqlens_padded=shard["cu_seqlens_padded"],
        )


def test_each_dp_rank_reads_its_own_data_and_cp_peers_the_same(tmp_path):
    """World 4 as dp 2 x cp 2: ranks 0,1 read one share, ranks 2,3 the other; together every sequence once."""
    from hydra import compose, initialize_config_dir

    from recipe.build import build_data
    from recipe.config import CONFIG_DIR
    from recipe.parallel import ContextParallel, DistInfo

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("L0_sanity_cp", overrides=[f"output_dir={tmp_path}", "dataset.num_workers=0"])
    seen = {}
    for rank in range(4):
        info = DistInfo(rank, 4, rank, torch.device("cpu"), ContextParallel(2, rank % 2))
        data = build_data(cfg, info)
        loader, val = data.loader, data.val
        train_it = iter(loader)
        seen[rank] = {
            "val": np.concatenate([b["sample_index"].numpy() for b in val]),
            "train": np.concatenate([next(train_it)["sample_index"].numpy() for _ in range(3)]),
        }
    for split in ("val", "train"):
        assert np.array_equal(seen[0][split], seen[1][split]) and np.array_equal(seen[2][split], seen[3][split])
        assert not set(seen[0][split]) & set(seen[2][split])
    val_all = np.concatenate([seen[0]["val"], seen[2]["val"]])
    assert sorted(val_all.tolist()) == list(range(len(load_sequences(cfg.dataset.val_path))))


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("pad_to_fixed", [False, True])
def test_cp_batches_keep_the_token_budget_and_fixed_shapes(tmp_path, cp_size, pad_to_fixed):
    """L0_sanity_cp's settings (4,096-token budget) as the trainer wires them: the padded batch the CP ranks compute
    on never exceeds the budget, and with pad_to_fixed every rank's share is exactly budget / cp_size; every real
    token still lands on exactly one rank."""
    from hydra import compose, initialize_config_dir

    from recipe.build import build_data, cp_shard
    from recipe.config import CONFIG_DIR, token_budget
    from recipe.parallel import ContextParallel, DistInfo

    overrides = [f"output_dir={tmp_path}", "dataset.num_workers=0", f"cp_size={cp_size}", f"dataset.pad_to_fixed={pad_to_fixed}"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("L0_sanity_cp", overrides=overrides)
    budget = token_budget(cfg)
    infos = [DistInfo(r, cp_size, r, torch.device("cpu"), ContextParallel(cp_size, r)) for r in range(cp_size)]
    data = build_data(cfg, infos[0])
    loader, val = data.loader, data.val
    train_it = iter(loader)
    batches = [next(train_it) for _ in range(60)] + list(val)
    shards = [cp_shard(cfg, info) for info in infos]
    for batch in batches:
        parts = [shard(batch) for shard in shards]
        total = int(parts[0]["cu_seqlens_padded"][-1])
        assert total <= budget
        assert all(len(p["input_ids"]) * cp_size == total for p in parts)
        if pad_to_fixed:
            assert all(len(p["input_ids"]) == budget // cp_size for p in parts)
        assert sum(p["num_real_tokens"] for p in parts) == batch["num_real_tokens"]
        assert sum(int((p["labels"] != -100).sum()) for p in parts) == int((batch["labels"] != -100).sum())


@pytest.mark.parametrize(
    "max_len, fixed, message",
    [
        (4080, False, r"cannot hold one sequence of dataset.max_seq_length=4080 \(padded for context parallelism: 4096\)"),
        (1024, True, "to be a multiple of 64"),
    ],
)
def test_cp_budget_that_cannot_hold_padded_sequences_is_refused(max_len, fixed, message):
    from recipe.data.dataset import BatchSettings

    multiple = 32 if not fixed else 64  # 2 x cp_size x 8: cp 2, cp 4
    with pytest.raises(ValueError, match=message):
        BatchSettings(max_seq_length=max_len, token_micro_batch_size=4080, pad_to_fixed=fixed, sequence_multiple=multiple)


@pytest.mark.slow
def test_dp_cp_grid_and_fsdp2_shards_over_all_ranks():
    """World 4, cp_size 2: CP groups are neighbouring ranks, dp rank = rank // 2, and FSDP2 shards every parameter
    over all 4 ranks (the dp x cp grid flattened, not only the dp ranks)."""
    import json

    r = torchrun("tests/scripts/cp_layout.py", 4, "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(r.stdout.strip().splitlines()[-1])
    for x in ranks:
        assert x["cp_ranks"] == [x["rank"] // 2 * 2, x["rank"] // 2 * 2 + 1] and x["cp_rank"] == x["rank"] % 2
        assert x["dp_rank"] == x["rank"] // 2 and x["dp_size"] == 2
        assert x["shard_mesh_size"] == 4 and "Shard(dim=0)" in x["placements"]
