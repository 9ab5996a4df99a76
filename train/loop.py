"""train_and_evaluate(config, workdir): the thin training loop."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.base import MODEL_OVERRIDES
from model import ModelConfig, RopeScaling, axes, flops_per_token, get_variant
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
from train.checkpoint import Checkpointer, gather_process_states, own_process_state
from train.data import Dataset, build_dataset
from train.state import abstract_with_shardings, create_train_state, state_shardings
from train.step import BATCH_KEYS, batch_shardings, eval_step, finish_eval, jit_over_mesh, train_step

log = logging.getLogger(__name__)


def model_config(config: ml_collections.ConfigDict, data_vocab: int | None = None) -> ModelConfig:
    """The ModelConfig of an experiment: the variant, its overrides, and the tokenizer's vocabulary."""
    overrides = {k: config.model[k] for k in MODEL_OVERRIDES if config.model[k] is not None}
    if config.model.rope_scaling.factor is not None:
        overrides["rope_scaling"] = RopeScaling(**config.model.rope_scaling.to_dict())
    if data_vocab is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = data_vocab
    cfg = get_variant(config.model.variant, **overrides)
    if data_vocab is not None and cfg.vocab_size < data_vocab:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {data_vocab} tokens")
    return cfg


def validate(config: ml_collections.ConfigDict, model_cfg: ModelConfig, dp_size: int) -> None:
    """Cheap checks of the training fields, before anything is compiled."""
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


def to_global(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in shardings}


