"""optimizer.fused=triton (optim.TritonAdamW) on CPU through Triton's interpreter: its update against torch's AdamW,
with the clip folded in, its state dict, and which AdamW each setting gives. The GPU run is
tests/test_gpu.py::test_triton_adamw_matches_fused_adamw."""

import pytest
import torch

from recipe.config import ConfigError
from recipe.model import rope_kernel
from recipe.optim import TritonAdamW, adamw_kind
from recipe.parallel import IMPLEMENTATION_KEYS, DDPStrategy, DistInfo

needs_triton = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")


def parameters() -> list[torch.nn.Parameter]:
    """Sizes that fill and do not fill a program's 4096 elements, one not a multiple of four, and a view at a 4-byte
    offset into its storage (as a DTensor's local shard can be): the unaligned launch's cases."""
    torch.manual_seed(0)
    storage = torch.randn(40)
    return [torch.nn.Parameter(torch.randn(*s)) for s in [(64, 48), (4196,), (33,), (7, 5)]] + [torch.nn.Parameter(storage[1:34])]


def groups(params):
    return [{"params": params[:2] + params[4:], "weight_decay": 0.01}, {"params": params[2:4], "weight_decay": 0.0}]


@needs_triton
@pytest.mark.parametrize("scale", [None, 3.5])
@pytest.mark.parametrize("unaligned_first", [False, True])
def test_triton_adamw_matches_torch_adamw(interpreted, scale, unaligned_first):
    """Four steps at changing learning rates, two groups (with and without weight decay), a parameter without a
    gradient in one step, the unaligned view first in its group or not: the parameters and both moments against
    torch's AdamW given the gradients divided by `scale` (the clip divisor as grad_scale), to float rounding; the
    gradients are left as they were."""
    order = (lambda ps: ps[::-1]) if unaligned_first else (lambda ps: ps)
    ours_p, ref_p = order(parameters()), order(parameters())
    ours = TritonAdamW(groups(ours_p), lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, fused=True)
    for step in range(4):
        for opt in (ours, ref):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (step + 1)
        torch.manual_seed(step + 10)
        grads = [torch.randn_like(p) * 10 for p in ours_p]
        for i, (a, b, g) in enumerate(zip(ours_p, ref_p, grads)):
            skip = step == 2 and i == 3
            a.grad = None if skip else g.clone()
            b.grad = None if skip else (g / scale if scale else g.clone())
        ours.grad_scale = torch.tensor(scale) if scale else None
        ours.step()
        ref.step()
        for a, b, g in zip(ours_p, ref_p, grads):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-6)
            if a.grad is not None:
                assert torch.equal(a.grad, g)
            for key in ("exp_avg", "exp_avg_sq"):  # where a moment's two terms cancel, a few ulps of the larger
                want = ref.state[b][key]
                torch.testing.assert_close(ours.state[a][key], want, rtol=2e-6, atol=1e-6 * want.abs().max().item())
            assert float(ours.state[a]["step"]) == float(ref.state[b]["step"])


