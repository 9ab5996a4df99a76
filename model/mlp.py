"""The feed-forward block: a gated (GLU) or plain MLP with a registered activation (arXiv:2002.05202).

`ModelConfig.mlp_activation` names an entry of `model.config.MLP_ACTIVATIONS`.
A gated MLP computes `down(act(x W_gate) * (x W_up))` at width d_ff; a plain
one `down(act(x W_up))` at width 3/2 d_ff, so both have the same parameters and
FLOPs (Shazeer's comparison). Axis letters as in model/layers.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes
from model.config import MLP_ACTIVATIONS, ModelConfig
from model.layers import dtype_of, einsum, hidden_std, init_normal, logical_param, output_init

# Below this many rows (a decode step's batch) the stacked gate+up weight costs more than it saves:
# stacking copies both weights on every call, and XLA:CPU runs a stacked dot over a few rows
# slower per FLOP than two plain ones (bench/README.md).
_STACKED_GATE_UP_MIN_ROWS = 256


@jax.custom_vjp
def swiglu_stacked(gate_up_BTCF: jax.Array) -> jax.Array:
    """silu(gate) * up from gate and up stacked on axis 2 ([B, T, 2, F] -> [B, T, F]).

    Its own gradient writes the stacked cotangent in one elementwise pass; autodiff of the
    two slices pads each slice's cotangent to [B, T, 2, F] and adds them, two more passes
    over the largest activation of the block (bench/README.md).
    """
    return jax.nn.silu(gate_up_BTCF[:, :, 0]) * gate_up_BTCF[:, :, 1]


def _swiglu_stacked_fwd(gate_up_BTCF: jax.Array) -> tuple[jax.Array, jax.Array]:
    return swiglu_stacked(gate_up_BTCF), gate_up_BTCF


def _swiglu_stacked_bwd(gate_up_BTCF: jax.Array, d_BTF: jax.Array) -> tuple[jax.Array]:
    gate_BTF, up_BTF = gate_up_BTCF[:, :, 0], gate_up_BTCF[:, :, 1]
    sig_BTF = jax.nn.sigmoid(gate_BTF)
    d_gate_BTF = d_BTF * up_BTF * sig_BTF * (1 + gate_BTF * (1 - sig_BTF))
    return (jnp.stack([d_gate_BTF, d_BTF * gate_BTF * sig_BTF], axis=2).astype(gate_up_BTCF.dtype),)


swiglu_stacked.defvjp(_swiglu_stacked_fwd, _swiglu_stacked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def glu_stacked(act: Callable[[jax.Array], jax.Array], gate_up_BTCF: jax.Array) -> jax.Array:
    """act(gate) * up from gate and up stacked on axis 2: `swiglu_stacked` for any gate activation.

    The same one-pass stacked cotangent, with act's derivative from its own (elementwise) VJP.
    """
    return act(gate_up_BTCF[:, :, 0]) * gate_up_BTCF[:, :, 1]


def _glu_stacked_fwd(act: Callable[[jax.Array], jax.Array], gate_up_BTCF: jax.Array) -> tuple[jax.Array, jax.Array]:
    return glu_stacked(act, gate_up_BTCF), gate_up_BTCF


def _glu_stacked_bwd(
    act: Callable[[jax.Array], jax.Array], gate_up_BTCF: jax.Array, d_BTF: jax.Array
) -> tuple[jax.Array]:
    gate_BTF, up_BTF = gate_up_BTCF[:, :, 0], gate_up_BTCF[:, :, 1]
    act_BTF, act_vjp = jax.vjp(act, gate_BTF)
    (d_gate_BTF,) = act_vjp(d_BTF * up_BTF)
    return (jnp.stack([d_gate_BTF, d_BTF * act_BTF], axis=2).astype(gate_up_BTCF.dtype),)


glu_stacked.defvjp(_glu_stacked_fwd, _glu_stacked_bwd)

# Hand-written stacked kernels by activation name; the other gated activations use `glu_stacked`.
_STACKED_KERNELS: dict[str, Callable[[jax.Array], jax.Array]] = {"swiglu": swiglu_stacked}


def stacked_kernel(name: str) -> Callable[[jax.Array], jax.Array]:
    """[B, T, 2, F] gate and up -> [B, T, F] for the gated activation `name`, with a one-pass gradient."""
    return _STACKED_KERNELS.get(name) or functools.partial(glu_stacked, MLP_ACTIVATIONS[name].fn)


class MLP(nn.Module):
    """Feed-forward block: SwiGLU by default (Llama), or any activation of MLP_ACTIVATIONS."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        act = MLP_ACTIVATIONS[cfg.mlp_activation]
        d, f = cfg.d_model, cfg.mlp_hidden
        init = init_normal(hidden_std(cfg))
        dt = dtype_of(cfg.dtype)
        # Declared in this order (gate, up, down) so that SwiGLU keeps its parameters' init draws.
        w_gate_DF = logical_param(self, "gate", (d, f), (axes.EMBED, axes.MLP), init) if act.gated else None
        w_up_DF = logical_param(self, "up", (d, f), (axes.EMBED, axes.MLP), init)
        w_down_FD = logical_param(self, "down", (f, d), (axes.MLP, axes.EMBED), output_init(cfg, hidden_std(cfg)))
        if not act.gated:
            h_BTF = act.fn(einsum("BTD,DF->BTF", x_BTD, w_up_DF.astype(dt)))
        elif x_BTD.shape[0] * x_BTD.shape[1] >= _STACKED_GATE_UP_MIN_ROWS:
            # Gate and up as one matmul over a stacked [D, 2, F] weight: one pass over x instead of two
            # (bench/README.md); stacking on a new axis keeps F sharded where it was.
            w_DCF = jnp.stack([w_gate_DF, w_up_DF], axis=1).astype(dt)
            gate_up_BTCF = einsum("BTD,DCF->BTCF", x_BTD, w_DCF)
            h_BTF = stacked_kernel(cfg.mlp_activation)(gate_up_BTCF)
        else:
            gate_BTF = einsum("BTD,DF->BTF", x_BTD, w_gate_DF.astype(dt))
            up_BTF = einsum("BTD,DF->BTF", x_BTD, w_up_DF.astype(dt))
            h_BTF = act.fn(gate_BTF) * up_BTF
        h_BTF = nn.with_logical_constraint(h_BTF, (axes.ACT_BATCH, axes.ACT_SEQ, axes.ACT_MLP))
        return einsum("BTF,FD->BTD", h_BTF, w_down_FD.astype(dt))
