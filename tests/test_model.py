"""The ESM-2 module against transformers' EsmForMaskedLM, THD vs BSHD, conversion, export, init and errors (CPU)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_config

from recipe.model import EsmConfig, build_model, init_weights
from recipe.model.config import SIZES
from recipe.model.convert import export_hf, hf_to_ours, load_hf_into, ours_to_hf
from recipe.model.esm import EsmForMaskedLM
from recipe.model.flops import batch_flops, effective_seqlen, flops_per_token, matmul_params

SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256),
    "8M": dict(num_layers=6, hidden_size=320, num_heads=20, intermediate_size=1280),
}


def make_pair(shape: str, token_dropout: bool, seed: int = 0):
    from transformers import EsmForMaskedLM as HFEsm

    torch.manual_seed(seed)
    hf = HFEsm(hf_config(token_dropout=token_dropout, **SHAPES[shape])).eval()
    with torch.no_grad():  # biases and norms away from 0/1, so a mis-mapped tensor cannot hide
        for name, p in hf.named_parameters():
            if "bias" in name or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        # a trained-looking <pad> row: training moves it (the decoder is tied), init leaves it zero
        hf.esm.embeddings.word_embeddings.weight[hf.config.pad_token_id].normal_(0.0, 0.02)
    ours = build_model(EsmConfig(**SHAPES[shape], token_dropout=token_dropout, backend="torch")).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict(), ours.config.num_layers))
    return hf, ours


def random_batch(seed: int = 1, batch=4, width=40, mask_rate=0.15):
    """Right-padded ESM-2 token batches with <cls>/<eos>, <mask> tokens and MLM labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, width + 1, (batch,), generator=g)
    lengths[0] = width
    ids = torch.full((batch, width), 1)
    labels = torch.full((batch, width), -100)
    attn = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        seq = torch.randint(4, 29, (n,), generator=g)
        seq[0], seq[-1] = 0, 2
        pick = (torch.rand(n, generator=g) < mask_rate) & (seq > 3)
        pick[1] = True
        labels[b, :n] = torch.where(pick, seq, torch.tensor(-100))
        seq = torch.where(pick, torch.tensor(32), seq)
        ids[b, :n], attn[b, :n] = seq, 1
    return ids, attn, labels


def to_thd(ids, attn, labels):
    keep = attn.bool()
    lengths = attn.sum(-1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return ids[keep], cu, int(lengths.max()), labels[keep]


@pytest.mark.parametrize("shape", ["tiny", "8M"])
@pytest.mark.parametrize("token_dropout", [True, False])
def test_parity_with_transformers(shape, token_dropout):
    hf, ours = make_pair(shape, token_dropout)
    ids, attn, labels = random_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn, labels=labels)
        bshd = ours(ids, attention_mask=attn, labels=labels, return_logits=True)
        flat, cu, max_len, flat_labels = to_thd(ids, attn, labels)
        thd = ours(flat, cu_seqlens=cu, max_seqlen=max_len, labels=flat_labels, return_logits=True)
        thd_head_only = ours(flat, cu_seqlens=cu, max_seqlen=max_len, labels=flat_labels)
    keep = attn.bool()
    assert (bshd.logits[keep] - ref.logits[keep]).abs().max() <= 1e-4
    assert (thd.logits - ref.logits[keep]).abs().max() <= 1e-4
    for out in (bshd, thd, thd_head_only):
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    assert int(thd_head_only.num_tokens) == int((labels != -100).sum())


PAD_ROWS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 5, 1, 32, 1, 9, 2, 1], [0, 1, 1, 6, 32, 2, 1, 1]])
PAD_MASKS = {
    "none": None,
    "right": torch.tensor([[1] * 8, [1] * 7 + [0], [1] * 6 + [0] * 2]),
    "holes": torch.tensor([[0] + [1] * 7, [1] * 7 + [0], [1, 0, 1, 1, 1, 0, 1, 1]]),  # left padding, gaps
}


