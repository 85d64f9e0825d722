"""Triton kernels of exact packed (THD) attention, bidirectional within each sequence: forward, the backward's
preprocess (delta = rowsum(dO * O)), dK/dV per key block and dQ per query block (attention.py launches them).

Why our own: at ESM-2's small head dims (16, 24, 32) the cost of attention is in the score tiles (exp, row
statistics), not in the dot products; FA2's Hopper kernels pad those head dims to 32 and run 128x128 tiles. Here the
head dim is padded only to the next power of two (BLOCK_D, masked 16-byte loads), the softmax runs in base 2 with the scale
folded into one multiply, and the block sizes, warps and stages are launch parameters (bench/attention_kernels.py
--sweep picks them).

Which block a program runs: the grid is (query or key blocks, heads) with the first axis an upper bound on the
blocks of all sequences, cdiv(T, BLOCK) + N (each sequence leaves at most one partly filled block). Each program
finds its own (sequence, block start) from cu_seqlens: the per-sequence block counts, their running sum, and the
number of sums <= its block index (`_find_block`). That costs one load of cu_seqlens per program and no launch or
host synchronisation, where a table built on the device would be extra launches per layer (and per block size), and
a (cdiv(max_seqlen, BLOCK), N, H) grid would start mostly empty programs for batches of short sequences. Programs
past the last block (at most N per head) return at once.

Recompiles: a kernel is compiled per head dim, launch setting and power-of-two bucket of the sequence count (SEQS);
the token and sequence counts are not specialised on (do_not_specialize), so packed batches of other sizes reuse it.

Numerics: scores, softmax statistics and all accumulators in fp32; P (and dS) are rounded to the input dtype only as
operands of the second dot product of each pair, as flash attention does. The log-sum-exp is saved in natural-log
units [H, T].
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _add(a, b):
    """The combine functions of our reductions and scan, ours rather than tl.sum's, tl.max's and tl.cumsum's: the CPU
    tests' interpreter runs only functions defined after it is on (as layernorm_triton.py)."""
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _find_block(CU, pid, num_seqs, BLOCK: tl.constexpr, SEQS: tl.constexpr):
    """(sequence, first row of the block, sequence start, sequence length) of packed block `pid`; sequence ==
    num_seqs when pid is past the last block. Empty sequences have no blocks (a zero count)."""
    idx = tl.arange(0, SEQS)
    inside = idx < num_seqs
    bos = tl.load(CU + idx, mask=inside, other=0)
    eos = tl.load(CU + idx + 1, mask=inside, other=0)
    counts = (eos - bos + BLOCK - 1) // BLOCK
    ends = tl.associative_scan(counts, 0, _add)
    seq = tl.reduce((ends <= pid).to(tl.int32), 0, _add)  # the first sequence whose blocks end after pid
    here = idx == seq
    first = tl.reduce(tl.where(here, ends - counts, 0), 0, _add)
    start = tl.reduce(tl.where(here, bos, 0), 0, _add)
    length = tl.reduce(tl.where(here, eos - bos, 0), 0, _add)
    return seq, (pid - first) * BLOCK, start, length


@triton.jit
def _own_block(CU, num_seqs, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SEQS: tl.constexpr):
    """This program's block (`_find_block`) as the kernels use it: (sequence, sequence start, length, the block's
    offsets in the sequence, the head dim's lanes, which offsets are inside, the [BLOCK, BLOCK_D] mask, the block's
    token rows)."""
    seq, r0, bos, length = _find_block(CU, tl.program_id(0), num_seqs, BLOCK, SEQS)
    offs = r0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs < length
    return seq, bos, length, offs, offs_d, inside, inside[:, None] & (offs_d < D)[None, :], (bos + offs).to(tl.int64)


@triton.jit
def _head(head, stride_h, HEAD_ALIGN: tl.constexpr):
    """head * stride_h, declared a multiple of HEAD_ALIGN (the host's `_head_align`, which divides every head stride).
    Triton learns a stride's alignment only when it is a multiple of 16; without this, the head stride 24 of head dim
    24 left every load and store of these kernels 2 bytes wide."""
    return tl.multiple_of(head * stride_h, HEAD_ALIGN)


