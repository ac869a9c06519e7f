"""SIGTERM / SIGUSR1 (SLURM preemption, scancel, --signal): finish the step, checkpoint, exit 75.

The handler only sets a flag; the training loop all-reduces it every step so that every rank
stops at the same step even if only some of them got the signal.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("lapvqa.train")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "checkpointed, re-run the same command to continue"
EXIT_NONFINITE = 3  # too many non-finite steps in a row
EXIT_DATA = 4  # too many corrupt samples/shards


class StopFlag:
    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if not self.signum:
            log.warning("got %s: checkpointing after this step, then exiting with code %d",
                        signal.Signals(signum).name, EXIT_PREEMPTED)
        self.signum = signum

    def __bool__(self) -> bool:
        return bool(self.signum)
