"""Building blocks of the Llama decoder.

Axis legend (used in every variable suffix and einsum subscript):
  B batch          T query sequence     S key/value sequence
  D model dim      N query heads        K kv heads
  G query heads per kv head (N = K * G) H head dim
  F mlp hidden dim V vocabulary         L layers
  C the stacked gate and up projections of the MLP (model/mlp.py)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes
from model.config import ATTENTION_IMPLS, ModelConfig, RopeScaling


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def einsum(subscripts: str, a: jax.Array, b: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Two-operand einsum that accumulates in float32 and returns `out_dtype` (default: `a`'s dtype).

    In float32 this is `jnp.einsum`. With low-precision operands on CPU, every
    dot, forward and backward, is written as bf16 x bf16 -> float32: XLA:CPU
    runs that natively but turns a bf16 -> bf16 dot (or one with a float32
    cotangent) into a float32 dot on converted copies (measured in
    bench/README.md). GPUs and TPUs accumulate low-precision dots in float32
    anyway, so there it is `jnp.einsum` with `preferred_element_type`.
    """
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    low = a.dtype == b.dtype and a.dtype != jnp.float32 and jnp.issubdtype(a.dtype, jnp.floating)
    if not low or jax.default_backend() != "cpu":
        return jnp.einsum(subscripts, a, b, preferred_element_type=out_dtype)
    subscripts = subscripts.replace(" ", "")
    ins, out = subscripts.split("->")
    lhs, rhs = ins.split(",")
    for x, other in ((lhs, rhs), (rhs, lhs)):  # the backward einsums below need every index twice
        if set(x) - set(other) - set(out):
            raise ValueError(f"einsum {subscripts!r}: an index of {x!r} is summed out of one operand alone")
    return _einsum_f32_acc(subscripts, out_dtype, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_f32_acc(subscripts: str, out_dtype: jnp.dtype, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _einsum_f32_acc_fwd(subscripts, out_dtype, a, b):
    return _einsum_f32_acc(subscripts, out_dtype, a, b), (a, b)


def _einsum_f32_acc_bwd(subscripts, out_dtype, res, g):
    a, b = res
    ins, out = subscripts.split("->")
    lhs, rhs = ins.split(",")
    g = g.astype(a.dtype)
    ga = jnp.einsum(f"{out},{rhs}->{lhs}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    gb = jnp.einsum(f"{lhs},{out}->{rhs}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return ga, gb


_einsum_f32_acc.defvjp(_einsum_f32_acc_fwd, _einsum_f32_acc_bwd)


def init_normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def hidden_std(cfg: ModelConfig) -> float:
    """Init std of the hidden matrices (attention, MLP): init_std, times sqrt(base / width) under μP (model/mup.py)."""
    return cfg.init_std * cfg.multipliers.hidden_init


def output_init(cfg: ModelConfig, std: float) -> nn.initializers.Initializer:
    """The initializer of a projection that writes into the residual stream or the logits."""
    return nn.initializers.zeros if cfg.zero_init_outputs else init_normal(std)


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init) -> jax.Array:
    """Declares a parameter with logical axis names, stored in param_dtype."""
    cfg: ModelConfig = module.cfg
    return module.param(
        name, nn.with_logical_partitioning(init, names), shape, dtype_of(cfg.param_dtype)
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv:1910.07467), computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = logical_param(self, "scale", (x_BTD.shape[-1],), (axes.NORM,), nn.initializers.ones)
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
        # Cast back before scaling, as the reference implementation does.
        return scale_D.astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies of rotary embeddings (arXiv:2104.09864), [H/2] float32.

    With `scaling`, applies the Llama 3.1 rule: low frequencies are divided by
    `factor`, high ones kept, the band between smoothly interpolated.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return jnp.where(
        wavelen < high_wavelen, inv_freq, jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, interpolated)
    )


def rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, H/2] in float32 for integer positions."""
    inv_freq = rope_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def apply_rope(x_BTnH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotates the two halves of each head (the Hugging Face layout, not interleaved)."""
    cos = jnp.concatenate([cos_BTh, cos_BTh], axis=-1)[:, :, None, :].astype(x_BTnH.dtype)
    sin = jnp.concatenate([sin_BTh, sin_BTh], axis=-1)[:, :, None, :].astype(x_BTnH.dtype)
    x1, x2 = jnp.split(x_BTnH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTnH * cos + rotated * sin


def attention_mask(
    q_positions_BT: jax.Array,
    k_positions_BS: jax.Array,
    q_segments_BT: jax.Array | None = None,
    k_segments_BS: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, S] mask: causal by position, and within one document.

    Positions restart at each packed document, so causality is decided by the
    token index in the row, which the caller passes as positions when
    documents are packed; segments keep documents apart.
    """
    mask_BTS = k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    if q_segments_BT is not None:
        mask_BTS &= q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    return mask_BTS


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads; softmax in float32."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores_BKGTS = einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, jnp.float32)
    scores_BKGTS = scores_BKGTS / math.sqrt(h)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def full_attention(cfg: ModelConfig, mask_BTS: jax.Array) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`(q_BTNH, k_BSKH, v_BSKH) -> out_BTNH` under `mask_BTS` with the kernel `cfg.attention_impl` names."""
    implementation = ATTENTION_IMPLS[cfg.attention_impl]
    if implementation is None:
        return functools.partial(attend, mask_BTS=mask_BTS)

    def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array) -> jax.Array:
        # Its default scale is attend's 1/sqrt(H); it groups kv heads itself.
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                            implementation=implementation)

    return dot_product_attention


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads (arXiv:2305.13245) and RoPE.

    The projections are separate methods so the KV-cache decoder can run them
    around its own cache update.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        std = hidden_std(cfg)
        init = init_normal(std)
        self.wq_DNH = logical_param(self, "q", (d, n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), init)
        self.wk_DKH = logical_param(self, "k", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), init)
        self.wv_DKH = logical_param(self, "v", (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), init)
        out_init = output_init(cfg, std)
        self.wo_NHD = logical_param(self, "o", (n, h, d), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), out_init)

    def project_qkv(
        self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Query, key and value heads, with rotary embeddings applied to q and k.

        Under μP the queries carry the extra attention-logit scale sqrt(H0 / H), which makes
        `attend`'s q·k / sqrt(H) the paper's q·k · sqrt(H0) / H (model/mup.py); here, so that the
        KV-cache decoder, which calls this method and attends with its own kernel, gets it too.
        Three plain matmuls: one over a stacked [D, K, G + 2, H] weight was no faster in
        float32 and slower in bfloat16 on CPU (bench/README.md, "one QKV matmul").
        """
        dt = dtype_of(self.cfg.dtype)
        q_BTNH = einsum("BTD,DNH->BTNH", x_BTD, self.wq_DNH.astype(dt))
        k_BTKH = einsum("BTD,DKH->BTKH", x_BTD, self.wk_DKH.astype(dt))
        v_BTKH = einsum("BTD,DKH->BTKH", x_BTD, self.wv_DKH.astype(dt))
        q_BTNH = nn.with_logical_constraint(q_BTNH, (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_HEADS, None))
        k_BTKH = nn.with_logical_constraint(k_BTKH, (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_KV_HEADS, None))
        v_BTKH = nn.with_logical_constraint(v_BTKH, (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_KV_HEADS, None))
        query_scale = self.cfg.multipliers.query
        if query_scale != 1.0:  # standard parametrization (and μP at its base width) skip the multiply
            q_BTNH = q_BTNH * jnp.asarray(query_scale, q_BTNH.dtype)
        return apply_rope(q_BTNH, cos_BTh, sin_BTh), apply_rope(k_BTKH, cos_BTh, sin_BTh), v_BTKH

    def project_out(self, out_BTNH: jax.Array) -> jax.Array:
        return einsum("BTNH,NHD->BTD", out_BTNH, self.wo_NHD.astype(dtype_of(self.cfg.dtype)))

    def __call__(self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        q_BTNH, k_BTKH, v_BTKH = self.project_qkv(x_BTD, cos_BTh, sin_BTh)
        return self.project_out(full_attention(self.cfg, mask_BTS)(q_BTNH, k_BTKH, v_BTKH))
