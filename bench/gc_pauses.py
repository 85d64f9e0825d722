"""How long each full garbage collection pauses the host in a training run: the trainer in this process, with every
generation-2 collection timed through `gc.callbacks`. From the repository root (the configs' data paths are
relative to it):

    python bench/gc_pauses.py --out /tmp/gc -- num_train_steps=250              # L0_sanity compiled, on this CPU
    python bench/gc_pauses.py --config-name L1_8M --out /tmp/gc -- dataset.train_path=...

Prints the durations in order: first the collections Python starts by itself during set-up, then, with
`gc_every_n_steps`, the loop's own. Those are what a step that lands on one waits for.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="L0_sanity")
    p.add_argument("--out", required=True, help="the run's output_dir (overwritten)")
    p.add_argument("overrides", nargs="*", help="more key=value overrides, after --")
    a = p.parse_args()
    durations: list[float] = []
    started = [0.0]

    def timer(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                durations.append(round((time.perf_counter() - started[0]) * 1e3, 1))

    gc.callbacks.append(timer)
    sys.argv = ["train_fsdp2.py", "--config-name", a.config_name, f"output_dir={a.out}", "overwrite_output_dir=true",
                "use_torch_compile=true", "dataset.pad_to_fixed=true", "dataset.val_path=null",
                "checkpoint.save_every_n_steps=0", "checkpoint.save_final_model=false",
                "checkpoint.save_final_checkpoint=false", *a.overrides]  # fmt: skip
    from recipe.train import entrypoint

    try:
        entrypoint("fsdp2")()
    finally:
        gc.callbacks.remove(timer)
        print("full collections, ms, in order:", durations, flush=True)


if __name__ == "__main__":
    main()
