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
    newer objects: a collection after torch.compile's first steps took 170-190 ms on this CPU, lever 55); cyclic
    garbage made between collections is still freed; afterwards the collector is as it was. 0 changes nothing."""
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
    if every:
        assert started == [2, 2]
        assert frozen[2] > frozen[1] and frozen[5] > frozen[4] and frozen[3] <= frozen[2]  # survivors frozen at 3 and 6 only
        assert [ref() is None for ref in garbage] == [True] * 6 + [False]  # step 7's cycle waits for the next one
    else:
        assert started_before_last > 0  # automatic collections kept running
    assert gc.isenabled() and gc.get_freeze_count() == 0
