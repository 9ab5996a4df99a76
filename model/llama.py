"""The Llama decoder: embed -> (scanned) blocks -> norm -> logits, and its public API."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes
from model.config import REMAT_POLICIES, ModelConfig
from model.layers import (
    Attention,
    RMSNorm,
    attention_mask,
    dtype_of,
    einsum,
    full_attention,
    init_normal,
    logical_param,
    output_init,
    rope_tables,
)
from model.mlp import MLP

Params = dict[str, Any]
# Attention from projected heads: (q_BTNH, k_BTKH, v_BTKH) -> out_BTNH.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_ACT_BTD = (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_EMBED)


class Block(nn.Module):
    """One pre-norm transformer block. `__call__` returns `(x, None)` so it can be scanned."""

    cfg: ModelConfig

    def __call__(
        self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array, mask_BTS: jax.Array
    ) -> tuple[jax.Array, None]:
        x_BTD, _, _ = self.with_attention(x_BTD, cos_BTh, sin_BTh, full_attention(self.cfg, mask_BTS))
        return x_BTD, None

    @nn.compact
    def with_attention(
        self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array, attend_fn: AttendFn
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block with `attend_fn(q_BTNH, k_BTKH, v_BTKH)` as its attention; also returns the new k and v.

        The KV-cache decoder (model/decode.py) passes an `attend_fn` that also reads the cached keys.
        """
        x_BTD = nn.with_logical_constraint(x_BTD, _ACT_BTD)
        attn = Attention(self.cfg, name="attn")
        q_BTNH, k_BTKH, v_BTKH = attn.project_qkv(RMSNorm(self.cfg, name="attn_norm")(x_BTD), cos_BTh, sin_BTh)
        h_BTD = x_BTD + attn.project_out(attend_fn(q_BTNH, k_BTKH, v_BTKH))
        out_BTD = h_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(h_BTD))
        return nn.with_logical_constraint(out_BTD, _ACT_BTD), k_BTKH, v_BTKH


def block_class(cfg: ModelConfig) -> type[nn.Module]:
    """Block, wrapped in nn.remat when the config asks for a policy."""
    if cfg.remat_policy == "none":
        return Block
    # prevent_cse is only needed outside scan (arXiv jax docs: scan already blocks CSE).
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
    """Decoder-only Llama. Layers are scanned (one compiled block) or unrolled."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        init = init_normal(cfg.init_std)
        self.embedding_VD = logical_param(self, "embedding", (cfg.vocab_size, cfg.d_model), (axes.VOCAB, axes.EMBED), init)
        block = block_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg, name="final_norm")
        if not cfg.tie_embeddings:
            # Under μP the head keeps init_std: its logits carry the 1/m multiplier instead (model/mup.py).
            head_init = output_init(cfg, cfg.init_std)
            shape, names = (cfg.d_model, cfg.vocab_size), (axes.EMBED, axes.VOCAB)
            self.lm_head_DV = logical_param(self, "lm_head", shape, names, head_init)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.embedding_VD, tokens_BT, axis=0).astype(dtype_of(self.cfg.dtype))
        return nn.with_logical_constraint(x_BTD, _ACT_BTD)

    def run_layers(self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        if self.cfg.scan_layers:
            x_BTD, _ = self.layers(x_BTD, cos_BTh, sin_BTh, mask_BTS)
        else:
            for layer in self.layers:
                x_BTD, _ = layer(x_BTD, cos_BTh, sin_BTh, mask_BTS)
        return x_BTD

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and output head; logits are float32 whatever the compute dtype.

        Under μP the logits are multiplied by mup_base_width / d_model (arXiv:2203.03466 Table 8),
        here, where the KV-cache decoder computes its logits too.
        """
        x_BTD = self.final_norm(x_BTD)
        dt = dtype_of(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            logits_BTV = einsum("BTD,VD->BTV", x_BTD, self.embedding_VD.astype(dt), jnp.float32)
        else:
            logits_BTV = einsum("BTD,DV->BTV", x_BTD, self.lm_head_DV.astype(dt), jnp.float32)
        output_scale = self.cfg.multipliers.output
        if output_scale != 1.0:  # standard parametrization (and μP at its base width) skip the multiply
            logits_BTV = logits_BTV * output_scale
        return nn.with_logical_constraint(logits_BTV, (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_VOCAB))

    def __call__(
        self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
    ) -> jax.Array:
        b, t = tokens_BT.shape
        index_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions_BT is None:
            positions_BT = index_BT
        cos_BTh, sin_BTh = rope_tables(self.cfg, positions_BT)
        # Causality follows the index in the row (positions restart at each
        # packed document); segments keep packed documents apart.
        mask_BTS = attention_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
        x_BTD = self.run_layers(self.embed(tokens_BT), cos_BTh, sin_BTh, mask_BTS)
        return self.logits(x_BTD)


def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, still boxed with their logical axes; allocates nothing."""
    return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), _dummy_tokens()))["params"]


def param_logical_axes(cfg: ModelConfig) -> Any:
    """A pytree matching the parameters whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(cfg))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Freshly initialised parameters (plain arrays, logical axes stripped)."""
    boxed = Llama(cfg).init(rng, _dummy_tokens())["params"]
    return nn.meta.unbox(boxed)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] (float32) for integer tokens [B, T].

    `positions` default to 0..T-1 in every row; `segment_ids` (same shape)
    confine attention to tokens of the same packed document.
    """
    return Llama(cfg).apply({"params": params}, tokens, positions, segment_ids)


def unstack_layers(cfg: ModelConfig, params: Params) -> list[Params]:
    """The per-layer parameter trees, from either the scanned or the unrolled layout."""
    if cfg.scan_layers:
        return [jax.tree.map(lambda x: x[i], params["layers"]) for i in range(cfg.n_layers)]
    return [params[f"layers_{i}"] for i in range(cfg.n_layers)]


def with_layers(cfg: ModelConfig, params: Params, layers: list[Params]) -> Params:
    """`params` with its blocks replaced by `layers`, laid out as `cfg` expects."""
    rest = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layers_")}
    if cfg.scan_layers:
        return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {**rest, **{f"layers_{i}": layer for i, layer in enumerate(layers)}}
