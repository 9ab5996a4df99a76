"""The local executor of `herd sweep`: a bounded pool of `herd train` processes on this machine's CPUs.

With `--parallel=N` the usable CPUs are split into N disjoint slots and each
running trial is pinned to one (XLA sizes its thread pool from the CPUs a
process may use), so trials do not fight over cores. The compiled-step cache
(`HERD_XLA_CACHE`, shared by default) lets trials of one shape compile once.

Ctrl-C or SIGTERM stops cleanly: no new trial starts, each running trial gets
SIGTERM, saves a checkpoint after its current step and ends `interrupted`; a
second signal kills them. `kill -9` of the sweep kills its trials with it
(their parent-death signal), losing only their unsaved steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from train import trial as trial_lib
from train.sweep_plan import TrialPlan
from train.sweep_progress import Progress


def cpu_slots(parallel: int) -> list[list[int] | None]:
    """`parallel` disjoint CPU sets (None each when there are fewer CPUs than slots: no pinning)."""
    cpus = sorted(os.sched_getaffinity(0))
    if parallel > len(cpus):
        return [None] * parallel
    per = len(cpus) // parallel
    return [cpus[i * per:(i + 1) * per] for i in range(parallel)]


def run_local(workdir: Path, trials: Sequence[TrialPlan], *, parallel: int, max_failures: int,
              progress: Progress, poll_s: float = 0.2) -> str:
    """Runs `trials` with at most `parallel` at once; returns "finished", "stopped" (too many failures) or
    "interrupted" (a signal)."""
    queue = list(trials)
    free = cpu_slots(parallel)
    running: dict[subprocess.Popen, tuple[TrialPlan, list[int] | None]] = {}
    signalled: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        if signalled:  # a second signal: stop waiting for checkpoints
            for proc in running:
                proc.kill()
            return
        signalled.append(signum)
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failures = 0
    try:
        while queue or running:
            stop_launching = bool(signalled) or 0 <= max_failures < failures
            while queue and free and not stop_launching:
                t, slot = queue.pop(0), free.pop(0)
                running[trial_lib.start(workdir / t.name, slot)] = (t, slot)
                progress.update()
            if not running:
                break
            for proc in [p for p in running if p.poll() is not None]:
                t, slot = running.pop(proc)
                record = trial_lib.finish(workdir / t.name, proc.returncode)
                free.append(slot)
                failures += record["status"] == "failed"
                progress.finished(record)
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signalled:
        return "interrupted"
    return "stopped" if queue else "finished"
