"""The optax chain built from an experiment config: schedules, clipping, weight-decay masks, the optimizers.

`validate(config, model_cfg)` checks every optimizer and schedule field without
building anything, so the trainer can fail before compiling.
`build_optimizer(config, model_cfg)` returns `(tx, schedule)`: global-norm
clipping (when `optimizer.grad_clip > 0`) followed by the registered optimizer,
which reads its learning rate from the registered schedule. Gradient
accumulation is the train step's job, not ours. The model config brings the
parametrization: under μP (`model.parametrization=mup`, model/mup.py) the
optimizer comes from `MUP_OPTIMIZERS`, which scale the hidden matrices' updates
and Adam's epsilon with width.

Weight decay is masked by parameter name (see `weight_decay_mask`) so that it
works on plain parameters, on the scanned layout (where norm scales are 2-D)
and on parameters boxed in flax `LogicallyPartitioned` / `Partitioned`
metadata, which is how the trainer derives optimizer-state shardings through
`jax.eval_shape(tx.init, boxed_params)`.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from model import ModelConfig
from model.mup import Multipliers, is_hidden_matrix
from train.muon import muon_labels, param_names, scale_by_muon

Mask = Callable[[Any], Any]
# The `optimizer.*` fields as attributes; `lr` and `weight_decay` may be traced (see INJECTED).
OptimizerFields = Any


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
    return schedule_of(config, float(config.optimizer.lr))


def schedule_of(config: ConfigDict, lr: float | jax.Array) -> optax.Schedule:
    """`config`'s schedule peaking at `lr`, which may be traced (the optimizer state's injected lr)."""
    return SCHEDULES[config.schedule.name](config.schedule, lr, int(config.train.steps))


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


def adamw(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """Adam with decoupled weight decay (arXiv:1711.05101); optax scales the decay by the lr, as PyTorch does."""
    return optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=mask)


def sgd(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum `b1` and decoupled weight decay (arXiv:1711.05101), kept out of the momentum."""
    return optax.chain(
        optax.trace(decay=oc.b1),
        optax.masked(optax.add_decayed_weights(oc.weight_decay), mask),
        optax.scale_by_learning_rate(schedule),
    )


