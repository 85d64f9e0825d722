"""The FlexAttention column of bench/attention_kernels.py: document ids from cu_seqlens, the document BlockMask and
flex over the packed tokens as one sequence, against SDPA run on each packed sequence alone (CPU, forward only:
flex has no CPU backward). The H200 timing and gradients are the bench's own comparison with FA2."""

import pytest
import torch
import torch.nn.functional as F

from bench.attention_kernels import document_block_mask, document_ids, flex_packed

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


@pytest.mark.parametrize("block_size", [8, 128])
@pytest.mark.parametrize("head_dim, pad", [(16, False), (24, False), (24, True)])
def test_flex_with_document_mask_matches_per_sequence_attention(block_size, head_dim, pad):
    """Eager flex (the mask_mod and the block mask's sparsity both apply): blocks of 8 hold several sequences, parts
    of one, and the padding; one block of 128 holds all. Padding tokens change no real token's output."""
    q, k, v = packed_inputs(head_dim)
    mask = document_block_mask(document_ids(CU, 40), block_size)
    out = flex_packed(q, k, v, mask, pad)
    assert out.shape == q.shape
    torch.testing.assert_close(out[:33], per_sequence_sdpa(q, k, v, CU))


@pytest.mark.slow
def test_compiled_flex_and_mask_build_match_per_sequence_attention():
    """The bench's compiled path (fullgraph, static shapes) for the mask build and for flex with padding of head dim
    24 to 32, on CPU's flex template: it traces and gives the same attention. (Padded: the padded q, k, v are new
    tensors. CPU's template fails at lowering on the unpadded [1, H, T, D] views of [T, H, D], reading the 3-d size
    of the buffer under the view; the CUDA lowering takes the view's own size and strides.)"""
    q, k, v = packed_inputs(24)
    build = torch.compile(document_block_mask, fullgraph=True, dynamic=False)
    attend = torch.compile(flex_packed, fullgraph=True, dynamic=False)
    out = attend(q, k, v, build(document_ids(CU, 40), 8), True)
    torch.testing.assert_close(out[:33], per_sequence_sdpa(q, k, v, CU))
