"""Stopping cleanly on a signal: a checkpoint at the next step boundary, on every rank after the same step."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("recipe")


class Preemption:
    """SIGTERM (Kubernetes, schedulers, torchrun passing one on), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's warning
    signal) ask for a checkpoint at the next step boundary; the request is all-reduced with the step's counts, so
    every rank stops after the same step. A second SIGINT aborts at once, without a checkpoint. Loader workers
    ignore all of these (`ignore_stop_signals`), so a signal sent to the whole process group stops only the loop.
    `close()` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
        if not self.requested:
            name = signal.Signals(signum).name
            log.warning("%s: stopping with a checkpoint after this step (a second Ctrl-C aborts without one)", name)
        self.requested = True

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
