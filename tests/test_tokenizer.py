import numpy as np
import pytest
from conftest import BUNDLED_TRAIN, BUNDLED_VAL

from recipe.data import tokenizer as tok


@pytest.fixture(scope="module")
def esm_tokenizer(tmp_path_factory):
    from transformers import EsmTokenizer

    d = tmp_path_factory.mktemp("vocab")
    return EsmTokenizer(vocab_file=str(tok.write_vocab(d)))


def test_vocabulary_layout():
    assert len(tok.VOCAB) == 33
    assert tok.VOCAB[tok.CLS_ID] == "<cls>" and tok.VOCAB[tok.PAD_ID] == "<pad>" and tok.VOCAB[tok.EOS_ID] == "<eos>"
    assert tok.VOCAB[tok.UNK_ID] == "<unk>" and tok.VOCAB[tok.MASK_ID] == "<mask>"
    assert "".join(tok.VOCAB[4:24]) == "LAGVSERTIDPKQNFYMHWC"
    assert [tok.VOCAB[i] for i in tok.STANDARD_AA_IDS] == list("LAGVSERTIDPKQNFYMHWC")


@pytest.mark.parametrize("path", [BUNDLED_TRAIN, BUNDLED_VAL], ids=["train", "validation"])
def test_ids_equal_transformers_on_every_bundled_sequence(esm_tokenizer, path):
    import pyarrow.parquet as pq

    sequences = pq.read_table(path).column("sequence").to_pylist()
    assert len(sequences) > 1000
    ours = [tok.encode(s) for s in sequences]
    theirs = esm_tokenizer(sequences)["input_ids"]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a.tolist() != b]
    assert not mismatches, f"{len(mismatches)} sequences differ, first {sequences[mismatches[0]][:50]}"


def test_lower_case_and_unknown_letters(esm_tokenizer):
    assert tok.encode("mkta").tolist() == tok.encode("MKTA").tolist() == esm_tokenizer("MKTA")["input_ids"]
    ids = tok.encode("MJK*1")
    assert ids.tolist() == [0, 20, 3, 15, 3, 3, 2]  # one <unk> per unknown character, positions stay aligned
    assert tok.count_invalid("MJK*1") == 3 and tok.count_invalid("mkXBUZO") == 0
    assert esm_tokenizer("MJK")["input_ids"] == ids[:4].tolist() + [2]


def test_decode_round_trip():
    seq = "MKTAYIAKQRQISFVKSHFSRQXBUZO"
    assert tok.decode(tok.encode(seq)) == seq
    assert tok.encode_residues(seq).dtype == np.uint8
