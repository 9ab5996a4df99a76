"""The analytic per-device memory of a train step: state exactly, activations by remat policy.

State (parameters, optimizer moments) is counted exactly from the abstract state's shard
shapes. Gradients, activations and the transient working set are estimated from the
model's shapes, the mesh and the remat policy, following the accounting of Korthikanti et
al. (arXiv:2205.05198 §4: per layer and token, what the backward pass keeps) adapted to
this model (GQA, SwiGLU, float32 norms and softmax, a materialised T x S score matrix).
`herd plan` prints it beside the compiled executable's figures; tests/test_plan.py holds
the two within PEAK_TOLERANCE of each other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from model import ModelConfig, axes
from model.flops import matmul_params
from train.mesh import data_parallel_size

# The analytic total stays within this fraction of the compiled peak (tests/test_plan.py
# checks it on XLA:CPU and, with libtpu, on the TPU compiler). Measured (README, "Planning a
# big run"): from 21 % below (405B, 126 layers, v5p) to 18 % above (405B shapes, 2 layers);
# XLA's scheduling and rematerialisation move the transient peak by that much either way.
PEAK_TOLERANCE = 0.30


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def logical_shard_bytes(boxed: Any, mesh_shape: dict[str, int], rules: axes.Rules) -> int:
    """`shard_bytes` without devices: from the logical axis names of a boxed abstract tree and mesh sizes.

    Follows train/mesh.py: a dimension the mesh axes do not divide stays whole.
    """
    import flax.linen as nn

    total = 0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)):
        names = leaf.names if isinstance(leaf, nn.meta.AxisMetadata) else ()
        value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
        if not jax.tree.leaves(value):
            continue
        spec = nn.logical_to_mesh_axes(tuple(names), rules) if names else ()
        shape = list(value.shape)
        for i, mesh_axes in enumerate(spec):
            group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            size = math.prod(mesh_shape[a] for a in group)
            if group and shape[i] % size == 0:
                shape[i] //= size
        total += math.prod(shape) * np.dtype(value.dtype).itemsize
    return total


def tensor_split(model_cfg: ModelConfig, rules: axes.Rules, mesh_shape: dict[str, int]) -> tuple[int, int]:
    """How many ways (heads and MLP, kv heads) the rules split a layer over the tensor axis."""
    mapped = dict(rules)
    t = mesh_shape.get(axes.TENSOR, 1) if mapped.get(axes.HEADS) == axes.TENSOR else 1
    t_kv = t if model_cfg.n_kv_heads % max(t, 1) == 0 else 1
    return t, t_kv


@dataclasses.dataclass
class Estimate:
    """Bytes per device."""

    parameters: float
    optimizer_state: float
    batch: float
    gradients: float
    activations: float  # kept from the forward pass for the backward pass, all layers
    working_set: float  # the largest transient: one layer's backward or the logits

    @property
    def total(self) -> float:
        return (self.parameters + self.optimizer_state + self.batch + self.gradients + self.activations
                + self.working_set)

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def per_token_layer_bytes(cfg: ModelConfig, seq_len: int, policy: str, t: int, t_kv: int) -> tuple[float, float]:
    """(bytes kept per token per layer under `policy`, bytes one layer's recomputed backward needs per token).

    p is the compute dtype's size; norms and the softmax run in float32 (model/layers.py).
    """
    p = np.dtype(cfg.dtype).itemsize
    d, h, f = cfg.d_model, cfg.head_size, cfg.d_ff
    n, k = cfg.n_heads / t, cfg.n_kv_heads / t_kv
    qkv = (n + 2 * k) * h * p
    scores = n * seq_len * 4  # the float32 [N, S] scores of each query token
    probs = n * seq_len * (4 + p)  # the float32 softmax and its compute-dtype copy
    norms = 2 * (d * 4 + d * p)  # two RMSNorms: float32 input and the normed output
    everything = d * p + norms + qkv + (n + k) * h * p + scores + probs + n * h * p + 2 * d * p + 3 * f / t * p
    kept = {
        "none": everything,
        "full": d * p,  # the block input only
        # jax.checkpoint_policies.checkpoint_dots: every matmul output (including the attention scores)
        "save_dots": d * p + qkv + scores + n * h * p + d * p + 2 * f / t * p + d * p,
        # dots_with_no_batch_dims_saveable: the weight matmuls' outputs, not the attention's
        "save_dots_no_batch": d * p + qkv + d * p + 2 * f / t * p + d * p,
    }[policy]
    return kept, everything


def estimate(
    model_cfg: ModelConfig,
    config: ml_collections.ConfigDict,
    mesh_shape: dict[str, int],
    rules: axes.Rules,
    boxed_state: Any,
) -> Estimate:
    """The analytic per-device memory of one train step of `config` on a mesh of `mesh_shape`.

    `boxed_state` is train.state.abstract_state(...): shapes and logical axes, no devices needed.
    """
    from train.step import BATCH_KEYS

    dp = data_parallel_size(mesh_shape, rules)
    batch_bytes = (len(BATCH_KEYS) + 1) * config.train.batch_size * config.data.seq_len * 4 / dp
    micro = config.train.microbatches
    rows = config.train.batch_size / micro / dp  # sequences per device per micro-batch
    seq = config.data.seq_len
    tokens = rows * seq
    t, t_kv = tensor_split(model_cfg, rules, mesh_shape)
    params = logical_shard_bytes(boxed_state.params, mesh_shape, rules)
    opt = logical_shard_bytes(boxed_state.opt_state, mesh_shape, rules)
    # One gradient buffer in the parameters' dtype and sharding; with micro-batches the running
    # sum and one micro-batch's gradients coexist (train/step.py accumulates in a scan).
    grads = params * (2 if micro > 1 else 1)
    kept, layer = per_token_layer_bytes(model_cfg, seq, model_cfg.remat_policy, t, t_kv)
    activations = model_cfg.n_layers * tokens * kept
    # The transient peak: one layer recomputed for its backward pass (its activations, its weights
    # gathered in the compute dtype, its float32 gradients before they are reduce-scattered), or
    # the float32 logits with their softmax and gradient (the vocabulary is split like the heads).
    p = np.dtype(model_cfg.dtype).itemsize
    layer_params = (matmul_params(model_cfg) - model_cfg.d_model * model_cfg.vocab_size) / model_cfg.n_layers / t
    backward = tokens * layer + layer_params * (2 * p + 4)
    vocab_t = t if dict(rules).get(axes.VOCAB) == axes.TENSOR else 1
    logits = 3 * tokens * model_cfg.vocab_size / vocab_t * 4
    return Estimate(params, opt, batch_bytes, grads, activations, max(backward, logits))
