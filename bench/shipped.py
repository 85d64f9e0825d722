"""What a user gets from a shipped config as it is: `train_fsdp2.py --config-name <config>` with nothing changed but
the data path and a short run (and no validation, checkpoint or export, which the training clock leaves out anyway).

    source .device/setup.sh && python bench/shipped.py --configs L1_8M L1_150M --docs docs/benchmarks.md

Rate: unpadded tokens per second per GPU over the steps after the warm-up, from the trainer's own metrics.jsonl, as
bench/vs_reference.py reads it; memory: peak `torch.cuda.max_memory_allocated`. Every shipped config keeps its own
micro-batch, gradient accumulation, backend, compile and padding settings, so one optimizer step is millions of
tokens: the runs are a few steps long.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import write_docs  # noqa: E402
from bench.vs_reference import Row, ours_result  # noqa: E402

# (warm-up steps, timed steps) per config: the warm-up covers compilation; a step is 2.1 M tokens in every L1 config.
STEPS = {"L1_8M": (3, 10), "L1_35M": (3, 8), "L1_150M": (2, 4), "L1_650M": (1, 2), "L2_3B": (1, 1)}


def measure(config: str, data: Path, out: Path, extra: list[str], timeout: float) -> dict:
    warmup, timed = STEPS[config]
    run_dir = out / config
    cmd = [
        sys.executable,
        str(ROOT / "train_fsdp2.py"),
        "--config-name",
        config,
        f"output_dir={run_dir}",
        f"dataset.train_path={data}",
        "dataset.val_path=null",
        f"num_train_steps={warmup + timed}",
        "log_every_n_steps=1",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_model=false",
        "checkpoint.save_final_checkpoint=false",
        "overwrite_output_dir=true",
        *extra,
    ]
    with open(out / f"{config}.log", "w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode:
        return {"error": f"exit {done.returncode} ({out / f'{config}.log'})"}
    return ours_result(run_dir, Row(config, config, "", 0, warmup, timed, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--data", type=Path, default=ROOT / ".device/data/swissprot14_train_100k.fasta.xz")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides (levers; never written to the docs)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per run")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())) / "shipped")
    p.add_argument("--docs", type=Path, help="write the table into this markdown file")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/shipped.py needs a CUDA GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for config in a.configs:
        r = measure(config, a.data.resolve(), a.out, a.set, a.timeout)
        print(f"{config}: {r}", flush=True)
        rate = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else r["error"]
        mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        rows.append(f"| {config} | {rate} | {mem} | {STEPS[config][1]} after {STEPS[config][0]} |")
    command = "python bench/shipped.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"**{gpu}**, {datetime.date.today()}, torch {torch.__version__}: `{command}`",
            "",
            "| config as shipped | tokens/s per GPU | peak GiB | timed steps |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print("\n" + text)
    if a.docs and not a.set:
        write_docs(a.docs, gpu, text, tool="shipped.py")


if __name__ == "__main__":
    main()
