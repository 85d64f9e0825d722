"""model.rope_kernel=triton (recipe/model/rope_kernel.py): the kernels run through Triton's interpreter on CPU
against the PyTorch rotary the torch backend uses, and the refusals of the setting. The GPU run of the same kernels
inside the te model is tests/test_gpu.py::test_triton_rope_kernel_matches_te_rope."""

import re

import pytest
import torch

from recipe.build import resolve_rope_kernel
from recipe.config import ConfigError
from recipe.model import rope_kernel
from recipe.model.layers import PackedInfo, apply_rotary, linear, rotary_cos_sin, rotary_inv_freq

needs_triton = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")


def reference(qkv, packed, heads, head_dim):
    cos, sin = rotary_cos_sin(packed.offsets, head_dim, 10000.0)
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(-3)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads, head_dim, tokens",
    [(4, 16, 33), (20, 8, 33), (3, 64, 33), (2, 24, 33), (3, 64, 300)],  # half-dims 8, 4, 32, 12 (35M)
)
def test_matches_the_pytorch_rotary_forward_and_backward(interpreted, dtype, heads, head_dim, tokens):
    """Outputs and QKV's gradient against the torch backend's rotary, on three packed sequences (33 tokens: less than
    one of the kernel's token blocks, not a multiple of it; 300 at half-dim 32: three blocks of 128), positions
    restarting at each sequence."""
    packed = PackedInfo(torch.tensor([0, 5, 12, tokens], dtype=torch.int32), tokens - 12, tokens)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=gen).to(dtype)
    grads = [torch.randn(tokens, heads, head_dim, generator=gen).to(dtype) for _ in range(3)]
    results = []
    for fn in (lambda x: rope_kernel.rope_qkv(x, packed.offsets, rotary_inv_freq(head_dim, 10000.0), heads, head_dim),
               lambda x: reference(x, packed, heads, head_dim)):  # fmt: skip
        x = qkv.clone().requires_grad_()
        out = fn(x)
        torch.autograd.backward(out, grads)
        results.append([*(o.detach() for o in out), x.grad])
    assert all(o.is_contiguous() for o in results[0][:3])
    assert torch.equal(results[0][2], results[1][2])  # v: a copy
    for got, want in zip(results[0], results[1]):
        # fp32: the same arithmetic but for the sin/cos implementation; bf16: at most one rounding step apart
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize(
    "backend, cp_size, has_triton, message",
    [
        ("torch", 1, True, "model.rope_kernel=triton needs the te backend \\(resolved: torch\\)"),
        ("te", 2, True, "model.rope_kernel=triton runs without context parallelism only \\(cp_size=2\\)"),
        ("te", 1, False, "model.rope_kernel=triton needs Triton"),
    ],
)
def test_refusals(monkeypatch, backend, cp_size, has_triton, message):
    monkeypatch.setattr(rope_kernel, "available", lambda: has_triton)
    with pytest.raises(ConfigError, match=message):
        resolve_rope_kernel("triton", backend, cp_size)
    assert resolve_rope_kernel("te", backend, cp_size) == "te"  # never refused


@pytest.mark.parametrize(
    "backend, cp_size, has_triton, picked, logged",
    [
        ("te", 1, True, "triton", "picked triton"),
        ("te", 2, True, "te", "picked te: context parallelism \\(cp_size=2\\) needs TE's rope"),
        ("te", 1, False, "te", "picked te: Triton is not installed"),
        ("torch", 1, True, "te", None),  # not used by the torch and hf backends: nothing to say
        ("hf", 1, True, "te", None),
    ],
)
def test_auto_picks_triton_where_it_can_run(monkeypatch, caplog, backend, cp_size, has_triton, picked, logged):
    monkeypatch.setattr(rope_kernel, "available", lambda: has_triton)
    with caplog.at_level("INFO", logger="recipe"):
        assert resolve_rope_kernel("auto", backend, cp_size) == picked
    lines = [r.getMessage() for r in caplog.records if "rope_kernel" in r.getMessage()]
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and re.search(logged, lines[0]), lines


