"""The benchmark harness's own logic on CPU: gradient accumulation, out-of-memory fallbacks, the docs section."""

import pytest
import torch

from bench.throughput import attempts, per_size, step_fn, write_docs
from recipe.model import EsmConfig, build_model


class CountingOptimizer:
    def __init__(self, model):
        self.model, self.steps = model, 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_step_fn_accumulates_then_steps():
    model = build_model(EsmConfig.from_size("tiny", backend="torch"), seed=0)
    opt = CountingOptimizer(model)
    ids = torch.randint(4, 24, (30,))
    batch = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 12, 30], dtype=torch.int32), "max_seqlen": 18, "labels": ids}
    step = step_fn(model, "torch", opt, accum=3)
    for calls in range(1, 7):
        step(batch)
        assert opt.steps == calls // 3
        grads_kept = model.embed_tokens.weight.grad is not None
        assert grads_kept == (calls % 3 != 0), "gradients accumulate between optimizer steps and are cleared after"


def test_out_of_memory_fallbacks():
    assert attempts(32768, 4) == [(32768, 4), (32768, 1), (16384, 1)]
    assert attempts(8192, 1) == [(8192, 1), (4096, 1)]


def test_accumulation_per_size():
    assert per_size(["4", "3B=1"], ["8M", "3B"]) == {"8M": 4, "3B": 1}
    assert per_size(["2"], ["650M"]) == {"650M": 2}


