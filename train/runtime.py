"""The compiled side of an experiment: mesh, state shardings, jitted train and eval steps.

`Runtime(config, model_cfg)` opens no data, so the loop, `herd sample/eval/convert`,
the benchmarks and the planner all build the same mesh and the same steps from
it. `check(config, model_cfg, n_devices)` is every cheap check of the run's
fields, made before anything is compiled, read or written (the sweep runner
calls it for each point without any device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from model import ModelConfig, axes
from train import guard
from train import mesh as mesh_lib
from train import optimizer as optimizer_lib
from train.config import apply_overrides
from train.state import abstract_with_shardings, create_train_state, state_shardings
from train.step import BATCH_KEYS, batch_shardings, eval_step, finish_eval, jit_over_mesh, train_step

LocalBatch = Mapping[str, np.ndarray]


def check(config: ml_collections.ConfigDict, model_cfg: ModelConfig, n_devices: int) -> None:
    """Raises ValueError naming the first field that `herd train` would reject on `n_devices` devices."""
    optimizer_lib.validate(config, model_cfg)
    if model_cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention_impl='cudnn' needs NVIDIA GPUs with cuDNN, and this process has "
                         f"{jax.default_backend()} devices: use 'xla' or 'herd' (the same function)")
    rules = axes.get_rules(config.mesh.rules)
    shape = dict(zip(axes.MESH_AXES, mesh_lib.mesh_shape(config.mesh, n_devices)))
    dp_size = mesh_lib.data_parallel_size(shape, rules)
    t = config.train
    for field in ("steps", "batch_size", "microbatches"):
        if t[field] <= 0:
            raise ValueError(f"train.{field}={t[field]} must be positive")
    if t.batch_size % t.microbatches:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.microbatches={t.microbatches}")
    if (t.batch_size // t.microbatches) % dp_size:
        raise ValueError(
            f"train.batch_size / train.microbatches = {t.batch_size // t.microbatches} rows per micro-batch "
            f"cannot be split over the {dp_size} data-parallel devices of the mesh"
        )
    if config.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds the model's context model.max_seq_len={model_cfg.max_seq_len}"
        )
    if config.eval.every <= 0 or config.eval.batches < 0:
        raise ValueError(f"eval.every={config.eval.every} must be positive and eval.batches={config.eval.batches} >= 0")
    if config.log.every <= 0:
        raise ValueError(f"log.every={config.log.every} must be positive")
    guard.check(config)
    if not (math.isfinite(t.z_loss) and t.z_loss >= 0):
        raise ValueError(f"train.z_loss={t.z_loss} must be a finite weight >= 0")
    peak = config.log.peak_flops
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"log.peak_flops={peak} must be a finite positive FLOP/s per device (or None: measured)")
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ValueError(f"checkpoint.every={config.checkpoint.every} and checkpoint.keep={config.checkpoint.keep} "
                         "must both be positive")


def local_data_parallel(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` on plain data parallel over as many devices as its batch splits over, every device
    when it can (for loading, evaluating and converting a run); build its Runtime on `mesh_devices(config)`.

    A run trained with a batch of 4 is still read on a host with 8 devices (on 4 of them). With several
    processes every device takes part, as in training.
    """
    n = len(jax.devices())
    if jax.process_count() == 1:
        rows = config.train.batch_size // max(config.train.microbatches, 1)
        n = max(d for d in range(1, n + 1) if rows % d == 0)
    return apply_overrides(config, {"mesh.data": n, "mesh.fsdp": 1, "mesh.tensor": 1})


def mesh_devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    """The devices of `local_data_parallel(config)`'s mesh: the first `mesh.data` of them."""
    return jax.devices()[: config.mesh.data]


class Runtime:
    """Mesh, logical rules, optimizer, state shardings and the jitted steps of one (config, model_cfg)."""

    def __init__(
        self, config: ml_collections.ConfigDict, model_cfg: ModelConfig, devices: list[jax.Device] | None = None
    ):
        devices = list(devices if devices is not None else jax.devices())
        check(config, model_cfg, len(devices))
        self.config, self.model_cfg = config, model_cfg
        self.rules = axes.get_rules(config.mesh.rules)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.tx, self.learning_rate = optimizer_lib.build_optimizer(config, model_cfg)
        self.shardings = state_shardings(model_cfg, self.tx, self.mesh, self.rules)
        self.batch_shardings = batch_shardings(self.mesh, self.rules, BATCH_KEYS + ("target_bytes",))
        replicated = mesh_lib.replicated(self.mesh)
        step = functools.partial(
            train_step,
            model_cfg=model_cfg,
            tx=self.tx,
            learning_rate=self.learning_rate,
            guard_cfg=guard.GuardConfig.from_config(config),
            microbatches=config.train.microbatches,
            z_loss=config.train.z_loss,
            document_mask=config.data.document_mask,
        )
        self.train_step = jit_over_mesh(
            step, self.mesh, self.rules, (self.shardings, self.batch_shardings), (self.shardings, replicated), (0,)
        )
        self.eval_step = jit_over_mesh(
            functools.partial(eval_step, model_cfg=model_cfg, document_mask=config.data.document_mask),
            self.mesh,
            self.rules,
            (self.shardings.params, self.batch_shardings),
            replicated,
        )

    def initial_state(self) -> Any:
        """The freshly initialised train state, created directly in its sharding."""
        return create_train_state(self.model_cfg, self.tx, self.mesh, self.rules, self.config.seed)

    def abstract_state(self) -> Any:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        return abstract_with_shardings(self.shardings, self.model_cfg, self.tx)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs (with shardings) of one global training batch, as the data pipeline delivers it."""
        shape = (self.config.train.batch_size, self.config.data.seq_len)
        dtypes = {"loss_mask": np.float32}
        return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, np.int32), sharding=s) for k, s in self.batch_shardings.items()}

    def lower_train_step(self) -> jax.stages.Lowered:
        """The jitted train step lowered for the abstract state and batch: nothing is allocated (`herd plan`)."""
        return self.train_step.lower(self.abstract_state(), self.abstract_batch())

    @property
    def local_rows(self) -> int:
        """Rows of each global batch that this process reads."""
        return self.config.train.batch_size // jax.process_count()

    def to_global(self, local: LocalBatch) -> dict[str, jax.Array]:
        """Assembles each process's rows into global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(s, local[k]) for k, s in self.batch_shardings.items()}

    def evaluate(
        self, params: Any, batches: Iterable[LocalBatch], *, limit: int | None = None, progress: str | None = None
    ) -> dict[str, float]:
        """Loss, perplexity, bits per byte (and the batch count) over `batches`, or their first `limit`.

        A short last batch (the end of a finite split) is filled with masked rows, so
        one compiled step serves every batch. `progress` names a tqdm bar, if any.
        """
        import tqdm

        sums: dict[str, float] = {}
        n = 0
        with tqdm.tqdm(total=limit, desc=progress, unit="batch", disable=progress is None) as bar:
            for local in batches:
                if limit is not None and n >= limit:
                    break
                out = jax.device_get(self.eval_step(params, self.to_global(_pad_rows(local, self.local_rows))))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                bar.update(1)
                if sums.get("tokens"):
                    bar.set_postfix(loss=f"{sums['ce_sum'] / sums['tokens']:.4f}")
        if not n:
            raise ValueError("no batches to evaluate")
        return finish_eval(sums) | {"batches": float(n)}


def _pad_rows(batch: LocalBatch, rows: int) -> LocalBatch:
    """Fills a short batch with masked (all-zero) rows so the compiled step's shape holds."""
    have = len(batch["inputs"])
    if have == rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
