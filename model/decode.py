"""KV-cache decoding steps: a batched prefill of padded prompts, then one token per row per step.

The cache is a plain pytree (`KVCache`), allocated once for `max_len` slots and
updated functionally. Row b of a batch keeps its tokens in slots
[start_B[b], end_B[b]); the token in slot s has rotary position s - start_B[b],
so every prompt starts at position 0 whether the batch is left padded (pad
before `start_B`) or right padded (stale slots past `end_B`, overwritten as the
row grows and never attended to). `model.generate` drives these steps.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from model import axes
from model.config import ModelConfig
from model.layers import attend, attention_mask, dtype_of, einsum, rope_tables
from model.llama import Block, Llama, Params, unstack_layers, with_layers

PADDING_SIDES = ("left", "right")
# Each layer's cache is its own [B, K, S, H] array, split over batch and kv heads
# as the attention activations are. Kv heads come before slots so that each
# (row, head) is one contiguous [S, H] matrix the attention dots read in place
# (with slots first XLA:CPU copies every layer's cache on each step), and layers
# are separate arrays rather than one [L, ...] stack, whose per-layer slices XLA
# copies out on every step (bench/README.md).
CACHE_AXES = (axes.ACT_BATCH, axes.ACT_KV_HEADS, axes.ACT_SEQ, None)


class KVCache(NamedTuple):
    """Keys and values, one [B, K, S, H] array per layer, and the slots each row occupies."""

    k_BKSH: tuple[jax.Array, ...]
    v_BKSH: tuple[jax.Array, ...]
    start_B: jax.Array  # int32: first slot of the row's sequence (its position 0)
    end_B: jax.Array  # int32: next slot to write; slots [start, end) are attended to


def cache_logical_axes(n_layers: int) -> KVCache:
    """PartitionSpecs of logical axis names matching `KVCache`, e.g. to build jit out_shardings."""
    kv = (PartitionSpec(*CACHE_AXES),) * n_layers
    return KVCache(kv, kv, PartitionSpec(axes.ACT_BATCH), PartitionSpec(axes.ACT_BATCH))


def _constrain(cache: KVCache) -> KVCache:
    """Applies the cache's logical sharding; a no-op unless logical axis rules are set."""
    specs = cache_logical_axes(len(cache.k_BKSH))
    return jax.tree.map(nn.with_logical_constraint, cache, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row, in the compute dtype."""
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_size)
    zeros = tuple(jnp.zeros(shape, dtype_of(cfg.dtype)) for _ in range(cfg.n_layers))
    empty_B = jnp.zeros((batch,), jnp.int32)
    return _constrain(KVCache(zeros, zeros, empty_B, empty_B))


def decoding_layout(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """The config and parameters with layers unrolled, as the decoder runs them.

    Done once per `stream`: a scanned model's stacked [L, ...] weights would
    otherwise be sliced (copied) layer by layer inside every compiled step.
    The unrolled copy of a scanned model's weights lives as long as the stream.
    """
    if not cfg.scan_layers:
        return cfg, params
    unrolled = cfg.replace(scan_layers=False)
    return unrolled, _relayout(cfg, unrolled, params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _relayout(cfg: ModelConfig, to: ModelConfig, params: Params) -> Params:
    return with_layers(to, params, unstack_layers(cfg, params))


def _attend_to_cache(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """`layers.attend` over one layer's cache, which already holds the new keys and values."""
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores_BKGTS = einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH, jnp.float32) / math.sqrt(h)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
    # Rows of probs times the cache, in the order XLA:CPU multiplies fastest: asking for BTKGH
    # directly makes it contract the cache over slots as the left operand, a slow layout.
    out_BKGTH = einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _extend(
    cfg: ModelConfig, params: Params, cache: KVCache, tokens_BT: jax.Array, n_new_B: jax.Array, *, fresh: bool
) -> tuple[jax.Array, KVCache]:
    """Runs `tokens_BT` from each row's `end_B` slot; returns the logits after each row's last new token.

    Row b's tokens past `n_new_B[b]` are padding: their keys are written but lie
    past the new `end_B`, so nothing attends to them. With `fresh` the cache is
    known to be empty and is not read.
    """
    b, t = tokens_BT.shape
    slot_BT = cache.end_B[:, None] + jnp.arange(t, dtype=jnp.int32)
    cos_BTh, sin_BTh = rope_tables(cfg, slot_BT - cache.start_B[:, None])
    if fresh:  # new keys: causal among themselves and not before the row's start (left padding)
        index_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_BTS = attention_mask(index_BT, index_BT) & (slot_BT >= cache.start_B[:, None])[:, None, :]
    else:  # the row's live slots up to each new token's own
        slot_S = jnp.arange(cache.k_BKSH[0].shape[2], dtype=jnp.int32)
        mask_BTS = (slot_S >= cache.start_B[:, None, None]) & (slot_S <= slot_BT[:, :, None])

    # Each row's new keys and values go to its own slots: a scatter, in place when the cache is
    # donated. The two index arrays are split by a slice, so their (B, T) dims lead the update.
    rows_B1 = jnp.arange(b)[:, None]

    def write(cache_BKSH: jax.Array, new_BTKH: jax.Array) -> jax.Array:
        return cache_BKSH.at[rows_B1, :, slot_BT].set(new_BTKH.astype(cache_BKSH.dtype), mode="drop")

    llama, block = Llama(cfg), Block(cfg)
    x_BTD = llama.apply({"params": params}, tokens_BT, method=Llama.embed)
    k_cache, v_cache = [], []
    # Layers unrolled whatever cfg.scan_layers says: a scanned step slices (copies) each layer's
    # weights and cache out of the stacks (`stream` passes unrolled weights, see decoding_layout).
    for i, p in enumerate(unstack_layers(cfg, params)):

        def attend_fn(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, i: int = i) -> jax.Array:
            # Written before it is read: reading the old cache and then writing it in place
            # made XLA copy each layer's cache twice per step.
            k_cache.append(write(cache.k_BKSH[i], k_BTKH))
            v_cache.append(write(cache.v_BKSH[i], v_BTKH))
            if fresh:  # the cache was empty: attend to the new keys alone
                return attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
            return _attend_to_cache(q_BTNH, k_cache[i], v_cache[i], mask_BTS)

        x_BTD, _, _ = block.apply({"params": p}, x_BTD, cos_BTh, sin_BTh, attend_fn, method=Block.with_attention)

    last_B11 = (n_new_B - 1)[:, None, None]
    x_B1D = jnp.take_along_axis(x_BTD, last_B11, axis=1)
    logits_BV = llama.apply({"params": params}, x_B1D, method=Llama.logits)[:, 0]
    return logits_BV, _constrain(KVCache(tuple(k_cache), tuple(v_cache), cache.start_B, cache.end_B + n_new_B))


