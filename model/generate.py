"""Streaming generation: check a request, prefill the prompts, then sample one token per row per step.

`generate` and `stream` run one jitted prefill and one jitted step (model/decode.py),
compiled once per (batch, padded prompt length, max_new_tokens) and reused for every
token, seed and sampling setting (one compilation for greedy, one for sampling).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import axes
from model.config import ModelConfig
from model.decode import PADDING_SIDES, KVCache, decode_step, decoding_layout, init_cache, prefill
from model.llama import Params
from model.sampling import sample_filtered


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
    tokens_B = sample_filtered(logits_BV, key, s.temperature, s.top_k, s.top_p, greedy)
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


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
    """The new tokens of each prompt (prompt excluded), up to and including its first EOS.

    Takes the keyword arguments of `stream` (`max_new_tokens` and `rng` required).
    """
    out: list[list[int]] = [[] for _ in prompts]
    for tokens_B, live_B in stream(cfg, params, prompts, **kwargs):
        for row in np.flatnonzero(live_B):
            out[row].append(int(tokens_B[row]))
    return out
