"""Distribution across ranks and workers, exact resume through StatefulDataLoader, cluster sampling."""

import contextlib
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLED_VAL, ROOT, run_cmd

from recipe.data.dataset import BatchSettings, ClusterIndex, MLMBatches, make_loader
from recipe.data.sources import SequenceStore, load_sequences

SETTINGS = BatchSettings(max_seq_length=128, token_micro_batch_size=1024, seed=11)


@pytest.fixture(scope="module")
def store():
    return load_sequences(BUNDLED_VAL)  # ~1,000 real sequences: quick to run through


def epoch_indices(store, world, workers, settings=SETTINGS):
    """Sample indices each rank reads in epoch 0 (iterating until every worker has moved past epoch 0)."""
    per_rank = []
    for rank in range(world):
        ds = MLMBatches(store, settings, rank, world, train=True)
        seen = []
        loader = make_loader(ds, num_workers=workers)
        expected = len(range(rank, len(store), world))
        for batch in loader:
            seen.extend(batch["sample_index"].tolist())
            if len(seen) >= expected + 200:
                break
        per_rank.append(seen)
    return per_rank


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 2), (4, 1)])
def test_ranks_cover_each_epoch_exactly_once(store, world, workers):
    per_rank = epoch_indices(store, world, workers)
    epoch0 = []
    for rank, seen in enumerate(per_rank):
        share = len(range(rank, len(store), world))
        # the first `share` samples a rank reads are its epoch-0 share when there is one worker; with several
        # workers their epochs interleave, so collect this rank's distinct indices of epoch 0 by construction
        ds = MLMBatches(store, SETTINGS, rank, world)
        mine = np.concatenate([ds._my_items(0, w, max(workers, 1)) for w in range(max(workers, 1))])
        assert len(mine) == share
        assert set(mine.tolist()) <= set(seen)
        epoch0.extend(mine.tolist())
    assert sorted(epoch0) == list(range(len(store)))  # none skipped, none duplicated


def test_epochs_are_reshuffled(store):
    ds = MLMBatches(store, SETTINGS, 0, 1)
    a, b = ds._my_items(0, 0, 1), ds._my_items(1, 0, 1)
    assert sorted(a) == sorted(b) and not np.array_equal(a, b)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_resume_gives_the_identical_next_batches(store, workers):
    """Save the loader state after k batches, restore into a fresh loader: the next batches are identical,
    across an epoch boundary too."""
    n_epoch = sum(1 for _ in MLMBatches(store, SETTINGS, 0, 1, train=False)) // max(workers, 1)
    for k in (3, n_epoch + 2):
        loader = make_loader(MLMBatches(store, SETTINGS, 0, 1), num_workers=workers)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = loader.state_dict()
        expected = [next(it) for _ in range(6)]
        restored = make_loader(MLMBatches(store, SETTINGS, 0, 1), num_workers=workers)
        restored.load_state_dict(state)
        assert _same(_take(restored, 6), expected)
        reference = _take(make_loader(MLMBatches(store, SETTINGS, 0, 1), num_workers=workers), k + 6)[k:]
        assert _same(reference, expected)


def test_restore_with_another_world_size_is_refused(store):
    loader = make_loader(MLMBatches(store, SETTINGS, 0, 2))
    _take(loader, 2)
    other = make_loader(MLMBatches(store, SETTINGS, 0, 4))
    with pytest.raises(ValueError, match="saved with world_size=2, this run has world_size=4"):
        other.load_state_dict(loader.state_dict())
        _take(other, 1)


def test_restore_with_another_worker_count_is_refused(store):
    loader = make_loader(MLMBatches(store, SETTINGS, 0, 1), num_workers=2)
    _take(loader, 3)
    state = loader.state_dict()
    other = make_loader(MLMBatches(store, SETTINGS, 0, 1), num_workers=0)
    with pytest.raises(ValueError, match="saved with num_workers=2, this run has num_workers=0"):
        other.load_state_dict(state)
        _take(other, 1)


def test_validation_is_one_deterministic_pass_every_time(store):
    val = MLMBatches(store, SETTINGS, 0, 1, train=False)
    a = [b["sample_index"].tolist() for b in val]
    b = [b["sample_index"].tolist() for b in val]  # the same object again: a fresh full pass, not an empty one
    assert a == b and sorted(sum(a, [])) == list(range(len(store)))


def test_cluster_sampling_draws_clusters_then_members():
    # 3 UniRef50 clusters: A has two UniRef90 clusters (one of 1 member, one of 3), B one member, C two members
    c50 = np.array([0, 0, 0, 0, 1, 2, 2])
    c90 = np.array([0, 1, 1, 1, 2, 3, 3])
    index = ClusterIndex(c50, c90)
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
import sys, torch, torch.distributed as dist
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
dist.destroy_process_group()
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