@pytest.mark.parametrize("token_dropout", [True, False])
@pytest.mark.parametrize("mask", list(PAD_MASKS))
def test_attended_pad_matches_transformers(token_dropout, mask):
    """`<pad>` among the attended tokens, with a trained (non-zero) `<pad>` row: transformers' own integration input
    [[0, 1, 2, 3, 4, 5]] with no mask, and rows whose mask covers `<pad>` (and a `<mask>`, for token dropout).
    transformers zeroes only what the attention mask excludes, so must we: BSHD at every position, THD (the attended
    tokens of right-padded rows, packed) at every token."""
    hf, ours = make_pair("tiny", token_dropout)
    ids, attn = PAD_ROWS, PAD_MASKS[mask]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn).logits
        bshd = ours(ids, attention_mask=attn).logits
        single = ours(ids[:1, :6]).logits  # the integration input exactly
        single_ref = hf(input_ids=ids[:1, :6]).logits
    assert (bshd - ref).abs().max() <= 1e-5
    assert (single - single_ref).abs().max() <= 1e-5
    if mask != "holes":  # a packed sequence is contiguous: it has no holes to mirror
        keep = attn if attn is not None else torch.ones_like(ids)
        flat, cu, max_len, _ = to_thd(ids, keep, ids)
        with torch.no_grad():
            thd = ours(flat, cu_seqlens=cu, max_seqlen=max_len).logits
        assert (thd - ref[keep.bool()]).abs().max() <= 1e-5


def test_thd_equals_bshd_and_is_independent_of_neighbours():
    _, ours = make_pair("tiny", True)
    ids, attn, labels = random_batch(seed=3, batch=5)
    flat, cu, max_len, _ = to_thd(ids, attn, labels)
    with torch.no_grad():
        bshd = ours(ids, attention_mask=attn).logits[attn.bool()]
        thd = ours(flat, cu_seqlens=cu, max_seqlen=max_len).logits
        # the first sequence alone gives the same outputs as inside the pack
        n0 = int(cu[1])
        alone = ours(flat[:n0], cu_seqlens=cu[:2], max_seqlen=n0).logits
    torch.testing.assert_close(thd, bshd, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, thd[:n0], atol=1e-5, rtol=0)


def test_positions_restart_per_sequence():
    """Rotary positions are per sequence: the same sequence at another offset of a pack gives the same output."""
    _, ours = make_pair("tiny", True)
    ids, attn, labels = random_batch(seed=4, batch=2)
    a, b = ids[0][attn[0].bool()], ids[1][attn[1].bool()]
    with torch.no_grad():
        ab = ours(
            torch.cat([a, b]),
            cu_seqlens=torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32),
            max_seqlen=max(len(a), len(b)),
        ).logits
        ba = ours(
            torch.cat([b, a]),
            cu_seqlens=torch.tensor([0, len(b), len(a) + len(b)], dtype=torch.int32),
            max_seqlen=max(len(a), len(b)),
        ).logits
    torch.testing.assert_close(ab[: len(a)], ba[len(b) :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fp32_residual", [False, True])
@pytest.mark.parametrize("layout", ["thd", "bshd"])
def test_residual_stream_dtype_under_autocast(fp32_residual, layout):
    """Under bf16 autocast the layers add into a bf16 stream unless fp32_residual; without autocast it stays fp32
    (the transformers parity above). The loss stays close to fp32 either way."""
    model = build_model(EsmConfig(**SHAPES["tiny"], backend="torch", fp32_residual=fp32_residual)).eval()
    seen = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    ids, attn, labels = random_batch(seed=7)
    if layout == "thd":
        flat, cu, max_len, flat_labels = to_thd(ids, attn, labels)
        inputs = dict(input_ids=flat, cu_seqlens=cu, max_seqlen=max_len, labels=flat_labels)
    else:
        inputs = dict(input_ids=ids, attention_mask=attn, labels=labels)
    with torch.no_grad():
        ref = model(**inputs).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**inputs).loss
    assert seen == [torch.float32, torch.float32 if fp32_residual else torch.bfloat16]
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])  # DDP's fp32 parameters, FSDP2's bf16 ones
def test_layer_norm_under_autocast_keeps_no_fp32_copies(device, param_dtype):
    """Under bf16 autocast our LayerNorm gives the bf16 matmul input autocast's fp32 LayerNorm would (to bf16
    rounding) and keeps only bf16 activations for backward (autocast keeps an fp32 copy of the input)."""
    from recipe.model.layers import layer_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(device, param_dtype).requires_grad_()
    b = (0.1 * torch.randn(64, generator=gen)).to(device, param_dtype).requires_grad_()
    saved = []

    def keep(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autocast(device, dtype=torch.bfloat16):
        ref = F.layer_norm(x, (64,), w, b, 1e-5).to(torch.bfloat16)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)
    assert not [s for s in saved if s[0] == torch.float32 and s[1] == x.numel()], saved
    grads = torch.autograd.grad(out.float().square().sum(), (x, w, b))
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (x, w, b))
    for g, r in zip(grads, ref_grads):  # bf16 parameters in the backward: differences of bf16 rounding, not more
        assert ((g.float() - r.float()).norm() / r.float().norm()).item() < 5e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shape", [(96, 64), (3, 32, 64)])  # packed [T, h] and padded [B, S, h] inputs
