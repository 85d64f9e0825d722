"""Plot validation loss against training time for the time-to-quality runs (bench/time_to_quality.sh) and say when
our trainer first reached the baseline's final validation loss.

    python bench/plot_ttq.py --hf ttq_hf.jsonl --ours ttq_ours.jsonl --png docs/time_to_quality_35m.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def val_curve(path: str) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return sorted((r["train_seconds"], r["val_loss"]) for r in rows if "val_loss" in r)


def first_time_at_or_below(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at which the curve first reaches `target`, interpolated linearly between validations."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:  # l0 > target here
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True)
    p.add_argument("--ours", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="ESM-2 35M on Swiss-Prot, one GPU each")
    a = p.parse_args()
    hf, ours = val_curve(a.hf), val_curve(a.ours)
    target_t, target = hf[-1]
    reached = first_time_at_or_below(ours, target)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([t / 60 for t, _ in hf], [v for _, v in hf], "o-", label="transformers EsmForMaskedLM (padded, SDPA, bf16)")
    ax.plot([t / 60 for t, _ in ours], [v for _, v in ours], "s-", label="ours (train_ddp.py, packed THD, torch backend)")
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    if reached is not None:
        ax.axvline(reached / 60, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training time (minutes; validation excluded)")
    ax.set_ylabel("validation loss (swissprot14_val)")
    ax.set_title(a.title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.png)
    ratio = f"{reached / target_t:.2f} of the baseline's time" if reached is not None else "never"
    print(
        f"baseline: final validation loss {target:.4f} after {target_t:.0f} s; "
        f"ours: final {ours[-1][1]:.4f} after {ours[-1][0]:.0f} s; "
        f"ours reached {target:.4f} after {reached if reached is None else round(reached)} s ({ratio}); plot {a.png}"
    )


if __name__ == "__main__":
    main()
