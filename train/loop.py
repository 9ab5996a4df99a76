"""train_and_evaluate(config, workdir): the thin training loop."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import ml_collections

from model import flops_per_token
from train import metrics as metrics_lib
from train import guard, run_info
from train.checkpoint import Checkpointer, gather_process_states
from train.config import model_config
from train.data import Dataset, check_data, open_data
from train.hardware import peak_flops_per_device
from train.runtime import Runtime, check
from train.signals import Interrupted, stop_requests
from train.workdir import RunDir

log = logging.getLogger(__name__)


def save_tokenizer(dataset: Dataset, workdir: str | os.PathLike) -> None:
    """Keeps the run's tokenizer model beside its checkpoints, so sampling and export need no data."""
    tokenizer = getattr(dataset, "tokenizer", None)
    blob = tokenizer.model_file() if tokenizer is not None else None
    path = RunDir(workdir).tokenizer
    if blob is not None and jax.process_index() == 0 and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the experiment in `workdir`; returns the per-step losses and final eval.

    `stop_at` ends the run early after saving a checkpoint, as a preemption would. A SIGTERM or
    SIGINT does the same after the step in flight and raises `train.signals.Interrupted`.
    """
    devices = list(devices if devices is not None else jax.devices())
    check(config, model_config(config), len(devices))  # before any data is prepared or read
    check_data(config)
    data = open_data(config)
    runtime = Runtime(config, data.model_cfg, devices)
    total = config.train.steps
    ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    data_it = data.batches(data.train)
    latest = ckpt.latest_step()
    if latest is not None and latest >= total:
        print(f"run in {workdir} already finished: checkpoint at step {latest} >= train.steps={total}; "
              "raise --config.train.steps to continue")
        ckpt.close()
        return {"losses": {}, "eval": {}, "final_step": latest}
    if latest is not None:
        start, state, data_state = ckpt.restore(runtime.abstract_state(), data_iterator=data_it)
        if data_state.get("imported_from"):
            log.info("starting from weights imported from %s", data_state["imported_from"])
        log.info("resumed from step %d", start)
    else:
        start, state = 0, runtime.initial_state()

    throughput = metrics_lib.Throughput(
        tokens_per_step=config.train.batch_size * config.data.seq_len,
        flops_per_token=flops_per_token(data.model_cfg, config.data.seq_len),
        peak_flops_per_device=peak_flops_per_device(override=config.log.peak_flops),
        n_devices=runtime.mesh.size,
    )
    run_info.write_run_info(
        workdir,
        config=config,
        mesh=runtime.mesh,
        data_fingerprint=data.train.fingerprint(),
        extra={"model": data.model_cfg.to_dict(), "start_step": start},
    )
    save_tokenizer(data.train, workdir)
    losses: dict[int, float] = {}
    final_eval: dict[str, float] = {}
    wandb = None
    if config.log.wandb:
        wandb = dict(project=config.log.wandb_project, group=config.log.wandb_group, name=config.log.wandb_name,
                     config=config.to_dict())
    writer = metrics_lib.MetricWriter(workdir, total_steps=total, start_step=start, progress=config.log.progress,
                                      wandb=wandb)
    with contextlib.closing(ckpt), writer, stop_requests() as stop:
        pending: tuple[int, Any, Any] | None = None  # (step, its device metrics, the data position of its batch)

        def flush() -> None:
            nonlocal pending
            if pending is None:
                return
            done, device_metrics, position = pending
            pending = None
            fetched = jax.device_get(device_metrics)
            norms = fetched.pop("grad_norms")
            scalars = {k: float(v) for k, v in fetched.items()}
            losses[done] = scalars["loss"]
            if done % config.log.every == 0 or done == total or scalars["skipped"]:
                row = {k: v for k, v in scalars.items() if v or k not in guard.METRICS}
                writer.write(done, row | throughput.tick(done))
            guard.after_step(done, scalars, norms, position, config, workdir, ckpt.latest_step())  # may halt

        throughput.reset(start)
        end = total if stop_at is None else min(stop_at, total)
        done = start
        for step in range(start, end):
            position = data_it.get_state()
            state, device_metrics = runtime.train_step(state, runtime.to_global(next(data_it)))
            flush()  # step t-1's metrics, read while step t runs
            ckpt.check()  # a failed async save stops the run now, as one line (does not wait)
            pending = (step + 1, device_metrics, position)
            done = step + 1
            if done % config.eval.every == 0 or done == total:
                flush()
                if config.eval.batches:
                    final_eval = runtime.evaluate(state.params, data.batches(data.eval), limit=config.eval.batches)
                    del final_eval["batches"]
                    writer.write(done, final_eval, prefix="eval/")
                throughput.reset(done)
            stopping = stop.stop_after(done)
            if ckpt.should_save(done, total) or done == end or stopping:
                flush()
                ckpt.save(done, state, {"train": gather_process_states(data_it.get_state())})
                throughput.reset(done)
            if stopping:
                break
        flush()
    if stop.signum is not None and done < end:
        raise Interrupted(stop.signum, done)
    return {"losses": losses, "eval": final_eval, "final_step": total, "state": state, "runtime": runtime,
            "data": data}
