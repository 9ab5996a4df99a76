"""The optax chain built from an experiment config: schedules, clipping, weight-decay masks.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

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


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The dict keys along a tree path; box attributes (`.value`) and other key kinds are skipped."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


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
        names = _path_names(path)
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


# Hidden matrices Muon orthogonalises, by (parent, name): their rank without a stacked layer
# axis, and which end holds `embed` (in-projections read it first, out-projections write it last).
_MUON_MATRICES: dict[tuple[str, str], tuple[int, str]] = {
    ("attn", "q"): (3, "in"),
    ("attn", "k"): (3, "in"),
    ("attn", "v"): (3, "in"),
    ("attn", "o"): (3, "out"),
    ("mlp", "gate"): (2, "in"),
    ("mlp", "up"): (2, "in"),
    ("mlp", "down"): (2, "out"),
}


def muon_dimension_numbers(names: tuple[str, ...], ndim: int) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees the parameter at `names` as a matrix (None: not a hidden matrix, Adam's job).

    Reduction axes are the inputs (`embed` for q/k/v/gate/up; heads x head_dim
    for `o`, `mlp` for `down`), output axes the rest; a leading stacked layer
    axis (scanned layers) is a batch axis, each layer orthogonalised alone.
    """
    spec = _MUON_MATRICES.get(tuple(names[-2:]))
    if spec is None:
        return None
    rank, embed_end = spec
    lead = ndim - rank
    if embed_end == "in":
        return optax.contrib.MuonDimensionNumbers(reduction_axis=lead, output_axis=tuple(range(lead + 1, ndim)))
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(lead, ndim - 1)), output_axis=ndim - 1)


def _muon_dims_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: muon_dimension_numbers(_path_names(p), x.ndim), tree)


def _muon_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "adam" if muon_dimension_numbers(_path_names(p), x.ndim) is None else "muon", params
    )


# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024, modded-nanogpt): they push every
# singular value into roughly [0.7, 1.2] in five steps, which is as good as U V^T for training.
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x_BMN: jax.Array, steps: int, eps: float = 1e-8, dtype: Any = jnp.float32) -> jax.Array:
    """Approximately orthogonalises each (M, N) matrix, M <= N: `U S' V^T` with S' ~ 1 for `U S V^T`.

    The iterates are kept in `dtype` and every matmul accumulates in float32; bfloat16 is
    what modded-nanogpt uses, and where the CPU has bf16 dot kernels it halves their cost.
    """
    a, b, c = MUON_NS_COEFFS
    # Einsums, not matmuls of transposes: XLA:CPU runs a bf16 dot fed by a transpose in float32.
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    out_dtype = x_BMN.dtype
    x_BMN = (x_BMN / (jnp.sqrt(jnp.sum(x_BMN * x_BMN, axis=(1, 2), keepdims=True)) + eps)).astype(dtype)
    for _ in range(steps):
        gram_BMM = mm("bmn,bkn->bmk", x_BMN, x_BMN)
        low_BMM = gram_BMM.astype(dtype)
        poly_BMM = (b * gram_BMM + c * mm("bmk,bkj->bmj", low_BMM, low_BMM)).astype(dtype)
        x_BMN = a * x_BMN + mm("bmk,bkn->bmn", poly_BMM, x_BMN).astype(dtype)
    return x_BMN.astype(out_dtype)


def _matrix_view(shape: tuple[int, ...], dims: optax.contrib.MuonDimensionNumbers):
    """`(to, back)`: array <-> stack of (M, N) matrices with M <= N (the short side first, as NS wants)."""
    as_tuple = lambda a: (a % len(shape),) if isinstance(a, int) else tuple(i % len(shape) for i in a)
    red, out = as_tuple(dims.reduction_axis), as_tuple(dims.output_axis)
    batch = tuple(i for i in range(len(shape)) if i not in red + out)
    perm = batch + red + out
    fan_in, fan_out = math.prod(shape[i] for i in red), math.prod(shape[i] for i in out)
    flip = fan_in > fan_out
    permuted = tuple(shape[i] for i in perm)
    inverse = tuple(perm.index(i) for i in range(len(shape)))

    def to(x: jax.Array) -> jax.Array:
        m = jnp.transpose(x, perm).reshape(-1, fan_in, fan_out)
        return jnp.swapaxes(m, 1, 2) if flip else m

    def back(m: jax.Array) -> jax.Array:
        m = jnp.swapaxes(m, 1, 2) if flip else m
        return jnp.transpose(m.reshape(permuted), inverse)

    return to, back


class MuonState(NamedTuple):
    count: jax.Array  # int32 scalar: updates so far
    mu: Any  # momentum, shaped like the Muon-owned parameters


def scale_by_muon(
    momentum: float, ns_steps: int, rms: float = 0.2, ns_dtype: Any = jnp.float32
) -> optax.GradientTransformation:
    """Muon's direction for the hidden matrices: Nesterov momentum, orthogonalised, rescaled to AdamW's RMS.

    The momentum is optax's (bias-corrected Nesterov, as `optax.contrib.scale_by_muon`,
    which tests/test_optimizer.py checks this against). Matrices of one shape
    are orthogonalised together, as one batch: at the default experiment's size
    the 28 hidden matrices become three batched Newton-Schulz chains, which took
    Muon's step from ~1.5x AdamW's (one chain per matrix) to ~1.4x here
    (bench/README.md, `optimizer_step.py`). Each orthogonalised update is scaled by
    `rms * sqrt(max(fan_in, fan_out))`: an orthogonal m x n matrix has RMS
    1/sqrt(max(m, n)) and AdamW's updates have RMS ~0.2, so `rms=0.2` lets
    Muon reuse AdamW's learning rate and weight decay (Liu et al., "Muon is
    Scalable for LLM Training", arXiv:2502.16982 §2.2). `ns_dtype` is the dtype of the
    Newton-Schulz iterates (see `newton_schulz`).
    """

    def init(params: Any) -> MuonState:
        return MuonState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params))

    def update(updates: Any, state: MuonState, params: Any = None) -> tuple[Any, MuonState]:
        del params
        mu = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.mu, updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        direction = jax.tree.map(
            lambda m, g: momentum * m / (1 - momentum ** (t + 1)) + (1 - momentum) * g / (1 - momentum**t),
            mu,
            updates,
        )
        leaves, treedef = jax.tree.flatten(direction)
        dims = treedef.flatten_up_to(_muon_dims_tree(direction))
        views = [_matrix_view(x.shape, d) for x, d in zip(leaves, dims)]
        stacks = [to(x) for x, (to, _) in zip(leaves, views)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, m in enumerate(stacks):
            groups.setdefault((m.shape[1:], m.dtype), []).append(i)
        out: list[Any] = [None] * len(leaves)
        for (mn, _), members in groups.items():
            batch = newton_schulz(jnp.concatenate([stacks[i] for i in members]), ns_steps, dtype=ns_dtype)
            scale = rms * math.sqrt(max(mn))
            for i, part in zip(members, jnp.split(batch, np.cumsum([stacks[i].shape[0] for i in members])[:-1])):
                out[i] = views[i][1](part * scale)
        return treedef.unflatten(out), MuonState(count=count, mu=mu)

    return optax.GradientTransformation(init, update)


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
    return optax.partition({"muon": hidden, "adam": adamw(oc, adam_schedule, mask)}, _muon_labels)


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
