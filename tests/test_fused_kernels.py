"""recipe/model/fused_kernels.py's Triton kernels on CPU, through Triton's interpreter: the fused exact-GELU backward
against PyTorch's GELU backward and bias gradient, the LayerNorm against PyTorch's. The GPU runs are
tests/test_gpu.py::test_fused_gelu_mlp_matches_pytorch and ::test_te_layer_norm_matches_torch_layer_norm."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from recipe.model import fused_kernels, layers, rope_kernel

needs_triton = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")


def tolerance(dtype):
    """fp32: the interpreter's erf and exp differ from PyTorch's in the last bits; bf16: one rounding step."""
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, features, rows", [(33, 200, 512), (700, 64, 64), (512, 128, 32)])
def test_gelu_backward_and_bias_matches_pytorch(interpreted, dtype, tokens, features, rows):
    """Token counts that are and are not whole multiples of a program's rows, feature counts below, at and past one
    column block: the gradient (written in place) and the bias gradient (fp32) against PyTorch's."""
    torch.manual_seed(0)
    pre = (torch.randn(tokens, features) * 2).to(dtype)
    grad = torch.randn(tokens, features).to(dtype)
    leaf = pre.clone().requires_grad_()
    F.gelu(leaf).backward(grad)
    expected = leaf.grad
    inplace = grad.clone()
    bias_grad = fused_kernels.gelu_backward_and_bias(inplace, pre, rows=rows)
    torch.testing.assert_close(inplace, expected, **tolerance(dtype))
    torch.testing.assert_close(bias_grad, inplace.float().sum(0), rtol=1e-5, atol=1e-4)  # the sum of what it stored
    assert rel_err(bias_grad, expected.float().sum(0)) < (1e-6 if dtype == torch.float32 else 1e-2)


@needs_triton
def test_gelu_mlp_matches_pytorch_autograd(interpreted):
    """The autograd function against fc2(GELU(fc1)) through PyTorch's autograd, FP32 weights cast to BF16 as under
    autocast: the output, the input's gradient and every weight's and bias's, the last four in the parameters'
    dtype."""
    torch.manual_seed(1)
    x0 = torch.randn(70, 48).bfloat16()
    params0 = [torch.randn(96, 48) * 48**-0.5, torch.randn(96) * 0.1, torch.randn(48, 96) * 96**-0.5, torch.randn(48) * 0.1]
    outs = {}
    for name in ("fused", "pytorch"):
        x, params = x0.clone().requires_grad_(), [p.clone().requires_grad_() for p in params0]
        w1, b1, w2, b2 = params
        if name == "fused":
            y = fused_kernels._GeluMLP.apply(x, *params, torch.bfloat16)
        else:
            y = F.linear(F.gelu(F.linear(x, w1.bfloat16(), b1.bfloat16())), w2.bfloat16(), b2.bfloat16())
        y.float().square().sum().backward()
        outs[name] = (y, x.grad, *(p.grad for p in params))
    for got, want in zip(outs["fused"], outs["pytorch"], strict=True):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 5e-3  # BF16 roundings in another order, not more


