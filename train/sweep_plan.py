"""Planning a sweep: expand the experiment's `sweep()`, resolve and check every trial, name its directory.

Trial i = the experiment + the command's `--config.k=v` + point i + (with
`--seeds=N`) `seed` = 0 .. N-1. Every trial is resolved and checked as
`herd train` would check it before anything is written, so a bad point fails
the whole command with one line. A trial's directory is named by a readable
slug of its point and a short hash of its resolved config
(`lr=0.001,seed=1-3fa2c9`); `sweep.json` lists the trials in order.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from train import trial as trial_lib
from train.config import apply_overrides, flatten, model_config
from train.data import check_data
from train.experiment import load_experiment, load_module, parse_value
from train.runtime import check
from train.workdir import RunDir

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
# Keys that say how or where a trial runs and what it reports, not what it computes: left out of its hash.
NOT_HASHED = ("log.", "slurm.")
# What every trial gets from the runner: no progress bar in train.log.
RUNNER_OVERRIDES = {"log.progress": False}


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """One trial: its place in the sweep, its overrides (point and seed), its directory name and config."""

    index: int
    point: dict[str, Any]
    seed: int | None
    slug: str
    hash: str
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.slug}-{self.hash}"

    @property
    def overrides(self) -> dict[str, Any]:
        return self.point | ({"seed": self.seed} if self.seed is not None else {})


def sweep_points(spec: str) -> list[dict[str, Any]]:
    """The override dicts of the experiment's `sweep()` (given the experiment's argument if it takes one)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    fn = getattr(module, "sweep", None)
    if not callable(fn):
        raise ValueError(f"--config={spec}: {path} defines no sweep() function to expand")
    points = fn(arg or None) if inspect.signature(fn).parameters else fn()
    points = list(points) if points is not None else []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not all(isinstance(k, str) for k in point):
            raise ValueError(f"{path}: sweep point {i} is {point!r}, not a dict of dotted keys to values")
    if not points:
        raise ValueError(f"{path}: sweep() gave no points")
    return [dict(p) for p in points]


def trial_hash(config: ml_collections.ConfigDict) -> str:
    """Six hex digits of the resolved config, without the keys that do not change what a trial computes."""
    values = {k: v for k, v in flatten(config).items() if not any(k.startswith(p) for p in NOT_HASHED)}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()[:6]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key of the sweep shares (`optimizer.lr` -> `lr`)."""
    keys = sorted(set(keys))
    depth = {k: 1 for k in keys}
    while True:
        names = {k: ".".join(k.split(".")[-depth[k]:]) for k in keys}
        clashes = [k for k in keys if list(names.values()).count(names[k]) > 1 and depth[k] < k.count(".") + 1]
        if not clashes:
            return names
        for k in clashes:
            depth[k] += 1


def show_value(value: Any) -> str:
    """A swept value as tables and plots print it (floats to 6 significant digits)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _slug_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def slug(overrides: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """`lr=0.001,seed=1`: the trial's overrides in sweep order, as a file name."""
    text = ",".join(f"{names.get(k, k)}={_slug_value(v)}" for k, v in overrides.items()) or "baseline"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:100]


def plan(spec: str, cli_overrides: Mapping[str, Any], *, seeds: int, n_devices: int) -> list[TrialPlan]:
    """Every trial of the sweep, each resolved and checked as `herd train` would check it; nothing is written."""
    if seeds < 0:
        raise ValueError(f"--seeds={seeds} must be >= 0 (0: no seed axis, the experiment's own seed)")
    base = load_experiment(spec)
    base = apply_overrides(base, {**cli_overrides, **RUNNER_OVERRIDES})
    points = sweep_points(spec)
    names = short_names([k for p in points for k in p] + (["seed"] if seeds else []))
    trials: list[TrialPlan] = []
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        for seed in range(seeds) if seeds else [None]:
            overrides = point | ({"seed": seed} if seed is not None else {})
            where = f"sweep point {i} ({slug(overrides, names)})"
            if seed is not None and "seed" in point:
                raise ValueError(f"{where} sets seed, which --seeds={seeds} also sets; drop one of them")
            try:
                config = apply_overrides(base, overrides)
                _check_cli_round_trip(config, overrides)
                check(config, model_config(config), n_devices)
                check_data(config)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            trial = TrialPlan(len(trials), point, seed, slug(overrides, names), trial_hash(config), config)
            if trial.hash in seen:
                raise ValueError(f"{where} is the same trial as sweep point {seen[trial.hash]}: "
                                 "every point must change the resolved config")
            seen[trial.hash] = i
            trials.append(trial)
    return trials


