"""Multi-GPU checks (pytest -m gpu -s, on a machine with 2 or 4 GPUs): context parallelism against none, CP training
with DP, exact CP resume, and FP8 recipe state in sync across data-parallel ranks. Numbers are printed (-s)."""

import shutil

import pytest
import torch
from conftest import compare_curves, losses, read_metrics, te_available, torchrun

pytestmark = pytest.mark.gpu


def needs_gpus(n: int):
    ok = torch.cuda.is_available() and torch.cuda.device_count() >= n and te_available()
    return pytest.mark.skipif(not ok, reason=f"{n} Hopper+ GPUs with TransformerEngine needed")


@needs_gpus(2)
@pytest.mark.parametrize("size", ["8M", "150M"])
def test_cp2_matches_cp1(size):
    r = torchrun("tests/multi_gpu/cp_parity.py", 2, size)
    print("\n  " + r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@needs_gpus(2)
@pytest.mark.parametrize("nproc, cp", [(2, 2), (4, 2), (4, 4)])
def test_l0_sanity_cp_trains(tmp_path, nproc, cp):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} GPUs needed")
    r = torchrun("train_cp.py", nproc, "--config-name", "L0_sanity_cp", f"cp_size={cp}", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-4000:]
    train, val = read_metrics(tmp_path)
    print(
        f"\n  L0_sanity_cp, {nproc} GPUs as dp {nproc // cp} x cp {cp}: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
        f"val loss {val[-1]['val_loss']:.3f}, {train[-1]['tokens_per_second_per_gpu']:.3g} tokens/s/GPU"
    )
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert (tmp_path / "final_model" / "config.json").exists()


@needs_gpus(2)
def test_cp_resume_is_exact(tmp_path):
    args = [
        "--config-name",
        "L0_sanity_cp",
        "num_train_steps=8",
        "checkpoint.save_every_n_steps=4",
        "validation.every_n_steps=0",
        "log_every_n_steps=1",
        "checkpoint.save_final_model=false",
        "dataset.num_workers=0",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = torchrun("train_cp.py", 2, *args, f"output_dir={full}")
    assert r.returncode == 0, r.stderr[-4000:]
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    r = torchrun("train_cp.py", 2, *args, f"output_dir={resumed}", "checkpoint.resume_from_checkpoint=true")
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = losses(full), losses(resumed)
    print(
        f"\n  CP resume at step 4: losses 5-8 uninterrupted {[a[s] for s in range(5, 9)]}, resumed {[b[s] for s in range(5, 9)]}"
    )
    assert b[5] == a[5]
    assert all(abs(b[s] - a[s]) < 1e-3 * a[s] for s in range(5, 9))


@needs_gpus(2)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "mfsdp"])
def test_fp8_recipe_state_identical_across_ranks(tmp_path, strategy):
    r = torchrun("tests/multi_gpu/fp8_sync.py", 2, strategy, str(tmp_path))
    print("\n  " + r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


MFSDP_ARGS = [
    "--config-name",
    "L0_sanity",
    "model.backend=te",
    "num_train_steps=40",
    "grad_acc_steps=2",
    "log_every_n_steps=1",
    "validation.every_n_steps=20",
    "checkpoint.save_every_n_steps=20",
    "dataset.num_workers=0",
]


@needs_gpus(2)
def test_mfsdp_matches_fsdp2_sharded_with_accumulation_and_resumes(tmp_path):
    """2 GPUs, 2 micro-batches per step: Megatron-FSDP (sharded, gradients finished on the last micro-batch) against
    FSDP2, same seed and data: step 1 within 5e-3, the mean per-step gap and validation within 1 %; then Megatron-FSDP
    resumed from its step-20 checkpoint repeats step 21 exactly and steps 22-40 within 1e-3; its export loads."""
    runs = {}
    for strategy in ("fsdp2", "mfsdp"):
        r = torchrun(f"train_{strategy}.py", 2, *MFSDP_ARGS, f"output_dir={tmp_path / strategy}")
        assert r.returncode == 0, f"{strategy} failed:\n" + r.stderr[-4000:]
        runs[strategy] = read_metrics(tmp_path / strategy)
    a, b = losses(tmp_path / "mfsdp"), losses(tmp_path / "fsdp2")
    gap, shown = compare_curves(a, b, ("mfsdp", "fsdp2"))
    val = {s: runs[s][1][-1]["val_loss"] for s in runs}
    print(f"\n  mfsdp vs fsdp2, 2 GPUs, grad_acc_steps=2: {shown}; final val loss {val['mfsdp']:.4f} vs {val['fsdp2']:.4f}")
    assert abs(a[1] - b[1]) <= 5e-3 * b[1], f"step 1 differs (initial weights, data or gradient scaling): {shown}"
    # Per-step losses are of different batches and the two keep different weight precisions under BF16 compute
    # (FSDP2: BF16 working copies; Megatron-FSDP: FP32 under autocast), so single steps wander apart by a few percent
    # (2.8 % once on two H100s) while the curves agree: hold the mean gap and the validation loss to 1 %.
    mean_gap = sum(abs(a[s] - b[s]) / b[s] for s in a) / len(a)
    assert gap <= 5e-2 and mean_gap <= 1e-2, f"mean gap {mean_gap:.2e}; {shown}"
    assert abs(val["mfsdp"] - val["fsdp2"]) <= 1e-2 * val["fsdp2"], f"{shown}; val {val}"
    assert (tmp_path / "mfsdp" / "final_model" / "config.json").exists()

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "mfsdp" / "checkpoints" / "step_20", resumed / "checkpoints" / "step_20")
    r = torchrun("train_mfsdp.py", 2, *MFSDP_ARGS, f"output_dir={resumed}", "checkpoint.resume_from_checkpoint=true")
    assert r.returncode == 0, r.stderr[-4000:]
    c = losses(resumed)
    print(f"  mfsdp resume at step 20 on 2 GPUs: steps 21-23 {[a[s] for s in (21, 22, 23)]} vs {[c[s] for s in (21, 22, 23)]}")
    assert sorted(c) == list(range(21, 41)), f"resumed run logged steps {sorted(c)}"
    assert c[21] == a[21], f"step 21: {a[21]!r} uninterrupted vs {c[21]!r} resumed"
    worst = max(abs(c[s] - a[s]) / a[s] for s in c)
    assert worst <= 1e-3, {s: (a[s], c[s]) for s in c if abs(c[s] - a[s]) > 1e-3 * a[s]}


