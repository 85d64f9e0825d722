"""Strategies in one process: what FSDP2 does when there is nothing to shard."""

import pytest
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


@pytest.mark.parametrize("max_norm,scale", [(1.0, 1.0), (0.5, 100.0), (1e6, 1.0), (None, 1.0)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_folded_into_fused_adamw_gives_clip_then_step(max_norm, scale, fused, dtype):
    """With torch's fused AdamW the clip coefficient reaches the update as its grad_scale divisor instead of a pass
    over every gradient: the same norm, parameters and (clipped) gradients as clip_grad_norm_ followed by the step,
    to within float rounding where a clip applies and bit for bit where none does; other optimizers keep the pass.
    BF16 parameters (FSDP2 without FP32 master weights, unsharded on one process) too: the divisor stays FP32."""
    strategy = DDPStrategy(DistInfo(0, 1, 0, torch.device("cpu")), torch.float32)
    results = []
    for fold in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        norms = []
        for _ in range(3):
            (model(torch.randn(8, 16, dtype=dtype)).float().square().sum() * scale).backward()
            norms.append(float(strategy.clip_grad_norm(model, max_norm, optimizer if fold else None)))
            assert (getattr(optimizer, "grad_scale", None) is not None) == (fold and fused and bool(max_norm))
            optimizer.step()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            optimizer.zero_grad()
        results.append((norms, torch.cat([p.detach().flatten() for p in model.parameters()]), grads))
    (n0, p0, g0), (n1, p1, g1) = results
    assert n0 == pytest.approx(n1, rel=1e-6 if dtype == torch.float32 else 1e-2)
    clipped = max_norm is not None and max(n0) > max_norm
    assert clipped == (max_norm in (1.0, 0.5))  # the cases clip where meant to
    if clipped and fused:
        if dtype == torch.float32:
            torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)
        else:  # BF16: a step of rounding apart, which Adam's normalisation turns into up to a step of the parameter
            torch.testing.assert_close(p1, p0, rtol=1.6e-2, atol=2.5e-4)
            torch.testing.assert_close(g1, g0, rtol=1.6e-2, atol=1e-2 * g0.float().abs().max().item())
    else:
        assert torch.equal(p1, p0) and torch.equal(g1, g0)


TWO_GLOO_RANKS = """
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from recipe.model import EsmConfig, build_model
from recipe.optim import TritonAdamW
from recipe.parallel import DistInfo, FSDP2Strategy, setup_mesh

dist.init_process_group("gloo")
rank = dist.get_rank()
info = DistInfo(rank, 2, rank, torch.device("cpu"))
setup_mesh(info, 1, "p2p")


def tiny_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (30,), generator=gen)
    return dict(input_ids=ids, cu_seqlens=torch.tensor([0, 12, 30], dtype=torch.int32), max_seqlen=18, labels=ids)


{body}
dist.barrier()  # no rank tears down gloo while the other still uses it (it aborts)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # what the test reads is printed: skip the interpreter's teardown of gloo's threads, which aborted once under load
"""


def run_two_gloo_ranks(tmp_path, body: str, env: dict | None = None) -> str:
    """`body` run by two gloo processes (torchrun) after TWO_GLOO_RANKS' set-up (a 2-rank FSDP2 mesh, `tiny_batch`);
    returns their output (rank 0 prints what a test reads: two printing at once can interleave their lines)."""
    import sys

    from tests.conftest import ROOT, run_cmd

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_GLOO_RANKS.format(root=str(ROOT), body=body))
    r = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                timeout=240, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


ACCUMULATION = """
grads = {}
for reduce_every in (True, False):
    strategy = FSDP2Strategy(info, torch.bfloat16, reduce_every_micro_batch=reduce_every)  # BF16 compute, FP32 reduce
    model = strategy.wrap(build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0))
    whole = []
    for i in range(2):
        with strategy.sync_gradients(model, i == 1):
            model(**tiny_batch(10 * i + rank)).loss.backward()
        if i == 0:  # after the first micro-batch: whole FP32 gradients kept for accumulation, or none
            states = [m._get_fsdp_state()._fsdp_param_group for m in model.layers]
            whole.append(any(getattr(fp, "unsharded_accumulated_grad", None) is not None
                             for g in states for fp in g.fsdp_params))
    grads[reduce_every] = ([p.grad.to_local().clone() for p in model.parameters()], whole[0])
(sharded, kept_a), (deferred, kept_b) = grads[True], grads[False]
same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(sharded, deferred))
results = [None, None]
dist.all_gather_object(results, (rank, kept_a, kept_b, same))
if rank == 0:
    for r in results:
        print("ACCUM", *r, flush=True)
"""


@pytest.mark.slow
def test_fsdp2_accumulates_gradient_shards_by_default(tmp_path):
    """fsdp.reduce_every_micro_batch (default true): with two gloo processes and two micro-batches, FSDP2 keeps no
    whole FP32 gradients between the micro-batches (false keeps them, 4 bytes per parameter on every rank: 60 GB at
    15B), and both give the same gradients to float rounding."""
    out = run_two_gloo_ranks(tmp_path, ACCUMULATION)
    lines = sorted(x.split()[1:] for x in out.splitlines() if x.startswith("ACCUM"))
    assert lines == [["0", "False", "True", "True"], ["1", "False", "True", "True"]], out[-2000:]


SHARDED_ADAMW = """
final = {}
for kind in ("triton", "torch"):
    strategy = FSDP2Strategy(info, torch.float32)
    model = strategy.wrap(build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0))
    params = list(model.parameters())
    uneven = any(p.to_local().numel() * 2 != p.numel() for p in params)
    cls = TritonAdamW if kind == "triton" else torch.optim.AdamW
    opt = cls([{"params": params, "weight_decay": 0.01}], lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    for step in range(3):
        model(**tiny_batch(10 * step + rank)).loss.backward()
        strategy.clip_grad_norm(model, 0.5, opt)  # folded into TritonAdamW's update; torch's clips first
        opt.step()
        opt.zero_grad(set_to_none=True)
    final[kind] = [p.full_tensor().detach().clone() for p in params]
diff = max(float((a - b).abs().max()) for a, b in zip(final["triton"], final["torch"]))
if rank == 0:
    print("SHARDED", uneven, diff, flush=True)
"""


@pytest.mark.slow
def test_triton_adamw_updates_fsdp2_shards_as_torch_adamw(tmp_path):
    """optimizer.fused=triton on FSDP2's DTensor shards: two gloo processes, the kernel through Triton's interpreter,
    three clipped steps on shards (some uneven) give torch AdamW's parameters."""
    pytest.importorskip("triton")
    out = run_two_gloo_ranks(tmp_path, SHARDED_ADAMW, env={"TRITON_INTERPRET": "1"})
    lines = [x.split() for x in out.splitlines() if x.startswith("SHARDED")]
    assert lines, f"the script printed no result: {out[-2000:]}"
    line = lines[0]
    assert line[1] == "True", "no parameter was sharded unevenly: the test lost a case"
    assert float(line[2]) < 1e-5, out[-2000:]
