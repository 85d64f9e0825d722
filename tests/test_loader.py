"""Distribution across ranks and workers, exact resume from the global data position (also at another world size
and worker count), cluster sampling."""

import contextlib
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLED_VAL, ROOT, run_cmd

from recipe.data.dataset import BatchSettings, ClusterIndex, MLMBatches, make_loader
from recipe.data.order import DataPosition, permute
from recipe.data.sources import SequenceStore, load_sequences
from recipe.run_state import DataTracker

SETTINGS = BatchSettings(max_seq_length=128, token_micro_batch_size=1024, seed=11)


@pytest.fixture(scope="module")
def store():
    return load_sequences(BUNDLED_VAL)  # ~1,000 real sequences: quick to run through


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_each_epoch_is_a_permutation_and_epochs_differ(n):
    a, b = permute(np.arange(n), n, 11, 0), permute(np.arange(n), n, 11, 1)
    assert sorted(a.tolist()) == list(range(n)) and sorted(b.tolist()) == list(range(n))
    assert n < 7 or not np.array_equal(a, b)
    assert np.array_equal(permute(np.arange(n)[::-1], n, 11, 0), a[::-1])  # a pure function of the position


def rows_at(store, positions, settings=SETTINGS):
    n = len(store)
    return permute(positions % n, n, settings.seed, positions // n)


class Reader:
    """Rank `rank` of `world` with `workers` loader workers, continuing from `position`; records what it consumed."""

    def __init__(self, store, position, rank, world, workers):
        ds = MLMBatches(store, SETTINGS, rank, world, position=position)
        self.tracker = DataTracker(ds.layout_position(workers), rank)
        self.it = iter(make_loader(ds, num_workers=workers))
        self.samples = []

    def take(self, k):
        for _ in range(k):
            batch = next(self.it)
            self.tracker.consume(batch)
            self.samples.extend(batch["sample_index"].tolist())


def merged(readers) -> DataPosition:
    pos = readers[0].tracker.position
    for r in readers[1:]:
        p = r.tracker.position
        pos.cursors = [c if t % pos.world_size != r.tracker.dp_rank else p.cursors[t] for t, c in enumerate(pos.cursors)]
        pos.next_worker[r.tracker.dp_rank] = p.next_worker[r.tracker.dp_rank]
    return pos


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 2), (4, 1)])
def test_ranks_and_workers_read_disjoint_shares_of_the_global_order(store, world, workers):
    """Every stream reads exactly the positions its cursor says, the streams never overlap, and past one epoch's worth
    of batches every item of epoch 0 has been read once."""
    readers = [Reader(store, None, r, world, workers) for r in range(world)]
    for r in readers:
        r.take(len(store) // (4 * world) + 5)
    pos = merged(readers)
    consumed = pos.consumed()
    assert len(np.unique(consumed)) == len(consumed) == sum(len(r.samples) for r in readers)
    assert sorted(np.concatenate([r.samples for r in readers]).tolist()) == sorted(rows_at(store, consumed).tolist())
    epoch0 = consumed[consumed < len(store)]
    first_unread = pos.for_layout(world + 1, 1).frontier
    assert first_unread >= len(store) and sorted(rows_at(store, epoch0).tolist()) == list(range(len(store)))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_from_the_position_gives_the_identical_next_batches(store, workers):
    """Consume k batches, then a fresh loader from the tracked position: the next batches are identical to those
    of the uninterrupted loader, also across an epoch boundary and with the workers' round robin mid-cycle."""
    n_epoch = sum(1 for _ in MLMBatches(store, SETTINGS, 0, 1, train=False))
    for k in (3, 4, n_epoch + 2):
        reader = Reader(store, None, 0, 1, workers)
        reader.take(k)
        expected = [next(reader.it) for _ in range(6)]
        resumed = make_loader(MLMBatches(store, SETTINGS, 0, 1, position=reader.tracker.position), num_workers=workers)
        it = iter(resumed)
        assert _same([next(it) for _ in range(6)], expected)


def test_elastic_resume_2_1_2_consumes_the_global_order_without_gaps_or_repeats(store):
    """2 ranks x 2 workers, then 1 rank without workers, then 2 ranks x 1 worker, each resuming from the merged
    global position: the samples read over all three are exactly the rows at the consumed positions, no position
    twice, and everything below the final frontier read."""
    position, samples = None, []
    for world, workers, batches in ((2, 2, 7), (1, 0, 5), (2, 1, 6)):
        readers = [Reader(store, position, r, world, workers) for r in range(world)]
        for i, r in enumerate(readers):
            r.take(batches + i)  # ranks at different places, as after a preemption
            samples += r.samples
        position = DataPosition.from_dict(merged(readers).to_dict())
    consumed = position.consumed()
    assert len(np.unique(consumed)) == len(consumed) == len(samples) == position.consumed_count()
    assert sorted(samples) == sorted(rows_at(store, consumed).tolist())
    assert set(range(position.frontier)) <= set(consumed.tolist())


def test_same_layout_keeps_the_streams_another_collapses_them():
    pos = DataPosition(world_size=2, workers=1, cursors=[5, 3], next_worker=[0, 0])
    assert pos.for_layout(2, 1) is pos
    one = pos.for_layout(1, 1)  # stream 0 read 0,2,..,8; stream 1 read 1,3,5: all below 7 read, and 8
    assert (one.frontier, one.skip.tolist(), one.cursors) == (7, [8], [0])
    assert one.stream_positions(0, 0, 4).tolist() == [7, 9, 10, 11]
    assert one.consumed_count() == pos.consumed_count() == 8


def test_validation_is_one_deterministic_pass_every_time(store):
    val = MLMBatches(store, SETTINGS, 0, 1, train=False)
    a = [b["sample_index"].tolist() for b in val]
    b = [b["sample_index"].tolist() for b in val]  # the same object again: a fresh full pass, not an empty one
    assert a == b and sorted(sum(a, [])) == list(range(len(store)))


def test_cluster_sampling_draws_clusters_then_members():
    # 3 UniRef50 clusters: A has two UniRef90 clusters (one of 1 member, one of 3), B one member, C two members
    c50 = np.array([0, 0, 0, 0, 1, 2, 2])
    c90 = np.array([0, 1, 1, 1, 2, 3, 3])
    index = ClusterIndex.from_ids(c50, c90)
    assert len(index) == 3
    draws = np.concatenate([index.rows(np.zeros(1, dtype=np.int64), seed=1, epoch=e) for e in range(4000)])
    frac_first = (draws == 0).mean()  # the single-member UniRef90 cluster gets half of cluster A's draws
    assert abs(frac_first - 0.5) < 0.03 and set(draws.tolist()) == {0, 1, 2, 3}
    tokens = np.full(7 * 5, 5, dtype=np.uint8)
    store = SequenceStore(tokens, np.arange(0, 36, 5), "mem", {"ur50_id": c50, "ur90_id": c90})
    ds = MLMBatches(store, BatchSettings(max_seq_length=16, token_micro_batch_size=16), 0, 1, cluster_sampling=True)
    it = iter(ds)
    epoch = [int(i) for _ in range(2) for i in next(it)["sample_index"]][:3]
    assert {int(c50[r]) for r in epoch} == {0, 1, 2}  # an epoch is one draw per UniRef50 cluster


GLOO_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from recipe.data.dataset import BatchSettings, MLMBatches, make_loader
from recipe.data.sources import load_sequences
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store = load_sequences({path!r})
ds = MLMBatches(store, BatchSettings(max_seq_length=128, token_micro_batch_size=1024, seed=5), rank, world)
need = len(range(rank, len(store), world))
seen = []
for batch in make_loader(ds, num_workers=1):
    seen.extend(batch["sample_index"].tolist())
    if len(seen) >= need:
        break
width = len(store) // world + 1
seen = torch.nn.functional.pad(torch.tensor(seen[:need]), (0, width - need), value=-1)
out = [torch.zeros(width, dtype=torch.long) for _ in range(world)]
dist.all_gather(out, seen)
if rank == 0:
    allidx = torch.cat(out)
    allidx = allidx[allidx >= 0].sort().values
    print("COVER", len(store), len(allidx), bool(torch.equal(allidx, torch.arange(len(store)))))
dist.barrier()  # no rank tears down gloo while the other still uses it (it aborts)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # what the test reads is printed: skip the interpreter's teardown of gloo's threads, which aborted once under load
"""


def test_two_gloo_processes_cover_the_data_once(tmp_path):
    script = tmp_path / "cover.py"
    script.write_text(GLOO_SCRIPT.format(root=str(ROOT), path=str(BUNDLED_VAL)))
    r = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("COVER"))
    _, n, got, ok = line.split()
    assert n == got and ok == "True"


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory):
    """The bundled validation split as 4 parquet shards (streaming splits by shard)."""
    import pyarrow.parquet as pq

    table = pq.read_table(BUNDLED_VAL)
    out = tmp_path_factory.mktemp("shards")
    step = -(-table.num_rows // 4)
    for i in range(4):
        pq.write_table(table.slice(i * step, step), out / f"part-{i}.parquet")
    return out, table.num_rows


def test_streaming_ranks_cover_the_stream_once(parquet_shards):
    """Two ranks' first epochs together hold every sequence of the files exactly once (compared by content)."""
    import pyarrow.parquet as pq
    from datasets.distributed import split_dataset_by_node

    from recipe.data.streaming import StreamingMLMBatches, open_stream
    from recipe.data.tokenizer import decode

    path, n = parquet_shards
    uncropped = BatchSettings(max_seq_length=40_000, token_micro_batch_size=40_000, seed=11)  # longer than any sequence
    read = []
    for rank in range(2):
        share = sum(1 for _ in split_dataset_by_node(open_stream(path), rank=rank, world_size=2))
        mine = []
        for batch in StreamingMLMBatches(open_stream(path), uncropped, rank, 2):
            original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
            cu = batch["cu_seqlens"].tolist()
            mine.extend(decode(original[a:b].tolist()) for a, b in zip(cu, cu[1 : len(batch["seq_lengths"]) + 1]))
            if len(mine) >= share:
                break
        read.extend(mine[:share])
    want = pq.read_table(path).column("sequence").to_pylist()
    assert len(read) == n and sorted(read) == sorted(want)


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_resume_gives_the_identical_next_batches(parquet_shards, workers):
    from recipe.data.streaming import StreamingMLMBatches, open_stream

    path, _ = parquet_shards

    def fresh():
        return make_loader(StreamingMLMBatches(open_stream(path), SETTINGS, 0, 1), num_workers=workers)

    loader = fresh()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(4)]
    restored = fresh()
    restored.load_state_dict(state)
    assert _same(_take(restored, 4), expected)


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_a_file_of_empty_rows_fails_naming_it(tmp_path, workers):
    """Every row empty: once looped forever at step 0 waiting for a first batch; now an error that names the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recipe.data.sources import DataError
    from recipe.data.streaming import StreamingMLMBatches, open_stream

    path = tmp_path / "empty_rows.parquet"
    pq.write_table(pa.table({"sequence": ["", "", None, ""]}), path)
    loader = make_loader(StreamingMLMBatches(open_stream(path), SETTINGS, 0, 1, source=str(path)), num_workers=workers)
    expected = rf"{path}: no sequence to train on in a whole pass \(4 rows .* all with an empty"
    with alarm(60), pytest.raises(DataError, match=expected):
        next(iter(loader))


@contextlib.contextmanager
def alarm(seconds: int):
    """Fail instead of hanging the suite (the bug this guards against was a hang)."""

    def timeout(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_process_with_a_leftover_worker_still_exits(tmp_path):
    """Workers ignore SIGTERM (clean stops); one whose iterator outlived its loader must still not keep the process
    from exiting (multiprocessing's exit handler would SIGTERM it and wait forever)."""
    import subprocess
    import sys

    from conftest import BUNDLED_VAL, ROOT

    script = tmp_path / "leftover.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from recipe.data.dataset import BatchSettings, MLMBatches, make_loader\n"
        "from recipe.data.sources import load_sequences\n"
        f"store = load_sequences({str(BUNDLED_VAL)!r})\n"
        "loader = make_loader(MLMBatches(store, BatchSettings(max_seq_length=128, micro_batch_size=4), train=True), 1)\n"
        "it = iter(loader)\n"
        "next(it)\n"
        "del loader\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