@needs_gpus(2)
def test_fsdp2_reduce_every_micro_batch_keeps_only_gradient_shards(tmp_path):
    """650M on 2 GPUs, 4 micro-batches per step, FSDP2 with fsdp.reduce_every_micro_batch true (the default) and false:
    the same step-1 loss, the next steps within 1e-3, and the default's peak at least half of the whole-minus-shard
    FP32 gradients (650M x 4 bytes / 2) below the old way's, which keeps whole FP32 gradients between micro-batches."""
    args = [
        "--config-name",
        "L0_sanity",
        "model.size=650M",
        "model.backend=te",
        "num_train_steps=3",
        "grad_acc_steps=4",
        "log_every_n_steps=1",
        "validation.every_n_steps=0",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_checkpoint=false",
        "checkpoint.save_final_model=false",
        "dataset.num_workers=0",
    ]
    runs = {}
    for every in ("true", "false"):
        out = tmp_path / every
        r = torchrun("train_fsdp2.py", 2, *args, f"fsdp.reduce_every_micro_batch={every}", f"output_dir={out}")
        assert r.returncode == 0, f"reduce_every_micro_batch={every} failed:\n" + r.stderr[-4000:]
        runs[every] = (losses(out), read_metrics(out)[0][-1])
    (a, last_a), (b, last_b) = runs["true"], runs["false"]
    peak_a, peak_b = last_a["max_memory_gb"], last_b["max_memory_gb"]
    print(
        f"\n  650M FSDP2, 2 GPUs, 4 micro-batches: reduce every micro-batch {peak_a:.2f} GB peak, "
        f"{last_a['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU, losses {[a[s] for s in sorted(a)]}; "
        f"at the last only {peak_b:.2f} GB, {last_b['tokens_per_second_per_gpu']:,.0f}, {[b[s] for s in sorted(b)]}"
    )
    assert a[1] == b[1], f"step 1: {a[1]!r} vs {b[1]!r}"
    assert all(abs(a[s] - b[s]) <= 1e-3 * b[s] for s in (2, 3)), (a, b)
    assert peak_b - peak_a >= 0.5 * 0.65 * 4 / 2, f"peak {peak_a:.2f} GB (every micro-batch) vs {peak_b:.2f} GB"
