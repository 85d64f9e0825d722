"""For tools that watch our trainer from inside its process (bench/sync_check.py, bench/memory_peak.py): run
`train_fsdp2.py` in this process, and tell this repository's code from everything else in a stack."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_train_fsdp2(args: list[str]) -> None:
    """train_fsdp2.py with `args`, as `python train_fsdp2.py ARGS` would run it, in this process."""
    sys.argv = [str(ROOT / "train_fsdp2.py"), *args]
    sys.path.insert(0, str(ROOT))  # as `python train_fsdp2.py` would have it
    runpy.run_path(sys.argv[0], run_name="__main__")


def is_ours(filename: str, root: Path, tool: str) -> bool:
    """A file of this repository's code: under `root`, not in an installed-packages folder (a virtual environment may
    sit inside the repository), and not the watching tool itself (`tool`, relative to `root`)."""
    path = Path(filename)
    return path.is_relative_to(root) and "-packages/" not in filename and path != root / tool