class Trainer:
    """Everything built from a config: mesh, data, compiled steps, checkpoints."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        devices: list[jax.Device] | None = None,
        *,
        model_cfg: ModelConfig | None = None,
    ):
        """With `model_cfg` given (a recorded run), no data is opened: `train_data`/`eval_data` are None."""
        self.config = config
        optimizer_lib.validate(config)
        rules = axes.get_rules(config.mesh.rules)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rules = rules
        self.train_data: Dataset | None = None
        self.eval_data: Dataset | None = None
        if model_cfg is None:
            self.train_data = build_dataset(config, config.data.train_split, model_config(config).vocab_size)
            model_cfg = model_config(config, self.train_data.vocab_size)
        self.model_cfg = model_cfg
        validate(config, self.model_cfg, mesh_lib.data_parallel_size(self.mesh, rules))
        if self.train_data is not None:
            self.eval_data = build_dataset(config, config.data.eval_split, self.model_cfg.vocab_size)
        self.tx, self.schedule = optimizer_lib.build_optimizer(config)
        self.shardings = state_shardings(self.model_cfg, self.tx, self.mesh, rules)
        keys = BATCH_KEYS + ("target_bytes",)
        self.batch_shardings = batch_shardings(self.mesh, rules, keys)
        replicated = mesh_lib.replicated(self.mesh)
        step = functools.partial(
            train_step,
            model_cfg=self.model_cfg,
            tx=self.tx,
            schedule=self.schedule,
            microbatches=config.train.microbatches,
            z_loss=config.train.z_loss,
        )
        self.train_step = jit_over_mesh(
            step, self.mesh, rules, (self.shardings, self.batch_shardings), (self.shardings, replicated), (0,)
        )
        self.eval_step = jit_over_mesh(
            functools.partial(eval_step, model_cfg=self.model_cfg),
            self.mesh,
            rules,
            (self.shardings.params, self.batch_shardings),
            replicated,
        )

    def initial_state(self) -> Any:
        return create_train_state(self.model_cfg, self.tx, self.mesh, self.rules, self.config.seed)

    def abstract_state(self) -> Any:
        return abstract_with_shardings(self.shardings, self.model_cfg, self.tx)

    def batches(self, dataset: Dataset) -> Any:
        return dataset.iterator(self.config.train.batch_size, jax.process_index(), jax.process_count())

    def evaluate(self, params: Any) -> dict[str, float]:
        """Loss, perplexity and bits per byte on the first `eval.batches` batches of the eval split."""
        it = self.batches(self.eval_data)
        sums: dict[str, float] = {}
        for _ in range(self.config.eval.batches):
            out = jax.device_get(self.eval_step(params, to_global(next(it), self.batch_shardings)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return finish_eval(sums) if sums else {}


TOKENIZER_FILE = "tokenizer.model"


def save_tokenizer(dataset: Dataset, workdir: str | os.PathLike) -> None:
    """Keeps the run's tokenizer model beside its checkpoints, so sampling and export need no data."""
    tokenizer = getattr(dataset, "tokenizer", None)
    blob = tokenizer.model_file() if tokenizer is not None else None
    path = os.path.join(workdir, TOKENIZER_FILE)
    if blob is not None and jax.process_index() == 0 and not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(path + ".tmp", path)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the experiment in `workdir`; returns the per-step losses and final eval.

    `stop_at` ends the run early after saving a checkpoint, as a preemption would.
    """
    trainer = Trainer(config, devices)
    total = config.train.steps
    ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    data_it = trainer.batches(trainer.train_data)
    latest = ckpt.latest_step()
    if latest is not None and latest >= total:
        print(f"run in {workdir} already finished: checkpoint at step {latest} >= train.steps={total}; "
              "raise --config.train.steps to continue")
        ckpt.close()
        return {"losses": {}, "eval": {}, "final_step": latest}
    if latest is not None:
        start, state, data_state = ckpt.restore(trainer.abstract_state())
        if data_state.get("train") is not None:  # None: imported weights, no data read yet
            data_it.set_state(own_process_state(data_state["train"]))
        log.info("resumed from step %d", start)
    else:
        start, state = 0, trainer.initial_state()

    n_devices = trainer.mesh.size
    throughput = metrics_lib.Throughput(
        tokens_per_step=config.train.batch_size * config.data.seq_len,
        flops_per_token=flops_per_token(trainer.model_cfg, config.data.seq_len),
        peak_flops_per_device=metrics_lib.peak_flops_per_device(override=config.log.peak_flops),
        n_devices=n_devices,
    )
    metrics_lib.write_run_info(
        workdir,
        config=config,
        mesh=trainer.mesh,
        data_fingerprint=trainer.train_data.fingerprint(),
        extra={"model": trainer.model_cfg.to_dict(), "start_step": start},
    )
    save_tokenizer(trainer.train_data, workdir)
    losses: dict[int, float] = {}
    final_eval: dict[str, float] = {}
    with metrics_lib.MetricWriter(workdir, total_steps=total, start_step=start, progress=config.log.progress) as writer:
        pending: tuple[int, Any] | None = None

        def flush() -> None:
            nonlocal pending
            if pending is None:
                return
            done, device_metrics = pending
            pending = None
            scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            losses[done] = scalars["loss"]
            if done % config.log.every == 0 or done == total:
                writer.write(done, scalars | throughput.tick(done))

        throughput.reset(start)
        end = total if stop_at is None else min(stop_at, total)
        for step in range(start, end):
            batch = to_global(next(data_it), trainer.batch_shardings)
            state, device_metrics = trainer.train_step(state, batch)
            flush()  # step t-1's metrics, read while step t runs
            pending = (step + 1, device_metrics)
            done = step + 1
            if done % config.eval.every == 0 or done == total:
                flush()
                if config.eval.batches:
                    final_eval = trainer.evaluate(state.params)
                    writer.write(done, final_eval, prefix="eval/")
                throughput.reset(done)
            if ckpt.should_save(done, total) or done == end:
                flush()
                ckpt.save(done, state, {"train": gather_process_states(data_it.get_state())})
                throughput.reset(done)
        flush()
    ckpt.close()
    return {"losses": losses, "eval": final_eval, "final_step": total, "state": state, "trainer": trainer}
