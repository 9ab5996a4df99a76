"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """One token per row [B]: greedy when `temperature` is the Python number 0, else scaled by
    `temperature`, filtered to the `top_k` largest (0 = off), then to the top-p nucleus
    (arXiv:1904.09751; 1 = off), and drawn with `rng`. Works on traced settings.
    """
    greedy = isinstance(temperature, (int, float)) and temperature == 0
    return sample_filtered(logits_BV, rng, jnp.asarray(temperature, jnp.float32), top_k, top_p, greedy)


def sample_filtered(
    logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, greedy: bool
) -> jax.Array:
    """`sample` with `greedy` static; the filters always run, so any setting (traced) shares one compilation."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    v = logits_BV.shape[-1]
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    # top-k: keep logits >= the k-th largest (ties at the boundary are kept).
    kth_B = jnp.take(sorted_BV, jnp.clip(top_k, 1, v) - 1, axis=-1)
    kth_B = jnp.where(top_k > 0, kth_B, -jnp.inf)
    sorted_BV = jnp.where(sorted_BV >= kth_B[:, None], sorted_BV, -jnp.inf)
    # top-p: the smallest prefix of the sorted, top-k filtered distribution whose mass reaches top_p.
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.maximum(jnp.sum(before_BV < top_p, axis=-1), 1)
    cutoff_B = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    # top_p = 1 keeps everything, even a tail the float32 running sum has already rounded up to 1.
    cutoff_B = jnp.where(top_p < 1, cutoff_B, -jnp.inf)
    logits_BV = jnp.where(logits_BV >= jnp.maximum(kth_B, cutoff_B)[:, None], logits_BV, -jnp.inf)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
