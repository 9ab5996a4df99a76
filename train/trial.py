"""One trial of a sweep: its record (`trial.json`), the `herd train` process that runs it, its outcome.

A trial directory is an ordinary run directory (train/workdir.py) plus
`trial.json` and `train.log` (the trial's stdout and stderr). The trial runs as
its own `herd train` process, so a crash, an out-of-memory kill or a NaN in one
trial never takes its sweep down, and an interrupted trial resumes from its
last checkpoint like any run. Statuses live in `trial.json`, written
atomically by whoever starts or ends the process (the sweep itself, or a SLURM
job running `run(trial_dir)`):

    pending -> running -> done | failed | interrupted (stopped on a signal after a checkpoint)
"""

from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from train.workdir import RunDir

TRIAL_FILE = "trial.json"
LOG_FILE = "train.log"
STATUSES = ("pending", "running", "interrupted", "done", "failed")
FINISHED = ("done", "failed")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def read(trial_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The trial's record, or None where there is none yet."""
    path = Path(trial_dir) / TRIAL_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(trial_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Replaces the record atomically: a crash leaves the old one or the new one, never half of either."""
    path = Path(trial_dir) / TRIAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TRIAL_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update(trial_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    record = {**(read(trial_dir) or {}), **fields}
    write(trial_dir, record)
    return record


def format_value(value: Any) -> str:
    """A value as `--config.KEY=` text that train.experiment.parse_value reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "None"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def command(record: Mapping[str, Any], trial_dir: str | os.PathLike) -> list[str]:
    """`herd train` for the trial: its experiment, the sweep's CLI overrides, then its own point and seed."""
    overrides = {**record["cli_overrides"], **record["overrides"]}
    return [sys.executable, "-m", "train.main", "train", f"--config={record['experiment']}",
            f"--workdir={os.fspath(trial_dir)}", *(f"--config.{k}={format_value(v)}" for k, v in overrides.items())]


def _child_setup(cpus: Iterable[int] | None) -> None:
    """In the child before exec: die with the parent (a sweep killed with -9 leaves no orphan training on), and
    keep to the CPUs of its slot (XLA sizes its thread pool from the CPUs a process may use)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: a killed sweep may leave its trial running until it ends
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))


def start(trial_dir: str | os.PathLike, cpus: Iterable[int] | None = None, **fields: Any) -> subprocess.Popen:
    """Starts the trial's `herd train` with output appended to train.log; marks it running."""
    trial_dir = Path(trial_dir)
    record = read(trial_dir)
    if record is None:
        raise FileNotFoundError(f"{trial_dir} has no {TRIAL_FILE}")
    cpus = sorted(cpus) if cpus is not None else None
    log = open(trial_dir / LOG_FILE, "ab")
    log.write(f"\n=== {now()} attempt {record.get('attempts', 0) + 1} on {socket.gethostname()}\n".encode())
    log.flush()
    with warnings.catch_warnings():
        # The child execs `herd train` straight after the fork (preexec_fn only pins CPUs and sets its death
        # signal); JAX's fork warning is about children that go on running Python beside JAX's threads.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        proc = subprocess.Popen(command(record, trial_dir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=lambda: _child_setup(cpus))
    log.close()
    update(trial_dir, status="running", host=socket.gethostname(), pid=proc.pid, cpus=cpus, started=now(),
           ended=None, error=None, attempts=record.get("attempts", 0) + 1, **fields)
    return proc


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failure|Exit)\b:?")


def _error_line(trial_dir: Path, returncode: int) -> str:
    """The one line that says why: herd's own error line if it printed one, else the log's last line."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"herd train was killed by {name}{hint}"
    try:
        lines = [ln.strip() for ln in (trial_dir / LOG_FILE).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    ours = [ln for ln in lines if ln.startswith("herd")]
    # A traceback's own message (JAX adds a note about filtered frames after it, which says nothing).
    raised = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return (ours or raised or lines or [f"herd train exited with status {returncode}"])[-1][:1000]


def final_metrics(trial_dir: str | os.PathLike) -> dict[str, float]:
    """The last value of every metric in the trial's metrics.jsonl (later rows win, as after a resume)."""
    path = RunDir(trial_dir).metrics
    final: dict[str, float] = {}
    if not path.exists():
        return final
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a kill
        for key, value in row.items():
            if key != "step" and value is not None and math.isfinite(value):
                final[key] = value
        final["step"] = row.get("step", final.get("step"))
    return final


def finish(trial_dir: str | os.PathLike, returncode: int) -> dict[str, Any]:
    """Records how the trial's process ended: done, interrupted (a signal, after its checkpoint) or failed."""
    trial_dir = Path(trial_dir)
    interrupted = returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT)
    status = "done" if returncode == 0 else "interrupted" if interrupted else "failed"
    record = read(trial_dir) or {}
    started = record.get("started")
    seconds = None
    if started:
        elapsed = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(started)
        seconds = elapsed.total_seconds()
    return update(trial_dir, status=status, returncode=returncode, ended=now(), pid=None,
                  error=None if status != "failed" else _error_line(trial_dir, returncode),
                  seconds=(record.get("seconds") or 0.0) + (seconds or 0.0), final=final_metrics(trial_dir))


def run(trial_dir: str) -> str:
    """Runs the trial to its end in this process's place (the body of a SLURM job); returns its status.

    A SIGTERM (SLURM's preemption or `scancel`) reaches the child, which checkpoints and stops.
    """
    proc = start(trial_dir, slurm_job=os.environ.get("SLURM_JOB_ID"))

    def forward(signum: int, frame: Any) -> None:
        del frame
        # SLURM (and submitit's default --signal) warn of preemption with USR2, which herd train
        # does not catch: passed on as SIGTERM, the trial checkpoints and stops.
        proc.send_signal(signal.SIGTERM if signum == signal.SIGUSR2 else signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(s, forward)
    return finish(trial_dir, proc.wait())["status"]
