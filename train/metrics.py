"""Metric sinks (JSONL, TensorBoard, progress bar), and throughput with MFU.

`MetricWriter` fans one dict of scalars per step out to the sinks;
`Throughput` turns wall time into tokens/s and MFU (FLOPs per token from
`model.flops.flops_per_token`, peak from `train.hardware.peak_flops_per_device`).
Only process 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax

from train.workdir import RunDir


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
        wandb: Mapping[str, Any] | None = None,
    ) -> None:
        """`wandb`: keyword arguments of `wandb.init` (project, group, name, config) to also log there."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._bar: Any = None
        self._wandb: Any = None
        if not self.enabled:
            return
        run = RunDir(workdir)
        run.root.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run.metrics, "a", encoding="utf-8")
        SummaryWriter = _summary_writer_class()

        # It warns of every NaN it is given; a non-finite step is reported once, by train/guard.py.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

        self._tb = SummaryWriter(
            logdir=str(run.tensorboard),
            purge_step=start_step + 1 if start_step > 0 else None,
            flush_secs=30,
        )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=progress_file
            )
        if wandb is not None:
            self._wandb = start_wandb(run, **wandb)

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
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_wandb(run: RunDir, *, project: str, group: str | None, name: str | None, config: Mapping[str, Any]) -> Any:
    """A Weights & Biases run writing under `<workdir>/wandb`: online with WANDB_API_KEY set, else offline
    (`wandb sync` uploads it later). Its id is fixed by the run directory, so a resumed run continues it."""
    try:
        import wandb
    except ImportError:
        raise ValueError("log.wandb=True needs the wandb package: pip install 'herd[track]'") from None
    import hashlib

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run_id = hashlib.sha256(str(run.root).encode()).hexdigest()[:16]
    return wandb.init(project=project, group=group, name=name or run.root.name, id=run_id, resume="allow",
                      dir=str(run.root), config=dict(config), mode=mode, settings=wandb.Settings(silent=True))


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch, when it is installed, only to accept torch tensors (herd
    passes floats); that import costs over a second of every run's start-up. Unless torch
    is loaded already, it is hidden for the duration of the import (a None entry in
    sys.modules makes `import torch` raise ImportError, which tensorboardX handles).
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