def test_linear_under_autocast_keeps_no_weight_copy(device, shape):
    """`layers.linear` with fp32 weights under bf16 autocast gives autocast's F.linear bit for bit (output and every
    gradient; on CUDA the weight's gradient is the GEMM's FP32 accumulator, not its BF16 rounding: close, not equal)
    but keeps no bf16 copy of the weight for backward: the memory of a whole model's weights in bf16 (what training
    unsharded costs against FSDP2, docs/benchmarks.md lever 21)."""
    from recipe.model.layers import linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device).requires_grad_()
    w = torch.randn(48, 64, generator=gen).to(device).requires_grad_()
    b = torch.randn(48, generator=gen).to(device).requires_grad_()
    weight_copies, results = [], []
    for fn in (F.linear, linear):
        saved = []

        def keep(t, saved=saved):
            saved.append(t)
            return t

        with torch.autocast(device, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = fn(x, w, b)
        weight_copies.append([t for t in saved if t.dtype == torch.bfloat16 and t.numel() == w.numel()])
        grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum(), (x, w, b))
        results.append((y, *grads))
    assert len(weight_copies[0]) == 1 and weight_copies[1] == []  # autocast keeps one; ours none
    for i, (ours, ref) in enumerate(zip(results[1], results[0])):
        assert ours.dtype == ref.dtype
        if i == 2 and device == "cuda":  # layers.weight_grad
            assert ((ours - ref).norm() / ref.norm()).item() < 1e-2
        else:
            assert torch.equal(ours, ref)


def test_compiled_layers_match_eager():
    """`compile_layers` (what use_torch_compile runs) gives eager's loss and gradients, on batches of two shapes
    (dynamic shapes: packed lengths and the number of sequences change between batches)."""
    _, eager = make_pair("tiny", True)
    _, compiled = make_pair("tiny", True)
    compiled.compile_layers()
    for seed, batch in ((5, 3), (6, 5)):
        flat, cu, max_len, flat_labels = to_thd(*random_batch(seed=seed, batch=batch))
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(flat, cu_seqlens=cu, max_seqlen=max_len, labels=flat_labels)
            out.loss.backward()
            outs.append((out.loss, [p.grad for p in model.parameters()]))
        (loss_e, grads_e), (loss_c, grads_c) = outs
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


def test_hf_round_trip_is_bit_exact():
    hf, ours = make_pair("tiny", True)
    back = ours_to_hf(ours.state_dict(), ours.config.num_layers)
    ref = hf.state_dict()
    skipped = {k for k in ref if k.startswith("esm.contact_head.") or k.endswith("inv_freq") or k == "lm_head.decoder.weight"}
    assert set(back) == set(ref) - skipped
    for k, v in back.items():
        assert torch.equal(v, ref[k]), k