@needs_triton
@pytest.mark.parametrize("max_norm", [0.5, None])
def test_clip_folds_into_triton_adamw(interpreted, max_norm):
    """Strategy.clip_grad_norm hands TritonAdamW the clip divisor as its grad_scale: the same norms and parameters
    as clip_grad_norm_ followed by torch's AdamW."""
    strategy = DDPStrategy(DistInfo(0, 1, 0, torch.device("cpu")), torch.float32)
    runs = []
    for kind in ("triton", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        make = TritonAdamW if kind == "triton" else torch.optim.AdamW
        optimizer = make(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
        norms = []
        for _ in range(3):
            model(torch.randn(8, 16)).square().sum().backward()
            norms.append(float(strategy.clip_grad_norm(model, max_norm, optimizer if kind == "triton" else None)))
            assert (getattr(optimizer, "grad_scale", None) is not None) == (kind == "triton" and max_norm is not None)
            optimizer.step()
            optimizer.zero_grad()
        runs.append((norms, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (n0, p0), (n1, p1) = runs
    assert n0 == pytest.approx(n1, rel=1e-6)
    assert max_norm is None or max(n0) > max_norm  # the clip applies
    torch.testing.assert_close(p0, p1, rtol=2e-6, atol=1e-7)


@needs_triton
def test_triton_adamw_state_dict_is_torch_adamws(interpreted):
    """The state dict has torch AdamW's keys, shapes and CPU step counts, and loads either way: torch's AdamW
    continued from TritonAdamW's state and TritonAdamW continued from torch's take the same next step."""
    params = {name: parameters() for name in ("triton", "torch")}
    opts = {
        "triton": TritonAdamW(groups(params["triton"]), lr=1e-2, betas=(0.9, 0.98), eps=1e-8),
        "torch": torch.optim.AdamW(groups(params["torch"]), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, foreach=False),
    }
    for name, opt in opts.items():
        for p in params[name]:
            p.grad = torch.ones_like(p)
        opt.step()
    sd = {name: opt.state_dict() for name, opt in opts.items()}
    hyper = [[{k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS} for g in sd[n]["param_groups"]] for n in sd]
    assert hyper[0] == hyper[1]
    for i, state in sd["triton"]["state"].items():
        assert state.keys() == sd["torch"]["state"][i].keys()
        assert state["step"].device.type == "cpu" and float(state["step"]) == 1.0
    # each continues from the other's state
    swapped = {"triton": TritonAdamW, "torch": torch.optim.AdamW}
    after = {}
    for name, other in (("triton", "torch"), ("torch", "triton")):
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in params[other]]
        opt = swapped[name](groups(fresh), lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
        opt.load_state_dict(sd[other])
        for p in fresh:
            p.grad = torch.full_like(p, -2.0)
        opt.step()
        after[name] = torch.cat([p.detach().flatten() for p in fresh])
    torch.testing.assert_close(after["triton"], after["torch"], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "fused, device, dtype, triton_ok, expected",
    [
        ("auto", "cpu", torch.float32, True, "foreach"),
        ("auto", "cuda", torch.float32, True, "triton"),
        ("auto", "cuda", torch.bfloat16, True, "fused"),  # BF16 parameters: torch's fused kernel
        ("auto", "cuda", torch.float32, False, "fused"),  # Megatron-FSDP
        ("auto", "cuda", "fp32 shards", True, "fused"),  # FSDP2's DTensor shards: measured faster there (lever 56)
        ("triton", "cuda", "fp32 shards", True, "triton"),
        (True, "cuda", torch.float32, True, "fused"),
        (False, "cuda", torch.float32, True, "foreach"),
        ("triton", "cuda", torch.float32, True, "triton"),
        ("triton", "cpu", torch.float32, True, "the CPU"),
        ("triton", "cuda", torch.float32, False, "this strategy"),
        ("triton", "cuda", torch.bfloat16, True, "BF16 parameters"),
    ],
)
def test_adamw_kind(fused, device, dtype, triton_ok, expected, monkeypatch):
    """What optimizer.fused gives; triton where it cannot run is refused with the reason (a ConfigError: the
    entrypoint prints it as one line), never swapped for another."""
    monkeypatch.setattr(rope_kernel, "available", lambda: True)
    model = torch.nn.Linear(4, 4).to(torch.float32 if dtype == "fp32 shards" else dtype)
    if dtype == "fp32 shards":  # what adamw_kind would see of a DTensor
        for p in model.parameters():
            p.to_local = lambda p=p: p
    if expected in ("the CPU", "this strategy", "BF16 parameters"):
        with pytest.raises(ConfigError, match=f"optimizer.fused=triton is not available on {expected}"):
            adamw_kind(fused, torch.device(device), model, triton_ok)
    else:
        assert adamw_kind(fused, torch.device(device), model, triton_ok) == expected


@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_resume_keeps_the_configured_adamw_implementation(saved, resumed):
    """A checkpoint's optimizer state loads without its `fused` flag: a run resumed with optimizer.fused=true from a
    run saved with false (or the other way round) runs the kernel its config asks for, with the saved state."""
    strategy = DDPStrategy(DistInfo(0, 1, 0, torch.device("cpu")), torch.float32)
    models, opts = [], []
    for fused in (saved, resumed):
        torch.manual_seed(0)
        models.append(torch.nn.Linear(4, 4))
        opts.append(torch.optim.AdamW(models[-1].parameters(), lr=1e-2, fused=fused))
    models[0](torch.randn(2, 4)).sum().backward()
    opts[0].step()
    model_sd, optim_sd = strategy.get_state_dict(models[0], opts[0])
    strategy.set_state_dict(models[1], opts[1], model_sd, optim_sd)
    assert opts[1].param_groups[0]["fused"] is resumed
    assert float(opts[1].state[models[1].weight]["step"]) == 1.0


def test_triton_refused_with_quantized_model_init():
    """quantized_model_init needs TE's FusedAdam (FP32 master copies of FP8 weights): an explicit
    optimizer.fused=triton is refused there, not ignored."""
    from recipe.config import LRSchedulerConfig, OptimizerConfig
    from recipe.optim import build_optimizer

    with pytest.raises(ConfigError, match="optimizer.fused=triton cannot keep the FP32 master copies"):
        build_optimizer(torch.nn.Linear(4, 4), OptimizerConfig(fused="triton"), LRSchedulerConfig(), 10,
                        torch.device("cuda"), master_weights=True)  # fmt: skip


def test_step_counts_placed_for_the_configured_kernel():
    """After a resume, each AdamW `step` count lies where the configured kernel reads it (torch's load places it by
    the checkpoint's flags): on the parameter's device for the fused kernel, on the CPU otherwise. A meta-device
    parameter stands in for a GPU one."""
    from recipe.parallel import place_step_counts

    params = [torch.nn.Parameter(torch.zeros(4, device="meta")) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    opt.param_groups[0]["fused"] = True
    opt.state[params[0]]["step"] = torch.tensor(3.0)
    opt.state[params[1]]["step"] = torch.tensor(3.0)  # (a GPU count would come back to the CPU; meta cannot)
    place_step_counts(opt)
    assert opt.state[params[0]]["step"].device.type == "meta"
    assert opt.state[params[1]]["step"].device.type == "cpu"


@needs_triton
@pytest.mark.parametrize("loss, norm, skipped", [(2.0, 1.0, False), (float("nan"), 1.0, True), (2.0, float("inf"), True)])
def test_triton_adamw_skips_a_non_finite_step_on_the_device(interpreted, loss, norm, skipped):
    """guard_update gives TritonAdamW the step's flag: with a non-finite loss or gradient norm the update writes
    nothing (parameters and moments as they were), with finite ones it is the same update as without the flag.
    torch's AdamW takes no flag: guard_update says so and its update waits for the host's check."""
    from recipe.optim import guard_update

    flagged, plain = parameters(), parameters()
    opts = [TritonAdamW(groups(ps), lr=1e-2, betas=(0.9, 0.98), eps=1e-8) for ps in (flagged, plain)]
    for step in range(2):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in flagged]
        for ps in (flagged, plain):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        before = [p.detach().clone() for p in flagged]
        moments = [{k: v.clone() for k, v in opts[0].state[p].items() if k != "step"} for p in flagged if opts[0].state[p]]
        last = step == 1
        assert guard_update(opts[0], torch.tensor(loss if last else 1.0), torch.tensor(norm if last else 1.0))
        opts[0].step()
        opts[1].step()
        if last and skipped:
            assert all(torch.equal(p.detach(), b) for p, b in zip(flagged, before))
            for p, m in zip(flagged, moments):
                assert all(torch.equal(opts[0].state[p][k], v) for k, v in m.items())
        else:
            assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(flagged, plain))
    assert not guard_update(torch.optim.AdamW(parameters(), lr=1e-2), torch.tensor(float("nan")), torch.tensor(1.0))
