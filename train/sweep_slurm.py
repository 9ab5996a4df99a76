"""The SLURM executor of `herd sweep`: one submitit job array per invocation, statuses in the trial files.

Each array task runs `train.trial.run(trial_dir)`, which starts the trial's
`herd train`, forwards SLURM's SIGTERM / USR2 to it (the trial checkpoints and
stops) and records the outcome in `trial.json`, so resuming works exactly as
locally: a trial whose job is still queued or running is left alone, any other
unfinished one is submitted again. The job's resources come from the config's
`slurm` group (`--config.slurm.partition=gpu` ...). submitit's own files go to
`<sweep>/slurm/`; each trial's output is in its own `train.log`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from train import trial as trial_lib
from train.sweep_plan import TrialPlan
from train.sweep_progress import Progress


def live_jobs(job_ids: Sequence[str]) -> set[str]:
    """Those of `job_ids` that SLURM still has queued or running (squeue; no accounting database needed)."""
    if not job_ids:
        return set()
    # -r lists each array task on its own line ("123_4"), as submitit names them.
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return {line.strip() for line in done.stdout.splitlines() if line.strip()} & set(job_ids)


def _executor(workdir: Path, slurm: ml_collections.ConfigDict):  # -> submitit.AutoExecutor
    try:
        import submitit
    except ImportError:
        raise ValueError("--executor=slurm needs the submitit package (pip install submitit)") from None
    if shutil.which("sbatch") is None:
        raise ValueError("--executor=slurm needs SLURM's sbatch on PATH; none was found")
    executor = submitit.AutoExecutor(folder=workdir / "slurm" / "%j", cluster="slurm")
    params = dict(timeout_min=int(slurm.time_min), cpus_per_task=int(slurm.cpus_per_trial), tasks_per_node=1, nodes=1)
    if slurm.gpus_per_trial:
        params["gpus_per_node"] = int(slurm.gpus_per_trial)
    if slurm.mem_gb is not None:
        params["mem_gb"] = int(slurm.mem_gb)
    if slurm.partition is not None:
        params["slurm_partition"] = slurm.partition
    if slurm.account is not None:
        params["slurm_account"] = slurm.account
    if slurm.parallelism:
        params["slurm_array_parallelism"] = int(slurm.parallelism)
    executor.update_parameters(name=f"herd-{workdir.name}", **params)
    return executor


def run_slurm(workdir: Path, trials: Sequence[TrialPlan], slurm: ml_collections.ConfigDict, *, max_failures: int,
              progress: Progress, wait: bool = True, poll_s: float = 2.0) -> str:
    """Submits the trials that no live job holds, then (with `wait`) follows them to the end."""
    records = {t.name: trial_lib.read(workdir / t.name) or {} for t in trials}
    alive = live_jobs([r["job_id"] for r in records.values() if r.get("job_id")])
    submit = [t for t in trials if records[t.name].get("job_id") not in alive]
    if submit:
        executor = _executor(workdir, slurm)
        for t in submit:  # before submitting: a fast job's "running" must not be overwritten
            trial_lib.update(workdir / t.name, status="pending", executor="slurm")
        jobs = executor.map_array(trial_lib.run, [str(workdir / t.name) for t in submit])
        for t, job in zip(submit, jobs):
            trial_lib.update(workdir / t.name, job_id=str(job.job_id))
    if not wait:
        return "submitted"
    pending = {t.name for t in trials}
    failures = 0
    try:
        while pending:
            time.sleep(poll_s)
            records = {n: trial_lib.read(workdir / n) or {} for n in pending}
            alive = live_jobs([r["job_id"] for r in records.values() if r.get("job_id")])
            for name, record in records.items():
                status = record.get("status")
                if status in ("done", "failed", "interrupted") and record.get("job_id") not in alive:
                    pending.discard(name)
                    failures += status == "failed"
                    progress.finished(record)
                elif record.get("job_id") not in alive:  # the job ended without recording an end
                    record = trial_lib.update(workdir / name, status="failed", ended=trial_lib.now(),
                                              error=f"SLURM job {record.get('job_id')} ended before the trial did "
                                                    f"(see {workdir / 'slurm'})")
                    pending.discard(name)
                    failures += 1
                    progress.finished(record)
            progress.update()
            if 0 <= max_failures < failures:
                _cancel([(trial_lib.read(workdir / n) or {}).get("job_id") for n in pending])
                return "stopped"
    except KeyboardInterrupt:
        print(f"herd sweep: stopped following; the SLURM jobs keep running; run the same command to follow them "
              f"again (scancel {' '.join(sorted({str(r.get('job_id')) for r in records.values()}))} stops them)")
        return "interrupted"
    return "finished"


def _cancel(job_ids: Sequence[str | None]) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], check=False)
