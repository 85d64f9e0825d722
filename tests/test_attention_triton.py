"""recipe/model/attention.py's Triton attention on CPU, through Triton's interpreter: the output, the log-sum-exp and
dq, dk, dv against per-sequence softmax attention in PyTorch (fp32, from the same inputs), for head dims that are
and are not a power of two, packings with one sequence, unequal ones, a length-1 and an empty sequence, and block
sizes smaller than the sequences (several tiles, a part-filled last tile) and larger. fp32 inputs to float rounding;
bf16 inputs within bf16's rounding of P and dS."""

import math

import numpy as np
import pytest
import torch
from conftest import rel_err

from recipe.model import attention, rope_kernel

needs_triton = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")

PACKINGS = {
    "one": [45],
    "several": [37, 1, 0, 70, 20],
    "edges": [0, 16, 1, 33, 0],  # empty first and last, a sequence exactly one 16-row tile long
}


def _fast_combine(interp, kind: str):
    """The interpreter's reduce or scan with our kernels' combine functions (attention_triton._add, _maximum) in
    numpy at once, as it runs tl.sum's and tl.max's: its general path calls the combine function element by element
    in Python, minutes for these tests' tiles."""
    ops = interp.ReduceOps if kind == "reduce" else interp.ScanOps
    general = ops.apply_impl

    def apply_impl(self, input):
        fn = getattr(self.combine_fn, "fn", None)
        name = getattr(fn, "__name__", "") if getattr(fn, "__module__", "") == "recipe.model.attention_triton" else ""
        if kind == "reduce" and name == "_add":
            return self.sum(input[0])
        if kind == "reduce" and name == "_maximum":
            return self.min_max(input[0], val_reduce_op=np.max)
        if kind == "scan" and name == "_add" and not self.reverse:
            return self.cumsum(input[0])
        return general(self, input)

    return ops, apply_impl


@pytest.fixture
def attn_interpreted(interpreted, monkeypatch):
    """The interpreter, with the attention module loaded under it, its reductions over our combine functions in
    numpy (`_fast_combine`), and its matmul taking bf16 operands as numbers: Triton's interpreter (3.x) keeps bf16 as
    raw uint16 bits and multiplies the bits (the GPU multiplies the values), so its dot is given the operands widened
    to fp32, exactly as the tensor cores read them."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    dot = interp.InterpreterBuilder.create_dot

    def widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        def f32(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            return interp.TensorHandle(interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

        return dot(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", widened)
    for kind in ("reduce", "scan"):
        ops, apply_impl = _fast_combine(interp, kind)
        monkeypatch.setattr(ops, "apply_impl", apply_impl)
    attention._kernels.cache_clear()
    yield
    attention._kernels.cache_clear()


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)


def reference(q, k, v, cu, scale):
    """(out [T, H, D], lse [H, T]) of softmax attention within each sequence, in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0], device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            s = torch.einsum("thd,shd->hts", q[a:b], k[a:b]) * scale
            out[a:b] = torch.einsum("hts,shd->thd", s.softmax(-1), v[a:b])
            lse[:, a:b] = s.logsumexp(-1)
    return out, lse


