"""`python -m recipe.launch ARGS` is torchrun (the same arguments and PET_* environment variables) whose stop is a
clean stop: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 are passed on to the trainers, which checkpoint at the next step
boundary and exit 0, and then so does the launcher.

Why not torchrun itself: on SIGTERM or SIGINT its elastic agent raises SignalException, sends the signal to every
trainer's process group, waits up to --shutdown-timeout for them (then SIGKILL), and exits 1 with a traceback even
when every trainer checkpointed and exited 0; a SIGUSR1 it is not told to handle kills it outright. Here the agent is
told to leave those three signals alone (its --signals-to-handle) and this process hands each to its children, the
trainers; the agent then sees its workers finish and reports their exit status, as for any run. A second SIGINT
goes to torch's own handler: the agent shuts the trainers down (they abort, as on a second Ctrl-C) and exits 1.
Linux only (the trainers are found through /proc).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1")


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid` (torchrun starts each trainer in a session of its own, so the
    trainers are exactly our children; their loader workers are theirs)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def forward(signum: int, frame) -> None:
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    if signum == signal.SIGINT:  # the next Ctrl-C is torch's: shut the trainers down and exit
        signal.signal(signal.SIGINT, _terminate_process_handler)
    pids = children(os.getpid())
    if not pids:  # no trainer started yet (or all gone): nothing to checkpoint, stop as torchrun does
        _terminate_process_handler(signum, frame)
    print(
        f"recipe.launch: passing {signal.Signals(signum).name} to the trainers {pids}; they stop after their current step "
        f"with a checkpoint{' (Ctrl-C again aborts)' if signum == signal.SIGINT else ''}",
        file=sys.stderr,
        flush=True,
    )
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.run import parse_args, run

    args = parse_args(argv if argv is not None else sys.argv[1:])
    kept = [s.strip() for s in args.signals_to_handle.split(",") if s.strip() and s.strip() not in FORWARDED]
    args.signals_to_handle = ",".join(kept)
    for name in FORWARDED:
        signal.signal(getattr(signal, name), forward)
    record(run)(args)


if __name__ == "__main__":
    main()
