"""The prepared store: prepare from each input kind, cluster index, torn and stale stores, bad inputs, and
training on a store (resume exactness, and resume at another world size and strategy)."""

import json
import logging
import shutil
import sys

import numpy as np
import pytest
from conftest import BUNDLED_TRAIN, TINY, read_metrics, run_cmd, torchrun

from recipe.data.dataset import BatchSettings, MLMBatches
from recipe.data.order import DataPosition, permute
from recipe.data.prepare import prepare
from recipe.data.sources import DataError, load_sequences
from recipe.data.store import MappedStore


def clustered_table(n: int, seed: int = 0, null_every: int = 0):
    """n real sequences with a UniRef-like structure: UniRef50 clusters of 1..~30 members in 1..~6 UniRef90 groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seqs = pq.read_table(BUNDLED_TRAIN).column("sequence").to_pylist()[:n]
    rng = np.random.default_rng(seed)
    ur50, ur90, c, i = [], [], 0, 0
    while i < n:
        size = min(int(rng.zipf(1.8)) if rng.random() < 0.7 else 1, 30, n - i)
        groups = rng.integers(0, min(size, 6), size) if size > 1 else np.zeros(1, int)
        ur50 += [f"UniRef50_C{c}"] * size
        ur90 += [f"UniRef90_C{c}_{g}" for g in groups]
        c, i = c + 1, i + size
    if null_every:
        ur50 = [None if k % null_every else x for k, x in enumerate(ur50)]
    return pa.table({"id": [f"S{k}" for k in range(n)], "sequence": seqs, "ur50_id": ur50, "ur90_id": ur90})


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("clustered")
    table = clustered_table(6000)
    pq.write_table(table.slice(0, 3000), root / "a.parquet")
    pq.write_table(table.slice(3000), root / "b.parquet")
    stats = prepare(root, root / "store", val_fraction=0.05, seed=1, progress=False)
    return root, table, stats


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_writes_a_store_with_the_cluster_index(clustered):
    root, table, stats = clustered
    train, val = MappedStore(root / "store" / "train"), MappedStore(root / "store" / "validation")
    assert len(train) + len(val) == 6000 == stats["train"] + stats["validation"]
    c50 = set(table.column("ur50_id").to_pylist())
    assert stats["train_clusters"]["ur50"] + stats["validation_clusters"]["ur50"] == len(c50)  # whole clusters held out
    # the memory-mapped index groups rows exactly as the ids do
    assert isinstance(train.tokens.base, np.memmap) and isinstance(
        train.cluster_index().order.base, np.memmap
    )  # mapped, not read
    sizes = []
    for split in (train, val):
        index = split.cluster_index()
        starts = np.asarray(index.sub_start)[np.asarray(index.first_sub)]
        sizes += np.diff(starts).tolist()
    assert sorted(sizes) == sorted(np.bincount(np.unique(table.column("ur50_id").to_pylist(), return_inverse=True)[1]).tolist())
    # every training sequence is in the input, token for token
    seqs = set(table.column("sequence").to_pylist())
    from recipe.data.tokenizer import decode

    assert all(decode(train.residues(i)) in seqs for i in range(0, len(train), 97))


def test_prepare_is_deterministic_and_refuses_a_non_empty_output(clustered, tmp_path):
    root, _, _ = clustered
    prepare(root, tmp_path / "again", val_fraction=0.05, seed=1, progress=False)
    for name in ("tokens.u8", "offsets.i64", "cluster_order.i64", "cluster_first_sub.i64"):
        assert (tmp_path / "again" / "train" / name).read_bytes() == (root / "store" / "train" / name).read_bytes()
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        prepare(root, tmp_path / "again", val_fraction=0.05, seed=1, progress=False)
    stats = prepare(root / "a.parquet", tmp_path / "again", val_fraction=0.05, seed=1, progress=False, overwrite=True)
    assert MappedStore(tmp_path / "again" / "train").manifest["sequences"] == stats["train"] < 3000  # nothing stale left
    (tmp_path / "again" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="also holds.*notes.txt"):
        prepare(root, tmp_path / "again", overwrite=True, progress=False)


def test_torn_and_half_written_stores_are_refused(clustered, tmp_path):
    root, _, _ = clustered
    store = tmp_path / "copy"
    shutil.copytree(root / "store" / "train", store)
    with open(store / "tokens.u8", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"torn store: tokens.u8 is 1000 bytes"):
        load_sequences(store)
    (store / "manifest.json").unlink()  # what an interrupted prepare leaves: data files, no manifest
    with pytest.raises(DataError, match="incomplete store.*interrupted"):
        load_sequences(store)
    r = run_cmd(
        [
            sys.executable,
            "train_ddp.py",
            *TINY,
            "num_train_steps=1",
            f"dataset.train_path={store}",
            "dataset.val_path=null",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert r.returncode != 0 and "incomplete store" in r.stderr


def test_null_cluster_ids_become_singletons_not_one_cluster(tmp_path, caplog):
    import pyarrow.parquet as pq

    table = clustered_table(500, null_every=5)  # 4 of 5 rows without ur50_id
    pq.write_table(table, tmp_path / "nulls.parquet")
    nulls = sum(x is None for x in table.column("ur50_id").to_pylist())
    named = len({x for x in table.column("ur50_id").to_pylist() if x is not None})
    with caplog.at_level(logging.WARNING):
        stats = prepare(tmp_path / "nulls.parquet", tmp_path / "out", val_fraction=0.0, progress=False)
    assert stats["ur50_null_rows"] == nulls and stats["train_clusters"]["ur50"] == named + nulls
    assert "have no UniRef50 id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mem = load_sequences(tmp_path / "nulls.parquet")  # the in-memory path: the same rule
    assert len(mem.cluster_index()) == named + nulls and "null ur50_id" in caplog.text


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_integer_sequence_column_names_the_file_and_column(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = tmp_path / f"ints.{kind}"
    table = pa.table({"sequence": [1, 2, 3], "id": ["a", "b", "c"]})
    pcsv.write_csv(table, path) if kind == "csv" else pq.write_table(table, path)
    for fn in (lambda: load_sequences(path), lambda: prepare(path, tmp_path / "o", progress=False)):
        with pytest.raises(DataError, match=rf"{path.name}: column 'sequence' holds int64, not protein sequences"):
            fn()


def test_uniref90_fasta_with_membership_and_tagged_headers(tmp_path):
    fasta = tmp_path / "uniref90.fasta"
    fasta.write_text(">UniRef90_A n=2 Tax=x\nMKT\n>UniRef90_B n=1\nMKTAY\n>UniRef90_C\nAAAA\n>UniRef90_D\nLLL\n")
    member = tmp_path / "members.tsv"
    member.write_text("ur90_id\tur50_id\nUniRef90_A\tUniRef50_A\nUniRef90_B\tUniRef50_A\nUniRef90_C\tUniRef50_C\n")
    stats = prepare(fasta, tmp_path / "m", val_fraction=0.0, membership=member, progress=False)
    assert stats["train_clusters"] == {"ur50": 3, "ur90": 4} and stats["ur50_null_rows"] == 1  # D: not in the file
    index = MappedStore(tmp_path / "m" / "train").cluster_index()
    assert sorted(np.diff(index.first_sub).tolist()) == [1, 1, 2]
    tagged = tmp_path / "tagged.fasta"
    tagged.write_text(">s1 ur50_id=X ur90_id=X1\nMK\n>s2 ur50_id=X ur90_id=X2\nMKK\n>s3 ur50_id=Y ur90_id=Y1\nAA\n")
    assert prepare(tagged, tmp_path / "t", val_fraction=0.0, progress=False)["train_clusters"] == {"ur50": 2, "ur90": 3}


# ------------------------------------------------------------------------------------------- cluster sampling
def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_cluster_sampling_statistics(clustered):
    """Over many epochs of the training order: every UniRef50 cluster exactly once per epoch, and within a cluster a
    UniRef90 group uniformly, then a member uniformly. A chi-square over all members (normal approximation, 5 sigma)
    accepts the sampler and rejects the two usual mistakes: members uniform within the UniRef50 cluster, and
    sequences drawn uniformly."""
    root, _, _ = clustered
    store = MappedStore(root / "store" / "train")
    index = store.cluster_index()
    ds = MLMBatches(store, BatchSettings(max_seq_length=64, token_micro_batch_size=4096, seed=7), cluster_sampling=True)
    n50, epochs = len(index), 600
    p = np.arange(n50 * epochs, dtype=np.int64)
    e, items = p // n50, permute(p % n50, n50, 7, p // n50)
    assert all(np.array_equal(np.sort(items[e == k]), np.arange(n50)) for k in (0, 1, epochs - 1))  # clusters: once per epoch
    rows = index.rows(items, 7, e)
    got_rows, _, _ = ds._fetch(DataPosition().for_layout(1, 1), 0, 0, 3 * n50)  # the dataset draws the same rows
    assert np.array_equal(got_rows, rows[: 3 * n50])
    # expected probability of each row given its cluster is drawn once per epoch
    first, sub_start, order = np.asarray(index.first_sub), np.asarray(index.sub_start), np.asarray(index.order)
    prob = np.zeros(len(store))
    prob_flat = np.zeros(len(store))
    for c in range(n50):
        subs = range(first[c], first[c + 1])
        members = order[sub_start[first[c]] : sub_start[first[c + 1]]]
        prob_flat[members] = 1 / len(members)
        for s in subs:
            prob[order[sub_start[s] : sub_start[s + 1]]] = 1 / len(subs) / (sub_start[s + 1] - sub_start[s])
    counts = np.bincount(rows, minlength=len(store))
    dof = len(store) - n50
    limit = dof + 5 * np.sqrt(2 * dof)
    assert chi_square(counts, prob * epochs) < limit
    wrong = np.bincount(
        order[
            sub_start[first[items]]
            + (np.random.default_rng(0).random(len(items)) * (sub_start[first[items + 1]] - sub_start[first[items]])).astype(int)
        ],
        minlength=len(store),
    )
    assert chi_square(wrong, prob * epochs) > limit  # members uniform within UniRef50: caught
    assert (
        chi_square(np.bincount(np.random.default_rng(1).integers(0, len(store), len(items)), minlength=len(store)), prob * epochs)
        > limit
    )  # sequences uniformly: caught
    assert prob_flat.sum() == pytest.approx(n50) and prob.sum() == pytest.approx(n50)


# ------------------------------------------------------------------------------------------- training on a store
def check(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def copy_checkpoint(src, dst, step):
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    return dst


def meta(run, step) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step}" / "meta.json").read_text())


def consumed(run, step) -> np.ndarray:
    return DataPosition.from_dict(meta(run, step)["data_position"]).consumed()


@pytest.fixture(scope="module")
def store_run(clustered, tmp_path_factory):
    """8 steps of DDP on 2 gloo processes (2 loader workers each) from the clustered store, checkpoints every 4."""
    root, _, _ = clustered
    data = [f"dataset.train_path={(root / 'store' / 'train').resolve()}", f"dataset.val_path={root / 'store' / 'validation'}"]
    out = tmp_path_factory.mktemp("store_runs") / "full"
    r = check(
        torchrun(
            "train_ddp.py",
            2,
            *TINY,
            *data,
            "dataset.num_workers=2",
            "num_train_steps=8",
            "checkpoint.save_every_n_steps=4",
            f"output_dir={out}",
        )
    )
    assert "cluster sampling on" in r.stderr
    return out, data


def train_losses(run) -> dict:
    return {x["step"]: x["loss"] for x in read_metrics(run)[0]}


@pytest.mark.slow
def test_store_resume_is_bitwise_identical_and_a_relative_path_is_the_same_data(store_run, tmp_path):
    """prepare -> train -> resume on a store with clusters: the resumed steps' losses equal the uninterrupted run's
    bit for bit; the resumed run names the data by a relative path (the first by an absolute one) and is accepted."""
    import os

    from conftest import ROOT

    full, data = store_run
    relative = os.path.relpath(data[0].split("=", 1)[1], ROOT)
    run = copy_checkpoint(full, tmp_path / "resumed", 4)
    check(
        torchrun(
            "train_ddp.py",
            2,
            *TINY,
            f"dataset.train_path={relative}",
            data[1],
            "dataset.num_workers=2",
            "num_train_steps=8",
            "checkpoint.save_every_n_steps=4",
            "checkpoint.resume_from_checkpoint=true",
            f"output_dir={run}",
        )
    )
    a, b = train_losses(full), train_losses(run)
    assert sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b), (a, b)
    assert np.array_equal(consumed(full, 8), consumed(run, 8))


@pytest.mark.slow
def test_same_world_size_ddp_to_fsdp2_continues_with_the_same_data(store_run, tmp_path):
    full, data = store_run
    run = copy_checkpoint(full, tmp_path / "fsdp2", 4)
    check(
        torchrun(
            "train_fsdp2.py",
            2,
            *TINY,
            *data,
            "dataset.num_workers=2",
            "num_train_steps=8",
            "checkpoint.save_every_n_steps=4",
            "checkpoint.resume_from_checkpoint=true",
            f"output_dir={run}",
        )
    )
    a, b = train_losses(full), train_losses(run)
    assert sorted(b) == [5, 6, 7, 8] and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in b), (a, b)
    assert np.array_equal(consumed(full, 8), consumed(run, 8))


@pytest.mark.slow
def test_elastic_resume_2_to_1_to_2_processes_across_ddp_and_fsdp2(store_run, tmp_path):
    """DDP x 2 processes (2 workers) -> FSDP2 x 1 (no workers) -> FSDP2 x 2, sharded (1 worker) -> DDP x 1 (2 workers):
    the step count continues, and the consumed positions grow as nested sets whose sizes are exactly the samples
    trained on, so no sample was skipped (everything below the frontier is in) or repeated (a set as large as the
    count)."""
    full, data = store_run
    run = copy_checkpoint(full, tmp_path / "elastic", 4)
    common = [
        *TINY,
        *data,
        "checkpoint.save_every_n_steps=4",
        "checkpoint.max_checkpoints=null",
        "checkpoint.resume_from_checkpoint=true",
        f"output_dir={run}",
    ]
    r = check(torchrun("train_fsdp2.py", 1, *common, "dataset.num_workers=0", "num_train_steps=8"))
    assert "written by 2 processes, now 1" in r.stderr
    check(torchrun("train_fsdp2.py", 2, *common, "dataset.num_workers=1", "num_train_steps=12"))
    r = check(torchrun("train_ddp.py", 1, *common, "dataset.num_workers=2", "num_train_steps=14"))
    assert "written by 2 processes, now 1" in r.stderr
    records = read_metrics(run)[0]
    assert [x["step"] for x in records] == list(range(5, 15))
    assert all(np.isfinite(x["loss"]) for x in records)
    by_step = {x["step"]: x["consumed_samples"] for x in records}
    steps = (4, 8, 12, 14)
    sets = {step: consumed(run, step) for step in steps}
    assert meta(run, 4)["consumed_samples"] == len(sets[4])
    for step in steps:
        positions = sets[step]
        assert step == 4 or by_step[step] == len(positions), step
        assert len(np.unique(positions)) == len(positions), step
        frontier = DataPosition.from_dict(meta(run, step)["data_position"]).for_layout(7, 1).frontier
        assert np.array_equal(positions[:frontier], np.arange(frontier)), step
    for a, b in zip(steps, steps[1:]):
        assert set(sets[a].tolist()) < set(sets[b].tolist())
    layouts = [(meta(run, s)["world_size"], meta(run, s)["strategy"]) for s in steps]
    assert layouts == [(2, "ddp"), (1, "fsdp2"), (2, "fsdp2"), (1, "ddp")]