def inputs(lengths, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    return [(torch.randn(t, heads, head_dim, generator=g) * 1.5).to(dtype) for _ in range(4)]  # q, k, v, dO


def run_both(lengths, heads, head_dim, dtype, launch, scale=None, mangle=None):
    """(ours, reference): each a list [out, lse, dq, dk, dv], ours through the autograd function. `mangle` changes the
    reference (the tests that show a wrong kernel would be caught)."""
    q0, k0, v0, do = inputs(lengths, heads, head_dim, dtype)
    cu = cu_seqlens(lengths)
    s = head_dim**-0.5 if scale is None else scale
    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    out = attention.varlen_attention(q, k, v, cu, max(lengths), scale=scale, fwd=launch, bwd=launch)
    out.backward(do)
    _, lse = attention.attention_forward(q0, k0, v0, cu, s, launch)
    qr, kr, vr = (x.float().requires_grad_() for x in (q0, k0, v0))
    ref_out, ref_lse = (mangle or reference)(qr, kr, vr, cu, s)
    ref_out.backward(do.float())
    return [out, lse, q.grad, k.grad, v.grad], [ref_out, ref_lse, qr.grad, kr.grad, vr.grad]


def assert_matches(ours, ref, dtype):
    names = ["out", "lse", "dq", "dk", "dv"]
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(names, ours, ref, strict=True):
        assert got.shape == want.shape and got.dtype == (torch.float32 if name == "lse" else dtype), name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < limit, f"{name}: relative error {rel_err(got, want):.2e}"


@needs_triton
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
@pytest.mark.parametrize("packing", sorted(PACKINGS))
def test_matches_reference_fp32(attn_interpreted, head_dim, packing):
    """fp32 inputs (full-precision dots): the kernels' arithmetic, to float rounding, with 16x32 tiles (several query
    and key tiles per sequence, part-filled last tiles)."""
    ours, ref = run_both(PACKINGS[packing], 2, head_dim, torch.float32, attention.Launch(16, 32))
    assert_matches(ours, ref, torch.float32)


@needs_triton
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
@pytest.mark.parametrize("launch", [attention.Launch(32, 16), attention.Launch(64, 128)])
def test_matches_reference_bf16(attn_interpreted, head_dim, launch):
    """bf16 inputs, three heads, the unequal packing with a length-1 and an empty sequence: within bf16's rounding
    of P and dS, for tiles smaller and larger than the sequences."""
    ours, ref = run_both(PACKINGS["several"], 3, head_dim, torch.bfloat16, launch)
    assert_matches(ours, ref, torch.bfloat16)


@needs_triton
def test_scale_and_strided_inputs(attn_interpreted):
    """An explicit scale is the one applied, and q, k, v as strided views of one fused [T, 3, H, D] tensor (the
    model's QKV) give what their contiguous copies give."""
    lengths, heads, dim = PACKINGS["several"], 2, 24
    ours, ref = run_both(lengths, heads, dim, torch.float32, attention.Launch(16, 16), scale=0.3)
    assert_matches(ours, ref, torch.float32)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lengths), 3, heads, dim, generator=g)
    cu = cu_seqlens(lengths)
    views = qkv.unbind(1)
    assert views[0].stride(0) == 3 * heads * dim
    strided, _ = attention.attention_forward(*views, cu, dim**-0.5, attention.Launch(16, 16))
    dense, _ = attention.attention_forward(*(x.contiguous() for x in views), cu, dim**-0.5, attention.Launch(16, 16))
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)


@needs_triton
def test_rows_of_far_negative_scores(attn_interpreted):
    """A query whose scores against every key of its sequence are far below zero (log-sum-exp about -117, so
    exp(-lse) overflows fp32), in sequences that end inside a tile: its output and dq stay finite and exact (keys
    past a sequence's end must get P = 0, not exp2(0 - lse))."""
    lengths, dim = [20, 5], 16
    g = torch.Generator().manual_seed(0)
    q, v, do = (torch.randn(sum(lengths), 1, dim, generator=g) for _ in range(3))
    k = 1 + 0.01 * torch.randn(sum(lengths), 1, dim, generator=g)
    q[3] = -30.0
    cu = cu_seqlens(lengths)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention.varlen_attention(*leaves, cu, max(lengths), fwd=attention.Launch(16, 16), bwd=attention.Launch(16, 16))
    out.backward(do)
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference(*refs, cu, dim**-0.5)
    ref_out.backward(do)
    assert ref_lse[0, 3] < -100
    for got, want in zip([out, *(x.grad for x in leaves)], [ref_out, *(x.grad for x in refs)], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def leaky(q, k, v, cu, scale):
    """Attention over the whole packed batch: the mask leak across sequences a wrong kernel could have."""
    return reference(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), scale)


def wrong_scale(q, k, v, cu, scale):
    return reference(q, k, v, cu, scale * 1.1)


@needs_triton
@pytest.mark.parametrize("mangle", [leaky, wrong_scale])
def test_check_catches_a_wrong_kernel(attn_interpreted, mangle):
    """The comparison fails against a reference that leaks across sequences or scales differently: a kernel with
    either fault would fail the tests above."""
    ours, ref = run_both(PACKINGS["several"], 2, 16, torch.float32, attention.Launch(16, 32), mangle=mangle)
    with pytest.raises(AssertionError):
        assert_matches(ours, ref, torch.float32)


@needs_triton
def test_bad_inputs_raise():
    q = torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        attention.varlen_attention(q, q, q, torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="one shape"):
        attention.varlen_attention(q, q, q[:, :1], torch.tensor([0, 4], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="scale must be positive"):
        attention.varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, scale=-1.0)
    with pytest.raises(TypeError, match="bf16, fp16, fp32"):
        attention.varlen_attention(q.double(), q.double(), q.double(), torch.tensor([0, 4], dtype=torch.int32), 4)


