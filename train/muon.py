"""Muon for the hidden matrices: Nesterov momentum, orthogonalised by Newton-Schulz, at AdamW's update size.

`scale_by_muon` is the optax transformation; `muon_labels` says which
parameters it owns (attention q/k/v/o and MLP gate/up/down; the rest go to
AdamW, see `train.optimizer.muon`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def param_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The dict keys along a tree path; box attributes (`.value`) and other key kinds are skipped."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


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


def muon_dims_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: muon_dimension_numbers(param_names(p), x.ndim), tree)


def muon_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "adam" if muon_dimension_numbers(param_names(p), x.ndim) is None else "muon", params
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
    are orthogonalised together, as one batch: a model's hidden matrices come in
    a few shapes, so a few batched Newton-Schulz chains replace one small chain per
    matrix, whose dots leave a CPU idle (bench/README.md, `optimizer_step.py`).
    Each orthogonalised update is scaled by
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
        dims = treedef.flatten_up_to(muon_dims_tree(direction))
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
