"""What quantization statistics cost: the same FP8 training run without them, with the shipped YAML's statistics
every 10 steps, and every step, as `train_fsdp2.py` subprocesses on one GPU; prints unpadded tokens/s over the
steps after the warm-up and the slowdown against the run without statistics.

    source .device/setup.sh && python bench/quant_stats_cost.py                          # L0_sanity, 200 steps
    source .device/setup.sh && python bench/quant_stats_cost.py --config L1_650M --steps 60 --warmup 20 \\
        --set dataset.train_path=.device/data/swissprot14_train_100k.fasta.xz dataset.val_path=null

Each frequency is the shipped hydra_config/quant_stats/layer_stats.yaml with every `freq` replaced
(recipe.quant_stats.with_frequency), written to a temporary file and passed as quant_stats_config.quant_stats_file.
Rate: consumed tokens over training seconds between the warm-up step and the last (the trainer's metrics.jsonl,
which leaves validation and checkpoints out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipe.quant_stats import DEFAULT_FILE, load_template, with_frequency  # noqa: E402

FP8 = ["model.backend=te", "model.activation=gelu_tanh", "fp8_config.enabled=true"]


def rate(out_dir: Path, warmup: int) -> float:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    first, last = train[warmup], train[max(train)]
    return (last["consumed_tokens"] - first["consumed_tokens"]) / (last["train_seconds"] - first["train_seconds"])


def run(config: str, steps: int, warmup: int, extra: list[str], out_dir: Path, stats_file: Path | None) -> float:
    stats = ["quant_stats_config.enabled=true", f"quant_stats_config.quant_stats_file={stats_file}"] if stats_file else []
    args = [
        sys.executable,
        "train_fsdp2.py",
        "--config-name",
        config,
        *FP8,
        f"num_train_steps={steps}",
        "log_every_n_steps=1",
        "validation.every_n_steps=0",
        "checkpoint.save_every_n_steps=0",
        "checkpoint.save_final_checkpoint=false",
        "checkpoint.save_final_model=false",
        *stats,
        *extra,
        f"output_dir={out_dir}",
    ]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return rate(out_dir, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="L0_sanity")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the rate")
    p.add_argument("--freqs", type=int, nargs="+", default=[10, 1])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more trainer overrides")
    a = p.parse_args()
    template = load_template(DEFAULT_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        base = run(a.config, a.steps, a.warmup, a.set, Path(tmp) / "off", None)
        print(f"{a.config}, FP8 (every layer), {a.steps} steps: without statistics {base:,.0f} tokens/s")
        for freq in a.freqs:
            stats_file = Path(tmp) / f"stats_freq{freq}.yaml"
            stats_file.write_text(yaml.safe_dump(with_frequency(template, freq), sort_keys=False))
            got = run(a.config, a.steps, a.warmup, a.set, Path(tmp) / f"freq{freq}", stats_file)
            print(f"  statistics every {freq:>3} steps: {got:,.0f} tokens/s ({got / base - 1:+.1%})")


if __name__ == "__main__":
    main()
