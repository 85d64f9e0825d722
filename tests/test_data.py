"""Sources (formats and bad input), MLM masking, packing, and the prepare command."""

import gzip
import json
import lzma
import sys

import numpy as np
import pytest
from conftest import BUNDLED_TRAIN, run_cmd

from recipe.data import mlm
from recipe.data.dataset import BatchSettings, MLMBatches, make_samples
from recipe.data.packing import Sample, collate_bshd, collate_thd, padding_waste
from recipe.data.prepare import prepare, record_id
from recipe.data.sources import DataError, load_sequences
from recipe.data.tokenizer import CLS_ID, EOS_ID, MASK_ID, PAD_ID, STANDARD_AA_IDS, encode

FASTA = ">sp|P1|A one\nMKTAY\nIAKQR\n>tr|P2|B two\nmkla\n>P3 empty\n\n>P4\nMJKL*\n"


def write(path, text, opener=open):
    with opener(path, "wt") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("suffix, opener", [(".fasta", open), (".fasta.gz", gzip.open), (".fa.xz", lzma.open)])
def test_fasta_variants(tmp_path, suffix, opener, caplog):
    store = load_sequences(write(tmp_path / f"x{suffix}", FASTA, opener))
    assert len(store) == 3 and store.skipped_empty == 1 and store.invalid_chars == 2
    assert store.residues(0).tolist() == encode("MKTAYIAKQR")[1:-1].tolist()
    assert store.residues(1).tolist() == encode("MKLA")[1:-1].tolist()
    assert "1 empty skipped, 2 characters mapped to <unk>" in caplog.text


def test_parquet_csv_and_hf_dataset_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    seqs = ["MKTAYIAKQR", "", "MKLA", None, "ACDE"]
    pq.write_table(pa.table({"sequence": seqs, "ur50_id": ["a", "b", "a", "c", "d"]}), tmp_path / "x.parquet")
    (tmp_path / "x.csv").write_text("id,sequence\n1,MKTAYIAKQR\n2,\n3,MKLA\n4,\n5,ACDE\n")
    datasets.Dataset.from_dict({"sequence": seqs}).save_to_disk(str(tmp_path / "hf"))
    stores = [load_sequences(tmp_path / "x.parquet"), load_sequences(tmp_path / "x.csv"), load_sequences(tmp_path / "hf")]
    for s in stores:
        assert len(s) == 3 and s.skipped_empty == 2
        assert [s.residues(i).tolist() for i in range(3)] == [encode(x)[1:-1].tolist() for x in ("MKTAYIAKQR", "MKLA", "ACDE")]
    assert stores[0].clusters["ur50_id"].tolist() == [0, 0, 1]  # a, a, d (the b and c rows were empty)