def test_export_loads_in_transformers(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline

    _, ours = make_pair("tiny", True)
    export_hf(ours.state_dict(), ours.config, tmp_path)
    hf, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, attn, _ = random_batch(seed=5)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=attn).logits
        mine = ours(ids, attention_mask=attn).logits
    assert (ref - mine)[attn.bool()].abs().max() <= 1e-5
    base = AutoModel.from_pretrained(tmp_path)
    assert base.config.model_type == "esm"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("MKTA")["input_ids"] == [0, 20, 15, 11, 5, 2]
    fill = pipeline("fill-mask", model=hf, tokenizer=tok)
    assert len(fill("MKTAYIA<mask>QRQISF")) == 5
    # import it back (the facebook layout) into a fresh model
    fresh = build_model(ours.config, seed=123)
    load_hf_into(fresh, tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_import_skips_contact_head_and_rejects_strangers(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    hf, ours = make_pair("tiny", True)
    hf.save_pretrained(tmp_path)
    fresh = build_model(ours.config, seed=7)
    with caplog.at_level("INFO"):
        load_hf_into(fresh, tmp_path)
    assert "skipped 2 tensors" in caplog.text and "contact_head" in caplog.text
    sd = load_file(tmp_path / "model.safetensors")
    save_file(dict(sd, **{"esm.extra.weight": torch.zeros(2)}), tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="esm.extra.weight"):
        load_hf_into(fresh, tmp_path)
    del sd["esm.encoder.layer.1.output.dense.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="esm.encoder.layer.1.output.dense.bias"):
        load_hf_into(fresh, tmp_path)
    sd = load_file(tmp_path / "model.safetensors") | {"esm.encoder.layer.1.output.dense.bias": torch.zeros(7)}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.fc2_bias"):
        load_hf_into(fresh, tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ids=torch.tensor([0, 5, 40, 2])), "out of range"),
        (dict(ids=torch.tensor([0, 5, -1, 2])), "out of range"),
        (dict(cu=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "strictly increasing"),
        (dict(cu=torch.tensor([0, 2, 3], dtype=torch.int32)), "end at T=4"),
        (dict(cu=torch.tensor([0, 2, 4])), "int32"),
        (dict(max_len=1), "max_seqlen"),
        (dict(masked_index=torch.tensor([1, 2])), "masked_index must list the positions of the labelled tokens"),
        (dict(masked_index=torch.tensor([2]), labels=None), "masked_index .* goes with labels"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    model = build_model(EsmConfig(**SHAPES["tiny"], backend="torch"))
    ids = kwargs.get("ids", torch.tensor([0, 5, 6, 2]))
    cu = kwargs.get("cu", torch.tensor([0, 2, 4], dtype=torch.int32))
    labels = kwargs.get("labels", torch.tensor([-100, -100, 6, -100]))
    with pytest.raises((ValueError, TypeError), match=match):
        model(ids, cu_seqlens=cu, max_seqlen=kwargs.get("max_len", 4), labels=labels, masked_index=kwargs.get("masked_index"))


def test_te_backend_refuses_masks_it_cannot_mirror():
    """TE runs BSHD as packed rows: a left-padded or gapped mask would shift rotary positions against transformers."""
    from recipe.model.esm import check_inputs

    config = EsmConfig(**SHAPES["tiny"], backend="te")
    check_inputs(config, PAD_ROWS, None, None, PAD_MASKS["right"], None)
    with pytest.raises(ValueError, match="right-padded attention_mask"):
        check_inputs(config, PAD_ROWS, None, None, PAD_MASKS["holes"], None)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EsmConfig.from_size("42M"), "not a known ESM-2 size"),
        (lambda: EsmConfig.from_size("8M", backend="jax"), "model.backend"),
        (lambda: EsmConfig.from_size("8M", activation="relu"), "model.activation"),
        (lambda: EsmConfig.from_size("8M", num_heads=7), "not divisible"),
    ],
)
def test_bad_config_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_explicit_te_backend_without_te_fails_clearly():
    pytest.importorskip("torch")
    try:
        import transformer_engine.pytorch  # noqa: F401

        pytest.skip("transformer_engine is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="model.backend=te cannot run here"):
        build_model(EsmConfig.from_size("tiny", backend="te"))


def test_auto_backend_says_what_it_picked(caplog):
    with caplog.at_level("INFO"):
        model = build_model(EsmConfig.from_size("tiny"))
    assert "model.backend=auto picked" in caplog.text
    assert model.config.backend in ("torch", "te")


@pytest.mark.parametrize(
    "size, layers, hidden, heads", [(k, v["num_layers"], v["hidden_size"], v["num_heads"]) for k, v in SIZES.items()]
)
def test_size_presets(size, layers, hidden, heads):
    published = {
        "8M": (6, 320, 20),
        "35M": (12, 480, 20),
        "150M": (30, 640, 20),
        "650M": (33, 1280, 20),
        "3B": (36, 2560, 40),
        "15B": (48, 5120, 40),
    }
    cfg = EsmConfig.from_size(size)
    if size in published:
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == published[size]
    assert cfg.intermediate_size == 4 * cfg.hidden_size


def test_init_statistics_and_meta_device():
    cfg = EsmConfig(num_layers=2, hidden_size=256, num_heads=4, intermediate_size=1024, backend="torch")
    meta = EsmForMaskedLM(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    init_weights(meta, seed=3)
    direct = build_model(cfg, seed=3)
    for (name, a), (_, b) in zip(meta.named_parameters(), direct.named_parameters()):
        assert torch.equal(a, b), name
    sd = dict(direct.named_parameters())
    for name in (
        "layers.0.mlp.fc1_weight",
        "layers.0.attention.layernorm_qkv.weight",
        "layers.1.attention.proj.weight",
        "lm_head.dense.weight",
    ):
        w = sd[name]
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001, name
    assert torch.all(sd["layers.0.attention.layernorm_qkv.layer_norm_weight"] == 1)
    assert torch.all(sd["layers.1.attention.layernorm_qkv.bias"] == 0)
    assert torch.all(sd["layers.1.mlp.layer_norm_weight"] == 1) and torch.all(sd["final_layer_norm.weight"] == 1)
    assert torch.all(sd["lm_head.bias"] == 0) and torch.all(sd["embed_tokens.weight"][1] == 0)
    other = build_model(dataclasses.replace(cfg), seed=4)
    assert not torch.equal(other.embed_tokens.weight, direct.embed_tokens.weight)


def test_flops_formula():
    cfg = EsmConfig.from_size("650M")
    d, f, L = 1280, 5120, 33
    assert matmul_params(cfg) == L * (4 * d * d + 2 * d * f) + d * d + d * 33
    assert effective_seqlen([100, 300]) == pytest.approx((100**2 + 300**2) / 400)
    assert flops_per_token(cfg, 200.0) == pytest.approx(6 * matmul_params(cfg) + 12 * L * d * 200)
    assert batch_flops(cfg, [100, 300]) == pytest.approx(400 * flops_per_token(cfg, 250.0))
    # a 650M model does roughly 6 x 0.65 G FLOPs per token
    assert 3.5e9 < flops_per_token(cfg, 0) < 4.2e9


@pytest.mark.parametrize(
    "size, compiled, quantized, expected",
    [
        ("8M", False, False, "torch"),
        ("150M", False, False, "torch"),
        ("650M", False, False, "te"),
        ("3B", False, False, "te"),
        ("650M", True, False, "torch"),
        ("8M", False, True, "te"),
        ("8M", True, True, "te"),
    ],
)
def test_auto_backend_follows_measurements(size, compiled, quantized, expected):
    from recipe.model import auto_backend

    backend, reason = auto_backend(EsmConfig.from_size(size).hidden_size, compiled, quantized)
    assert backend == expected and reason


def test_packed_attention_keeps_no_view_of_qkv(monkeypatch):
    """The flash kernel saves its inputs for backward; a v that is still a view of the fused QKV output would keep
    the whole QKV tensor alive per layer. Every tensor handed to it must own its storage."""
    import torch.nn.attention.varlen as varlen

    from recipe.model import layers

    seen = []

    def fake_varlen_attn(q, k, v, *args):
        seen.extend(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in (q, k, v))
        return q

    monkeypatch.setattr(layers, "_varlen_usable", lambda q: True)
    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    layer = layers.TorchEsmLayer(EsmConfig(**SHAPES["tiny"], backend="torch"))
    packed = layers.PackedInfo(torch.tensor([0, 5, 12], dtype=torch.int32), 7, 12)
    x = torch.randn(12, SHAPES["tiny"]["hidden_size"])
    layer(x, layers.rotary_cos_sin(packed.offsets, layer.head_dim, 10000.0), packed=packed)
    assert seen == [True, True, True]


@pytest.mark.parametrize("layout", ["thd", "bshd"])
def test_head_on_masked_index_matches_head_on_label_mask(layout):
    """The loop passes the labelled tokens' positions (`model_inputs`' masked_index, found on the host) so that the
    LM head's token selection makes the host wait for nothing; on packed batches the final LayerNorm then runs on
    those tokens only. Loss, counts and gradients (the final LayerNorm's included) are those of the selection by the
    labels on the device, and of the full logits, which come with the full last hidden state."""
    from recipe.validation import model_inputs

    _, ours = make_pair("tiny", True)
    ids, attn, labels = random_batch(seed=5, batch=4)
    flat, cu, max_len, flat_labels = to_thd(ids, attn, labels)
    batch = dict(input_ids=flat, cu_seqlens=cu, max_seqlen=max_len, labels=flat_labels)
    if layout == "bshd":
        batch = dict(input_ids=ids, attention_mask=attn, labels=labels)
    inputs = model_inputs(batch, torch.device("cpu"))
    assert torch.equal(inputs["masked_index"], torch.nonzero(batch["labels"].reshape(-1) != -100).squeeze(1))
    results = []
    for how in ("index", "mask", "logits"):
        ours.zero_grad()
        kwargs = {k: v for k, v in inputs.items() if how == "index" or k != "masked_index"}
        out = ours(**kwargs, return_logits=how == "logits")
        out.loss.backward()
        assert (out.last_hidden_state is None) == (layout == "thd" and how != "logits")
        results.append((out.loss_sum.detach(), out.num_tokens, out.num_correct, [p.grad.clone() for p in ours.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-6, atol=1e-6)
        assert other[1] == results[0][1] and other[2] == results[0][2]
        for a, b in zip(other[3], results[0][3], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
