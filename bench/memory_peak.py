"""What is alive on the GPU at the training peak, and who allocated it: runs `train_fsdp2.py` in this process with the
CUDA caching allocator's history recording on, then replays the recorded allocations and frees to find the moment the
most bytes were allocated and lists the blocks live at that moment, grouped by the line of our code (and the library
line) that allocated them. Why: our peak `torch.cuda.max_memory_allocated` sits above the reference recipe's, and the
peak is the sum of what happens to be alive at one instant; this names the terms of that sum.

    source .device/setup.sh && python bench/vs_reference.py --ours-only --rows 650M --trainer bench/memory_peak.py \\
        --out /tmp/x

or directly, as a drop-in for train_fsdp2.py (all arguments go to it):

    python bench/memory_peak.py --config-name L1_650M num_train_steps=6 dataset.train_path=... [key=value ...]

The report is printed and written to `<output_dir>/memory_peak.txt` (rank 0; other ranks write
`memory_peak.rank<N>.txt`). The trainer still writes its own metrics.jsonl, so vs_reference reads its result as usual.
MEMORY_PEAK_ENTRIES sets the size of the allocator's ring buffer of events (each holds a Python stack: host memory).

How the replay counts: `max_memory_allocated` drops a block's bytes when it is freed ("free_requested"), not when a
side stream's use of it has ended ("free_completed"), so by default a block ends at free_requested; the peak with
blocks ending at free_completed (what the snapshot viewer calls active memory) is reported alongside. Trace sizes are
the bytes requested; the allocator's statistics count its rounded-up blocks, so the trace peak reads slightly lower.
When the ring buffer wrapped, blocks allocated before its first event are recovered from their frees in the trace
(their entry carries the allocation's stack) and from the blocks still allocated in the final snapshot.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python bench/...`: the repository's packages importable

from bench.in_process import is_ours as is_ours_file  # noqa: E402
from bench.in_process import run_train_fsdp2  # noqa: E402

SELF = "bench/memory_peak.py"
DEFAULT_ENTRIES = 2_000_000
GIB, MIB = 2**30, 2**20
Frame = dict[str, Any]
Entry = dict[str, Any]
# The trace's actions that end a block, by counting convention: what max_memory_allocated counts, or active memory.
ENDS = ("free_requested", "free_completed")


@dataclass(frozen=True)
class Block:
    """One allocation: where it lives, its requested bytes, its allocation stack (innermost frame first) and the
    index of its `alloc` entry in the trace (-1: allocated before the trace began)."""

    addr: int
    size: int
    frames: tuple[Frame, ...] = field(compare=False)
    index: int


@dataclass
class Peak:
    """The moment of most live bytes: after trace entry `index` (-1: before the first entry)."""

    bytes: int
    index: int
    live: list[Block]
    baseline: list[Block]  # allocated before the trace began (wrapped ring buffer), live at its start


def _frames(entry: Entry) -> tuple[Frame, ...]:
    return tuple(entry.get("frames") or ())


def baseline_blocks(trace: Sequence[Entry], ends_at: str = "free_requested", still_live: Iterable[Entry] = ()) -> list[Block]:
    """Blocks live when the trace began: those the trace frees without having allocated them, and those the final
    snapshot (`still_live`: its blocks, with address/requested_size/state/frames) holds live that the trace never
    allocated. Empty when the trace saw the process from its first allocation."""
    live: dict[int, Block] = {}
    early: list[Block] = []
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = Block(e["addr"], e["size"], _frames(e), i)
        elif e["action"] == ends_at and live.pop(e["addr"], None) is None:
            early.append(Block(e["addr"], e["size"], _frames(e), -1))
    held = {"active_allocated"} if ends_at == "free_requested" else {"active_allocated", "active_awaiting_free"}
    for b in still_live:
        if b.get("state", "active_allocated") in held and b["address"] not in live:
            size = b["requested_size"] if "requested_size" in b else b["size"]
            early.append(Block(b["address"], size, tuple(b.get("frames") or ()), -1))
    return early


def find_peak(trace: Sequence[Entry], ends_at: str = "free_requested", still_live: Iterable[Entry] = ()) -> Peak:
    """Replay allocs and frees (ending blocks at `ends_at`) from the blocks live when the trace began; the first
    moment with the most live bytes and the blocks live then."""
    if ends_at not in ENDS:
        raise ValueError(f"ends_at must be one of {ENDS}, not {ends_at!r}")
    baseline = baseline_blocks(trace, ends_at, still_live)
    live = {b.addr: b for b in baseline}
    now = best = sum(b.size for b in baseline)
    best_index = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = Block(e["addr"], e["size"], _frames(e), i)
            now += e["size"]
        elif e["action"] == ends_at:
            now -= live.pop(e["addr"]).size
        if now > best:
            best, best_index = now, i
    return Peak(best, best_index, live_after(trace, best_index, ends_at, baseline), baseline)


def live_after(trace: Sequence[Entry], index: int, ends_at: str, baseline: Iterable[Block]) -> list[Block]:
    """The blocks live after trace entry `index`, starting from `baseline`."""
    live = {b.addr: b for b in baseline}
    for i, e in enumerate(trace[: index + 1]):
        if e["action"] == "alloc":
            live[e["addr"]] = Block(e["addr"], e["size"], _frames(e), i)
        elif e["action"] == ends_at:
            del live[e["addr"]]
    return list(live.values())


def short_path(filename: str, root: Path) -> str:
    """A frame's file, relative to the repository or to the installed-packages folder it sits in."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    path = Path(filename)
    return str(path.relative_to(root)) if path.is_relative_to(root) else filename


def frame_label(frame: Frame | None, root: Path, missing: str) -> str:
    if frame is None:
        return missing
    return f"{short_path(frame['filename'], root)}:{frame['line']} ({frame['name']})"


