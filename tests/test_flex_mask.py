"""The FlexAttention column of bench/attention_kernels.py: document ids from cu_seqlens, the document BlockMask and
flex over the packed tokens as one sequence, against SDPA run on each packed sequence alone (CPU, forward only:
flex has no CPU backward). The H200 timing and gradients are the bench's own comparison with FA2."""

import pytest
import torch
import torch.nn.functional as F

from bench.attention_kernels import document_block_mask, document_block_mask_from_ranges, document_ids, flex_packed

CU = torch.tensor([0, 5, 17, 18, 33], dtype=torch.int32)  # lengths 5, 12, 1, 15: across and inside blocks of 8


def test_document_ids_count_sequences_and_padding_is_one_more():
    """Each token's sequence index; the 7 tokens past cu_seqlens[-1] are a document of their own."""
    expected = [0] * 5 + [1] * 12 + [2] + [3] * 15 + [4] * 7
    assert document_ids(CU, 40).tolist() == expected
    assert document_ids(CU, 33).tolist() == expected[:33]


def per_sequence_sdpa(q, k, v, cu):
    """[T, H, D] attention of each packed sequence on its own: what the document mask must reproduce."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(outs)


def packed_inputs(head_dim: int, total: int = 40, heads: int = 3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(total, heads, head_dim, generator=gen) for _ in range(3)]


def kv_blocks(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[q blocks, kv blocks] bool of which kv blocks each q block row lists (the order within a row does not matter)."""
    num, indices = num[0, 0], indices[0, 0].long()
    listed = torch.arange(indices.shape[-1])[None, :] < num[:, None]
    return torch.zeros(indices.shape, dtype=torch.int32).scatter_add_(1, indices, listed.int()) > 0


@pytest.mark.parametrize("total, block_size", [(40, 8), (40, 16), (35, 4), (42, 4), (33, 128)])
def test_mask_from_block_ranges_equals_create_block_mask(total, block_size):
    """flex_ranges' mask lists the same partial and the same full blocks as create_block_mask over the mask_mod: the
    last block as long as the others or shorter (40/16, 35/4; 42/4: shorter and inside one document, which
    create_block_mask counts as partial), padding tokens past the sequences or none (33)."""
    doc = document_ids(CU, total)
    ours, ref = document_block_mask_from_ranges(doc, block_size), document_block_mask(doc, block_size)
    for num, idx in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")]:
        torch.testing.assert_close(getattr(ours, num), getattr(ref, num))
        assert torch.equal(kv_blocks(getattr(ours, num), getattr(ours, idx)), kv_blocks(getattr(ref, num), getattr(ref, idx)))
    assert ours.seq_lengths == ref.seq_lengths and ours.BLOCK_SIZE == ref.BLOCK_SIZE


@pytest.mark.parametrize("build", [document_block_mask, document_block_mask_from_ranges])
@pytest.mark.parametrize("block_size", [8, 128])
@pytest.mark.parametrize("head_dim, pad", [(16, False), (24, False), (24, True)])
def test_flex_with_document_mask_matches_per_sequence_attention(build, block_size, head_dim, pad):
    """Eager flex (the mask_mod and the block mask's sparsity both apply): blocks of 8 hold several sequences, parts
    of one, and the padding; one block of 128 holds all. Padding tokens change no real token's output."""
    q, k, v = packed_inputs(head_dim)
    mask = build(document_ids(CU, 40), block_size)
    out = flex_packed(q, k, v, mask, pad)
    assert out.shape == q.shape
    torch.testing.assert_close(out[:33], per_sequence_sdpa(q, k, v, CU))


@pytest.mark.slow
def test_compiled_flex_and_mask_builds_match_per_sequence_attention():
    """The bench's compiled path (fullgraph, static shapes) for both mask builds and for flex with padding of head dim
    24 to 32, on CPU's flex template: it traces and gives the same attention. (Padded: the padded q, k, v are new
    tensors. CPU's template fails at lowering on the unpadded [1, H, T, D] views of [T, H, D], reading the 3-d size
    of the buffer under the view; the CUDA lowering takes the view's own size and strides.)"""
    q, k, v = packed_inputs(24)
    attend = torch.compile(flex_packed, fullgraph=True, dynamic=False)
    for build in (document_block_mask, document_block_mask_from_ranges):
        mask = torch.compile(build, fullgraph=True, dynamic=False)(document_ids(CU, 40), 8)
        torch.testing.assert_close(attend(q, k, v, mask, True)[:33], per_sequence_sdpa(q, k, v, CU))
