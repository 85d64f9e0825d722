"""Strategies in one process: what FSDP2 does when there is nothing to shard."""

import torch

from recipe.model import EsmConfig, build_model
from recipe.parallel import DDPStrategy, DistInfo, FSDP2Strategy


def test_fsdp2_on_one_process_trains_unsharded_like_ddp():
    """One process: FSDP2 leaves the model unsharded (no DTensor parameters, no FSDP hooks), so train_fsdp2.py and
    train_ddp.py run the same arithmetic at the same speed on one GPU; gradient accumulation still works."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy = FSDP2Strategy(info, torch.float32)
    model = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    wrapped = strategy.wrap(model)
    assert wrapped is model and not strategy.shards
    assert all(type(p) is torch.nn.Parameter for p in wrapped.parameters())
    assert not hasattr(wrapped, "set_requires_gradient_sync")
    ids = torch.randint(4, 24, (30,))
    batch = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 12, 30], dtype=torch.int32), "max_seqlen": 18, "labels": ids}
    for last in (False, True):
        with strategy.sync_gradients(wrapped, last):
            wrapped(**batch).loss.backward()
    assert wrapped.embed_tokens.weight.grad is not None
    assert FSDP2Strategy(DistInfo(0, 2, 0, torch.device("cpu")), torch.float32).shards
    assert DDPStrategy.meta_init is False and FSDP2Strategy.meta_init is True
