"""The optax chain built from an experiment config: schedules, clipping, weight-decay masks, the optimizers.

`validate(config)` checks every optimizer and schedule field without building
anything, so the trainer can fail before compiling. `build_optimizer(config)`
returns `(tx, schedule)`: global-norm clipping (when `optimizer.grad_clip > 0`)
followed by the registered optimizer, which reads its learning rate from the
registered schedule. Gradient accumulation is the train step's job, not ours.

Weight decay is masked by parameter name (see `weight_decay_mask`) so that it
works on plain parameters, on the scanned layout (where norm scales are 2-D)
and on parameters boxed in flax `LogicallyPartitioned` / `Partitioned`
metadata, which is how the trainer derives optimizer-state shardings through
`jax.eval_shape(tx.init, boxed_params)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from train.muon import muon_labels, param_names, scale_by_muon

Mask = Callable[[Any], Any]


# ----------------------------------------------------------------------------- schedules


def _warmup_then(lr: float, warmup: int, after: Callable[[jax.Array], jax.Array]) -> optax.Schedule:
    """Linear warmup from 0 at step 0 to `lr` at `warmup`, then `after(step)` (which must equal lr at `warmup`)."""

    def schedule(step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        ramp = lr * s / max(warmup, 1)  # the max only guards warmup=0, where this branch is never taken
        return jnp.where(s < warmup, ramp, after(s))

    return schedule


def cosine(sc: ConfigDict, lr: float, total_steps: int) -> optax.Schedule:
    """Warmup, then half-cosine decay to `final_lr_fraction * lr` at `total_steps` (arXiv:1608.03983, no restarts)."""
    warmup, floor = sc.warmup_steps, sc.final_lr_fraction * lr
    span = max(total_steps - warmup, 1)

    def after(s: jax.Array) -> jax.Array:
        progress = jnp.clip((s - warmup) / span, 0.0, 1.0)
        # Written as lr minus a drop so the value at the end of warmup is exactly lr.
        return lr - (lr - floor) * 0.5 * (1.0 - jnp.cos(jnp.pi * progress))

    return _warmup_then(lr, warmup, after)


def wsd_decay_steps(decay_fraction: float, total_steps: int) -> int:
    """Steps in the wsd decay phase: at least one, so a tiny smoke run still ends at the floor."""
    return max(1, round(decay_fraction * total_steps))


def wsd(sc: ConfigDict, lr: float, total_steps: int) -> optax.Schedule:
    """Warmup-stable-decay (arXiv:2404.06395): warmup, constant lr, then a *linear* decay to
    `final_lr_fraction * lr` over the last `decay_fraction` of `total_steps`.

    MiniCPM uses an exponential decay; linear (also studied in arXiv:2405.18392) is the simpler choice.
    """
    warmup, floor = sc.warmup_steps, sc.final_lr_fraction * lr
    decay_steps = wsd_decay_steps(sc.decay_fraction, total_steps)
    decay_start = total_steps - decay_steps

    def after(s: jax.Array) -> jax.Array:
        progress = jnp.clip((s - decay_start) / decay_steps, 0.0, 1.0)
        return lr - (lr - floor) * progress

    return _warmup_then(lr, warmup, after)


def constant(sc: ConfigDict, lr: float, total_steps: int) -> optax.Schedule:
    """Warmup, then `lr` forever."""
    del total_steps
    return _warmup_then(lr, sc.warmup_steps, lambda s: jnp.full_like(s, lr))


def inverse_sqrt(sc: ConfigDict, lr: float, total_steps: int) -> optax.Schedule:
    """Warmup, then `lr * sqrt(warmup / step)`: the Transformer schedule (arXiv:1706.03762 §5.3), peaking at lr."""
    del total_steps
    warmup = sc.warmup_steps
    return _warmup_then(lr, warmup, lambda s: lr * jnp.sqrt(warmup / jnp.maximum(s, 1.0)))


SCHEDULES: dict[str, Callable[[ConfigDict, float, int], optax.Schedule]] = {
    "cosine": cosine,
    "wsd": wsd,
    "constant": constant,
    "inverse_sqrt": inverse_sqrt,
}


def build_schedule(config: ConfigDict) -> optax.Schedule:
    """The learning-rate schedule named by `config.schedule.name`, peaking at `config.optimizer.lr`."""
    _check_schedule(config)
    return SCHEDULES[config.schedule.name](config.schedule, float(config.optimizer.lr), int(config.train.steps))


# ----------------------------------------------------------------------------- weight-decay mask


def _is_norm(names: tuple[str, ...]) -> bool:
    # RMSNorm gains (attn_norm, mlp_norm, final_norm) are leaves named `scale`.
    return bool(names) and names[-1] == "scale"


def _is_embedding(names: tuple[str, ...]) -> bool:
    return names == ("embedding",)


def weight_decay_mask(params: Any, *, decay_embeddings: bool, decay_norms: bool) -> Any:
    """A tree of bools shaped like `params` (True = decayed), decided by parameter name.

    Matrices (attention, MLP, `lm_head`) are always decayed; norm scales and the
    input `embedding` only when asked (arXiv:2307.09288 trains Llama 2 this
    way). Metadata boxes are kept, with a bool inside, so the mask has exactly
    the structure of boxed or plain `params`. With tied embeddings the output
    head *is* `embedding`, so it follows `decay_embeddings`.
    """

    def decayed(path: tuple[Any, ...], leaf: Any) -> bool:
        del leaf
        names = param_names(path)
        if _is_norm(names):
            return decay_norms
        if _is_embedding(names):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decayed, params)


# ----------------------------------------------------------------------------- optimizers


def adamw(oc: ConfigDict, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """Adam with decoupled weight decay (arXiv:1711.05101); optax scales the decay by the lr, as PyTorch does."""
    return optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=mask)


def sgd(oc: ConfigDict, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum `b1` and decoupled weight decay (arXiv:1711.05101), kept out of the momentum."""
    return optax.chain(
        optax.trace(decay=oc.b1),
        optax.masked(optax.add_decayed_weights(oc.weight_decay), mask),
        optax.scale_by_learning_rate(schedule),
    )