def test_docs_section_is_replaced_in_place(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# intro\n\nkept\n")
    write_docs(doc, "GPU A", "table 1\n")
    write_docs(doc, "GPU B", "table B\n")
    write_docs(doc, "GPU A", "table 2\n")
    text = doc.read_text()
    assert text.startswith("# intro\n\nkept\n")
    assert "table 1" not in text and text.count("table 2") == 1 and text.count("table B") == 1
    assert text.index("table 2") < text.index("table B"), "a re-run keeps its section where it was"


@pytest.mark.parametrize("nproc", [1, 2])
def test_vs_reference_measures_the_trainer_itself(tmp_path, nproc):
    """The side-by-side command runs train_fsdp2.py as users do (with --nproc, under torchrun) and reads the rate
    per GPU from the trainer's own metrics."""
    from bench.vs_reference import Row, ours_command, ours_result
    from tests.conftest import BUNDLED_TRAIN, TINY, read_metrics, run_cmd

    row = Row("tiny", "L0_sanity", "unused", tokens=1024, warmup=2, timed=3, their_workers=1)
    cmd = ours_command(row, BUNDLED_TRAIN, tmp_path / "run", [*TINY, "device=cpu", "log_every_n_steps=2"], nproc=nproc)
    assert "grad_acc_steps=1" in cmd and "num_train_steps=5" in cmd
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if nproc > 1 else []
    assert cmd[1 : 1 + len(launcher)] == launcher and cmd[1 + len(launcher)].endswith("train_fsdp2.py")
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = ours_result(tmp_path / "run", row, nproc)
    by_step = {r["step"]: r for r in read_metrics(tmp_path / "run")[0]}
    tokens = by_step[5]["consumed_tokens"] - by_step[2]["consumed_tokens"]
    seconds = by_step[5]["train_seconds"] - by_step[2]["train_seconds"]
    assert result["timed_steps"] == 3 and result["peak_gib"] > 0
    assert result["tokens_per_s"] == pytest.approx(tokens / seconds / nproc)


@pytest.mark.parametrize("visible, first", [(None, 0), ("1", 1), ("0,1,2,3", 0), ("2,3", 2)])
def test_vs_reference_names_the_gpu_of_a_multi_gpu_run(visible, first):
    """--nproc 4 runs ours on "0,1,2,3": the table's GPU name comes from the first id (this once crashed the run)."""
    from bench.vs_reference import first_gpu

    assert first_gpu(visible) == first


@pytest.mark.parametrize(
    "gpus, with_reference, nproc, words",
    [
        (["0", "1", "2", "3"], False, 4, "ours only, on GPUs 0, 1, 2, 3 (4 processes under torchrun; rates per GPU)"),
        (["2"], False, 1, "ours only, on one GPU"),
        (["0", "1"], True, 1, "theirs on GPU 0, ours on GPU 1, at once"),
        ([None], True, 1, "one after the other on one GPU"),
    ],
)
def test_vs_reference_header_says_where_each_side_ran(gpus, with_reference, nproc, words):
    """The table's header once said "theirs on GPU 0, ours on GPU 1" for a four-GPU run of ours alone."""
    from bench.vs_reference import placement_words

    assert placement_words(gpus, with_reference, nproc) == words


def test_vs_reference_repeats_trade_places_and_report_medians():
    """--repeats N: on two GPUs the sides trade GPUs every repeat, on one GPU they trade order; the table takes each
    side's median rate and largest peak, keeps every run's rate, and says so in its header."""
    from bench.vs_reference import median_result, placement_words, placements

    assert placements(["0", "1"], 3) == [("0", "1", False), ("1", "0", False), ("0", "1", False)]
    assert placements([None], 2) == [(None, None, False), (None, None, True)]
    assert placements(["0", "1"], 1) == [("0", "1", False)]
    runs = [{"tokens_per_s": v, "peak_gib": g, "timed_steps": 20} for v, g in ((100.0, 7.0), (90.0, 7.5), (120.0, 7.0))]
    assert median_result(runs) == {"tokens_per_s": 100.0, "peak_gib": 7.5, "timed_steps": 20, "runs": [100.0, 90.0, 120.0]}
    failed = {"error": "rc 1"}
    assert median_result([*runs[:2], failed])["tokens_per_s"] == 95.0  # the median of the runs that finished
    assert median_result([failed]) == failed and "error" in median_result([failed, failed])
    assert median_result(runs[:1]) == runs[0]
    words = "3 runs of each side at once on GPUs 0 and 1, trading GPUs between repeats; medians"
    assert placement_words(["0", "1"], True, 1, 3) == words
    assert placement_words([None], True, 1, 2).startswith("2 runs of each side one after the other on one GPU")


def test_sync_check_names_our_call_chain_innermost_first():
    """bench/sync_check.py groups synchronizing calls by the chain of our frames (innermost first, at most four),
    leaving out frames outside the project and its own."""
    import traceback

    from bench.sync_check import ROOT, our_frames

    def frame(path, line):
        return traceback.FrameSummary(str(path), line, "f")

    stack = [
        frame("/usr/lib/python3/runpy.py", 1),
        frame(ROOT / "bench/sync_check.py", 49),
        frame(ROOT / "train_fsdp2.py", 12),
        frame(ROOT / "recipe/train.py", 152),
        frame(ROOT / "recipe/train.py", 214),
        frame("/site/torch/optim/adam.py", 9),
    ]
    assert our_frames(stack) == "recipe/train.py:214 <- recipe/train.py:152 <- train_fsdp2.py:12"
    assert our_frames(stack[:2]) == ""


def test_device_levers_keeps_each_gpus_runs_apart(tmp_path):
    """Queues on two GPUs that use the same run names, at once (as the lever queues do): each GPU's result lines
    are its own runs'. Before, every run wrote its output under its name alone, so the queues read one another's."""
    import os
    import stat
    import subprocess

    from conftest import ROOT

    stub = tmp_path / "bin" / "python"  # stands in for `python bench/vs_reference.py ... --gpus G ... --out DIR`
    stub.parent.mkdir()
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = --gpus ] && gpu=${args[$((i + 1))]}; '
        '[ "${args[$i]}" = --out ] && out=${args[$((i + 1))]}; done\n'
        'mkdir -p "$out"; line="ours 650M: {\'gpu\': $gpu}"\n'
        # GPU 0 writes its result first and ends last; GPU 1 writes in between (as runs of unequal length did)
        'if [ "$gpu" = 0 ]; then sleep 0.1; echo "$line"; sleep 1; else sleep 0.5; echo "$line"; fi\n'
    )
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    queues = []
    for gpu in (0, 1):
        queue = tmp_path / f"q{gpu}.txt"
        queue.write_text("main650 650M\nmain650b 650M\n")
        queues.append(str(queue))
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "GPUS": "0 1",
           "LEVERS_WORK": str(tmp_path / "work")}  # fmt: skip
    subprocess.run(["bash", str(ROOT / "bench/device_levers.sh"), *queues], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    text = (tmp_path / "out" / "levers.txt").read_text()
    for gpu in (0, 1):
        section = text.split(f"== GPU {gpu}\n")[1].split("== GPU")[0]
        assert section.count(f"{{'gpu': {gpu}}}") == 2 and f"{{'gpu': {1 - gpu}}}" not in section


def test_vs_reference_gives_each_reference_run_its_own_port(tmp_path, monkeypatch):
    """The reference's rendezvous defaults to port 12355: two of its runs at once on one host (two GPU pairs) failed
    with EADDRINUSE until each run was given a free port of its own."""
    from bench import vs_reference

    seen = []

    def run_logged(cmd, log, gpu, env, timeout):
        seen.append(env["MASTER_PORT"])
        return 1, 0.0

    class Ref:
        env = {"MASTER_PORT": "12355", "PATH": "x"}

        def command(self, row, name):
            return ["true"], tmp_path / f"{name}.json"

    monkeypatch.setattr(vs_reference, "run_logged", run_logged)
    monkeypatch.setattr(vs_reference, "failure", lambda rc, log: f"rc {rc}")
    for _ in range(2):
        assert "error" in vs_reference.measure_theirs(Ref(), "8M", vs_reference.ROWS["8M"], tmp_path, "0", 1.0)
    assert len(seen) == 2 and "12355" not in seen and all(port.isdigit() for port in seen)
    assert Ref.env["MASTER_PORT"] == "12355"  # the shared environment is left as it was