def is_ours(frame: Frame, root: Path) -> bool:
    """A frame of this repository's code: not an installed package (a virtual environment may sit inside the
    repository) and not this tool."""
    return is_ours_file(frame["filename"], root, SELF)


def our_frame(frames: Sequence[Frame], root: Path) -> Frame | None:
    """The innermost frame in this repository."""
    return next((f for f in frames if is_ours(f, root)), None)


def first_optimizer_step(trace: Sequence[Entry]) -> int | None:
    """Index of the first allocation made inside torch.optim (the optimizer's state, at its first step)."""
    return next(
        (i for i, e in enumerate(trace) if e["action"] == "alloc" and any("torch/optim/" in f["filename"] for f in _frames(e))),
        None,
    )


def _table(groups: dict[str, list[Block]], top: int, heading: str) -> list[str]:
    ranked = sorted(groups.items(), key=lambda kv: -sum(b.size for b in kv[1]))
    lines = [f"{heading} (top {min(top, len(ranked))} of {len(ranked)}):", f"  {'MiB':>9} {'count':>6}  where"]
    lines += [f"  {sum(b.size for b in bs) / MIB:9.1f} {len(bs):6d}  {key}" for key, bs in ranked[:top]]
    return lines


def grouped(blocks: Iterable[Block], key: Callable[[Block], str]) -> dict[str, list[Block]]:
    groups: dict[str, list[Block]] = collections.defaultdict(list)
    for b in blocks:
        groups[key(b)].append(b)
    return groups


def peak_report(
    trace: Sequence[Entry], root: Path, top: int, still_live: Iterable[Entry] = (), ends_at: str = "free_requested"
) -> str:
    """The report: the peak, what was live then grouped by allocation site, and when it was allocated."""
    still_live = list(still_live)
    peak = find_peak(trace, ends_at, still_live)
    other = ENDS[1 - ENDS.index(ends_at)]
    at = f"after event {peak.index} of {len(trace)}" if peak.index >= 0 else f"before the first of {len(trace)} events"
    lines = [
        f"trace peak: {peak.bytes / GIB:.3f} GiB live ({len(peak.live)} blocks), {at}; blocks end at {ends_at}",
        f"with blocks ending at {other} instead: {find_peak(trace, other, still_live).bytes / GIB:.3f} GiB",
    ]
    if peak.baseline:
        lines.append(
            f"the trace does not start at the first allocation (ring buffer wrapped): {len(peak.baseline)} blocks, "
            f"{sum(b.size for b in peak.baseline) / GIB:.3f} GiB, were live before it began and are counted; "
            "an earlier, higher peak cannot be seen"
        )
    else:
        lines.append("the trace starts from an empty allocator (no block outlives it unseen)")
    if any(e["action"] == "oom" for e in trace):
        lines.append("the trace records an out-of-memory error")
    lines.append("")

    def ours(b: Block) -> str:
        return frame_label(our_frame(b.frames, root), root, "(no repository frame)")

    def both(b: Block) -> str:
        inner = b.frames[0] if b.frames else None
        return f"{ours(b)}  |  {frame_label(inner, root, '(no Python frame)')}"

    lines += _table(grouped(peak.live, both), top, "live at the peak by innermost repository frame | innermost frame")
    lines.append("")
    lines += _table(grouped(peak.live, ours), top, "by repository frame")
    step = first_optimizer_step(trace)
    if step is not None:

        def phase(b: Block) -> str:
            if b.index < 0:
                return "before the trace began"
            return "before the first optimizer step" if b.index < step else "at or after the first optimizer step"

        lines.append("")
        lines += _table(grouped(peak.live, phase), 3, f"by when allocated (first optimizer step: event {step})")
    return "\n".join(lines) + "\n"


def output_path(args: Sequence[str], rank: int, cwd: Path) -> Path:
    """Where the report goes: the trainer's output_dir (a hydra override among `args`), else `cwd`."""
    dirs = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("output_dir=")]
    name = "memory_peak.txt" if rank == 0 else f"memory_peak.rank{rank}.txt"
    return (Path(dirs[-1]) if dirs else cwd) / name


def entries_setting() -> int:
    raw = os.environ.get("MEMORY_PEAK_ENTRIES", str(DEFAULT_ENTRIES))
    if not raw.isdigit() or int(raw) == 0:
        raise SystemExit(f"MEMORY_PEAK_ENTRIES must be a positive integer, not {raw!r}")
    return int(raw)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/memory_peak.py needs a CUDA GPU (it reads the CUDA caching allocator's history)")
    entries, rank = entries_setting(), int(os.environ.get("RANK", "0"))
    out = output_path(sys.argv[1:], rank, Path.cwd()).resolve()
    torch.cuda.memory._record_memory_history(max_entries=entries, context="alloc", stacks="python")
    try:
        run_train_fsdp2(sys.argv[1:])
    finally:
        device = torch.cuda.current_device()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snap["device_traces"][device]
        held = [b for s in snap["segments"] if s.get("device", device) == device for b in s["blocks"]]
        header = [
            f"device {device}, rank {rank}: max_memory_allocated {torch.cuda.max_memory_allocated(device) / GIB:.3f} GiB "
            f"(since the trainer's last reset), {len(trace)} trace events (MEMORY_PEAK_ENTRIES={entries})",
        ]
        if len(trace) >= entries:
            header.append("the ring buffer is full: the trace holds only the last events; raise MEMORY_PEAK_ENTRIES")
        text = "\n".join(header) + "\n" + peak_report(trace, ROOT, 40, held)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if rank == 0:
            print(f"\n{text}(written to {out})")


if __name__ == "__main__":
    main()