@triton.jit
def _tile(X, rows, head, stride_t, stride_h, offs_d, HEAD_ALIGN: tl.constexpr):
    """Pointers to the [rows, BLOCK_D] tile of one head of X [T, H, D]."""
    return X + rows[:, None] * stride_t + _head(head, stride_h, HEAD_ALIGN) + offs_d[None, :]


@triton.jit
def _head_rows(X, rows, head, stride_t, stride_h, offs_d, mask, HEAD_ALIGN: tl.constexpr):
    """The [rows, BLOCK_D] tile of one head of X [T, H, D], zeros outside `mask`."""
    return tl.load(_tile(X, rows, head, stride_t, stride_h, offs_d, HEAD_ALIGN), mask=mask, other=0.0)


@triton.jit
def _kv_tile(k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, offs_n, mask_d, MASK_N: tl.constexpr):
    """k and v of the key tile at n0; only the sequence's last tile (MASK_N) masks the keys past its end."""
    if MASK_N:
        ok = n0 + offs_n < length
        k = tl.load(k_ptrs + n0 * stride_kt, mask=ok[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=ok[:, None] & mask_d[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs + n0 * stride_kt, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=mask_d[None, :], other=0.0)
    return k, v


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, qk_scale, offs_n, mask_d,
              MASK_N: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax: scores in log2 units, the running max and sum rescaled once per tile.
    Only the sequence's last tile (MASK_N) masks keys past its end."""
    k, v = _kv_tile(k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, offs_n, mask_d, MASK_N)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # unscaled: the scale goes into exp2's argument (one FMA)
    if MASK_N:
        s = tl.where((n0 + offs_n < length)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum) * qk_scale)  # qk_scale > 0: the max commutes with it
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def attn_fwd(Q, K, V, OUT, LSE, CU, num_seqs, num_tokens, qk_scale,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
             D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             SEQS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """OUT [T, H, D] and LSE [H, T] (natural log) of one query block of one sequence and head. qk_scale is the softmax
    scale times log2(e)."""
    head = tl.program_id(1)
    seq, bos, length, offs_m, offs_d, mask_m, q_mask, rows = _own_block(CU, num_seqs, D, BLOCK_M, BLOCK_D, SEQS)
    if seq >= num_seqs:
        return
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    q = _head_rows(Q, rows, head, stride_qt, stride_qh, offs_d, q_mask, HEAD_ALIGN)
    k_ptrs = _tile(K, bos.to(tl.int64) + offs_n, head, stride_kt, stride_kh, offs_d, HEAD_ALIGN)
    v_ptrs = _tile(V, bos.to(tl.int64) + offs_n, head, stride_vt, stride_vh, offs_d, HEAD_ALIGN)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    full = length // BLOCK_N * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, qk_scale, offs_n,
                                  mask_d, False, PRECISION)  # fmt: skip
    if full < length:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, full, length, stride_kt, stride_vt, qk_scale, offs_n,
                                  mask_d, True, PRECISION)  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(_tile(OUT, rows, head, stride_ot, stride_oh, offs_d, HEAD_ALIGN), out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + head * num_tokens + bos + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=mask_m)


