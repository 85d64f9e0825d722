"""Our Triton kernels compiled for a Hopper GPU (sm_90) on the CPU, reading the PTX: their tiles load and store 16
bytes at a time. A kernel whose pointer arithmetic the compiler cannot prove aligned still runs and still passes the
numerical tests, at a fraction of the bandwidth; only the generated code shows it (head dim 24's attention did,
two bytes at a time, until the head offset carried its alignment)."""

import inspect
import re
from collections import Counter
from typing import Any

import pytest
import torch

from recipe.model import attention, rope_kernel

pytestmark = pytest.mark.skipif(not rope_kernel.available(), reason="triton is in the dev extra")


def ptx_accesses(fn: Any, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> Counter:
    """How many global loads and stores of each width (`ld.global.v4.b32`, ...) the kernel `fn` compiles to for sm_90.
    `args` gives each runtime argument as a pointer type ('*bf16') or an example value: as Triton's launcher does,
    pointers are taken as 16-byte aligned and integers that are multiples of 16 are marked so."""
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    signature, attrs, consts = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    ptx = compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]
    return Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+", ptx))


def _attention_args(head_dim: int, heads: int = 20) -> dict:
    """The layers' layout: q, k, v views of the QKV projection [T, 3, H, D], outputs [T, H, D]."""
    hidden = heads * head_dim
    args: dict = {name: "*bf16" for name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    args.update(LSE="*fp32", DELTA="*fp32", CU="*i32", num_seqs=7, num_tokens=4001, qk_scale=0.3, sm_scale=0.2)
    for t in "qkv":
        args[f"stride_{t}t"], args[f"stride_{t}h"] = 3 * hidden, head_dim
    for t in ("o", "do", "dq", "dk", "dv"):
        args[f"stride_{t}t"], args[f"stride_{t}h"] = hidden, head_dim
    return args


@pytest.mark.parametrize("head_dim", [16, 24, 32, 64])
@pytest.mark.parametrize("kernel", ["attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"])
def test_attention_tiles_move_16_bytes_at_a_time(kernel, head_dim):
    """No bf16 element of a tile is loaded or stored alone, at every head dim `auto` runs our kernels at (the delta
    kernel stores one fp32 per row: only its loads are tiles)."""
    strides = [torch.empty(1, 20, head_dim)] * 2  # the head stride of every tensor: the head dim
    align = attention._head_align(*strides)
    fn = getattr(attention._kernels(), kernel)
    constexprs = dict(D=head_dim, BLOCK_D=attention._head_block(head_dim), HEAD_ALIGN=align, BLOCK_T=attention.DELTA_ROWS,
                      BLOCK_M=64, BLOCK_N=64, SEQS=16, PRECISION="tf32")  # fmt: skip
    constexprs = {k: v for k, v in constexprs.items() if k in inspect.signature(fn.fn).parameters}
    accesses = ptx_accesses(fn, _attention_args(head_dim), constexprs)
    narrow = {op: n for op, n in accesses.items() if op.endswith(".b16")}
    assert not narrow, f"{kernel} at head dim {head_dim} moves bf16 elements one at a time: {dict(accesses)}"
    assert any(op.startswith("ld.global.v4") for op in accesses), dict(accesses)
    if kernel != "attn_bwd_delta":
        assert any(op.startswith("st.global.v4") for op in accesses), dict(accesses)


def test_head_align_is_what_divides_every_head_stride():
    """The hint is a promise to the compiler: the largest power of two up to 16 that divides every head stride."""
    heads = lambda d: torch.empty(3, 4, d)  # noqa: E731
    assert attention._head_align(heads(24), heads(32)) == 8
    assert attention._head_align(heads(64), heads(32)) == 16
    assert attention._head_align(heads(20)) == 4
    assert attention._head_align(torch.empty(3, 4, 2, 24)[:, :, 0]) == 16  # head stride 48: a multiple of 16


@pytest.mark.parametrize("has_inf", [False, True])
def test_adamw_moves_16_bytes_at_a_time(has_inf):
    """TritonAdamW's four streams (parameter, gradient, two moments) load, and its three outputs store, 16 bytes at a
    time, with and without the non-finite flag (lever 49 masks every access by it)."""
    from recipe.optim import TritonAdamW, _adamw_kernel

    args = dict(base="*fp32", table="*i64", numels="*i64", first="*i64", blocks="*i32", scale="*fp32", found_inf="*fp32",
                lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.01, step_size=1e-3, bc2_sqrt=0.5)  # fmt: skip
    constexprs = dict(HAS_SCALE=True, HAS_INF=has_inf, DECAY=True, ALIGNED=True, BLOCK=TritonAdamW.BLOCK)
    accesses = ptx_accesses(_adamw_kernel(), args, constexprs, num_warps=TritonAdamW.WARPS)
    vector = {op: n for op, n in accesses.items() if op.startswith(("ld.global.v4", "st.global.v4"))}
    # 4 loads (parameter, gradient, two moments) and 3 stores per thread's 4-element chunks, several chunks a thread
    assert sum(n for op, n in vector.items() if op.startswith("ld")) >= 4, dict(accesses)
    assert sum(n for op, n in vector.items() if op.startswith("st")) >= 3, dict(accesses)
