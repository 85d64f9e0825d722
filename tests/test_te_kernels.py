"""recipe/model/te_kernels.py's fused exact-GELU backward on CPU, through Triton's interpreter, against PyTorch's
GELU backward and bias gradient. The GPU run is tests/test_gpu.py::test_fused_gelu_mlp_matches_pytorch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from recipe.model import rope_kernel, te_kernels

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
    bias_grad = te_kernels.gelu_backward_and_bias(inplace, pre, rows=rows)
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
            y = te_kernels._GeluMLP.apply(x, *params, torch.bfloat16)
        else:
            y = F.linear(F.gelu(F.linear(x, w1.bfloat16(), b1.bfloat16())), w2.bfloat16(), b2.bfloat16())
        y.float().square().sum().backward()
        outs[name] = (y, x.grad, *(p.grad for p in params))
    for got, want in zip(outs["fused"], outs["pytorch"], strict=True):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 5e-3  # BF16 roundings in another order, not more


def test_malformed_input_is_refused():
    with pytest.raises(ValueError, match="two contiguous"):
        te_kernels.gelu_backward_and_bias(torch.zeros(4, 6).t(), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="rows=48 must be a multiple"):  # overlapping tiles would apply GELU twice
        te_kernels.gelu_backward_and_bias(torch.zeros(64, 8), torch.zeros(64, 8), rows=48)
