"""End-to-end training on CPU: L0_sanity, DDP vs FSDP2 with 2 gloo processes, exact resume, torn checkpoints,
preemption, non-finite stops, and config errors."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, losses, read_metrics, torchrun

pytestmark = pytest.mark.slow


def resume_two_process_run(run):
    """The 8-step, 2-process DDP run of these tests, resumed in `run` (checkpoints every 4 steps)."""
    return torchrun(
        "train_ddp.py",
        2,
        *TINY,
        "dataset.num_workers=2",
        "num_train_steps=8",
        "checkpoint.save_every_n_steps=4",
        "checkpoint.resume_from_checkpoint=true",
        f"output_dir={run}",
    )


def check(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """8 steps on 2 gloo processes with each strategy, checkpoints every 4 (FSDP2's written asynchronously)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for strategy, extra in (("ddp", []), ("fsdp2", ["checkpoint.async_save=true", "dataset.num_workers=2"])):
        out = root / strategy
        check(
            torchrun(
                f"train_{strategy}.py",
                2,
                *TINY,
                "num_train_steps=8",
                "checkpoint.save_every_n_steps=4",
                *(extra if strategy == "fsdp2" else ["dataset.num_workers=2"]),
                f"output_dir={out}",
            )
        )
        runs[strategy] = out
    return runs


def test_ddp_and_fsdp2_give_the_same_losses(two_process_runs):
    ddp, fsdp = losses(two_process_runs["ddp"]), losses(two_process_runs["fsdp2"])
    assert sorted(ddp) == list(range(1, 9))
    for step in ddp:
        assert ddp[step] == pytest.approx(fsdp[step], rel=1e-6, abs=1e-6), step
    assert ddp[8] < ddp[1]


def resume_copy(src, dst, step, *extra_files):
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")
    return dst


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_is_bitwise_identical(two_process_runs, tmp_path, strategy):
    """A run of 8 steps, and a run resumed from its step-4 checkpoint for the last 4: identical losses at every step."""
    full = two_process_runs[strategy]
    resumed = resume_copy(full, tmp_path / "resumed", 4)
    workers = ["dataset.num_workers=2"]
    extra = ["checkpoint.async_save=true"] if strategy == "fsdp2" else []
    check(
        torchrun(
            f"train_{strategy}.py",
            2,
            *TINY,
            *workers,
            *extra,
            "num_train_steps=8",
            "checkpoint.save_every_n_steps=4",
            "checkpoint.resume_from_checkpoint=true",
            f"output_dir={resumed}",
        )
    )
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    assert all(a[s] == b[s] for s in b), (a, b)


def test_torn_checkpoint_is_ignored(two_process_runs, tmp_path):
    """A save cut off half way (no COMPLETE marker, still in its temporary directory) is skipped on resume."""
    full = two_process_runs["ddp"]
    run = resume_copy(full, tmp_path / "torn", 4)
    torn = run / "checkpoints" / ".tmp_step_8"
    shutil.copytree(full / "checkpoints" / "step_8", torn)
    (torn / "COMPLETE").unlink()
    for shard in (torn / "dcp").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    r = check(resume_two_process_run(run))
    assert "resumed from" in r.stderr and "step_4 at step 4" in r.stderr
    assert losses(run)[8] == losses(full)[8]


def test_resume_with_changed_model_shape_fails_clearly(two_process_runs, tmp_path):
    run = resume_copy(two_process_runs["ddp"], tmp_path / "shape", 4)
    r = torchrun(
        "train_ddp.py",
        1,
        *TINY,
        "num_train_steps=8",
        "model.num_layers=3",
        "checkpoint.resume_from_checkpoint=true",
        f"output_dir={run}",
    )
    assert r.returncode != 0
    assert "cannot resume from" in r.stderr and "model_shape" in r.stderr


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    args = [
        *TINY,
        "num_train_steps=40",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_checkpoint=false",
        "dataset.num_workers=0",
    ]
    reference = tmp_path / "reference"
    check(torchrun("train_fsdp2.py", 1, *args, f"output_dir={reference}"))
    run = tmp_path / "preempted"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "train_fsdp2.py", *args, f"output_dir={run}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preemption signal: checkpoint saved at step" in err
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists()
    stopped_at = int(saved[0].name.split("_")[1])
    assert 3 <= stopped_at < 40
    check(torchrun("train_fsdp2.py", 1, *args, "checkpoint.resume_from_checkpoint=true", f"output_dir={run}"))
    assert losses(run) == losses(reference)


def test_non_finite_loss_stops_before_writing(tmp_path):
    r = torchrun(
        "train_ddp.py",
        1,
        *TINY,
        "num_train_steps=30",
        "optimizer.lr=1e12",
        "max_grad_norm=null",
        "lr_scheduler.warmup_steps=0",
        "checkpoint.save_every_n_steps=1",
        f"output_dir={tmp_path}",
    )
    assert r.returncode != 0
    found = re.search(r"NonFiniteError: non-finite (loss|gradient norm) at step (\d+)", r.stderr)
    assert found, r.stderr[-3000:]
    step = int(found.group(2))
    assert step > 1
    assert max(losses(tmp_path)) == step - 1  # nothing logged for the bad step
    assert max(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")) == step - 1


def test_l0_sanity_from_the_readme_command(tmp_path):
    """The README's command, on this CPU: loss falls, validation runs, final_model loads in transformers."""
    out = tmp_path / "l0"
    start = time.time()
    r = check(torchrun("train_fsdp2.py", 1, "--config-name", "L0_sanity", f"output_dir={out}"))
    elapsed = time.time() - start
    assert f"output_dir: {out}" in r.stdout
    train, val = read_metrics(out)
    assert {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second_per_gpu",
        "tflops_per_gpu",
        "mfu",
        "max_memory_gb",
        "consumed_tokens",
    } <= set(train[0])
    assert {"step", "val_loss", "val_perplexity", "val_accuracy"} <= set(val[0])
    assert len(val) == 2 and val[0]["val_tokens"] == val[1]["val_tokens"] > 0  # two full, identical passes
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    # the last three logged losses against the first (step 10); the drop is about 0.3 and moves by a few hundredths
    # with the data order (seed), so the margin sits below that noise
    assert sum(x["loss"] for x in train[-3:]) / 3 < train[0]["loss"] - 0.25
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(out / "final_model")
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    logits = model(**tok(["MKTAYIAKQRQISFVKSHFSRQ"], return_tensors="pt")).logits
    assert logits.shape == (1, 24, 33)
    # the trained export (its <pad> row moved by training) against our model on transformers' integration input,
    # which attends to <pad>
    import torch

    from recipe.model import build_model
    from recipe.model.convert import config_from_hf, load_hf_into

    ours = build_model(config_from_hf(out / "final_model", backend="torch")).eval()
    load_hf_into(ours, out / "final_model")
    assert ours.embed_tokens.weight[1].abs().max() > 0
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (ours(ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4
    print(
        f"\n  L0_sanity on this CPU: {elapsed:.0f} s, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
        f"val loss {val[-1]['val_loss']:.3f}"
    )


def test_continued_pretraining_from_a_hugging_face_directory(tmp_path):
    """model.init_from loads a facebook-layout directory (as save_pretrained writes it); with lr=0 the exported
    final model carries exactly the imported weights."""
    import torch
    from conftest import hf_config
    from safetensors.torch import load_file
    from transformers import EsmForMaskedLM

    torch.manual_seed(0)
    EsmForMaskedLM(hf_config(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256)).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    r = check(
        torchrun(
            "train_ddp.py",
            1,
            *TINY[1:],
            "num_train_steps=2",
            "optimizer.lr=0",
            "checkpoint.save_final_model=true",
            f"model.init_from={tmp_path / 'hf'}",
            f"output_dir={out}",
        )
    )
    assert "skipped 2 tensors we do not use" in r.stderr and "initialised from" in r.stderr
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "final_model" / "model.safetensors")
    rename = {".gamma": ".weight", ".beta": ".bias"}
    before = {next((k[: -len(a)] + b for a, b in rename.items() if k.endswith(a)), k): v for k, v in before.items()}
    shared = [k for k in after if k in before and "contact_head" not in k and "inv_freq" not in k]
    assert len(shared) == len(after) - 3
    assert all(torch.equal(before[k], after[k]) for k in shared)


# ====================================================================================== stops that must be clean
STOP_ARGS = [*TINY, "num_train_steps=400", "checkpoint.save_every_n_steps=0", "checkpoint.save_final_checkpoint=false"]


def stop_run(out, launcher, sig, target):
    """Start a run (2 gloo processes under `launcher`, or one plain process), send `sig` to the launcher or to its
    whole process group once a step is logged, and return (exit status, stderr)."""
    cmd = (
        [sys.executable, "train_ddp.py"]
        if launcher is None
        else [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2", "train_ddp.py"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    log = out.parent / f"{out.name}.stderr"  # a file, not a pipe: nothing blocks on a full buffer while we wait
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*cmd, *STOP_ARGS, f"output_dir={out}"],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        metrics, deadline = out / "metrics.jsonl", time.time() + 180
        while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.05)
        (os.killpg if target == "group" else os.kill)(proc.pid, sig)
        proc.wait(timeout=180)
    return proc.returncode, log.read_text()


@pytest.mark.parametrize(
    "launcher, sig, target, resume",
    [
        ("recipe.launch", signal.SIGTERM, "launcher", True),  # Kubernetes, docker stop, a scheduler
        ("recipe.launch", signal.SIGTERM, "group", False),  # a scheduler signalling every process of the job
        ("recipe.launch", signal.SIGINT, "launcher", True),  # Ctrl-C
        ("torch.distributed.run", signal.SIGTERM, "launcher", True),  # stock torchrun: it signals the trainers' groups,
        # loader workers included; checkpoint, but its own status is 1 (see recipe/launch.py)
        (None, signal.SIGINT, "group", False),  # Ctrl-C in a terminal to `python train_ddp.py`: loader workers get it too
    ],
    ids=["launch-sigterm", "launch-sigterm-group", "launch-sigint", "torchrun-sigterm", "python-sigint-group"],
)
def test_stop_signal_ends_in_a_checkpoint_that_resumes(tmp_path, launcher, sig, target, resume):
    """With loader workers on (dataset.num_workers=1, the default): a checkpoint at the step boundary after the
    signal, on every rank, exit 0, and a resumed run carries on from it. (These runs once crashed with 'DataLoader
    worker killed by signal: Terminated', or a KeyboardInterrupt traceback, and no checkpoint.)"""
    out = tmp_path / "run"
    rc, err = stop_run(out, launcher, sig, target)
    if launcher != "torch.distributed.run":  # torchrun raises SignalException after its trainers stopped (recipe/launch.py)
        assert rc == 0, err[-3000:]
    assert err.count("preemption signal: checkpoint saved at step") == (1 if launcher is None else 2), err[-3000:]
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists(), err[-3000:]
    stopped = int(saved[0].name.split("_")[1])
    assert 1 <= stopped < 400 and max(losses(out)) == stopped  # the step boundary the metrics last logged
    if not resume:  # the resume path is the same for every stop; tested where it is cheapest to vary nothing else
        return
    nproc = 1 if launcher is None else 2
    r = check(
        torchrun(
            "train_ddp.py",
            nproc,
            *STOP_ARGS[:-3],
            f"num_train_steps={stopped + 2}",
            "checkpoint.save_final_checkpoint=false",
            "checkpoint.resume_from_checkpoint=true",
            f"output_dir={out}",
        )
    )
    assert f"at step {stopped}" in r.stderr and sorted(losses(out)) == list(range(1, stopped + 3))


# ====================================================================================== after the last step
def test_validation_failure_after_the_last_step_keeps_checkpoint_and_export(tmp_path):
    """A validation split with no maskable residue: once it lost the whole run (validation came first) with the
    message 'yielded no batches'. Now the final checkpoint and export are written first and the error says why."""
    val = tmp_path / "val.fasta"
    val.write_text(">a\n****\n>b\n**\n")
    out = tmp_path / "run"
    r = torchrun(
        "train_ddp.py",
        1,
        *TINY,
        "num_train_steps=2",
        "checkpoint.save_final_model=true",
        f"dataset.val_path={val}",
        f"output_dir={out}",
    )
    assert r.returncode != 0
    why = rf"validation on {val} gave no masked token to score: its 1 micro-batch\(es\) hold no masked residue"
    assert re.search(why, r.stderr), r.stderr[-3000:]
    assert (out / "checkpoints" / "step_2" / "COMPLETE").exists() and (out / "final_model" / "model.safetensors").exists()


def test_resuming_a_finished_run(tmp_path):
    """Resumed at its last step, a finished run trains nothing and logs no second validation record; resumed with
    num_train_steps below the checkpoint's step, it is refused, naming the key (it once did nothing, silently)."""
    out = tmp_path / "run"
    check(torchrun("train_ddp.py", 1, *TINY, "num_train_steps=3", f"output_dir={out}"))
    before = (out / "metrics.jsonl").read_text()
    resume = ["checkpoint.resume_from_checkpoint=true", f"output_dir={out}"]
    r = check(torchrun("train_ddp.py", 1, *TINY, "num_train_steps=3", *resume))
    assert "nothing left to train" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before and len(read_metrics(out)[1]) == 1
    r = torchrun("train_ddp.py", 1, *TINY, "num_train_steps=2", *resume)
    assert r.returncode != 0 and "num_train_steps=2 is below the step of the checkpoint to resume" in r.stderr


def test_logs_and_exports_say_what_ran(tmp_path):
    """Two processes on CPU: the exported plan says fp32 (what a CPU run computes in), hydra's log file holds the
    rank-0 INFO lines once (the console too), and a resumed run continues train_seconds from its checkpoint."""
    import json

    out = tmp_path / "run"
    args = [*TINY, "num_train_steps=4", "checkpoint.save_every_n_steps=2", "dataset.num_workers=0"]
    r = check(torchrun("train_ddp.py", 2, *args, "checkpoint.save_final_model=true", f"output_dir={out}"))
    exported = json.loads((out / "final_model" / "config.json").read_text())["recipe"]["layer_precision"]
    assert exported["layers"] == ["fp32"] * 4
    assert r.stderr.count("layer precision: layers 1-4: fp32") == 1  # rank 0 only
    log_file = (out / "train.log").read_text()
    assert log_file.count("layer precision: layers 1-4: fp32") == 1 and "model: ESM-2 tiny" in log_file
    saved = json.loads((out / "checkpoints" / "step_2" / "meta.json").read_text())["train_seconds"]
    assert saved >= {x["step"]: x["train_seconds"] for x in read_metrics(out)[0]}[2] > 0
    resumed = resume_copy(out, tmp_path / "resumed", 2)
    check(torchrun("train_ddp.py", 2, *args, "checkpoint.resume_from_checkpoint=true", f"output_dir={resumed}"))
    seconds = {x["step"]: x["train_seconds"] for x in read_metrics(resumed)[0]}
    assert sorted(seconds) == [3, 4] and saved < seconds[3] < seconds[4]


def test_corrupt_newest_checkpoint_resumes_the_older_one(two_process_runs, tmp_path):
    """64 bytes flipped in the newest checkpoint's shard: the resume names the file, falls back to step 4, and
    continues exactly as the uninterrupted run did."""
    full = two_process_runs["ddp"]
    run = resume_copy(full, tmp_path / "corrupt", 4)
    shutil.copytree(full / "checkpoints" / "step_8", run / "checkpoints" / "step_8")
    shard = run / "checkpoints" / "step_8" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[2000:2064] = bytes(b ^ 0xFF for b in data[2000:2064])
    shard.write_bytes(bytes(data))
    r = check(resume_two_process_run(run))
    assert f"{shard}: contents differ from the manifest's digest" in r.stderr
    assert "RESUMING FROM AN OLDER CHECKPOINT" in r.stderr and "step_4 at step 4" in r.stderr
    assert losses(run)[8] == losses(full)[8]
    assert (run / "checkpoints" / "step_4").exists() and list((run / "checkpoints").glob("corrupt_step_8_*"))


def test_a_fresh_run_never_clobbers_another_runs_directory(tmp_path):
    """A second fresh run into a used output_dir is refused and changes nothing; with overwrite_output_dir=true it
    replaces the old run, and a later resume loads the new run's checkpoint, not the old run's higher step."""
    out, args = tmp_path / "run", [*TINY, "dataset.num_workers=0", "checkpoint.save_every_n_steps=2"]
    check(torchrun("train_ddp.py", 1, *args, "num_train_steps=4", f"output_dir={out}"))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix not in (".log", ".lock")}
    assert not (out / ".hydra").exists()
    r = torchrun("train_ddp.py", 1, *args, "num_train_steps=4", "seed=1", f"output_dir={out}")
    assert r.returncode != 0 and f"output_dir={out} holds another run's outputs" in r.stderr
    assert {p: p.read_bytes() for p in before} == before
    check(torchrun("train_ddp.py", 1, *args, "num_train_steps=2", "seed=1", "overwrite_output_dir=true", f"output_dir={out}"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2"]
    r = check(
        torchrun(
            "train_ddp.py", 1, *args, "num_train_steps=3", "seed=1", "checkpoint.resume_from_checkpoint=true", f"output_dir={out}"
        )
    )
    assert "step_2 at step 2" in r.stderr and sorted(losses(out)) == [1, 2, 3]


def test_multirun_jobs_get_their_own_directories(tmp_path):
    out = tmp_path / "sweep"
    check(torchrun("train_ddp.py", 1, "-m", *TINY, "dataset.num_workers=0", "num_train_steps=2", "seed=1,2", f"output_dir={out}"))
    jobs = [out / "multirun" / str(n) for n in (0, 1)]
    assert all((job / "checkpoints" / "step_2" / "COMPLETE").exists() for job in jobs)
    assert losses(jobs[0]) != losses(jobs[1])
    assert not (out / "metrics.jsonl").exists()


def test_a_second_run_in_a_running_runs_directory_is_refused(tmp_path):
    args = [*TINY, "num_train_steps=100000", "checkpoint.save_every_n_steps=0", "dataset.num_workers=0", f"output_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    first = subprocess.Popen(
        [sys.executable, "train_ddp.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.05)
        second = torchrun("train_ddp.py", 1, *args, "checkpoint.resume_from_checkpoint=true")
        assert second.returncode != 0
        assert f"{tmp_path} is in use by another run (pid {first.pid} on host" in second.stderr, second.stderr[-3000:]
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert "preemption signal: checkpoint saved" in err
