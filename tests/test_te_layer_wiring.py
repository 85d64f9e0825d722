"""The te backend's layer wiring on CPU, with TransformerEngine replaced by a stand-in (TE needs a GPU): which
modules a BF16 and a quantized layer are built from, that the te layer computes what the torch layer computes from
the same weights, and that model.rope_kernel=triton (through Triton's interpreter) gives what TE's rope path gives.

The stand-in has only what te_layers.py calls, with TE's signatures: its attention is our packed attention and its
rope the PyTorch rotary. What TE's kernels compute is checked on the GPU (tests/test_gpu.py)."""

import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

from recipe.model import layers, rope_kernel
from recipe.model.config import EsmConfig, Runtime
from recipe.model.esm import EsmForMaskedLM, init_weights


class _TEModule(nn.Module):
    """TE's LayerNormLinear / Linear / LayerNormMLP, reduced to their parameter names and TE's FSDP2 flag (a property
    that caches whether FSDP2 wraps the module in `_is_fsdp2`)."""

    def __init__(self, *shape, names=(), **kwargs):
        super().__init__()
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(1)))

    @property
    def is_fsdp2(self) -> bool:
        return getattr(self, "_is_fsdp2", False)


class _DotProductAttention(nn.Module):
    calls = 0  # forward calls, all instances

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded, cu_seqlens_kv_padded, max_seqlen_q,
                max_seqlen_kv):  # fmt: skip
        _DotProductAttention.calls += 1
        out = layers.packed_attention(q, k, v, layers.PackedInfo(cu_seqlens_q, max_seqlen_q, q.shape[0]))
        return out.flatten(-2)


def _apply_rotary_pos_emb(t, freqs, tensor_format, fused, cu_seqlens, cp_size, cp_rank):
    angles = freqs[layers.PackedInfo(cu_seqlens, 0, t.shape[0]).offsets][:, 0, 0]  # [T, D]
    return layers.apply_rotary(t, angles.cos(), angles.sin())


