"""Stopping a run cleanly on SIGTERM or SIGINT: finish the step, save a checkpoint, exit.

Clusters preempt with SIGTERM (SLURM sends it before a time limit or a
cancellation), a sweep forwards it to its trials, Ctrl-C sends SIGINT. Inside
`stop_requests()` the first such signal only sets a flag, which the loop reads
between steps; a second one acts as it normally would (KeyboardInterrupt for
SIGINT), for a run that must die at once.

With several processes the flag must be read identically everywhere, or one
process would leave the collective step that the others are in: it is agreed
every `sync_every` steps through one all-gather (the signal usually reaches
every process, e.g. from srun, but not necessarily between the same steps).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`; running it again resumes there."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving the checkpoint of step {step}; "
                         "run the same command again to resume")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that a signal ended."""
        return 128 + self.signum


class StopRequests:
    """The first SIGTERM/SIGINT received while active; `stop_after(step)` says whether to stop there."""

    def __init__(self, sync_every: int = 10):
        self.signum: int | None = None
        self.sync_every = sync_every

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    def stop_after(self, step: int) -> bool:
        """Whether every process should stop once `step` is done (collective with several processes)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        local = np.int32(self.signum or 0)
        seen = np.asarray(multihost_utils.process_allgather(local))
        if self.signum is None and seen.any():
            self.signum = int(seen[seen > 0][0])
        return bool(seen.any())


@contextlib.contextmanager
def stop_requests(sync_every: int = 10) -> Iterator[StopRequests]:
    """Catches SIGTERM and SIGINT for the duration (main thread only; elsewhere signals are left alone)."""
    requests = StopRequests(sync_every)
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, requests._handle)
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