def lion(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
    """Lion (arXiv:2302.06675): sign updates; the paper uses a 3-10x smaller lr and larger weight decay than AdamW."""
    return optax.lion(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=mask)


def muon(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask) -> optax.GradientTransformation:
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


OPTIMIZERS: dict[str, Callable[[OptimizerFields, optax.Schedule, Mask], optax.GradientTransformation]] = {
    "adamw": adamw,
    "sgd": sgd,
    "lion": lion,
    "muon": muon,
}


# ----------------------------------------------------------------------------- μP (model/mup.py)


def hidden_matrix_mask(params: Any) -> Any:
    """A tree of bools shaped like `params` (boxes kept, as `weight_decay_mask`): True on the hidden matrices."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: is_hidden_matrix(param_names(path)), params)


def _mup_chain(
    direction: optax.GradientTransformation, oc: OptimizerFields, schedule: optax.Schedule, mask: Mask, mults: Multipliers
) -> optax.GradientTransformation:
    """`direction`, its hidden-matrix entries times base/width, then decoupled decay and the learning rate.

    The decay term is added after the width scaling, so its per-step size lr * weight_decay is the
    same at every width (the mup package's MuAdamW: lr / m and weight_decay * m on hidden matrices).
    At the base width the scale is 1.0 and this is exactly the standard-parametrization chain.
    """
    return optax.chain(
        direction,
        optax.masked(optax.scale(mults.hidden_lr), hidden_matrix_mask),
        optax.add_decayed_weights(oc.weight_decay, mask),
        optax.scale_by_learning_rate(schedule),
    )


def mup_adamw(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask, mults: Multipliers) -> optax.GradientTransformation:
    """`adamw` under μP (arXiv:2203.03466 Tables 3 and 8): hidden-matrix lr / m, epsilon / m (model/mup.py)."""
    adam = optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps * mults.adam_eps)
    return _mup_chain(adam, oc, schedule, mask, mults)


def mup_lion(oc: OptimizerFields, schedule: optax.Schedule, mask: Mask, mults: Multipliers) -> optax.GradientTransformation:
    """`lion` under μP: its sign updates are entrywise normalised like Adam's, so Adam's rule applies (the
    mup package's advice for "Adam-like" optimizers): hidden-matrix lr / m. Lion has no epsilon."""
    return _mup_chain(optax.scale_by_lion(b1=oc.b1, b2=oc.b2), oc, schedule, mask, mults)


# Optimizers with a μP learning-rate rule. Not here: sgd (Table 3's SGD column scales the input and
# output layers' learning rates too) and muon, whose orthogonalised updates have a fixed spectral
# norm and call for a different width rule (arXiv:2310.17813) that nothing here has checked.
MUP_OPTIMIZERS: dict[str, Callable[[OptimizerFields, optax.Schedule, Mask, Multipliers],
                                   optax.GradientTransformation]] = {
    "adamw": mup_adamw,
    "lion": mup_lion,
}


# The hyperparameters sweeps vary most live in the optimizer state (optax.inject_hyperparams) instead of
# being compiled into the step as constants: trials that differ only in them share one compiled step
# through the persistent compilation cache. Others (betas, schedule shape, ...) are compiled in.
INJECTED = ("lr", "weight_decay")
LearningRate = Callable[[Any, jax.Array], jax.Array]  # (opt_state, step) -> that step's learning rate


def build_optimizer(config: ConfigDict, model_cfg: ModelConfig) -> tuple[optax.GradientTransformation, LearningRate]:
    """`(tx, learning_rate)`: optional global-norm clipping, then the configured optimizer driven by the schedule.

    `tx.update` needs `params` (weight decay reads them). `learning_rate(opt_state, step)`
    is the step's learning rate from the state's injected peak lr, for the loop to log.
    `model_cfg` chooses the parametrization: a μP model gets `MUP_OPTIMIZERS[optimizer.name]`.
    """
    validate(config, model_cfg)
    oc = config.optimizer
    mask = functools.partial(
        weight_decay_mask, decay_embeddings=bool(oc.decay_embeddings), decay_norms=bool(oc.decay_norms)
    )

    def make(lr: jax.Array, weight_decay: jax.Array) -> optax.GradientTransformation:
        hp = types.SimpleNamespace(**{**oc.to_dict(), "lr": lr, "weight_decay": weight_decay})
        schedule = schedule_of(config, lr)
        parts = [optax.clip_by_global_norm(oc.grad_clip)] if oc.grad_clip > 0 else []
        if model_cfg.parametrization == "sp":
            parts.append(OPTIMIZERS[oc.name](hp, schedule, mask))
        else:
            parts.append(MUP_OPTIMIZERS[oc.name](hp, schedule, mask, model_cfg.multipliers))
        return optax.chain(*parts)

    tx = optax.inject_hyperparams(make)(**{name: float(oc[name]) for name in INJECTED})

    def learning_rate(opt_state: Any, step: jax.Array) -> jax.Array:
        return schedule_of(config, opt_state.hyperparams["lr"])(step)

    return tx, learning_rate


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


def validate(config: ConfigDict, model_cfg: ModelConfig) -> None:
    """Raises a one-line ValueError naming the first bad optimizer / schedule field; builds nothing."""
    oc = config.optimizer
    _choice("optimizer.name", oc.name, OPTIMIZERS)
    if model_cfg.parametrization != "sp" and oc.name not in MUP_OPTIMIZERS:
        raise ValueError(f"optimizer.name={oc.name!r} has no rule for model.parametrization="
                         f"{model_cfg.parametrization!r}; use one of: {', '.join(MUP_OPTIMIZERS)}")
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
