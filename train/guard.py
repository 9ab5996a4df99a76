"""Nothing passes silently: an update whose loss, gradient or update is not finite is never applied.

In the step (device side) `decide` says whether to apply this step's update:
not when the loss, the gradient norm or the update norm is not finite, nor,
with the loss-spike guard on (`train.spike_factor` > 1 and
`train.on_spike=skip`), when the loss exceeds `spike_factor` times its running
mean (as large runs guard against spikes, e.g. arXiv:2204.02311 §5.1 skipping
batches). A step not applied leaves the parameters and the optimizer state as
they were, decided from global values, so identically on every process. The
guard's own state (running mean, consecutive skips) lives in the train state.

In the loop (host side) `after_step` applies the policy `train.on_nonfinite`:
`halt` stops at the first non-finite step, `skip` goes on and halts after
`train.max_skips` non-finite steps in a row. Halting writes `nonfinite.json`
(the step, the data position of its batch, its loss and norms, and per-layer
gradient norms: enough to replay it) and raises `NonFinite`, one line for the
CLI; no non-finite state is ever checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from train.workdir import RunDir

log = logging.getLogger(__name__)

POLICIES = ("halt", "skip")
SPIKE_ACTIONS = ("warn", "skip")
EMA_DECAY = 0.99  # the running mean of the loss covers ~100 applied steps
SPIKE_WARMUP = 20  # applied steps before the spike guard judges (the mean of a few early losses is no baseline)
FORENSICS_FILE = "nonfinite.json"
METRICS = ("nonfinite", "spike", "skipped", "nonfinite_in_a_row")  # written only when not zero


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """What the step needs of `train.*` (static: part of the compiled step)."""

    spike_factor: float = 0.0
    skip_spikes: bool = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> GuardConfig:
        return cls(float(config.train.spike_factor), config.train.on_spike == "skip")


def check(config: ml_collections.ConfigDict) -> None:
    """One-line errors for the guard's fields."""
    t = config.train
    if t.on_nonfinite not in POLICIES:
        raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r} is not one of: {', '.join(POLICIES)}")
    if t.on_spike not in SPIKE_ACTIONS:
        raise ValueError(f"train.on_spike={t.on_spike!r} is not one of: {', '.join(SPIKE_ACTIONS)}")
    if t.max_skips < 0:
        raise ValueError(f"train.max_skips={t.max_skips} must be >= 0")
    if not math.isfinite(t.spike_factor) or (t.spike_factor != 0 and t.spike_factor <= 1):
        raise ValueError(f"train.spike_factor={t.spike_factor} must be 0 (off) or a finite factor > 1")


def initial_state() -> dict[str, jax.Array]:
    """The guard's part of a fresh train state."""
    return {"loss_ema": jnp.zeros((), jnp.float32), "applied": jnp.zeros((), jnp.int32),
            "skips": jnp.zeros((), jnp.int32)}


def decide(
    guard: Mapping[str, jax.Array], loss: jax.Array, grad_norm: jax.Array, update_norm: jax.Array, cfg: GuardConfig
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """(apply this update?, the guard's next state, its metrics)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    applied = guard["applied"]
    mean = guard["loss_ema"] / (1 - EMA_DECAY ** jnp.maximum(applied, 1).astype(jnp.float32))  # bias-corrected
    spike = jnp.asarray(False)
    if cfg.spike_factor > 0:
        spike = finite & (applied >= SPIKE_WARMUP) & (loss > cfg.spike_factor * mean)
    apply = finite & ~(spike & cfg.skip_spikes)
    next_guard = {
        "loss_ema": jnp.where(apply, EMA_DECAY * guard["loss_ema"] + (1 - EMA_DECAY) * loss, guard["loss_ema"]),
        "applied": applied + apply.astype(jnp.int32),
        "skips": jnp.where(finite, 0, guard["skips"] + 1),  # non-finite steps in a row
    }
    metrics = {"nonfinite": (~finite).astype(jnp.float32), "spike": spike.astype(jnp.float32),
               "skipped": (~apply).astype(jnp.float32), "nonfinite_in_a_row": next_guard["skips"].astype(jnp.float32)}
    return apply, next_guard, metrics


def select(apply: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the update is applied, else `old`, leaf by leaf (fused into the update's elementwise pass)."""
    return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)


def grad_norms(grads: Any, apply: jax.Array, scanned: bool) -> dict[str, jax.Array]:
    """Per-parameter gradient norms (per layer for a scanned stack), computed only for a step not applied."""

    def norms() -> dict[str, jax.Array]:
        out = {}
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            axes = tuple(range(1, g.ndim)) if scanned and name.startswith("layers.") else None
            out[name] = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes))
        return out

    shapes = jax.eval_shape(norms)
    return jax.lax.cond(apply, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), norms)


class NonFinite(ValueError):
    """The run halted at a non-finite step (one line; the details are in nonfinite.json)."""


def after_step(step: int, scalars: Mapping[str, float], norms: Mapping[str, Any], position: Any,
               config: ml_collections.ConfigDict, workdir: str | os.PathLike, last_checkpoint: int | None) -> None:
    """Applies `train.on_nonfinite` to step `step`'s fetched metrics: warns of spikes, halts when it must."""
    if scalars.get("spike"):
        action = "skipped" if config.train.on_spike == "skip" else "applied anyway (train.on_spike=warn)"
        log.warning("step %d: loss %.4g spiked above %g x its running mean; the update was %s",
                    step, scalars["loss"], config.train.spike_factor, action)
    if not scalars.get("nonfinite"):
        return
    in_a_row = int(scalars.get("nonfinite_in_a_row", 1))
    if config.train.on_nonfinite == "skip" and in_a_row <= config.train.max_skips:
        log.warning("step %d: loss %s or gradients not finite; update skipped (%d in a row, train.max_skips=%d)",
                    step, scalars["loss"], in_a_row, config.train.max_skips)
        return
    path = RunDir(workdir).root / FORENSICS_FILE
    if jax.process_index() == 0:
        record = {"step": step, "loss": _json_number(scalars.get("loss")),
                  "grad_norm": _json_number(scalars.get("grad_norm")),
                  "update_norm": _json_number(scalars.get("update_norm")), "nonfinite_in_a_row": in_a_row,
                  "policy": config.train.on_nonfinite, "data_position": position,
                  "grad_norms": {k: _json_number(v) for k, v in norms.items()}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    why = "non-finite" if in_a_row == 1 else f"non-finite for {in_a_row} steps in a row (train.max_skips=" \
                                               f"{config.train.max_skips})"
    kept = f"the checkpoint of step {last_checkpoint} is intact" if last_checkpoint else "no checkpoint was saved"
    raise NonFinite(f"step {step}: loss {scalars.get('loss')} and gradients {why}; halted without saving it "
                    f"(train.on_nonfinite={config.train.on_nonfinite}); {kept}; details in {path}")


def _json_number(value: Any) -> Any:
    """Floats (or lists of them) with NaN/inf as strings: JSON has no non-finite numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
