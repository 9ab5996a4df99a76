"""KV-cache decoding: batched prefill, one-token steps, sampling (greedy, temperature, top-k, top-p).

The cache is a plain pytree (`KVCache`), allocated once for `max_len` slots and
updated functionally. Row b of a batch keeps its tokens in slots
[start_B[b], end_B[b]); the token in slot s has rotary position s - start_B[b],
so every prompt starts at position 0 whether the batch is left padded (pad
before `start_B`) or right padded (stale slots past `end_B`, overwritten as the
row grows and never attended to). `generate` and `stream` run one jitted
prefill and one jitted step, compiled once per (batch, padded prompt length,
max_new_tokens) and reused for every token, seed and sampling setting (one
compilation for greedy, one for sampling).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from model import axes
from model.config import ModelConfig
from model.layers import attend, attention_mask, dtype_of, einsum, rope_tables
from model.llama import Block, Llama, Params, unstack_layers, with_layers

PADDING_SIDES = ("left", "right")
# Each layer's cache is its own [B, K, S, H] array, split over batch and kv heads
# as the attention activations are. Kv heads come before slots so that each
# (row, head) is one contiguous [S, H] matrix the attention dots read in place
# (slots first made XLA:CPU copy every layer's cache on each step, 20-25 % of a
# step), and layers are separate arrays rather than one [L, ...] stack, whose
# per-layer slices XLA copies out on every step (bench/README.md).
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
    # directly made it contract the cache over slots as the left operand, ~4x slower per step.
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
    return _sample(logits_BV, rng, jnp.asarray(temperature, jnp.float32), top_k, top_p, greedy)


def _sample(
    logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, greedy: bool
) -> jax.Array:
    """`sample` with `greedy` static; the filters always run, so any setting shares one compilation."""
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


class _Settings(NamedTuple):
    """Traced sampling and stopping settings, shared by the prefill and step functions."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    eos_E: jax.Array  # stop tokens, padded with -1
    pad_id: jax.Array


