"""Fast CPU checks of the training loop's parts (recipe/train.py); the loop end to end is tests/test_train.py."""

import gc
import weakref

import pytest


def test_step_counter_returns_each_steps_counts_through_its_reused_buffers():
    """The counts come back as they went up, step after step (the buffers are reused), and the device tensor that
    `start` returns holds them too (the loss denominator is read from it). On CPU; the pinned, non-blocking path is
    exercised by the GPU runs."""
    import torch

    from recipe.train import StepCounter, StepCounts

    counter = StepCounter(torch.device("cpu"))
    for step in range(3):
        local = [10.0 + step, 100.0, 1e12 * (step + 1), 5.0, 0.0, float(step == 2)]
        summed = counter.start(local)
        assert summed.tolist() == local
        assert counter.result() == StepCounts(*local)


@pytest.mark.parametrize("every", [0, 3])
def test_garbage_collection_runs_on_the_loops_schedule_and_is_restored(every):
    """gc_every_n_steps=3: automatic collection is off and what existed before is frozen, full collections run at
    steps 3 and 6 only, however much is allocated between, and each freezes what survived it (the next scans only
    newer objects: after torch.compile's first steps each collection scanned what it built, lever 55); cyclic
    garbage made between collections is still freed, the rest when the run ends; afterwards the collector is as it was.
    0 changes nothing."""
    from recipe.train import GarbageCollection

    started = []

    def record(phase, info):
        if phase == "start":
            started.append(info["generation"])

    class Cycle:
        def __init__(self):
            self.me = self

    with GarbageCollection.restored():
        collector = GarbageCollection(every)
        assert gc.isenabled() == (every == 0) and (gc.get_freeze_count() > 0) == (every > 0)
        gc.callbacks.append(record)
        frozen, garbage = [], []
        try:
            for step in range(1, 8):
                _ = [[[] for _ in range(100)] for _ in range(100)]  # past gen 0's threshold every step
                cycle = Cycle()
                garbage.append(weakref.ref(cycle))
                del cycle  # unreachable, and only a collection frees a cycle
                if step == 7:
                    started_before_last = len(started)
                collector.step(step)
                frozen.append(gc.get_freeze_count())
        finally:
            gc.callbacks.remove(record)
        freed_in_run = [ref() is None for ref in garbage]
    if every:
        assert started == [2, 2]  # steps 3 and 6
        assert frozen[2] > frozen[1] and frozen[5] > frozen[4] and frozen[3] <= frozen[2]  # survivors frozen at 3 and 6 only
        assert freed_in_run == [True] * 6 + [False]  # step 7's cycle waits for the next collection: the run's end
        assert all(ref() is None for ref in garbage)
    else:
        assert started_before_last > 0  # automatic collections kept running
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_out_of_memory_says_what_to_change_before_torchs_error(tmp_path, monkeypatch):
    """A run that does not fit its GPU (the shipped L1_150M and L1_650M micro-batches are sized for an H200) logs
    which keys to change, with their values; torch's own error follows as hydra reports any other (exit 1)."""
    import sys

    import torch

    import recipe.train as train

    def run(cfg, strategy_name):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    errors: list[str] = []
    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(train.log, "error", lambda msg, *args: errors.append(msg % args))  # hydra reconfigures logging
    monkeypatch.chdir(tmp_path)
    argv = ["train_fsdp2.py", "--config-name", "L1_150M", f"output_dir={tmp_path / 'run'}", "hydra.run.dir=."]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        train.entrypoint("fsdp2")()
    [hint] = errors
    assert "131,072 tokens per micro-batch" in hint and "dataset.micro_batch_size (now 128)" in hint
    assert "grad_acc_steps (now 16)" in hint