def lion(oc: ConfigDict, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """Lion (arXiv:2302.06675): sign updates; the paper uses a 3-10x smaller lr and larger weight decay than AdamW."""
    return optax.lion(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=mask)


def muon(oc: ConfigDict, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024, modded-nanogpt) on the hidden matrices, this AdamW on everything else.

    Hidden matrices (attention q/k/v/o, MLP gate/up/down) follow `scale_by_muon`
    (momentum `muon_momentum`, `muon_ns_steps` Newton-Schulz steps) with
    decoupled weight decay; embedding, output head and norm scales get `adamw`
    as the `adamw` optimizer would (as in modded-nanogpt and arXiv:2502.16982),
    at `muon_adam_lr_multiplier` times the learning rate: both follow the one
    schedule, and modded-nanogpt gives its embedding and head their own, larger
    rates.
    """
    hidden = optax.chain(
        scale_by_muon(oc.muon_momentum, oc.muon_ns_steps, ns_dtype=jnp.dtype(oc.muon_ns_dtype)),
        optax.add_decayed_weights(oc.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    multiplier = float(oc.muon_adam_lr_multiplier)
    adam_schedule = schedule if multiplier == 1.0 else (lambda step: multiplier * schedule(step))
    return optax.partition({"muon": hidden, "adam": adamw(oc, adam_schedule, mask)}, muon_labels)


OPTIMIZERS: dict[str, Callable[[ConfigDict, optax.Schedule, Mask], optax.GradientTransformation]] = {
    "adamw": adamw,
    "sgd": sgd,
    "lion": lion,
    "muon": muon,
}


def build_optimizer(config: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`: optional global-norm clipping, then the configured optimizer driven by the schedule.

    `tx.update` needs `params` (weight decay reads them). The schedule is
    returned so the loop can log the learning rate of each step.
    """
    validate(config)
    oc = config.optimizer
    schedule = build_schedule(config)
    mask = functools.partial(
        weight_decay_mask, decay_embeddings=bool(oc.decay_embeddings), decay_norms=bool(oc.decay_norms)
    )
    parts = [optax.clip_by_global_norm(oc.grad_clip)] if oc.grad_clip > 0 else []
    parts.append(OPTIMIZERS[oc.name](oc, schedule, mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- validation


def _choice(field: str, value: Any, registry: dict[str, Any]) -> None:
    if value not in registry:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(registry)}")


def _in_range(field: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not numeric or (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{field}={value!r} must be in {interval}")


def _check_wsd(config: ConfigDict) -> None:
    steps, sc = config.train.steps, config.schedule
    decay_start = steps - wsd_decay_steps(sc.decay_fraction, steps)
    if sc.warmup_steps > decay_start:
        raise ValueError(
            f"schedule.warmup_steps={sc.warmup_steps} runs into the wsd decay phase, which starts at step "
            f"{decay_start} (train.steps={steps}, schedule.decay_fraction={sc.decay_fraction})"
        )


def _check_inverse_sqrt(config: ConfigDict) -> None:
    if config.schedule.warmup_steps == 0:
        raise ValueError("schedule.warmup_steps=0 must be positive for inverse_sqrt (lr * sqrt(warmup / step))")


# Checks that only one schedule needs; the shared ones are in _check_schedule.
_SCHEDULE_CHECKS: dict[str, Callable[[ConfigDict], None]] = {"wsd": _check_wsd, "inverse_sqrt": _check_inverse_sqrt}


def _check_schedule(config: ConfigDict) -> None:
    sc, steps = config.schedule, config.train.steps
    _choice("schedule.name", sc.name, SCHEDULES)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"train.steps={steps!r} must be a positive integer")
    _in_range("optimizer.lr", config.optimizer.lr, 0.0, math.inf, lo_open=True, hi_open=True)
    warmup = sc.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"schedule.warmup_steps={warmup!r} must be a non-negative integer")
    if warmup > steps:
        raise ValueError(f"schedule.warmup_steps={warmup} exceeds train.steps={steps}")
    _in_range("schedule.final_lr_fraction", sc.final_lr_fraction, 0.0, 1.0)
    _in_range("schedule.decay_fraction", sc.decay_fraction, 0.0, 1.0, lo_open=True)
    _SCHEDULE_CHECKS.get(sc.name, lambda c: None)(config)


def validate(config: ConfigDict) -> None:
    """Raises a one-line ValueError naming the first bad optimizer / schedule field; builds nothing."""
    oc = config.optimizer
    _choice("optimizer.name", oc.name, OPTIMIZERS)
    _in_range("optimizer.b1", oc.b1, 0.0, 1.0, hi_open=True)
    _in_range("optimizer.b2", oc.b2, 0.0, 1.0, hi_open=True)
    _in_range("optimizer.eps", oc.eps, 0.0, math.inf, hi_open=True)
    _in_range("optimizer.weight_decay", oc.weight_decay, 0.0, math.inf, hi_open=True)
    _in_range("optimizer.grad_clip", oc.grad_clip, 0.0, math.inf, hi_open=True)
    if oc.name == "muon":
        _in_range("optimizer.muon_momentum", oc.muon_momentum, 0.0, 1.0, hi_open=True)
        _choice("optimizer.muon_ns_dtype", oc.muon_ns_dtype, {"float32": None, "bfloat16": None})
        _in_range("optimizer.muon_adam_lr_multiplier", oc.muon_adam_lr_multiplier, 0.0, math.inf, lo_open=True, hi_open=True)
        steps = oc.muon_ns_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"optimizer.muon_ns_steps={steps!r} must be a positive integer")
    _check_schedule(config)
