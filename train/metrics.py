"""Metric sinks (JSONL, TensorBoard, progress bar), throughput and MFU, run.json.

`MetricWriter` fans one dict of scalars per step out to the sinks;
`Throughput` turns wall time into tokens/s and MFU (FLOPs per token from
`model.flops.flops_per_token`, peak from `peak_flops_per_device`);
`write_run_info` records what produced a run. Only process 0 writes files.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RUN_INFO_FILE = "run.json"

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

# Dense (no structured sparsity) bf16 peak FLOP/s of one JAX device, matched
# as a case-insensitive substring of `device.device_kind`; the longest
# matching key wins, so "H100 PCIe" beats "H100" and "TPU v5 lite" beats
# "TPU v5". NVIDIA datasheets quote bf16 "with sparsity"; dense is half.
KNOWN_PEAK_FLOPS: dict[str, float] = {
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (SXM and PCIe).
    "A100": 312e12,
    # NVIDIA H100 datasheet: BF16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with sparsity.
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    # NVIDIA H200 datasheet: BF16 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity.
    "H200": 989e12,
    "H200 NVL": 835e12,
    # NVIDIA GH200 datasheet: the Hopper GPU's BF16 1,979 TFLOPS with sparsity.
    "GH200": 989e12,
    # NVIDIA HGX B200 datasheet: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs.
    "B200": 2250e12,
    # NVIDIA L4 / L40 / L40S datasheets: BF16 242 / 362 / 733 TFLOPS with sparsity.
    "L4": 121e12,
    "L40": 181e12,
    "L40S": 366e12,
    # Cloud TPU system architecture docs (cloud.google.com/tpu/docs/system-architecture-tpu-vm
    # and the per-version pages), bf16 per chip. On v2/v3 each TensorCore (two
    # per chip) is its own JAX device: 45 / 123 TFLOPS per chip.
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    # v4 onwards: one JAX device per chip (megacore or a single core).
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i: Jouppi et al., ISCA 2021 "Ten Lessons From Three Generations"
    "TPU v5 lite": 197e12,  # v5e: cloud.google.com/tpu/docs/v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p: cloud.google.com/tpu/docs/v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium): cloud.google.com/tpu/docs/v6e
    "TPU v6e": 918e12,
}


# --------------------------------------------------------------------------- peak FLOP/s


def known_peak_flops(device_kind: str) -> float | None:
    """Table peak for `device_kind` (longest substring match), or None if unknown."""
    kind = device_kind.lower()
    matches = [key for key in KNOWN_PEAK_FLOPS if key.lower() in kind]
    return KNOWN_PEAK_FLOPS[max(matches, key=len)] if matches else None


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(device: jax.Device, size: int = 1024, repeats: int = 2, trials: int = 3) -> float:
    """Measured FLOP/s of a chain of `repeats` size x size matmuls on `device`; cached.

    float32 on CPU (what the CPU runs fast), bfloat16 elsewhere. Best of
    `trials` timed runs after one compile-and-warm-up run. Inputs come from
    numpy: compiling jax.random would cost more than the measurement.
    """
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((size, size), np.float32), device).astype(dtype)
    # Scaled by 1/sqrt(size) so repeated products stay O(1) instead of overflowing.
    w = jax.device_put(rng.standard_normal((size, size), np.float32) / math.sqrt(size), device).astype(dtype)

    @jax.jit
    def chain(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, repeats, lambda _, y: y @ w, x)

    chain(x, w).block_until_ready()
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        chain(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * repeats / best


def peak_flops_per_device(device: jax.Device | None = None, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override`, else the known table, else measured.

    Measuring is meant for CPU; an accelerator missing from the table is
    measured too (with a warning), which understates its real peak.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"log.peak_flops must be positive FLOP/s per device, got {override}")
        return float(override)
    device = device if device is not None else jax.devices()[0]
    peak = known_peak_flops(device.device_kind)
    if peak is not None:
        return peak
    if device.platform != "cpu":
        log.warning(
            "no known peak FLOP/s for device kind %r; measuring a matmul instead (set log.peak_flops to override)",
            device.device_kind,
        )
        return measure_matmul_flops(device, size=4096, repeats=16)
    return measure_matmul_flops(device)


# --------------------------------------------------------------------------- throughput


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops_per_device: float, n_devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices.

    Model FLOPs, not hardware FLOPs: rematerialisation does not count
    (arXiv:2204.02311 App. B).
    """
    return tokens_per_sec * flops_per_token / (peak_flops_per_device * n_devices)


