"""Our trainer against NVIDIA BioNeMo's esm2_native_te recipe, side by side, at matched settings, in one call.

    source .device/setup.sh && python bench/vs_reference.py --docs docs/benchmarks.md            # one GPU
    source .device/setup.sh && python bench/vs_reference.py --gpus 0 1 --docs docs/benchmarks.md  # theirs on 0, ours on 1
    source .device/setup.sh && python bench/vs_reference.py --gpus 0 1 --repeats 3 --docs docs/benchmarks.md  # medians

What runs is what users run. Ours: `train_fsdp2.py --config-name <the shipped L1/L2 config>` as a subprocess, with
only the settings the comparison must fix (data, tokens per micro-batch, step count, no accumulation, no
validation or checkpoints); every other setting is the shipped default. Theirs: the recipe's own `train_fsdp2.py`,
unmodified, under its wrapper `support/bench_wrap.py` from the reference directory (`--reference`), with the
settings its driver `run.sh` uses plus FP32 master weights (`use_fp32_master_weights=true`), as ours keeps them.

Matched: the same Swiss-Prot file (their side reads it as parquet shards made by their `fasta_to_parquet.py`), packed
THD batches of the same tokens per micro-batch, the same number of optimizer steps, timed after the same warm-up
steps, one micro-batch per step. Rate: unpadded tokens per second over the timed steps; for ours from the trainer's
own metrics.jsonl (consumed tokens and training seconds at the warm-up step and at the end), for theirs from their
wrapper's per-step clock. Memory: peak `torch.cuda.max_memory_allocated`, GiB, both sides.

Noise: the reference's rate moves by 5 % between calls, and two GPUs of one host differ by up to 2 %. With
`--repeats N` each side runs N times and the table gives the medians (each run's rate is in the log and the JSON):
on two GPUs the sides trade GPUs between repeats, on one GPU they trade order, so neither side keeps the faster card
or the first slot.

Differences that stay, by design: our BF16 rows run ESM-2's exact (erf) GELU, theirs TE's tanh approximation (the
FP8 rows run the tanh GELU on both sides: TE's fused MLP has no other); theirs runs their own data pipeline with the
worker counts of their driver, ours the shipped `dataset.num_workers`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import write_docs  # noqa: E402
from recipe.parallel import free_port  # noqa: E402

FP8_BLOCK_THEIRS = [
    "fp8_config.enabled=true",
    "fp8_config.fp8_recipe=transformer_engine.common.recipe.Float8BlockScaling",
    "fp8_config.fp8_format=E4M3",
]
FP8_BLOCK_OURS = [*FP8_BLOCK_THEIRS, "model.activation=gelu_tanh"]


@dataclass(frozen=True)
class Row:
    size: str
    config: str  # our shipped hydra config
    their_model: str  # their model config directory (support/model_configs/...)
    tokens: int  # tokens per micro-batch, both sides
    warmup: int  # untimed optimizer steps
    timed: int  # timed optimizer steps
    their_workers: int  # their driver's dataset.num_workers for this size
    fp8: bool = False


ROWS = {
    "8M": Row("8M", "L1_8M", "esm2_t6_8M_UR50D", 65536, 40, 80, 12),
    "150M": Row("150M", "L1_150M", "esm2_t30_150M_UR50D", 65536, 30, 50, 10),
    "650M": Row("650M", "L1_650M", "esm2_t33_650M_UR50D", 49152, 10, 20, 6),
    "3B": Row("3B", "L2_3B", "esm2_t36_3B_UR50D", 16384, 10, 20, 4),
    "650M_fp8": Row("650M", "L1_650M", "esm2_t33_650M_UR50D", 49152, 10, 20, 8, fp8=True),
    "3B_fp8": Row("3B", "L2_3B", "esm2_t36_3B_UR50D", 16384, 10, 20, 4, fp8=True),
    # 15B: ours only (the reference ships no 15B model config), on several GPUs (--nproc).
    "15B": Row("15B", "L2_15B", "", 8192, 4, 8, 4),
    "15B_fp8": Row("15B", "L2_15B", "", 8192, 4, 8, 4, fp8=True),
}
GIB = 2**30


def ours_command(
    row: Row, data: Path, out_dir: Path, extra: list[str], trainer: Path = ROOT / "train_fsdp2.py", nproc: int = 1
) -> list[str]:
    steps = row.warmup + row.timed
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [
        *launcher,
        *([f"--nproc_per_node={nproc}"] if nproc > 1 else []),
        str(trainer),
        "--config-name",
        row.config,
        f"output_dir={out_dir}",
        f"dataset.train_path={data}",
        "dataset.val_path=null",
        f"dataset.micro_batch_size={row.tokens // 1024}",
        f"dataset.token_micro_batch_size={row.tokens}",
        "grad_acc_steps=1",
        f"num_train_steps={steps}",
        f"log_every_n_steps={row.warmup}",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_model=false",
        "checkpoint.save_final_checkpoint=false",
        *(FP8_BLOCK_OURS if row.fp8 else []),
        *extra,
    ]


def ours_result(out_dir: Path, row: Row, nproc: int = 1) -> dict:
    """Rate per GPU over the steps after the warm-up, from the trainer's own metrics.jsonl (which counts the
    tokens of all ranks)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "consumed_tokens" in r]
    start = next(r for r in train if r["step"] == row.warmup)
    end = train[-1]
    seconds = end["train_seconds"] - start["train_seconds"]
    return {
        "tokens_per_s": (end["consumed_tokens"] - start["consumed_tokens"]) / seconds / nproc,
        "timed_steps": end["step"] - start["step"],
        "peak_gib": max(r["max_memory_gb"] for r in train) * 1e9 / GIB,
    }