@triton.jit(do_not_specialize=["num_tokens"])
def attn_bwd_delta(OUT, DO, DELTA, num_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_ALIGN: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """DELTA [H, T] = rowsum(dO * O) in fp32: the softmax backward's per-row term, computed once for both backward
    kernels."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < num_tokens)[:, None] & (offs_d < D)[None, :]
    rows = offs_t.to(tl.int64)
    o = tl.load(_tile(OUT, rows, head, stride_ot, stride_oh, offs_d, HEAD_ALIGN), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile(DO, rows, head, stride_dot, stride_doh, offs_d, HEAD_ALIGN), mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head * num_tokens + offs_t, tl.reduce(o * do, 1, _add), mask=offs_t < num_tokens)


@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU, num_seqs, num_tokens, sm_scale, qk_scale,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                  stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SEQS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dK and dV of one key block (BLOCK_N keys) of one sequence and head, looping over the sequence's query blocks
    (BLOCK_M rows). Works transposed ([keys, queries] tiles) so that P^T is computed once per tile and feeds both
    dV += P^T dO and dS^T = P^T * (dP^T - delta). Query rows past the sequence's end are loaded as zeros with an
    infinite log-sum-exp, which makes their P exactly zero (not exp2(0 - lse), which can overflow): no mask on the
    tiles. Key rows past the end are computed but not stored, and no other row sums over them."""
    head = tl.program_id(1)
    seq, bos, length, offs_n, offs_d, _, kv_mask, keys = _own_block(CU, num_seqs, D, BLOCK_N, BLOCK_D, SEQS)
    if seq >= num_seqs:
        return
    offs_m = tl.arange(0, BLOCK_M)
    mask_d = offs_d < D
    k = _head_rows(K, keys, head, stride_kt, stride_kh, offs_d, kv_mask, HEAD_ALIGN)
    v = _head_rows(V, keys, head, stride_vt, stride_vh, offs_d, kv_mask, HEAD_ALIGN)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    q_ptrs = _tile(Q, bos.to(tl.int64) + offs_m, head, stride_qt, stride_qh, offs_d, HEAD_ALIGN)
    do_ptrs = _tile(DO, bos.to(tl.int64) + offs_m, head, stride_dot, stride_doh, offs_d, HEAD_ALIGN)
    stats = head * num_tokens + bos + offs_m
    for m0 in range(0, length, BLOCK_M):
        ok = m0 + offs_m < length
        qmask = ok[:, None] & mask_d[None, :]
        q = tl.load(q_ptrs + m0 * stride_qt, mask=qmask, other=0.0)
        do = tl.load(do_ptrs + m0 * stride_dot, mask=qmask, other=0.0)
        lse = tl.load(LSE + stats + m0, mask=ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + stats + m0, mask=ok, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # [N, M]
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(_tile(DK, keys, head, stride_dkt, stride_dkh, offs_d, HEAD_ALIGN), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)  # fmt: skip
    tl.store(_tile(DV, keys, head, stride_dvt, stride_dvh, offs_d, HEAD_ALIGN), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, qk_scale, offs_n, mask_d,
             MASK_N: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of dQ += dS K. Keys past the sequence's end (MASK_N, the last tile) load as zeros, and their P
    is set to zero: exp2(0 - lse) overflows for a row whose scores are all far below zero, and inf times a zero key
    would be NaN in the row's dQ."""
    k, v = _kv_tile(k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, offs_n, mask_d, MASK_N)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((n0 + offs_n < length)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU, num_seqs, num_tokens, sm_scale, qk_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                stride_dqt, stride_dqh,
                D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SEQS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dQ of one query block (BLOCK_M rows) of one sequence and head, looping over the sequence's key blocks
    (BLOCK_N keys); only the last, part-filled key tile masks P (`_dq_tile`)."""
    head = tl.program_id(1)
    seq, bos, length, offs_m, offs_d, mask_m, q_mask, rows = _own_block(CU, num_seqs, D, BLOCK_M, BLOCK_D, SEQS)
    if seq >= num_seqs:
        return
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    q = _head_rows(Q, rows, head, stride_qt, stride_qh, offs_d, q_mask, HEAD_ALIGN)
    do = _head_rows(DO, rows, head, stride_dot, stride_doh, offs_d, q_mask, HEAD_ALIGN)
    lse = tl.load(LSE + head * num_tokens + bos + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * num_tokens + bos + offs_m, mask=mask_m, other=0.0)
    k_ptrs = _tile(K, bos.to(tl.int64) + offs_n, head, stride_kt, stride_kh, offs_d, HEAD_ALIGN)
    v_ptrs = _tile(V, bos.to(tl.int64) + offs_n, head, stride_vt, stride_vh, offs_d, HEAD_ALIGN)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    full = length // BLOCK_N * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, n0, length, stride_kt, stride_vt, qk_scale, offs_n, mask_d,
                      False, PRECISION)  # fmt: skip
    if full < length:
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, full, length, stride_kt, stride_vt, qk_scale, offs_n, mask_d,
                      True, PRECISION)  # fmt: skip
    tl.store(_tile(DQ, rows, head, stride_dqt, stride_dqh, offs_d, HEAD_ALIGN), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)  # fmt: skip
