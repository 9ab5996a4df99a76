"""The train state pytree and its sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import ModelConfig, axes
from model.llama import Llama
from train import guard
from train import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; `guard` is train/guard.py's (loss running mean, skipped steps)."""

    step: jax.Array
    params: Any
    opt_state: Any
    guard: dict[str, jax.Array]

    @classmethod
    def fresh(cls, params: Any, opt_state: Any) -> TrainState:
        """Step 0 of training from `params` (new, or imported weights)."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, guard=guard.initial_state())


def _init_boxed(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The initial state with parameters (and their optimizer moments) still boxed in logical axes."""
    # The first half of a split, as when the state also carried a key: the same seed draws the same weights.
    init_key, _ = jax.random.split(jax.random.key(seed))
    params = Llama(model_cfg).init(init_key, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState.fresh(params, tx.init(params))


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """The boxed state's shapes and logical axes; nothing is allocated."""
    return jax.eval_shape(lambda: _init_boxed(model_cfg, tx, seed))


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: axes.Rules) -> TrainState:
    """NamedShardings of every leaf of the (unboxed) train state."""
    return mesh_lib.shardings_for(abstract_state(model_cfg, tx), mesh, rules)


def create_train_state(
    model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: axes.Rules, seed: int
) -> TrainState:
    """Initialises the state directly into its sharding: full parameters never sit on one device."""
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    init = jax.jit(lambda: nn.meta.unbox(_init_boxed(model_cfg, tx, seed)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return init()


def abstract_with_shardings(shardings: Any, model_cfg: ModelConfig, tx: optax.GradientTransformation) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
    shapes = nn.meta.unbox(abstract_state(model_cfg, tx))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