@pytest.mark.parametrize(
    "shape, positions, error",
    [
        ((7, 3 * 4 * 16 + 1), 7, "is not \\[T, 3 x 4 heads x 16\\]"),  # a QKV width that is not 3 x H x D
        ((7, 3 * 4 * 16), 6, "positions \\(6,\\) is not \\[T\\]"),
    ],
)
def test_malformed_input_is_refused_before_any_kernel(shape, positions, error):
    with pytest.raises(ValueError, match=error):
        rope_kernel.rope_qkv(torch.zeros(shape), torch.zeros(positions, dtype=torch.long), rotary_inv_freq(16, 1e4), 4, 16)


def test_the_model_refuses_the_kernel_where_it_does_not_apply():
    """Built directly (not through the trainer's config check): the torch backend has no use for it."""
    from recipe.model import EsmConfig, build_model
    from recipe.model.config import Runtime

    with pytest.raises(ValueError, match="rope_kernel=triton is for the te backend without context parallelism"):
        build_model(EsmConfig.from_size("tiny", backend="torch"), runtime=Runtime(rope_kernel="triton"))


@needs_triton
@pytest.mark.parametrize(
    "heads, head_dim, tokens, tiles, dtype",
    [
        (2, 64, 300, 1, torch.bfloat16),  # programs of one tile
        (2, 64, 300, 2, torch.bfloat16),  # of two
        (2, 64, 300, 2, torch.float32),
        (2, 24, 700, None, torch.bfloat16),  # the default, at a half-head of 12 lanes
        (4, 8, 33, None, torch.bfloat16),  # fewer tokens than one tile
    ],
)
def test_backward_sums_the_bias_gradient(interpreted, dtype, heads, head_dim, tokens, tiles):
    """The backward kernel's column sums of the QKV gradient it writes (the projection's bias gradient), over
    programs of one and two tiles and token counts that end inside a program: equal to summing that gradient
    afterwards, and the gradient itself the same as without the sums."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(tokens, heads, head_dim, generator=gen).to(dtype) for _ in range(3)]
    positions = torch.randint(0, 1024, (tokens,), generator=gen)
    inv_freq = rotary_inv_freq(head_dim, 10000.0)
    block_t = rope_kernel._blocks(head_dim, rope_kernel.BACKWARD.tile)[1]
    launch = rope_kernel.BACKWARD if tiles is None else rope_kernel.Launch(rows=tiles * block_t)
    dqkv, bias_grad = rope_kernel._backward(*grads, positions, inv_freq, heads, head_dim, bias=True, launch=launch)
    plain, none = rope_kernel._backward(*grads, positions, inv_freq, heads, head_dim, bias=False)
    assert none is None and torch.equal(dqkv, plain)
    torch.testing.assert_close(bias_grad, dqkv.float().sum(0), rtol=1e-5, atol=1e-4)


@needs_triton
def test_linear_rope_matches_linear_then_rope(interpreted):
    """The fused QKV projection and rope against layers.linear followed by rope_qkv through autograd, FP32 weights
    cast to BF16 as under autocast: q, k, v and the input's, weight's and bias's gradients (the bias's from the
    rope kernel's sums, in the bias's dtype)."""
    heads, head_dim, tokens = 3, 16, 150
    torch.manual_seed(2)
    packed = PackedInfo(torch.tensor([0, 40, 97, tokens], dtype=torch.int32), 57, tokens)
    x0 = torch.randn(tokens, 40).bfloat16()
    w0, b0 = torch.randn(3 * heads * head_dim, 40) * 40**-0.5, torch.randn(3 * heads * head_dim) * 0.1
    inv_freq = rotary_inv_freq(head_dim, 10000.0)
    grads = [torch.randn(tokens, heads, head_dim).bfloat16() for _ in range(3)]
    results = {}
    for name in ("fused", "separate"):
        x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        if name == "fused":
            out = rope_kernel._LinearRopeQKV.apply(x, w, b, packed.offsets, inv_freq, heads, head_dim, torch.bfloat16)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = rope_kernel.rope_qkv(linear(x, w, b), packed.offsets, inv_freq, heads, head_dim)
        torch.autograd.backward(out, grads)
        results[name] = [*(o.detach() for o in out), x.grad, w.grad, b.grad]
    for got, want in zip(results["fused"], results["separate"], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)