class Throughput:
    """Step time, tokens/s and MFU from the wall time between logged steps.

    Call `tick(step)` each time a step's metrics are logged; the first call
    only starts the clock. Call `reset(step)` after pauses that are not
    training (eval, checkpointing) so they do not count.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops_per_device: float,
        n_devices: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if tokens_per_step <= 0 or flops_per_token <= 0 or peak_flops_per_device <= 0 or n_devices <= 0:
            raise ValueError(
                "Throughput needs positive tokens_per_step, flops_per_token, peak_flops_per_device and n_devices; "
                f"got {tokens_per_step}, {flops_per_token}, {peak_flops_per_device}, {n_devices}"
            )
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.n_devices = n_devices
        self._clock = clock
        self._mark: tuple[int, float] | None = None

    def reset(self, step: int) -> None:
        """Restarts the clock at `step`."""
        self._mark = (step, self._clock())

    def tick(self, step: int) -> dict[str, float]:
        """Scalars averaged since the previous tick; empty on the first call."""
        now = self._clock()
        previous, self._mark = self._mark, (step, now)
        if previous is None or step <= previous[0] or now <= previous[1]:
            return {}
        steps, seconds = step - previous[0], now - previous[1]
        tokens_per_sec = self.tokens_per_step * steps / seconds
        return {
            "step_time_s": seconds / steps,
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_device": tokens_per_sec * self.flops_per_token / self.n_devices / 1e12,
            "mfu": mfu(tokens_per_sec, self.flops_per_token, self.peak_flops_per_device, self.n_devices),
        }


# --------------------------------------------------------------------------- writers


def _json_float(value: float) -> float | None:
    """JSON has no NaN/Infinity; non-finite values are written as null."""
    return value if math.isfinite(value) else None


class MetricWriter:
    """Writes one dict of scalars per step to JSONL, TensorBoard and a progress bar.

    Rows are numbered by completed steps. Files are opened in append mode, so
    a resumed run continues `metrics.jsonl`; rows past the restored step that
    the crashed run had written appear twice, and the later row wins.
    TensorBoard drops them itself (`purge_step`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        progress: bool = False,
        enabled: bool | None = None,
        progress_file: TextIO | None = None,
    ) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._bar: Any = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")
        # Imported here: tensorboardX imports torch when it is installed (seconds).
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            logdir=str(workdir / TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step > 0 else None,
            flush_secs=30,
        )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=progress_file
            )

    @property
    def progress_bar(self) -> Any:
        """The live tqdm bar, or None when there is none."""
        return self._bar

    def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
        """Records `scalars` at `step`, each key prefixed by `prefix` (e.g. "eval/")."""
        if not self.enabled:
            return
        values = {}
        for key, value in scalars.items():
            try:
                values[prefix + key] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {prefix + key!r} at step {step} is not a scalar: {value!r}") from None
        row = {"step": int(step), **{k: _json_float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, global_step=int(step))
        if self._bar is not None and not prefix:
            self._update_bar(int(step), values)

    def _update_bar(self, step: int, values: Mapping[str, float]) -> None:
        parts = []
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f}")
        if "tokens_per_sec" in values:
            parts.append(f"{values['tokens_per_sec']:,.0f} tok/s")
        if parts:
            self._bar.set_postfix_str(" | ".join(parts), refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes every sink; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- run.json


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
    path = Path(workdir) / RUN_INFO_FILE
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
