"""`herd sweep`: run every trial of an experiment's `sweep()`, resumably, locally or on SLURM.

    herd sweep --config=experiments/x.py[:arg] --workdir=sweeps/x [--seeds=3] [--config.k=v ...]
               [--parallel=N] [--executor=local|slurm] [--max_failures=N] [--retry_failed] [--dry_run]

Running the same command again skips finished trials, resumes interrupted ones
from their last checkpoint (a trial is an ordinary `herd train` run), retries
failed ones only with `--retry_failed`, and runs only the new trials of a grown
sweep. Planning and naming: train/sweep_plan.py; executors: train/sweep_local.py
(a process pool) and train/sweep_slurm.py (a submitit job array).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train import sweep_plan
from train import trial as trial_lib
from train.sweep_progress import Progress

EXECUTORS = ("local", "slurm")


def default_parallel() -> int:
    """Trials at once without --parallel: two on a CPU-only host with two or more CPUs, else one.

    Measured on this project's 2-core CPU (bench/README.md, "Sweeps"): two trials at once with one
    CPU each finish a sweep of smoke-sized trials in 0.61 of the wall time of one trial at a time
    with both CPUs (XLA:CPU spreads small steps poorly over cores, and one trial's start-up overlaps
    the other's training). Trials on an accelerator would share its memory, which each JAX process
    preallocates, so there it is one; more CPUs may well want more (measure with the bench).
    """
    import jax

    if jax.default_backend() != "cpu":
        return 1
    return min(2, len(os.sched_getaffinity(0)))


@dataclasses.dataclass
class SweepResult:
    """How the command ended and the status of every trial."""

    outcome: str  # finished | stopped (too many failures) | interrupted | planned (--dry_run) | submitted
    statuses: dict[str, str]

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self.statuses.items() if s == "failed"]


def run_sweep(
    spec: str,
    workdir: str | Path,
    cli_overrides: Mapping[str, Any] | None = None,
    *,
    seeds: int = 0,
    parallel: int | None = None,
    executor: str = "local",
    max_failures: int = -1,
    retry_failed: bool = False,
    dry_run: bool = False,
    wait: bool = True,
) -> SweepResult:
    """Plans, checks and runs the sweep in `workdir`; with `dry_run` prints the trial table and writes nothing."""
    workdir = Path(workdir)
    cli_overrides = dict(cli_overrides or {})
    if executor not in EXECUTORS:
        raise ValueError(f"--executor={executor!r} is not one of: {', '.join(EXECUTORS)}")
    parallel = default_parallel() if parallel is None else parallel
    if parallel < 1:
        raise ValueError(f"--parallel={parallel} must be a positive number of trials at once")
    sweep_plan.check_workdir(workdir, spec)
    n_devices = _devices_per_trial(spec, cli_overrides, executor)
    trials = sweep_plan.plan(spec, cli_overrides, seeds=seeds, n_devices=n_devices)
    if dry_run:
        print(sweep_plan.table(workdir, trials))
        return SweepResult("planned", {t.name: _status(workdir, t.name) for t in trials})
    with sweep_plan.SweepLock(workdir):
        sweep_plan.write_sweep(workdir, spec, cli_overrides, seeds, trials)
        todo = list(sweep_plan.to_run(workdir, trials, retry_failed))
        progress = Progress(workdir, [t.name for t in trials], parallel)
        progress.update()
        if executor == "local":
            from train.sweep_local import run_local

            outcome = run_local(workdir, todo, parallel=parallel, max_failures=max_failures, progress=progress)
        else:
            from train.sweep_slurm import run_slurm

            slurm = trials[0].config.slurm if trials else None
            outcome = run_slurm(workdir, todo, slurm, max_failures=max_failures, progress=progress, wait=wait)
    return SweepResult(outcome, {t.name: _status(workdir, t.name) for t in trials})


def _status(workdir: Path, name: str) -> str:
    return (trial_lib.read(workdir / name) or {}).get("status", "new")


def _devices_per_trial(spec: str, cli_overrides: Mapping[str, Any], executor: str) -> int:
    """The devices each trial's `herd train` will see: this machine's, or a SLURM job's GPUs (one CPU device)."""
    if executor == "slurm":
        from train.config import apply_overrides
        from train.experiment import load_experiment

        gpus = apply_overrides(load_experiment(spec), cli_overrides).slurm.gpus_per_trial
        return max(int(gpus), 1)
    import jax

    return jax.device_count()
