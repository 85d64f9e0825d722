"""recipe.evaluate against a direct transformers computation on the same masked batches, its determinism, its
masking protocols and its bad-input messages (CPU, a tiny exported model)."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLED_VAL, run_cmd

from recipe import evaluate as ev
from recipe.data.sources import load_sequences
from recipe.data.tokenizer import MASK_ID
from recipe.model import EsmConfig, build_model
from recipe.model.convert import export_hf

ARGS = ["--limit", "24", "--max-length", "64", "--batch-tokens", "512", "--no-progress", "--json"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random ESM-2 in our Hugging Face export format."""
    config = EsmConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, backend="torch")
    model = build_model(config, seed=7)
    return export_hf(model.state_dict(), config, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """A tiny random ESM-2 as transformers' save_pretrained writes it (as the facebook/esm2_* directories hold it)."""
    from conftest import hf_config
    from transformers import EsmForMaskedLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "hf"
    EsmForMaskedLM(hf_config(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)).save_pretrained(out)
    return out


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = ev.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def scored(capsys, *argv) -> dict:
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def transformers_reference(model_dir, masking: str, seed: int) -> dict:
    """Loss, accuracy and counts from transformers' EsmForMaskedLM on the very batches recipe.evaluate builds,
    each packed batch unpacked into a padded one."""
    from transformers import EsmForMaskedLM

    hf = EsmForMaskedLM.from_pretrained(str(model_dir)).eval()
    store = ev.head(load_sequences(BUNDLED_VAL), 24)
    loss_sum, tokens, correct, sequences = 0.0, 0, 0, 0
    for batch in ev.eval_batches(store, ev.batch_settings(masking, 64, 512, seed)):
        lengths = batch["seq_lengths"].tolist()
        ids = torch.split(batch["input_ids"][: sum(lengths)], lengths)
        labels = torch.split(batch["labels"][: sum(lengths)], lengths)
        width = max(lengths)
        padded = torch.full((len(ids), width), 1)
        padded_labels = torch.full((len(ids), width), -100)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (i, lab) in enumerate(zip(ids, labels)):
            padded[row, : len(i)], padded_labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
        with torch.no_grad():
            logits = hf(input_ids=padded, attention_mask=mask).logits
        keep = padded_labels != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], padded_labels[keep], reduction="sum").item()
        tokens += int(keep.sum())
        correct += int((logits[keep].argmax(-1) == padded_labels[keep]).sum())
        sequences += len(lengths)
    return {"loss": loss_sum / tokens, "accuracy": correct / tokens, "tokens": tokens, "sequences": sequences}


@pytest.mark.parametrize("model, masking", [("exported", "esm"), ("exported", "all-mask"), ("saved_by_transformers", "esm")])
def test_agrees_with_transformers_on_the_same_masked_batches(request, capsys, model, masking):
    model_dir = request.getfixturevalue(model)
    got = scored(capsys, model_dir, BUNDLED_VAL, *ARGS, "--masking", masking, "--seed", 5)
    ref = transformers_reference(model_dir, masking, seed=5)
    assert got["sequences"] == ref["sequences"] == 24
    assert got["tokens"] == ref["tokens"] > 0
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(ref["loss"]), rel=1e-5)
    assert abs(got["accuracy"] - ref["accuracy"]) <= 1 / ref["tokens"]  # at most one near-tie argmax may differ


@pytest.mark.parametrize("masking, mask_share", [("esm", (0.7, 0.9)), ("all-mask", (1.0, 1.0))])
def test_masking_protocols(masking, mask_share):
    """15 % of residues are scored; all-mask shows every one of them as <mask>, esm about 80 %."""
    store = ev.head(load_sequences(BUNDLED_VAL), 200)
    scored_inputs, residues = [], 0
    for batch in ev.eval_batches(store, ev.batch_settings(masking, 1024, 16384, seed=0)):
        keep = batch["labels"] != -100
        scored_inputs.append(batch["input_ids"][keep])
        residues += int(batch["num_real_tokens"]) - 2 * len(batch["seq_lengths"])
    inputs = torch.cat(scored_inputs)
    assert 0.14 < len(inputs) / residues < 0.16
    share = float((inputs == MASK_ID).float().mean())
    assert mask_share[0] <= share <= mask_share[1]


def test_deterministic_for_seed(exported, capsys):
    a = scored(capsys, exported, BUNDLED_VAL, *ARGS, "--seed", 1)
    b = scored(capsys, exported, BUNDLED_VAL, *ARGS, "--seed", 1)
    c = scored(capsys, exported, BUNDLED_VAL, *ARGS, "--seed", 2)
    assert a == b
    assert c["loss"] != a["loss"] and c["tokens"] != a["tokens"]


def test_report_lines_and_json_last(exported, capsys):
    code, out, err = run_main(capsys, exported, BUNDLED_VAL, "--limit", "3", "--json")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        "model",
        "data",
        "masking",
        "loss",
        "perplexity",
        "accuracy",
        "tokens",
        "sequences",
    ]
    assert set(json.loads(lines[-1])) >= {"loss", "perplexity", "accuracy", "tokens", "sequences"}
    assert "evaluate" in err and "3/3" in err  # the progress bar goes to stderr


def bert_dir(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    return tmp_path / "bert"


def empty_fasta(tmp_path):
    (tmp_path / "empty.fasta").write_text("")
    return tmp_path / "empty.fasta"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing model", "no such model directory"),
        ("not a model", "neither a Hugging Face ESM-2 directory"),
        ("not ESM-2", "model_type is 'bert', expected 'esm'"),
        ("empty data", "empty file"),
        ("missing data", "no such file or directory"),
        ("batch too small", "--batch-tokens=64 must be"),
    ],
)
def test_bad_input_gets_one_line_and_status_2(exported, tmp_path, capsys, case, expected):
    model, data, extra = exported, BUNDLED_VAL, []
    if case == "missing model":
        model = tmp_path / "nowhere"
    elif case == "not a model":
        model = tmp_path
    elif case == "not ESM-2":
        model = bert_dir(tmp_path)
    elif case == "empty data":
        data = empty_fasta(tmp_path)
    elif case == "missing data":
        data = tmp_path / "nothing.fasta"
    else:
        extra = ["--batch-tokens", "64"]
    code, _, err = run_main(capsys, model, data, *extra)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("recipe.evaluate: error:") and expected in err, err


def test_command_line_bad_input_has_no_traceback(tmp_path):
    r = run_cmd([sys.executable, "-m", "recipe.evaluate", str(tmp_path / "nowhere"), str(BUNDLED_VAL)], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"recipe.evaluate: error: {tmp_path / 'nowhere'}: no such model directory"]