def test_bundled_data_loads():
    store = load_sequences(BUNDLED_TRAIN)
    assert len(store) > 18000 and store.invalid_chars == 0 and store.skipped_empty == 0


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.fasta", None, r"missing.fasta: no such file"),
        ("empty.fasta", "", r"empty.fasta: empty file"),
        ("bad.fasta", "MKTA\n>x\nMK\n", r"bad.fasta:1: malformed FASTA: sequence data before"),
        ("blank.fasta", ">a\n\n>b\n", r"blank.fasta: no sequences"),
        ("nosuffix.txt", ">a\nMK\n", r"nosuffix.txt: cannot tell the format"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_sequences(path)


def test_parquet_without_sequence_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"seq": ["MK"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: no 'sequence' column \(columns: \['seq'\]\)"):
        load_sequences(tmp_path / "x.parquet")


# ------------------------------------------------------------------------------------------- masking
def test_masking_statistics_and_specials():
    tokens = np.concatenate([encode("MKTAYIAKQRQISFVKSHFSRQ" * 20) for _ in range(500)])
    n_per = len(tokens) // 500
    keys = np.repeat(mlm.sample_keys(7, 0, np.arange(500), 0), n_per)
    positions = np.tile(np.arange(n_per), 500)
    inputs, labels = mlm.mask_tokens(tokens, keys, positions)
    special = np.isin(tokens, [CLS_ID, EOS_ID, PAD_ID])
    selected = labels != -100
    assert not selected[special].any() and (inputs[special] == tokens[special]).all()
    assert (labels[selected] == tokens[selected]).all()
    rate = selected[~special].mean()
    assert abs(rate - 0.15) < 0.005
    masked = (inputs == MASK_ID)[selected].mean()
    random = ((inputs != MASK_ID) & (inputs != tokens))[selected].mean()
    kept = (inputs == tokens)[selected].mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept + random - 0.2) < 0.01
    # a random replacement equal to the original counts as kept: 10 % random x 19/20 actually change
    assert abs(random - 0.1 * 19 / 20) < 0.01
    assert np.isin(inputs[selected & (inputs != MASK_ID)], STANDARD_AA_IDS).all()
    assert (inputs[~selected] == tokens[~selected]).all()


def test_masking_is_a_function_of_seed_epoch_and_sample():
    s = BatchSettings(max_seq_length=64)
    store = load_sequences(BUNDLED_TRAIN)
    rows = np.array([5, 17, 99])
    a = make_samples(store, rows, s, epoch=1, random_crop=True)
    b = make_samples(store, rows[::-1], s, epoch=1, random_crop=True)[::-1]  # other order, other batch mates
    c = make_samples(store, rows, s, epoch=2, random_crop=True)
    for x, y in zip(a, b):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
    assert any(not np.array_equal(x.labels, z.labels) for x, z in zip(a, c))


def test_crop_random_in_training_fixed_in_validation():
    store = load_sequences(BUNDLED_TRAIN)
    long_rows = np.flatnonzero(store.lengths > 1000)[:20]
    s = BatchSettings(max_seq_length=100)
    train = make_samples(store, long_rows, s, epoch=0, random_crop=True)
    val = make_samples(store, long_rows, s, epoch=0, random_crop=False)
    assert all(len(x.input_ids) == 100 and x.input_ids[0] == CLS_ID and x.input_ids[-1] == EOS_ID for x in train + val)
    starts = set()
    for row, x in zip(long_rows, train):
        res = store.residues(int(row))
        original = np.where(x.labels[1:-1] != -100, x.labels[1:-1], x.input_ids[1:-1])
        starts.add(next(i for i in range(len(res) - 97) if np.array_equal(res[i : i + 98], original)))
    assert len(starts) > 10  # windows start at many places
    for row, x in zip(long_rows, val):
        original = np.where(x.labels[1:-1] != -100, x.labels[1:-1], x.input_ids[1:-1])
        assert np.array_equal(store.residues(int(row))[:98], original)


# ------------------------------------------------------------------------------------------- packing
def _samples(lengths):
    return [Sample(i, encode("A" * (n - 2)), np.full(n, -100)) for i, n in enumerate(lengths)]


def test_collate_thd_layout():
    b = collate_thd(_samples([5, 7, 3]), pad_to_multiple_of=16)
    assert b["input_ids"].shape == (16,) and b["cu_seqlens"].tolist() == [0, 5, 12, 15, 16]
    assert b["cu_seqlens"].dtype.is_floating_point is False and str(b["cu_seqlens"].dtype) == "torch.int32"
    assert b["max_seqlen"] == 7 and b["num_real_tokens"] == 15
    assert "position_ids" not in b  # the model derives positions from cu_seqlens
    assert b["input_ids"][15] == PAD_ID and b["labels"][15] == -100
    fixed = collate_thd(_samples([5, 7]), pad_to=32)
    assert fixed["input_ids"].shape == (32,) and fixed["cu_seqlens"].tolist() == [0, 5, 12, 32]
    exact = collate_thd(_samples([8, 8]), pad_to_multiple_of=16)
    assert exact["cu_seqlens"].tolist() == [0, 8, 16]


def test_collate_bshd():
    b = collate_bshd(_samples([5, 9]))
    assert b["input_ids"].shape == (2, 16) and b["attention_mask"].sum().item() == 14
    assert b["input_ids"][0, 5:].eq(PAD_ID).all()


@pytest.mark.parametrize("budget, max_len, fixed", [(2048, 512, False), (4096, 1024, False), (1024, 1024, True)])
def test_packing_never_splits_drops_or_overflows(budget, max_len, fixed, capsys):
    store = load_sequences(BUNDLED_TRAIN)
    ds = MLMBatches(store, BatchSettings(max_seq_length=max_len, token_micro_batch_size=budget, pad_to_fixed=fixed), train=False)
    batches = list(ds)
    seen = np.concatenate([b["sample_index"].numpy() for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(len(store)))  # each sequence exactly once
    for b in batches:
        assert b["input_ids"].numel() <= budget and b["input_ids"].numel() % 16 == 0
        assert b["num_real_tokens"] <= budget
        lengths = b["seq_lengths"].numpy()
        want = np.minimum(store.lengths[b["sample_index"].numpy()], max_len - 2) + 2
        assert np.array_equal(lengths, want)  # whole (cropped) sequences, never split
        ids = b["input_ids"].numpy()
        cu = b["cu_seqlens"].numpy()
        assert (ids[cu[:-1][: len(lengths)]] == CLS_ID).all() and (ids[cu[1 : len(lengths) + 1] - 1] == EOS_ID).all()
    with capsys.disabled():
        print(
            f"\n  padding waste budget={budget} max_len={max_len} fixed={fixed}: "
            f"{padding_waste(batches):.2%} over {len(batches)} batches"
        )


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_splits_deterministically(tmp_path):
    src, shuffled = tmp_path / "in.fasta.gz", tmp_path / "shuffled.fasta"
    recs = [f">sp|P{i:05d}|N{i} desc\n{'MKTAYIAK'[: 1 + i % 8]}\n" for i in range(3000)]
    write(src, "".join(recs) + ">tr|E|empty\n\n", gzip.open)
    shuffled.write_text("".join(recs[::-1]))
    s1 = prepare(src, tmp_path / "a", val_fraction=0.1, seed=3, progress=False)
    s2 = prepare(shuffled, tmp_path / "b", val_fraction=0.1, seed=3, progress=False)
    assert s1["train"] + s1["validation"] == 3000 and s1["empty_skipped"] == 1
    assert 200 < s1["validation"] < 400 and s1["validation"] == s2["validation"]
    a = load_sequences(tmp_path / "a" / "validation")
    b = load_sequences(tmp_path / "b" / "validation")
    assert sorted(map(bytes, (a.residues(i) for i in range(len(a))))) == sorted(
        map(bytes, (b.residues(i) for i in range(len(b))))
    )
    assert json.loads((tmp_path / "a" / "prepare_stats.json").read_text())["records"] == 3001
    assert record_id("UniRef50_Q6GZX4 Putative n=2 Tax=x") == "UniRef50_Q6GZX4" and record_id("sp|P1|X y") == "P1"


def test_prepare_cli_errors(tmp_path):
    r = run_cmd([sys.executable, "-m", "recipe.data.prepare", str(tmp_path / "nope.fasta"), str(tmp_path / "o")])
    assert r.returncode == 2 and "nope.fasta: no such file" in r.stderr