class Reference:
    """NVIDIA's recipe as its driver runs it: its extra wheels, a wandb stand-in, the data as parquet shards."""

    def __init__(self, path: Path, fasta: Path, work: Path):
        self.path, self.recipe, self.support, self.work = path, path / "recipe", path / "support", work
        if not (self.recipe / "train_fsdp2.py").exists():
            raise SystemExit(f"--reference {path}: no recipe/train_fsdp2.py there (bash ../shared/device/prepare.sh --peers)")
        site = work / "site"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(site),
                *map(str, sorted((self.support / "wheels").glob("*.whl"))),
            ],
            check=True,
        )
        paths = [str(site)] + ([] if _has_module("wandb") else [str(self.support / "shims")])
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
            "WANDB_MODE": "disabled",
            "HYDRA_FULL_ERROR": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        self.parquet = work / "parquet"
        subprocess.run(
            [sys.executable, str(self.support / "fasta_to_parquet.py"), str(fasta), str(self.parquet), "--shards", "16"],
            check=True,
            env=self.env,
        )

    def command(self, row: Row, name: str) -> tuple[list[str], Path]:
        out = self.work / f"{name}.json"
        model = self.support / "model_configs" / row.their_model
        overrides = [
            "--config-name",
            "L0_sanity",
            f"config_name_or_path={model}",
            f"dataset.tokenizer_name={self.recipe}/tokenizers/esm2",
            "dataset.load_dataset_kwargs.path=parquet",
            f"dataset.load_dataset_kwargs.data_files={self.parquet}/*.parquet",
            "dataset.load_dataset_kwargs.split=train",
            "dataset.load_dataset_kwargs.streaming=true",
            "use_sequence_packing=true",
            f"dataset.micro_batch_size={row.tokens // 1024}",
            f"dataset.num_workers={row.their_workers}",
            "use_torch_compile=false",
            f"num_train_steps={row.warmup + row.timed + 1}",
            "logger.frequency=10",
            "checkpoint.ckpt_dir=null",
            "checkpoint.save_final_model=false",
            "checkpoint.resume_from_checkpoint=false",
            "wandb_init_args.mode=disabled",
            f"hydra.run.dir={self.work}/hydra/{name}",
            "use_fp32_master_weights=true",
            *(FP8_BLOCK_THEIRS if row.fp8 else []),
        ]
        cmd = [
            sys.executable,
            str(self.support / "bench_wrap.py"),
            "--recipe",
            str(self.recipe),
            "--script",
            "train_fsdp2.py",
            "--out",
            str(out),
            "--warmup",
            str(row.warmup),
            "--label",
            name,
            "--config-json",
            str(model / "config.json"),
            "--",
            *overrides,
        ]
        return cmd, out