def _choose(
    logits_BV: jax.Array, done_B: jax.Array, rng: jax.Array, s: _Settings, greedy: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples the next tokens; finished rows get `pad_id`. Returns (tokens_B, done_B, rng)."""
    rng, key = jax.random.split(rng)
    tokens_B = _sample(logits_BV, key, s.temperature, s.top_k, s.top_p, greedy)
    tokens_B = jnp.where(done_B, s.pad_id, tokens_B)
    return tokens_B, done_B | jnp.isin(tokens_B, s.eos_E), rng


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _prefill_and_sample(
    cfg: ModelConfig,
    max_len: int,
    padding: str,
    greedy: bool,
    rules: axes.Rules,
    params: Params,
    tokens_BT: jax.Array,
    lengths_B: jax.Array,
    rng: jax.Array,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    # The logical axis rules are a static argument so that jit's cache tells
    # calls under different rules apart; they are re-entered while tracing.
    with nn.logical_axis_rules(rules):
        cache = init_cache(cfg, tokens_BT.shape[0], max_len)
        logits_BV, cache = prefill(cfg, params, cache, tokens_BT, lengths_B, padding)
        done_B = jnp.zeros(tokens_BT.shape[:1], bool)
        tokens_B, done_B, rng = _choose(logits_BV, done_B, rng, settings, greedy)
    return tokens_B, done_B, cache, rng


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames="cache")
def _step_and_sample(
    cfg: ModelConfig,
    greedy: bool,
    rules: axes.Rules,
    params: Params,
    cache: KVCache,
    tokens_B: jax.Array,
    done_B: jax.Array,
    rng: jax.Array,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    with nn.logical_axis_rules(rules):
        logits_BV, cache = decode_step(cfg, params, cache, tokens_B)
        tokens_B, done_B, rng = _choose(logits_BV, done_B, rng, settings, greedy)
    return tokens_B, done_B, cache, rng


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, padding: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one int32 [B, T] array padded on `padding`'s side, and their lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        if padding == "left":
            tokens[row, tokens.shape[1] - len(prompt) :] = prompt
        else:
            tokens[row, : len(prompt)] = prompt
    return tokens, lengths


def _check(
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    padding: str,
) -> None:
    """Rejects a bad request with one line naming the argument, before anything is compiled."""
    v = cfg.vocab_size

    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not is_int(t) or not 0 <= t < v]
        if bad:
            raise ValueError(f"prompt {i} has token {bad[0]!r} outside the vocabulary [0, {v})")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the model's max_seq_len={cfg.max_seq_len}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k filtering)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filtering)")
    for name, ids in (("eos_id", eos_ids), ("pad_id", [pad_id])):
        bad = [t for t in ids if not is_int(t) or not 0 <= t < v]
        if bad:
            raise ValueError(f"{name}={bad[0]!r} must be a token id in [0, {v})")
    if padding not in PADDING_SIDES:
        raise ValueError(f"padding={padding!r} must be one of {', '.join(PADDING_SIDES)}")


def stream(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    padding: str = "left",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Checks the request, dispatches the prefill, and returns an iterator of `(tokens_B, live_B)`,
    one per generated position.

    `tokens_B` holds each row's new token; `live_B` says whether it is real
    output (False once the row has emitted an EOS, after which its token is
    `pad_id`). Iteration stops after `max_new_tokens` positions or once every
    row has emitted an EOS (any of `eos_id`). Sampling is greedy when
    `temperature` is 0; otherwise the draws depend only on `rng` and the settings.
    """
    eos_ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, padding)
    # Padded to a fixed length with an id no token has, so up to 4 stop tokens share one compilation.
    eos_E = np.full(max(4, len(eos_ids)), -1, np.int32)
    eos_E[: len(eos_ids)] = eos_ids
    temperature_ = jnp.float32(temperature if temperature > 0 else 1.0)
    settings = _Settings(temperature_, jnp.int32(top_k), jnp.float32(top_p), eos_E, np.int32(pad_id))
    tokens_BT, lengths_B = pad_prompts(prompts, pad_id, padding)
    # The last sampled token is never fed back, so it needs no slot.
    max_len = tokens_BT.shape[1] + max_new_tokens - 1
    rules = tuple(nn.get_logical_axis_rules())
    cfg, params = decoding_layout(cfg, params)
    first = functools.partial(_prefill_and_sample, cfg, max_len, padding, temperature == 0, rules, params)
    step = functools.partial(_step_and_sample, cfg, temperature == 0, rules, params)
    return _decode_loop(first(tokens_BT, lengths_B, rng, settings), step, settings, max_new_tokens)


def _decode_loop(
    state: tuple, step: Callable[..., tuple], settings: _Settings, max_new_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The body of `stream`: from the prefill's `state`, steps dispatched one ahead of the tokens being read."""
    tokens_B, done_B, cache, rng = state
    live_B = np.ones(tokens_B.shape[0], bool)
    for i in range(max_new_tokens):
        more = i + 1 < max_new_tokens
        if more:  # dispatch the next step before waiting for this one's tokens
            ahead = step(cache, tokens_B, done_B, rng, settings)
        tokens, done = np.asarray(tokens_B), np.asarray(done_B)
        yield tokens, live_B
        if done.all() or not more:
            return
        live_B = ~done
        tokens_B, done_B, cache, rng = ahead


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    padding: str = "left",
) -> list[list[int]]:
    """The new tokens of each prompt (prompt excluded), up to and including its first EOS; see `stream`."""
    out: list[list[int]] = [[] for _ in prompts]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id, padding=padding)
    for tokens_B, live_B in stream(cfg, params, prompts, max_new_tokens=max_new_tokens, rng=rng, **kw):
        for row in np.flatnonzero(live_B):
            out[row].append(int(tokens_B[row]))
    return out
