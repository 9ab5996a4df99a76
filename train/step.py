"""Pure loss, train and eval steps, and the one helper that jits them over a mesh.

A batch is a dict of [B, T] arrays: `inputs`, `targets` (int32), `loss_mask`
(float32, 0 on padding), `positions` and `segment_ids` (int32, per packed
document), and optionally `target_bytes` (int32, UTF-8 bytes each target token
stands for; the denominator of bits per byte).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from model import ModelConfig, axes, forward
from train import guard
from train import mesh as mesh_lib
from train.optimizer import LearningRate
from train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def loss_sums(
    model_cfg: ModelConfig, params: Any, batch: Batch, z_loss: float, document_mask: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed (not averaged) objective over the batch's unmasked tokens, and its parts.

    Sums let micro-batches and eval batches of any size combine exactly. Without
    `document_mask` (config `data.document_mask`, the Llama 3 ablation) the packed
    segments and per-document positions are dropped here, the one place every
    source's batches reach the model: each row is attended as one causal
    sequence at positions 0..T-1, and `loss_mask` still leaves out the targets
    that start a new document, so losses and bytes count the same tokens.
    """
    packing = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]} if document_mask else {}
    logits_BTV = forward(model_cfg, params, batch["inputs"], **packing)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum((log_z_BT - target_logit_BT) * mask_BT)
    z_sum = jnp.sum(jnp.square(log_z_BT) * mask_BT)
    parts = {"ce_sum": ce_sum, "z_sum": z_sum, "tokens": jnp.sum(mask_BT)}
    if "target_bytes" in batch:
        parts["bytes"] = jnp.sum(batch["target_bytes"].astype(jnp.float32) * mask_BT)
    return ce_sum + z_loss * z_sum, parts


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], taking every n-th row so each shard stays evenly split."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, axes.ACT_BATCH) + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    learning_rate: LearningRate,
    guard_cfg: guard.GuardConfig = guard.GuardConfig(),
    microbatches: int = 1,
    z_loss: float = 0.0,
    document_mask: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from the whole global batch (accumulated over micro-batches).

    The update is applied only if train/guard.py's `decide` says so (finite loss, gradients
    and update); otherwise the parameters and optimizer state stay as they were.
    """
    loss_fn = functools.partial(loss_sums, model_cfg, z_loss=z_loss, document_mask=document_mask)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(carry: tuple[Any, dict], micro: Batch) -> tuple[tuple[Any, dict], None]:
        grads, sums = carry
        g, parts = grad_fn(state.params, micro)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, parts)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sums0 = {"ce_sum": 0.0, "z_sum": 0.0, "tokens": 0.0} | ({"bytes": 0.0} if "target_bytes" in batch else {})
    sums0 = jax.tree.map(lambda v: jnp.zeros((), jnp.float32), sums0)
    if microbatches == 1:
        (grad_sums, sums), _ = accumulate((zeros, sums0), batch)
    else:
        (grad_sums, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), split_microbatches(batch, microbatches))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grad_sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    loss, grad_norm, update_norm = sums["ce_sum"] / tokens, optax.tree.norm(grads), optax.tree.norm(updates)
    apply, guard_state, flags = guard.decide(state.guard, loss, grad_norm, update_norm, guard_cfg)
    params, opt_state = guard.select(
        apply, (optax.apply_updates(state.params, updates), opt_state), (state.params, state.opt_state))
    metrics = {
        "loss": loss,
        "z_loss": sums["z_sum"] / tokens,
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "param_norm": optax.tree.norm(params),
        "lr": learning_rate(state.opt_state, state.step),
        "tokens": sums["tokens"],
        **flags,
        "grad_norms": guard.grad_norms(grads, apply, model_cfg.scan_layers),  # forensics; not a scalar
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, guard=guard_state)
    return new_state, metrics


def eval_step(
    params: Any, batch: Batch, *, model_cfg: ModelConfig, document_mask: bool = True
) -> dict[str, jax.Array]:
    """Summed cross-entropy, token and byte counts of one batch."""
    _, parts = loss_sums(model_cfg, params, batch, 0.0, document_mask)
    return parts


def finish_eval(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte from summed eval parts."""
    tokens = max(sums["tokens"], 1.0)
    out = {"loss": sums["ce_sum"] / tokens, "perplexity": math.exp(min(sums["ce_sum"] / tokens, 50.0)), "tokens": sums["tokens"]}
    if sums.get("bytes"):
        # Nats over the real byte length of the text (arXiv:2101.00027 §4.2), so tokenizers compare fairly.
        out["bits_per_byte"] = sums["ce_sum"] / (math.log(2) * sums["bytes"])
    return out


def batch_shardings(mesh: Mesh, rules: axes.Rules, keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, NamedSharding]:
    sharding = mesh_lib.batch_sharding(mesh, rules)
    return {k: sharding for k in keys}


def jit_over_mesh(
    fn: Callable[..., Any],
    mesh: Mesh,
    rules: axes.Rules,
    in_shardings: tuple[Any, ...],
    out_shardings: Any,
    donate_argnums: tuple[int, ...] = (),
) -> Callable[..., Any]:
    """jax.jit with explicit shardings whose tracing sees the mesh and the logical rules.

    Train, eval and the planner all build their compiled functions here.
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    def lower(*args: Any) -> jax.stages.Lowered:
        """The same jit lowered for (abstract) arguments, under the same mesh and rules: the planner's entry."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)

    call.lower = lower  # type: ignore[attr-defined]
    return call
