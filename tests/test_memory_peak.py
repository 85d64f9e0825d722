"""bench/memory_peak.py's analysis on synthetic allocator traces (the format torch.cuda.memory._snapshot() returns:
device_traces entries with action/addr/size/frames, frames innermost first)."""

from pathlib import Path

import pytest
import torch

from bench.memory_peak import find_peak, main, output_path, peak_report

REPO = Path("/repo")
MIB = 2**20


def frame(path: str, line: int, name: str = "f") -> dict:
    return {"filename": path, "line": line, "name": name}


LINEAR = frame("/venv/lib/python3.12/site-packages/torch/nn/modules/linear.py", 125, "forward")
TE_LINEAR = frame("/venv/lib/python3.12/site-packages/transformer_engine/pytorch/module/linear.py", 300, "forward")
ADAM = frame("/venv/lib/python3.12/site-packages/torch/optim/adam.py", 80, "_init_group")
LAYER = frame("/repo/recipe/model/layers.py", 40, "forward")
TRAIN = frame("/repo/recipe/train.py", 214, "train_step")
TOOL = frame("/repo/bench/memory_peak.py", 200, "main")
VENV_IN_REPO = frame("/repo/.venv/lib/python3.12/site-packages/torch/autograd/graph.py", 9, "_engine_run_backward")


def alloc(addr: int, mib: float, *frames: dict) -> dict:
    return {"action": "alloc", "addr": addr, "size": int(mib * MIB), "frames": list(frames), "stream": 0}


def free(addr: int, mib: float, action: str = "free_requested", *frames: dict) -> dict:
    return {"action": action, "addr": addr, "size": int(mib * MIB), "frames": list(frames), "stream": 0}


def freed(addr: int, mib: float) -> list[dict]:
    """A free as the allocator records it: requested, then completed."""
    return [free(addr, mib), free(addr, mib, "free_completed")]


def test_peak_is_the_moment_of_most_live_bytes():
    trace = [
        alloc(1, 100, LAYER),
        alloc(2, 200, TRAIN),
        *freed(1, 100),
        alloc(3, 50, TRAIN),  # 250 MiB: below the 300 MiB before it
        {"action": "segment_alloc", "addr": 0, "size": 1024 * MIB, "stream": 0},
    ]
    peak = find_peak(trace)
    assert peak.bytes == 300 * MIB and peak.index == 1
    assert sorted(b.addr for b in peak.live) == [1, 2]
    assert not peak.baseline