def test_grid_bound_covers_every_block():
    """The grid's bound on blocks over all sequences is never below the blocks the sequences need."""
    g = torch.Generator().manual_seed(0)
    for block in (16, 64, 128):
        for _ in range(50):
            lengths = torch.randint(0, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            need = sum(math.ceil(n / block) for n in lengths)
            assert attention._grid_rows(sum(lengths), len(lengths), block) >= need


def test_bench_launch_settings_parse():
    """bench/attention_kernels.py: --fwd/--bwd take the settings as the BEST line prints them, and the sweep covers
    block sizes 64 and 128, 4 and 8 warps, 2 and 3 stages."""
    import argparse

    from bench import attention_kernels as bench

    launch = attention.Launch(128, 32, 8, 3)
    assert bench.parse_launch(bench.launch_text(launch)) == launch
    with pytest.raises(argparse.ArgumentTypeError, match="block_m,block_n,warps,stages"):
        bench.parse_launch("128,64,4")
    for backward in (False, True):
        settings = bench.sweep_launches(backward)
        assert len(set(settings)) == len(settings)
        for field, values in (("block_m", {64, 128}), ("warps", {4, 8}), ("stages", {2, 3})):
            assert {getattr(x, field) for x in settings} == values
        assert {x.block_n for x in settings} >= {64, 128}


@needs_triton
def test_bench_sweep_on_cpu(attn_interpreted, monkeypatch, capsys):
    """The sweep's host side through the interpreter: every setting runs and is compared with the reference (FA2's
    place; here per-sequence PyTorch attention, so the printed differences are float rounding), and the BEST line
    names the fastest setting of each pass (times given: the second forward, the first backward setting)."""
    from bench import attention_kernels as bench

    def torch_reference(q, k, v, cu, m):
        return reference(q, k, v, cu, q.shape[-1] ** -0.5)[0]

    settings = [attention.Launch(16, 16, 4, 2), attention.Launch(32, 16, 4, 3)]
    times = iter([2e-3, 1e-3, 1e-3, 3e-3])
    monkeypatch.setattr(bench, "kernels_flash2", lambda: torch_reference)
    monkeypatch.setattr(bench, "sweep_launches", lambda backward: settings)
    monkeypatch.setattr(bench, "timed_seconds", lambda step, batches: [step(b) for b in batches] and next(times))
    q, k, v, grad = inputs(PACKINGS["several"], 2, 24, torch.float32)
    for x in (q, k, v):
        x.requires_grad_()
    line = bench.sweep("8M", (q, k, v, cu_seqlens(PACKINGS["several"]), 70, grad), iters=1)
    assert line == "BEST size=8M fwd=32,16,4,3 (1.000 ms) bwd=16,16,4,2 (1.000 ms)"
    diffs = [float(x.split("max diff from FA2 ")[1].rstrip(")")) for x in capsys.readouterr().out.splitlines()]
    assert len(diffs) == 4 and max(diffs) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
def test_gpu_matches_flash_attention(head_dim):
    """On the GPU (compiled kernels, default launch settings), bf16: the output and gradients no further from the
    fp32 reference than FA2's (varlen_attn, what the torch backend runs), to within half a bf16 step, on a packing
    with sequences longer than a tile, a length-1 and an empty one."""
    from torch.nn.attention.varlen import varlen_attn

    lengths = [300, 1, 0, 1024, 77, 129]
    q0, k0, v0, do = (x.cuda() for x in inputs(lengths, 4, head_dim, torch.bfloat16))
    cu = cu_seqlens(lengths).cuda()
    results = {}
    for name in ("ours", "flash2", "reference"):
        dtype = torch.float32 if name == "reference" else torch.bfloat16
        q, k, v = (x.detach().to(dtype).clone().requires_grad_() for x in (q0, k0, v0))  # each run its own leaves
        if name == "ours":
            out = attention.varlen_attention(q, k, v, cu, max(lengths))
        elif name == "flash2":
            out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths))
        else:
            out = reference(q, k, v, cu.cpu(), head_dim**-0.5)[0]
        out.backward(do.to(dtype))
        results[name] = [out, q.grad, k.grad, v.grad]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        ours, fa2 = (rel_err(results[x][i], results["reference"][i]) for x in ("ours", "flash2"))
        assert ours < fa2 + 2e-3, f"{name}: ours {ours:.2e} from the fp32 reference, FA2 {fa2:.2e}"


@needs_triton
def test_compiled_attention_stays_in_the_graph_and_agrees(attn_interpreted):
    """`varlen_attention`, what the torch backend's layers call (model.attention_kernel=triton), runs through custom
    ops with their autograd: under torch.compile with fullgraph=True it compiles (no graph break: the ops stay in the
    layer's graph), and its output and gradients are the eager call's."""
    lengths = PACKINGS["several"]
    q0, k0, v0, do = inputs(lengths, 2, 16, torch.float32)
    cu = cu_seqlens(lengths)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, cu: attention.varlen_attention(q, k, v, cu, max(lengths)) * 2.0, fullgraph=True)
    results = []
    for call in (compiled, lambda q, k, v, cu: attention.varlen_attention(q, k, v, cu, max(lengths)) * 2.0):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = call(q, k, v, cu)
        out.backward(do)
        results.append([out, q.grad, k.grad, v.grad])
    for got, want in zip(*results, strict=True):
        assert rel_err(got, want) < 1e-5