def prefill(
    cfg: ModelConfig, params: Params, cache: KVCache, tokens_BT: jax.Array, lengths_B: jax.Array, padding: str = "left"
) -> tuple[jax.Array, KVCache]:
    """Fills an empty cache with padded prompts; returns the logits after each prompt [B, V] and the cache.

    `lengths_B` are the true prompt lengths; `padding` says on which side of
    each row the pad tokens lie ("left" or "right").
    """
    b, t = tokens_BT.shape
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    if padding == "left":
        start_B, n_new_B = t - lengths_B, jnp.full((b,), t, jnp.int32)
    elif padding == "right":
        start_B, n_new_B = jnp.zeros((b,), jnp.int32), lengths_B
    else:
        raise ValueError(f"padding={padding!r} must be one of {', '.join(PADDING_SIDES)}")
    cache = cache._replace(start_B=start_B, end_B=jnp.zeros((b,), jnp.int32))
    return _extend(cfg, params, cache, tokens_BT, n_new_B, fresh=True)


def decode_step(cfg: ModelConfig, params: Params, cache: KVCache, tokens_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Appends one token per row at that row's next slot; returns the next-token logits [B, V] and the cache."""
    return _extend(cfg, params, cache, tokens_B[:, None], jnp.ones_like(cache.end_B), fresh=False)