@needs_triton
@pytest.mark.parametrize("rows, hidden, rows_per_program", [(37, 96, 32), (300, 40, 128), (5, 2560, 32), (20, 1000, 16)])
def test_triton_layer_norm_matches_pytorch(interpreted, rows, hidden, rows_per_program):
    """FP32 (the arithmetic, to float rounding): output, mean and rstd, and dx, dw, db against PyTorch's LayerNorm,
    for row counts that are and are not whole multiples of a program's rows and row widths that are and are not a
    power of two. BF16: the output against PyTorch's on the same BF16 input and BF16 parameters, within one BF16
    step (Triton's interpreter rounds to BF16 toward zero, the GPU to nearest: the reference's parameters are rounded
    as the interpreter rounds them)."""
    torch.manual_seed(0)
    x = torch.randn(rows, hidden) * 3 + 1
    w, b = torch.randn(hidden) * 0.5 + 1, torch.randn(hidden) * 0.1
    y, mean, rstd, _ = fused_kernels.layer_norm_forward(x, w, b, 1e-5)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = F.layer_norm(leaves[0], (hidden,), leaves[1], leaves[2], 1e-5)
    dy = torch.randn(rows, hidden)
    want.backward(dy)
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, x.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)
    got = fused_kernels.layer_norm_backward(dy, x, w, mean, rstd, rows_per_program=rows_per_program)
    for g, leaf in zip(got, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-4, atol=1e-4)
    xb = x.bfloat16()
    yb, _, _, _ = fused_kernels.layer_norm_forward(xb, w, b, 1e-5)
    w16, b16 = (toward_zero(t) for t in (w, b))  # as the interpreter rounds the parameters
    ref = F.layer_norm(xb.float(), (hidden,), w16, b16, 1e-5)
    assert yb.dtype == torch.bfloat16 and ((yb.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-5).all()


def toward_zero(t: torch.Tensor) -> torch.Tensor:
    """FP32 values rounded to BF16 toward zero (kept in FP32): what Triton's interpreter does where a GPU rounds to
    nearest."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


@needs_triton
def test_triton_layer_norm_autograd_under_the_interpreter(interpreted):
    """The autograd function (what fused_kernels.layer_norm runs on CUDA under autocast): gradients in the parameters'
    dtype, equal to PyTorch's LayerNorm on BF16 input with the parameters rounded to BF16, to BF16 precision."""
    torch.manual_seed(2)
    x0 = torch.randn(50, 200).bfloat16()
    p0 = [torch.randn(200) * 0.2 + 1, torch.randn(200) * 0.1]
    outs = {}
    for name in ("triton", "pytorch"):
        x, w, b = x0.clone().requires_grad_(), *(p.clone().requires_grad_() for p in p0)
        if name == "triton":
            y = fused_kernels._TritonLayerNorm.apply(x, None, w, b, 1e-5, torch.bfloat16)
        else:
            y = F.layer_norm(x.float(), (200,), w.bfloat16().float(), b.bfloat16().float(), 1e-5).bfloat16()
        (y.float() * torch.linspace(-1, 1, 200)).square().sum().backward()
        outs[name] = (y, x.grad, w.grad, b.grad)
    for got, want in zip(outs["triton"], outs["pytorch"], strict=True):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 1.6e-2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_is_the_add_then_the_layer_norm(interpreted, dtype):
    """The residual add fused into the LayerNorm's kernels (`_TritonLayerNorm` given r) against `x + r` then the
    Triton LayerNorm alone and autograd adding s's two gradients: s, y and the gradients of x, r, the weight
    and the bias, bit for bit in FP32. In BF16 the interpreter rounds toward zero where PyTorch's add (and a GPU)
    rounds to nearest: s is the toward-zero sum exactly, the rest within BF16's rounding (the GPU test compares them
    bit for bit)."""
    torch.manual_seed(3)
    x0, r0 = torch.randn(45, 200).to(dtype), torch.randn(45, 200).to(dtype)
    p0 = [torch.randn(200) * 0.2 + 1, torch.randn(200) * 0.1]
    g_s, g_y = torch.randn(45, 200).to(dtype), torch.randn(45, 200).to(dtype)
    outs = {}
    for name in ("fused", "separate"):
        x, r, w, b = x0.clone().requires_grad_(), r0.clone().requires_grad_(), *(p.clone().requires_grad_() for p in p0)
        if name == "fused":
            s_, y = fused_kernels._TritonLayerNorm.apply(x, r, w, b, 1e-5, dtype)
        else:
            s_ = x + r
            y = fused_kernels._TritonLayerNorm.apply(s_, None, w, b, 1e-5, dtype)
        torch.autograd.backward([s_, y], [g_s, g_y])
        outs[name] = (s_, y, x.grad, r.grad, w.grad, b.grad)
    if dtype == torch.bfloat16:
        assert torch.equal(outs["fused"][0].float(), toward_zero(x0.float() + r0.float()))
    for got, want in zip(outs["fused"], outs["separate"], strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want) if dtype == torch.float32 else rel_err(got, want) < 1e-2


def test_add_layer_norm_off_cuda_is_the_add_then_pytorchs_layer_norm():
    """Where the fused kernels do not run (here: CPU), add_layer_norm is x + r and layers.layer_norm of it."""
    x, r = torch.randn(6, 32), torch.randn(6, 32)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    s_, y = fused_kernels.add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(s_, x + r) and torch.equal(y, F.layer_norm(x + r, (32,), w, b, 1e-5))


@pytest.mark.parametrize(
    "x_dtype, r_dtype, width, kernel, fused",
    [
        (torch.bfloat16, torch.bfloat16, 64, "triton", True),  # a BF16 layer at the 650M/3B widths
        (torch.float32, torch.bfloat16, 64, "triton", False),  # model.fp32_residual=true: an FP32 stream
        (torch.bfloat16, torch.bfloat16, 64, "te", False),  # rows wider than 4096 (15B) or no Triton: TE's LayerNorm
        (torch.bfloat16, None, 64, "triton", False),  # not under CUDA autocast
    ],
)
def test_add_layer_norm_fuses_only_where_its_kernels_apply(monkeypatch, x_dtype, r_dtype, width, kernel, fused):
    """Which path add_layer_norm takes, as on a GPU: the fused kernels for a BF16 stream under autocast where our
    LayerNorm runs, else the add and then `layer_norm` (which picks its own kernel)."""
    taken = []
    monkeypatch.setattr(layers, "cuda_autocast_dtype", lambda x: None if r_dtype is None else torch.bfloat16)
    monkeypatch.setattr(fused_kernels, "layer_norm_kernel", lambda h: kernel)
    monkeypatch.setattr(fused_kernels._TritonLayerNorm, "apply", lambda *a: taken.append("fused") or (a[0], a[0]))
    monkeypatch.setattr(fused_kernels, "layer_norm", lambda s, *a: taken.append("separate") or s)
    x, r = torch.randn(4, width).to(x_dtype), torch.randn(4, width).to(r_dtype or torch.bfloat16)
    fused_kernels.add_layer_norm(x, r, torch.ones(width), torch.zeros(width), 1e-5)
    assert taken == (["fused"] if fused else ["separate"])


@pytest.mark.parametrize("available", [True, False])
def test_layer_norm_kernel_by_width(available, monkeypatch):
    """Our Triton LayerNorm for rows up to 4096 wide (the 650M and 3B widths, where TE has only its general
    kernels); TE's for wider rows (15B: its tuned kernels are faster) and wherever Triton does not import."""
    monkeypatch.setattr(rope_kernel, "available", lambda: available)
    assert [fused_kernels.layer_norm_kernel(h) for h in (320, 1280, 2560, 4096, 5120)] == (
        ["triton"] * 4 + ["te"] if available else ["te"] * 5
    )


def test_torch_layers_run_the_fused_gelu_mlp():
    """The torch backend's MLP goes through fused_kernels.gelu_mlp (lever 44: no [T, ffn] tensor allocated in its
    backward on CUDA; its arithmetic is checked above and in tests/test_gpu.py)."""
    from recipe.model import EsmConfig, build_model

    model = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    assert all(layer.mlp.feed_forward is fused_kernels.gelu_mlp for layer in model.layers)


def test_malformed_input_is_refused():
    with pytest.raises(ValueError, match="two contiguous"):
        fused_kernels.gelu_backward_and_bias(torch.zeros(4, 6).t(), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="rows=48 must be a multiple"):  # overlapping tiles would apply GELU twice
        fused_kernels.gelu_backward_and_bias(torch.zeros(64, 8), torch.zeros(64, 8), rows=48)