def first_gpu(visible: str | None) -> int:
    """The id of the first GPU of a CUDA_VISIBLE_DEVICES value ("1", "0,1,2,3"), or 0 when none is set."""
    return int(visible.split(",")[0]) if visible else 0


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def failure(rc: int, log: Path) -> str:
    """What a failed run's table cell says: out of memory, a time-out, or where to look."""
    text = log.read_text(errors="replace") if log.exists() else ""
    if "OutOfMemoryError" in text or "CUDA out of memory" in text:
        return "out of memory"
    return "timed out" if rc == 124 else f"failed (rc={rc}, {log.name})"


def run_logged(cmd: list[str], log: Path, gpu: str | None, env: dict | None, timeout: float) -> tuple[int, float]:
    env = dict(env or os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def measure_theirs(ref: Reference, name: str, row: Row, logs: Path, gpu: str | None, timeout: float) -> dict:
    if not row.their_model:
        return {"error": "no reference config at this size"}
    cmd, out = ref.command(row, name)
    log = logs / f"theirs_{name}.log"
    # Their rendezvous defaults to port 12355: a port of its own lets two references run on one host at once.
    rc, wall = run_logged(cmd, log, gpu, {**ref.env, "MASTER_PORT": str(free_port())}, timeout)
    if rc or not out.exists():
        return {"error": failure(rc, log), "wall_s": wall}
    r = json.loads(out.read_text())
    if not r.get("timed_steps"):
        return {"error": f"no timed steps ({r.get('error')})", "wall_s": wall}
    return {
        "tokens_per_s": r["unpadded_tokens_per_s"],
        "timed_steps": r["timed_steps"],
        "peak_gib": r["peak_mem_allocated_gib"],
        "wall_s": wall,
    }


def measure_ours(
    name: str,
    row: Row,
    data: Path,
    work: Path,
    logs: Path,
    gpu: str | None,
    extra: list[str],
    timeout: float,
    trainer: Path,
    nproc: int = 1,
) -> dict:
    out_dir = work / f"ours_{name}"
    log = logs / f"ours_{name}.log"
    rc, wall = run_logged(ours_command(row, data, out_dir, extra, trainer, nproc), log, gpu, None, timeout)
    if rc:
        return {"error": failure(rc, log), "wall_s": wall}
    return {**ours_result(out_dir, row, nproc), "wall_s": wall}


def table(results: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| row | tokens per micro-batch | theirs, tokens/s | ours, tokens/s | ours / theirs | peak GiB theirs / ours |",
        "|---|---|---|---|---|---|",
    ]
    for row, theirs, ours in results.values():

        def rate(r):
            return f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r.get("error", "-")

        ratio = (
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.3f}" if "tokens_per_s" in ours and "tokens_per_s" in theirs else "-"
        )
        mem = " / ".join(f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-" for r in (theirs, ours))
        precision = "FP8 block scaling" if row.fp8 else "BF16"
        lines.append(f"| {row.size} {precision} | {row.tokens:,} | {rate(theirs)} | {rate(ours)} | {ratio} | {mem} |")
    return "\n".join(lines) + "\n"


def placement_words(gpus: list, with_reference: bool, nproc: int, repeats: int = 1) -> str:
    """Where each side ran, for the table's header (`gpus`: --gpus, or [None] for the default GPU)."""
    if nproc > 1:  # ours only (checked in main)
        return f"ours only, on GPUs {', '.join(gpus)} ({nproc} processes under torchrun; rates per GPU)"
    if not with_reference:
        return "ours only, on one GPU"
    if repeats > 1:
        where = (f"at once on GPUs {gpus[0]} and {gpus[-1]}, trading GPUs between repeats" if len(gpus) > 1
                 else "one after the other on one GPU, trading order between repeats")  # fmt: skip
        return f"{repeats} runs of each side {where}; medians"
    return f"theirs on GPU {gpus[0]}, ours on GPU {gpus[-1]}, at once" if len(gpus) > 1 else "one after the other on one GPU"


def placements(gpus: list, repeats: int) -> list[tuple]:
    """(their GPU, our GPU, ours first) for each repeat: on two GPUs the sides trade GPUs every repeat, on one GPU
    they trade order, so that a faster card or the first slot favours neither side."""
    if len(gpus) > 1:
        return [(gpus[0], gpus[-1], False) if r % 2 == 0 else (gpus[-1], gpus[0], False) for r in range(repeats)]
    return [(gpus[0], gpus[0], r % 2 == 1) for r in range(repeats)]


def median_result(runs: list[dict]) -> dict:
    """One side's result over its repeats: the median rate of the runs that finished, the largest peak, every rate."""
    if len(runs) == 1:
        return runs[0]
    done = [r for r in runs if "tokens_per_s" in r]
    if not done:
        return {"error": "; ".join(str(r.get("error")) for r in runs)}
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in done),
        "peak_gib": max(r["peak_gib"] for r in done),
        "timed_steps": done[0]["timed_steps"],
        "runs": [r.get("tokens_per_s", r.get("error")) for r in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=ROOT / ".device/peers/bionemo-esm2-native-te")
    p.add_argument("--data", type=Path, default=ROOT / ".device/data/swissprot14_train_100k.fasta.xz")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument(
        "--gpus",
        nargs="+",
        default=None,
        metavar="ID",
        help="one id: both sides on it, one after the other; two ids: theirs on the first, ours on the second, at once",
    )
    p.add_argument("--ours-only", action="store_true", help="skip the reference (lever runs)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for our runs (levers)")
    p.add_argument(
        "--trainer",
        type=Path,
        default=ROOT / "train_fsdp2.py",
        help="our entrypoint to run (train_ddp.py, or another checkout's, for an A/B)",
    )
    p.add_argument("--nproc", type=int, default=1, help="our runs on this many GPUs (torchrun; all of --gpus); rates are per GPU")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side per row; the table gives the medians")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())) / "vs_reference")
    p.add_argument("--docs", type=Path, help="write the table into this markdown file")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/vs_reference.py needs a CUDA GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs_reference_"))
    gpus = a.gpus or [None]
    our_gpu = gpus[-1]
    if a.nproc > 1:
        if not a.ours_only or len(gpus) != a.nproc:
            p.error("--nproc N runs ours only (--ours-only), on the N GPUs of --gpus")
        our_gpu = ",".join(gpus)
    ref = None if a.ours_only else Reference(a.reference.resolve(), a.data.resolve(), work)
    gpu_name = torch.cuda.get_device_name(first_gpu(our_gpu))
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    runs: dict = {name: ([], []) for name in a.rows}  # row -> (their runs, our runs)

    def label(name: str, r: int) -> str:
        return name if a.repeats == 1 else f"{name}_run{r + 1}"

    def theirs_all(r: int, gpu) -> None:
        for name in a.rows:
            result = measure_theirs(ref, label(name, r), ROWS[name], a.out, gpu, a.timeout) if ref else {"error": "not run"}
            runs[name][0].append(result)
            print(f"theirs {label(name, r)}: {result}", flush=True)

    def ours_all(r: int, gpu) -> None:
        for name in a.rows:
            result = measure_ours(label(name, r), ROWS[name], a.data.resolve(), work, a.out, gpu, a.set, a.timeout,
                                  a.trainer.resolve(), a.nproc)  # fmt: skip
            runs[name][1].append(result)
            print(f"ours {label(name, r)}: {result}", flush=True)

    for r, (their_gpu_r, our_gpu_r, ours_first) in enumerate(placements(gpus, a.repeats)):
        sides = [(theirs_all, (r, their_gpu_r)), (ours_all, (r, our_gpu if a.nproc > 1 else our_gpu_r))]
        if len(gpus) > 1 and ref is not None:  # one side per GPU, at the same time
            threads = [threading.Thread(target=fn, args=args) for fn, args in sides]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for fn, args in reversed(sides) if ours_first else sides:
                fn(*args)
    results = {name: [ROWS[name], median_result(theirs), median_result(ours)] for name, (theirs, ours) in runs.items()}
    command = "python bench/vs_reference.py " + " ".join(sys.argv[1:])
    placement = placement_words(gpus, ref is not None, a.nproc, a.repeats)
    header = (
        f"**{gpu_name}**, {datetime.date.today()}, torch {torch.__version__}, {placement}: `{command}`. Timed steps per row: "
        + ", ".join(f"{n} {ROWS[n].timed} after {ROWS[n].warmup}" for n in a.rows)
        + "."
    )
    text = table({k: tuple(v) for k, v in results.items()}, header)
    (a.out / "vs_reference.json").write_text(json.dumps({k: v[1:] for k, v in results.items()}, indent=1))
    print("\n" + text)
    if a.docs and not a.set and not a.ours_only and a.trainer.resolve() == ROOT / "train_fsdp2.py":
        write_docs(a.docs, gpu_name, text, tool="vs_reference.py")
        print(f"wrote {a.docs}")


if __name__ == "__main__":
    main()
