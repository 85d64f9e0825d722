"""torch.profiler over a window of optimizer steps of a real run (`profiler.enabled=true`).

A benchmark that copies the training step can only say where the copy spends its time; this profiles what the
trainer runs (loader, counters, forward, backward, clip, optimizer) at the step the user picks, after compilation and
the allocator have settled. Each rank writes, under `profiler.dir` (default output_dir/profile):

- `trace_rank<R>.json.gz`: the Chrome/Perfetto trace of the window (open it in https://ui.perfetto.dev);
- `summary_rank<R>.txt`: GPU kernel time per step grouped by kind (matmul, attention, copies, ...), the wall time of
  the same steps (the difference is time the GPU waited for the host), the top kernels and the top operators, and
  the GPU's idle gaps with what the host was running during each.

`summarize` also serves bench/profile_step.py and bench/profile_reference.py, so every profile reads the same way.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GROUPS = [  # kernel kinds by name, first match wins
    ("attention", r"flash|fmha|attn|cudnn|sdpa"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|sm90|wgmma|matmul"),
    ("layernorm", r"layer_?norm|ln_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("rope", r"rope|rotary"),
    ("copy/cast", r"copy|cast|convert|fill|transpose|memcpy|memset"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "elementwise/other")


def _is_kernel(event: Any) -> bool:
    """A GPU kernel (or copy) itself: not a CPU operator (which carries its kernels' time too) and not an annotated
    range such as "Optimizer.step#AdamW.step" or "ProfilerStep#3", which spans kernels without being one."""
    if getattr(event, "self_device_time_total", 0.0) <= 0:
        return False
    if event.device_type != torch.autograd.DeviceType.CUDA:
        return False
    if getattr(event, "is_user_annotation", False):
        return False
    return not (event.key.startswith("ProfilerStep") or event.key.startswith("Optimizer."))


def summarize(prof: Any, steps: int, wall_ms: float | None = None, title: str = "", top: int = 15) -> str:
    """A readable account of a finished profile of `steps` steps: kernel time per step by kind, against the wall time
    per step when known, then the largest kernels and the operators that launched the most GPU time."""
    events = prof.key_averages()
    by_group: dict[str, float] = defaultdict(float)
    kernels = []
    for e in events:
        if _is_kernel(e):
            by_group[group_of(e.key)] += e.self_device_time_total
            kernels.append((e.self_device_time_total, e.count, e.key))
    total = sum(by_group.values())
    lines = [title] if title else []
    wall = f"wall {wall_ms:.1f} ms per step" if wall_ms is not None else ""
    if kernels:
        head = f"{total / steps / 1e3:.1f} ms of GPU kernels per step over {steps} step(s)"
        lines.append(head + (f"; {wall} (the difference: the GPU waiting for the host)" if wall else ""))
        for group, t in sorted(by_group.items(), key=lambda x: -x[1]):
            lines.append(f"  {group:18} {t / steps / 1e3:9.2f} ms  {t / total:6.1%}")
        lines.append("top kernels (ms per step, calls per step):")
        for t, n, key in sorted(kernels, reverse=True)[:top]:
            lines.append(f"  {t / steps / 1e3:8.2f} ms  x{n / steps:<6.0f} {key[:120]}")
    else:
        lines.append(f"no GPU kernels over {steps} step(s) (a CPU run)" + (f"; {wall}" if wall else ""))

    # Operators: on a GPU by the kernel time they launched (children included), on a CPU by their own CPU time.
    def cost(e: Any) -> float:
        return e.device_time_total if kernels else e.self_cpu_time_total

    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and cost(e) > 0]
    ops = [e for e in ops if not (e.key.startswith("ProfilerStep") or getattr(e, "is_user_annotation", False))]
    what = "the GPU time they launched, children included" if kernels else "their own CPU time"
    lines.append(f"top operators by {what} (ms per step, calls per step):")
    for e in sorted(ops, key=lambda e: -cost(e))[:top]:
        lines.append(f"  {cost(e) / steps / 1e3:8.2f} ms  x{e.count / steps:<6.0f} {e.key[:120]}")
    if kernels:
        lines.extend(idle_report(list(prof.events()), steps, top=min(top, 10)))
    return "\n".join(lines) + "\n"


def idle_gaps(events: list[Any], min_us: float = 100.0) -> list[tuple[float, float]]:
    """The intervals (µs) of at least `min_us` in which no GPU kernel ran on any stream, between the first kernel
    of the window and its last."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if _is_kernel(e))
    gaps, busy_until = [], None
    for start, end in spans:
        if busy_until is not None and start - busy_until >= min_us:
            gaps.append((busy_until, start))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def host_at(events: list[Any], when: float, depth: int = 4) -> str:
    """What the host was running at time `when` (µs): the innermost `depth` CPU operators that contain it, outermost
    first (annotations such as ProfilerStep left out), or '(no operator)'."""
    cpu = (e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    around = [e for e in cpu if e.time_range.start <= when < e.time_range.end and not e.name.startswith("ProfilerStep")]
    around.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    return " > ".join(e.name[:60] for e in around[-depth:]) or "(no operator)"


def idle_report(events: list[Any], steps: int, top: int = 10) -> list[str]:
    """Where the GPU waited for the host: the idle time per step in gaps of 0.1 ms or more, then the largest gaps
    with what the host was running in the middle of each (a sync, a slow launch, the data loader, Python)."""
    gaps = idle_gaps(events)
    if not gaps:
        return ["GPU idle: no gap of 0.1 ms or more between kernels"]
    origin = min(e.time_range.start for e in events if _is_kernel(e))
    total = sum(end - start for start, end in gaps)
    lines = [f"GPU idle: {total / steps / 1e3:.2f} ms per step in {len(gaps) / steps:.0f} gaps of 0.1 ms or more per step; "
             f"the largest (ms, at ms into the window: what the host was running midway):"]  # fmt: skip
    for start, end in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        lines.append(f"  {(end - start) / 1e3:8.2f} ms at {(start - origin) / 1e3:9.1f}: {host_at(events, (start + end) / 2)}")
    return lines


def export_trace(prof: Any, path: Path) -> Path:
    """The Chrome trace, gzipped (a 650M step is tens of MB as text)."""
    raw = path.with_suffix("")  # trace.json.gz -> trace.json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return path


class StepProfiler:
    """Profiles optimizer steps `start_step` .. `start_step + num_steps - 1` (1-based, as metrics.jsonl counts them).

    The loop calls `step()` after every optimizer step. The profiler starts recording one step early (its own first
    recorded step is slower, so it is a warm-up left out of the results) and writes its files when the window ends;
    a run that ends first, or starts too late to train a step before the window, writes nothing and says so. The
    loop syncs the host once per step (the loss), so the wall time between two `step()` calls is one whole step."""

    def __init__(self, cfg: Any, out_dir: Path, rank: int, device: torch.device, first_step: int):
        """`cfg`: the `profiler` config section (off: every call does nothing); `first_step`: the run's step at start."""
        self.start, self.count, self.rank = cfg.start_step, cfg.num_steps, rank
        self.dir = Path(cfg.dir) if cfg.dir is not None else out_dir / "profile"
        self.step_no, self.prof = first_step, None
        # The profiler warms up on the step before the window, so the run must train one step before it.
        self.done = not cfg.enabled or first_step > self.start - 2
        if cfg.enabled and self.done:  # a resumed run at or past the window
            log.warning(
                "profiler: the run starts at step %d, past profiler.start_step=%d - 1: nothing is profiled",
                first_step + 1,
                self.start,
            )
        if self.done:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=self.start - 2 - first_step, warmup=1, active=self.count, repeat=1),
            on_trace_ready=self._write,
            record_shapes=cfg.record_shapes,
            with_stack=cfg.with_stack,
        )
        self.prof.start()
        self.stamps: list[float] = []

    def step(self) -> None:
        """After an optimizer step (the loop has synced the host on its loss)."""
        if self.done or self.prof is None:
            return
        self.step_no += 1
        if self.start - 1 <= self.step_no <= self.start - 1 + self.count:
            self.stamps.append(time.perf_counter())
        self.prof.step()
        if self.step_no >= self.start - 1 + self.count:
            self.prof.stop()
            self.done = True

    def close(self) -> None:
        """At the end of the run: stop a window the run did not reach the end of."""
        if self.prof is not None and not self.done:
            self.done = True
            self.prof.stop()  # may call _write, which leaves a partial window unwritten
            log.warning(
                "profiler: the run ended at step %d, before the window %d-%d ended: nothing written",
                self.step_no,
                self.start,
                self.start + self.count - 1,
            )

    def _write(self, prof: Any) -> None:
        if self.step_no < self.start + self.count - 1:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        wall = (self.stamps[-1] - self.stamps[0]) * 1e3 / self.count if len(self.stamps) == self.count + 1 else None
        title = f"steps {self.start}-{self.start + self.count - 1}, rank {self.rank}"
        text = summarize(prof, self.count, wall, title)
        (self.dir / f"summary_rank{self.rank}.txt").write_text(text)
        trace = export_trace(prof, self.dir / f"trace_rank{self.rank}.json.gz")
        if self.rank == 0:
            log.info("profile of %s:\n%s(trace: %s)", title, text, trace)
