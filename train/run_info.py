"""run.json: what produced a run (resolved config, package versions, git commit, mesh, devices, data)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import ml_collections

from train.workdir import RunDir

# Packages whose versions make a run reproducible, by distribution name.
TRACKED_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "numpy",
    "ml_collections",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the tracked packages and Python; None when missing."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(path: str | os.PathLike) -> dict[str, Any]:
    """{"commit", "dirty"} of the git repository containing `path`; None outside one.

    A repository without commits has commit None but a dirty flag. Untracked
    files count as dirty: they can change what runs.
    """
    cwd = Path(path)
    commit = _git(["rev-parse", "--verify", "HEAD"], cwd)
    status = _git(["status", "--porcelain"], cwd)
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status.strip()) if status is not None else None,
    }


def _config_json(value: Any) -> Any:
    """Fallback for json.dumps: nested configs as dicts, anything else as its repr."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def write_run_info(
    workdir: str | os.PathLike,
    *,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None,
    data_fingerprint: str | None,
    extra: dict[str, Any] | None = None,
    code_dir: str | os.PathLike | None = None,
    enabled: bool | None = None,
) -> dict[str, Any]:
    """Writes `<workdir>/run.json` describing this run and returns the record.

    An existing run.json (a resumed run) is not lost: its records move into
    the new record's "previous" list, oldest first. `code_dir` is the
    directory whose git commit is recorded (default: this project). Only
    process 0 writes (`enabled` defaults to that).
    """
    devices = jax.devices()
    record: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # to_dict() resolves FieldReferences; the round trip makes tuples lists.
        "config": json.loads(json.dumps(config.to_dict(), default=_config_json)),
        "versions": package_versions(),
        "git": git_state(code_dir if code_dir is not None else Path(__file__).resolve().parents[1]),
        "mesh": {str(name): int(size) for name, size in mesh.shape.items()} if mesh is not None else None,
        "devices": {
            "platform": devices[0].platform,
            "kinds": dict(Counter(d.device_kind for d in devices)),
            "count": len(devices),
            "local_count": jax.local_device_count(),
        },
        "process_count": jax.process_count(),
        "data_fingerprint": data_fingerprint,
        "extra": json.loads(json.dumps(extra, default=_config_json)) if extra else {},
    }
    if not (jax.process_index() == 0 if enabled is None else enabled):
        return record
    path = RunDir(workdir).run_info
    if path.exists():
        text = path.read_text(encoding="utf-8")
        try:
            old = json.loads(text)
        except json.JSONDecodeError:
            old = {"unparsed": text}  # keep even an unreadable record verbatim
        previous = old.pop("previous", []) if isinstance(old, dict) else []
        record["previous"] = [*(previous if isinstance(previous, list) else [previous]), old]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the old file
    return record
