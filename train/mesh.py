"""Device mesh construction, logical -> physical shardings, multi-host start-up."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import axes

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes, with bounded waits.

    Must run before any other JAX call. Explicit variables (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID) take precedence; on clusters JAX
    detects (SLURM, Cloud TPU, ...) set HERD_DISTRIBUTED=1 to auto-detect. Missing
    or dead peers end every process within HERD_DISTRIBUTED_TIMEOUT seconds (default
    60) with one line naming the coordinator (train/distributed.py).
    """
    from train.distributed import initialize_from_env

    initialize_from_env()


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with at most one -1 filled in from `n_devices`."""
    sizes = [int(mesh_cfg[name]) for name in axes.MESH_AXES]
    for name, size in zip(axes.MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size} must be a positive size or -1 (fill in)")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got mesh.data/fsdp/tensor = {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh sizes {sizes} cannot be filled in: {known} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} "
            f"but there are {n_devices} devices; make the product {n_devices} or set one axis to -1"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (needed by logical constraints)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes.MESH_AXES)
    return jax.make_mesh(shape, axes.MESH_AXES, axis_types=axis_types, devices=devices)


def _physical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: axes.Rules) -> PartitionSpec:
    """Maps logical names to mesh axes, replicating any dimension the mesh does not divide."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    out = []
    for dim, mesh_axes in zip(shape, spec):
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        size = math.prod(mesh.shape[a] for a in group)
        if group and dim % size:
            log.info("dimension %d of size %d is not divisible by mesh axes %s; replicated", len(out), dim, group)
            out.append(None)
        else:
            out.append(mesh_axes)
    return PartitionSpec(*out)


def shardings_for(abstract_boxed: Any, mesh: Mesh, rules: axes.Rules) -> Any:
    """NamedShardings for an (abstract, boxed) pytree; unboxed leaves are replicated.

    The result has the structure of the unboxed tree.
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nn.meta.AxisMetadata):
            value = leaf.unbox()
            if not jax.tree.leaves(value):
                # A box around an empty node: optax.partition's placeholder (MaskedNode) for the
                # parameters another optimizer owns. It holds no array, so it stays as it is.
                return value
            return NamedSharding(mesh, _physical_spec(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh, rules: axes.Rules, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays: the batch split as the ACT_BATCH rule says, the rest replicated."""
    spec = nn.logical_to_mesh_axes((axes.ACT_BATCH,) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def data_parallel_size(axis_sizes: Mapping[str, int], rules: axes.Rules) -> int:
    """How many ways the global batch is split, for mesh axis sizes (e.g. `mesh.shape`)."""
    spec = nn.logical_to_mesh_axes((axes.ACT_BATCH,), rules)[0]
    group = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(axis_sizes[a] for a in group)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
