"""Loss curves of one or more training runs, from their metrics.jsonl, into one PNG.

    python -m recipe.plot OUTPUT_DIR [OUTPUT_DIR ...] [-o curves.png]

Top row: training loss (solid) and validation loss (dashed, dots) against optimizer step and against training time
(`train_seconds`: validation and checkpoint writes excluded, so runs of different speed compare by time to quality).
Bottom row: training throughput (tokens/s per GPU) against the same axes. Each run gets one colour, labelled by its
directory name. Without -o the figure goes to curves.png inside the first OUTPUT_DIR. Bad input (no such directory,
no or an unreadable metrics.jsonl) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


class PlotError(Exception):
    """Bad input: the message (one line) names the file."""


@dataclass
class Run:
    label: str
    train: list[dict] = field(default_factory=list)  # records with "loss"
    val: list[dict] = field(default_factory=list)  # records with "val_loss"


def read_run(directory: Path, label: str) -> Run:
    path = directory / "metrics.jsonl"
    if not directory.is_dir():
        raise PlotError(f"{directory}: no such output directory")
    if not path.exists():
        raise PlotError(f"{path}: no such file (is {directory} a training run's output_dir?)")
    run = Run(label)
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
        if "loss" in record:
            run.train.append(record)
        if "val_loss" in record:
            run.val.append(record)
    if not run.train and not run.val:
        raise PlotError(f"{path}: no training or validation records")
    return run


def labels_for(directories: list[Path]) -> list[str]:
    """Directory names; where two runs share a name, parent/name."""
    names = [d.resolve().name for d in directories]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(directories, names)]


def time_unit(runs: list[Run]) -> tuple[float, str]:
    longest = max((r["train_seconds"] for run in runs for r in run.train + run.val if "train_seconds" in r), default=0.0)
    if longest > 2 * 3600:
        return 3600.0, "h"
    if longest > 2 * 60:
        return 60.0, "min"
    return 1.0, "s"


def series(records: list[dict], x: str, y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    pairs = [(r[x] / scale, r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(runs: list[Run], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    scale, unit = time_unit(runs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex="col")
    columns = (("step", "optimizer step", 1.0), ("train_seconds", f"training time ({unit})", scale))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for col, (x, xlabel, s) in enumerate(columns):
            axes[0, col].plot(*series(run.train, x, "loss", s), color=color, linewidth=1.2, alpha=0.9)
            axes[0, col].plot(*series(run.val, x, "val_loss", s), color=color, linestyle="--", marker="o", markersize=4)
            axes[1, col].plot(*series(run.train, x, "tokens_per_second_per_gpu", s), color=color, linewidth=1.2)
            axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("masked-LM loss")
    axes[1, 0].set_ylabel("tokens/s per GPU")
    axes[0, 0].set_title("against optimizer step")
    axes[0, 1].set_title("against training time")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=run.label) for i, run in enumerate(runs)]
    handles += [
        Line2D([], [], color="gray", label="training loss"),
        Line2D([], [], color="gray", linestyle="--", marker="o", markersize=4, label="validation loss"),
    ]
    axes[0, 1].legend(handles=handles, loc="upper right", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recipe.plot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="OUTPUT_DIR", help="a training run's output_dir (holds metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: curves.png in the first OUTPUT_DIR)")
    args = p.parse_args(argv)
    try:
        runs = [read_run(d, label) for d, label in zip(args.runs, labels_for(args.runs))]
        out = plot(runs, args.output if args.output is not None else args.runs[0] / "curves.png")
    except (PlotError, OSError) as exc:
        print(f"recipe.plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