def _check_cli_round_trip(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Trials run through `herd train --config.k=v`: each value must read back as itself."""
    for key, value in overrides.items():
        if parse_value(config, key, trial_lib.format_value(value)) != value:
            raise ValueError(f"{key}={value!r} would not survive the command line (it reads back differently)")


# ----------------------------------------------------------------------------- the sweep directory


def check_workdir(workdir: Path, spec: str) -> None:
    """Refuses a --workdir that is a file, a run directory, another sweep, or a folder of other things."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir={workdir} is a file, not a sweep directory")
    if (workdir / SWEEP_FILE).exists():
        recorded = json.loads((workdir / SWEEP_FILE).read_text(encoding="utf-8")).get("experiment")
        if recorded != spec:
            raise ValueError(f"--workdir={workdir} holds a sweep of --config={recorded}, not {spec}; "
                             "use another --workdir")
    elif RunDir(workdir).run_info.exists():
        raise ValueError(f"--workdir={workdir} is a training run directory, not a sweep; use another --workdir")
    elif workdir.is_dir() and [p for p in workdir.iterdir() if p.name != LOCK_FILE]:
        raise ValueError(f"--workdir={workdir} is not empty and holds no {SWEEP_FILE}; use an empty or new directory")


@dataclasses.dataclass
class SweepLock:
    """An exclusive lock on the sweep directory: one `herd sweep` at a time (released when the process dies)."""

    workdir: Path

    def __enter__(self) -> SweepLock:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.workdir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(f"another herd sweep is running in {self.workdir}; wait for it or stop it first") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def write_sweep(workdir: Path, spec: str, cli_overrides: Mapping[str, Any], seeds: int,
                trials: Sequence[TrialPlan]) -> None:
    """Writes sweep.json and a pending trial.json for each new trial; existing trial records are kept."""
    project = Path(spec.partition(":")[0]).stem
    for t in trials:
        if trial_lib.read(workdir / t.name) is None:
            # Tracking names (used with log.wandb): project = experiment, group = sweep, run = trial.
            runner = {**RUNNER_OVERRIDES, "log.wandb_project": project, "log.wandb_group": workdir.name,
                      "log.wandb_name": t.slug}
            trial_lib.write(workdir / t.name, {
                "index": t.index, "name": t.name, "slug": t.slug, "hash": t.hash, "experiment": spec,
                "cli_overrides": {**runner, **cli_overrides}, "point": t.point, "seed": t.seed,
                "overrides": t.overrides, "status": "pending", "attempts": 0, "created": trial_lib.now(),
            })
    previous = json.loads((workdir / SWEEP_FILE).read_text(encoding="utf-8")) if (workdir / SWEEP_FILE).exists() else {}
    listed = [t.name for t in trials]
    retired = [n for n in previous.get("trials", []) + previous.get("retired", []) if n not in listed]
    record = {"experiment": spec, "cli_overrides": dict(cli_overrides), "seeds": seeds, "trials": listed,
              "retired": sorted(set(retired)), "updated": trial_lib.now()}
    tmp = workdir / f"{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, workdir / SWEEP_FILE)


def to_run(workdir: Path, trials: Sequence[TrialPlan], retry_failed: bool) -> Iterator[TrialPlan]:
    """The trials this invocation must run: not done, and not failed unless retrying."""
    for t in trials:
        status = (trial_lib.read(workdir / t.name) or {}).get("status", "pending")
        if status == "done" or (status == "failed" and not retry_failed):
            continue
        yield t


def table(workdir: Path, trials: Sequence[TrialPlan]) -> str:
    """The trial table `--dry_run` prints: index, status, directory, overrides."""
    rows = []
    for t in trials:
        status = (trial_lib.read(workdir / t.name) or {}).get("status", "new")
        rows.append(f"{t.index:>4}  {status:<11}  {t.name:<40}  {json.dumps(t.overrides)}")
    return "\n".join([f"{'#':>4}  {'status':<11}  {'trial':<40}  overrides", *rows])