def test_blocks_freed_before_the_peak_are_not_counted():
    trace = [alloc(7, 1000, TRAIN), *freed(7, 1000), alloc(7, 600, LAYER), alloc(8, 600, LAYER), alloc(9, 1, TRAIN)]
    peak = find_peak(trace)
    assert peak.bytes == 1201 * MIB
    assert sorted((b.addr, b.size // MIB) for b in peak.live) == [(7, 600), (8, 600), (9, 1)]


@pytest.mark.parametrize("ends_at, peak_mib", [("free_requested", 100), ("free_completed", 150)])
def test_a_block_ends_at_the_chosen_free(ends_at, peak_mib):
    """max_memory_allocated drops a block at free_requested; active memory keeps it until free_completed (a side
    stream still using it)."""
    trace = [alloc(1, 100), free(1, 100), alloc(2, 50), free(1, 100, "free_completed")]
    assert find_peak(trace, ends_at).bytes == peak_mib * MIB


def test_groups_by_repository_frame_and_innermost_frame():
    trace = [
        alloc(1, 64, LINEAR, LAYER, TRAIN),
        alloc(2, 64, LINEAR, LAYER, TRAIN),
        alloc(3, 32, TE_LINEAR, LAYER, TRAIN),
        alloc(4, 8, VENV_IN_REPO, TRAIN, TOOL),  # a virtual environment inside the repository is not our code
        alloc(5, 4, TOOL),  # nor is the tool itself
    ]
    text = peak_report(trace, REPO, top=40)
    assert "trace peak: 0.168 GiB live (5 blocks), after event 4 of 5" in text
    both, ours = text.split("by repository frame")
    assert "128.0      2  recipe/model/layers.py:40 (forward)  |  torch/nn/modules/linear.py:125 (forward)" in both
    assert "32.0      1  recipe/model/layers.py:40 (forward)  |  transformer_engine/pytorch/module/linear.py:300" in both
    assert "8.0      1  recipe/train.py:214 (train_step)  |  torch/autograd/graph.py:9 (_engine_run_backward)" in both
    assert "4.0      1  (no repository frame)  |  bench/memory_peak.py:200 (main)" in both
    assert "160.0      3  recipe/model/layers.py:40 (forward)\n" in ours
    assert "8.0      1  recipe/train.py:214 (train_step)\n" in ours
    assert [line.split()[0] for line in ours.splitlines()[2:]] == ["160.0", "8.0", "4.0"], "largest first"


def test_top_limits_the_groups():
    trace = [alloc(i, i, frame(f"/repo/recipe/m{i}.py", i)) for i in range(1, 6)]
    text = peak_report(trace, REPO, top=2)
    assert "(top 2 of 5)" in text and "recipe/m5.py" in text and "recipe/m4.py" in text and "recipe/m3.py" not in text


def test_wrapped_trace_counts_blocks_allocated_before_it():
    """A full ring buffer drops the oldest events: a block freed in the trace but never allocated there was live
    from its start (its free carries the allocation's stack), and so was one the final snapshot still holds."""
    trace = [
        free(100, 500, "free_completed", LAYER),  # the tail of a free whose request fell off the buffer: ignored
        free(1, 300, "free_requested", LAYER),
        free(1, 300, "free_completed", LAYER),
        alloc(2, 100, TRAIN),
    ]
    held = [
        {"address": 9, "size": 64 * MIB, "requested_size": 60 * MIB, "state": "active_allocated", "frames": [TRAIN]},
        {"address": 2, "size": 100 * MIB, "requested_size": 100 * MIB, "state": "active_allocated", "frames": [TRAIN]},
        {"address": 5, "size": 2 * MIB, "requested_size": 2 * MIB, "state": "inactive", "frames": []},
    ]
    peak = find_peak(trace, still_live=held)
    assert peak.bytes == 360 * MIB and peak.index == -1, "before the first event: the 300 MiB block and the held one"
    assert sorted((b.addr, b.size // MIB, b.index) for b in peak.baseline) == [(1, 300, -1), (9, 60, -1)]
    text = peak_report(trace, REPO, top=40, still_live=held)
    assert "(ring buffer wrapped): 2 blocks, 0.352 GiB" in text
    assert "300.0      1  recipe/model/layers.py:40 (forward)" in text
    assert find_peak(trace, "free_completed", held).bytes == 860 * MIB, "active memory: the completed free's block too"


def test_complete_trace_is_reported_as_such():
    assert "starts from an empty allocator" in peak_report([alloc(1, 1, TRAIN)], REPO, top=40)


def test_splits_live_bytes_at_the_first_optimizer_step():
    trace = [alloc(1, 10, LAYER), alloc(2, 20, ADAM, TRAIN), alloc(3, 40, LAYER)]
    text = peak_report(trace, REPO, top=40)
    assert "by when allocated (first optimizer step: event 1)" in text
    assert "10.0      1  before the first optimizer step" in text
    assert "60.0      2  at or after the first optimizer step" in text


def test_report_goes_to_the_trainers_output_dir(tmp_path):
    args = ["--config-name", "L1_650M", "output_dir=/runs/a", "num_train_steps=6"]
    assert output_path(args, 0, tmp_path) == Path("/runs/a/memory_peak.txt")
    assert output_path(["++output_dir=/runs/b"], 3, tmp_path) == Path("/runs/b/memory_peak.rank3.txt")
    assert output_path(["num_train_steps=6"], 0, tmp_path) == tmp_path / "memory_peak.txt"


def test_without_cuda_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main()


def test_main_runs_the_trainer_and_writes_the_report(monkeypatch, tmp_path, capsys):
    """The glue around the analysis, with the CUDA calls stood in for: recording starts before the trainer runs with
    the arguments passed through, and the report of the final snapshot lands in the trainer's output_dir."""
    import runpy
    import sys

    calls: list = []
    snap = {
        "device_traces": [[alloc(1, 10, LAYER), alloc(2, 30, TRAIN), *freed(1, 10)]],
        "segments": [{"device": 0, "blocks": [{"address": 2, "size": 30 * MIB, "requested_size": 30 * MIB,
                                               "state": "active_allocated", "frames": [TRAIN]}]}],
    }  # fmt: skip
    monkeypatch.setenv("MEMORY_PEAK_ENTRIES", "1000")
    monkeypatch.setattr(sys, "argv", ["bench/memory_peak.py", "--config-name", "L0_sanity", f"output_dir={tmp_path}"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 40 * MIB)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(("record", a, k)))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snap)
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: calls.append(("run", path, sys.argv[1:])))
    main()
    assert calls[0] == ("record", (), {"max_entries": 1000, "context": "alloc", "stacks": "python"})
    trainer = str(Path(__file__).resolve().parent.parent / "train_fsdp2.py")
    assert calls[1] == ("run", trainer, ["--config-name", "L0_sanity", f"output_dir={tmp_path}"])
    assert calls[2] == ("record", (), {"enabled": None})
    text = (tmp_path / "memory_peak.txt").read_text()
    assert text.startswith("device 0, rank 0: max_memory_allocated 0.039 GiB")
    assert "trace peak: 0.039 GiB live (2 blocks), after event 1 of 4" in text and "starts from an empty allocator" in text
    assert text in capsys.readouterr().out


def test_entries_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MEMORY_PEAK_ENTRIES", "2e6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="MEMORY_PEAK_ENTRIES must be a positive integer, not '2e6'"):
        main()
