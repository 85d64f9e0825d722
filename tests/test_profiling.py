"""The step profiler (recipe/profiling.py): which steps it records, what it writes, and what it says when the run
does not reach its window."""

import gzip
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, torchrun

from recipe import profiling
from recipe.profiling import StepProfiler, group_of


def settings(tmp_path, **kw):
    base = dict(enabled=True, start_step=3, num_steps=2, dir=str(tmp_path / "prof"), record_shapes=False, with_stack=False)
    return SimpleNamespace(**{**base, **kw})


def train_steps(profiler, first, last):
    """Steps first..last (1-based) of a toy 'training': step s does s+1 matmuls, so the window's steps are told apart."""
    x = torch.randn(32, 32)
    for s in range(first, last + 1):
        for _ in range(s + 1):
            x = torch.tanh(x @ x)
        profiler.step()
    profiler.close()


@pytest.mark.parametrize("first", [0, 1])  # 1: the run trains exactly one step (the profiler's warm-up) before it
def test_records_exactly_the_window(tmp_path, first):
    """Steps 3 and 4 hold 4 + 5 matmuls: the summary counts 4.5 calls per step, whatever step the run started at."""
    cfg = settings(tmp_path)
    train_steps(StepProfiler(cfg, tmp_path, 0, torch.device("cpu"), first), first + 1, 6)
    summary = (tmp_path / "prof" / "summary_rank0.txt").read_text()
    assert summary.startswith("steps 3-4, rank 0\nno GPU kernels over 2 step(s) (a CPU run)")
    mm = next(line for line in summary.splitlines() if line.endswith(" aten::mm"))
    assert "x4 " in mm or "x5 " in mm  # 4.5 calls per step, printed rounded
    with gzip.open(tmp_path / "prof" / "trace_rank0.json.gz") as f:
        trace = json.load(f)
    assert sum(e.get("name") == "aten::mm" for e in trace["traceEvents"]) == 9


@pytest.mark.parametrize(
    "first, last, says",
    [
        (5, 8, "the run starts at step 6, past profiler.start_step=3 - 1"),
        (2, 8, "the run starts at step 3, past profiler.start_step=3 - 1"),  # no step left to warm the profiler up
        (0, 3, "the run ended at step 3, before the window 3-4 ended"),
    ],
)
def test_a_run_that_misses_the_window_writes_nothing_and_says_so(tmp_path, caplog, first, last, says):
    with caplog.at_level(logging.WARNING, logger="recipe.profiling"):
        train_steps(StepProfiler(settings(tmp_path), tmp_path, 0, torch.device("cpu"), first), first + 1, last)
    assert says in caplog.text and not (tmp_path / "prof").exists()


def test_off_does_nothing(tmp_path):
    train_steps(StepProfiler(settings(tmp_path, enabled=False), tmp_path, 0, torch.device("cpu"), 0), 1, 6)
    assert not (tmp_path / "prof").exists()


@pytest.mark.parametrize(
    "kernel, group",
    [
        ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "matmul"),
        ("void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda", "copy/cast"),
        ("void transformer_engine::fused_rope_forward_kernel<...>", "rope"),
        ("void at::native::(anonymous namespace)::GeluCUDAKernelImpl", "elementwise/other"),
    ],
)
def test_kernel_groups(kernel, group):
    assert group_of(kernel) == group


@pytest.mark.slow
def test_profiling_a_two_process_run(tmp_path):
    """`profiler.enabled=true` through the trainer: every rank writes its trace and summary of the window."""
    out = tmp_path / "run"
    args = [*TINY, "num_train_steps=4", "profiler.enabled=true", "profiler.start_step=2", "profiler.num_steps=2"]
    r = torchrun("train_ddp.py", 2, *args, "dataset.num_workers=0", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert (out / "profile" / f"trace_rank{rank}.json.gz").stat().st_size > 0
        assert (out / "profile" / f"summary_rank{rank}.txt").read_text().startswith(f"steps 2-3, rank {rank}\n")
    assert "profile of steps 2-3, rank 0" in r.stderr


def _event(name, start, end, cuda=False, annotation=False):
    """A profiler event as summarize reads it from prof.events() (times in µs)."""
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, key=name, time_range=SimpleNamespace(start=start, end=end),
                                 device_type=device, self_device_time_total=end - start if cuda else 0.0,
                                 is_user_annotation=annotation)  # fmt: skip


def test_idle_gaps_and_what_the_host_ran_meanwhile():
    """Kernels on two streams overlap (busy until the later end); a 2.85 ms gap while the host waits in a sync is
    found and named by the operators around its middle; a 50 µs gap is below the threshold; annotations are not
    operators."""
    events = [
        _event("ProfilerStep#1", 0, 10_000, annotation=True),
        _event("train_step", 0, 9_000),
        _event("aten::item", 2_000, 5_000),
        _event("cudaStreamSynchronize", 2_150, 4_900),
        _event("k1", 1_000, 2_000, cuda=True),
        _event("k2", 1_500, 2_100, cuda=True),
        _event("k3", 4_950, 6_000, cuda=True),
        _event("k4", 6_050, 7_000, cuda=True),
    ]
    assert profiling.idle_gaps(events) == [(2_100, 4_950)]
    assert profiling.host_at(events, 3_500) == "train_step > aten::item > cudaStreamSynchronize"
    assert profiling.host_at(events, 9_500) == "(no operator)"
    report = profiling.idle_report(events, steps=1)
    assert report[0].startswith("GPU idle: 2.85 ms per step in 1 gaps of 0.1 ms or more per step")
    assert report[1] == "      2.85 ms at       1.1: train_step > aten::item > cudaStreamSynchronize"
    assert profiling.idle_report(events[:5], steps=1) == ["GPU idle: no gap of 0.1 ms or more between kernels"]