@pytest.fixture
def stand_in_te(monkeypatch):
    te = types.ModuleType("transformer_engine")
    tp = types.ModuleType("transformer_engine.pytorch")
    attention = types.ModuleType("transformer_engine.pytorch.attention")
    rope = types.ModuleType("transformer_engine.pytorch.attention.rope")
    tp.LayerNormLinear = lambda *a, **k: _TEModule(names=("layer_norm_weight", "layer_norm_bias", "weight", "bias"))
    tp.Linear = lambda *a, **k: _TEModule(names=("weight", "bias"))
    tp.LayerNormMLP = lambda *a, **k: _TEModule(names=("layer_norm_weight", "layer_norm_bias", "fc1_weight"))
    tp.DotProductAttention = _DotProductAttention
    rope.apply_rotary_pos_emb = _apply_rotary_pos_emb
    te.pytorch, tp.attention, attention.rope = tp, attention, rope
    for name, module in [("transformer_engine", te), ("transformer_engine.pytorch", tp),
                         ("transformer_engine.pytorch.attention", attention),
                         ("transformer_engine.pytorch.attention.rope", rope)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rope_kernel._kernels.cache_clear()
    yield
    rope_kernel._kernels.cache_clear()


CONFIG = dataclasses.replace(EsmConfig.from_size("8M"), num_layers=2)


def test_bf16_layers_are_ours_and_quantized_layers_te(stand_in_te):
    from recipe.model.te_layers import TEEsmLayer

    bf16 = TEEsmLayer(dataclasses.replace(CONFIG, backend="te"), device="cpu")
    assert type(bf16.attention.layernorm_qkv) is layers.LayerNormLinear and type(bf16.attention.proj) is layers.Linear
    assert type(bf16.mlp) is layers.LayerNormMLP
    from recipe.model import fused_kernels

    assert bf16.mlp.norm is fused_kernels.layer_norm and bf16.mlp.feed_forward is fused_kernels.gelu_mlp
    quantized = TEEsmLayer(dataclasses.replace(CONFIG, backend="te"), device="cpu", quantized=True)
    te_modules = (quantized.attention.layernorm_qkv, quantized.attention.proj, quantized.mlp)
    assert all(type(m) is _TEModule for m in te_modules)
    assert all(m.is_fsdp2 for m in te_modules)  # they quantize their weights again in backward, as under FSDP2


def run(model, ids, cu):
    out = model(ids, cu_seqlens=cu, max_seqlen=15, labels=ids.clone(), return_logits=True)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


needs_triton = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")


@pytest.mark.parametrize(
    "kernel, attention_kernel",
    [("te", "te"), pytest.param("triton", "te", marks=needs_triton), ("te", "triton"), ("te", "flash")],
)
def test_te_layer_computes_what_the_torch_layer_computes(stand_in_te, monkeypatch, kernel, attention_kernel):
    """Same weights, same packed batch: the te model (TE's rope path, or the Triton kernel; TE's attention, or ours
    through layers.packed_attention, which on the CPU runs PyTorch's SDPA) against the torch backend, logits and every
    gradient, in fp32; and the attention that ran is the one asked for (flash, the torch backend's default, runs
    TE's)."""
    from recipe.model import te_layers

    ours = []
    monkeypatch.setattr(te_layers, "packed_attention", lambda *a: ours.append(a[-1]) or layers.packed_attention(*a))
    monkeypatch.setattr(_DotProductAttention, "calls", 0)
    ids, cu = torch.randint(4, 24, (37,), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 25, 37]).int()
    reference = EsmForMaskedLM(dataclasses.replace(CONFIG, backend="torch"))
    init_weights(reference, 0)
    runtime = Runtime(rope_kernel=kernel, attention_kernel=attention_kernel)
    model = EsmForMaskedLM(dataclasses.replace(CONFIG, backend="te"), device="cpu", runtime=runtime)
    init_weights(model, 0)
    (want, want_grads), (got, got_grads) = run(reference, ids, cu), run(model, ids, cu)
    layers_run = CONFIG.num_layers
    assert (ours, _DotProductAttention.calls) == (
        (["triton"] * layers_run, 0) if attention_kernel == "triton" else ([], layers_run)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_with_the_te_backend_compiles_nothing_and_says_so(stand_in_te, caplog, monkeypatch):
    """use_torch_compile=true with te: its layers run fused kernels torch.compile would only break around, so no
    layer is compiled, and the log says so (not a silent no-op)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(self))
    model = EsmForMaskedLM(dataclasses.replace(CONFIG, backend="te"), device="cpu")
    with caplog.at_level("WARNING"):
        model.compile_layers()
    assert compiled == []
    assert "use_torch_compile=true with the te backend compiles nothing" in caplog.text


def test_our_attention_refuses_what_it_cannot_run(stand_in_te):
    """attention_kernel=triton in a te model: refused under context parallelism (at construction) and for sequences
    laid out with gaps (cu_seqlens_padded), which only TE's attention reads; an unknown kernel name is refused too."""
    from recipe.model.config import ContextParallel
    from recipe.model.te_layers import TEEsmLayer

    te_config = dataclasses.replace(CONFIG, backend="te")
    with pytest.raises(ValueError, match="attention_kernel=triton runs without context parallelism"):
        TEEsmLayer(te_config, device="cpu", context_parallel=ContextParallel(size=2), attention_kernel="triton")
    with pytest.raises(ValueError, match="attention_kernel='trtion': flash, te or triton"):
        EsmForMaskedLM(te_config, device="cpu", runtime=Runtime(attention_kernel="trtion"))
    model = EsmForMaskedLM(te_config, device="cpu", runtime=Runtime(attention_kernel="triton"))
    init_weights(model, 0)
    ids, cu = torch.randint(4, 24, (40,), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 25, 37]).int()
    with pytest.raises(ValueError, match="cu_seqlens_padded .* needs TE's attention"):
        model(ids, cu_seqlens=cu, max_seqlen=16, cu_seqlens_padded=torch.tensor([0, 12, 28, 40]).int())
