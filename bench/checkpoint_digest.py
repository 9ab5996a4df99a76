"""What verifying checkpoints costs: a save with herd's digest record vs the same orbax save without it.

Per round, in alternating order, into fresh folders: (a) `Checkpointer.save` (digests of every array
computed on the devices, the sealed record written as a third orbax item) and (b) a bare orbax
`CheckpointManager.save` of the same state and data items; both synchronous, so each time is the
whole save. Also timed: `tree_digests` alone (both of its implementations), and the blocking part of an asynchronous save (what
the training loop waits for) with and without the digest. Median over rounds.

    .venv/bin/python bench/checkpoint_digest.py [--config=experiments/shakespeare.py] [--rounds=7]
"""

from __future__ import annotations

import common  # noqa: F401  (first: sets up JAX and sys.path)

import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import app, flags

from train.checkpoint import Checkpointer, make_record
from train.config import model_config
from train.digest import tree_digests
from train.runtime import Runtime

flags.DEFINE_integer("rounds", 7, "Timed rounds (after one warm-up round).")
flags.DEFINE_enum("malloc", "tuned", ["tuned", "system"], "tuned: restart with glibc's malloc tuned, as herd does on CPU.")
common.define_experiment_flag("experiments/shakespeare.py", "The experiment whose train state is saved.")
FLAGS = flags.FLAGS


def bare_orbax(directory: str, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=async_save, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def timed(save: Callable[[], Any], finish: Callable[[], Any]) -> tuple[float, float]:
    """(seconds until `save` returns, seconds until `finish` returns too)."""
    start = time.perf_counter()
    save()
    returned = time.perf_counter() - start
    finish()
    return returned, time.perf_counter() - start


def one_round(state: Any, data: dict[str, Any], root: str, async_save: bool, herd_first: bool) -> dict[str, float]:
    out: dict[str, float] = {}

    def herd() -> None:
        ckpt = Checkpointer(f"{root}/herd", every=1, keep=3, async_save=async_save)
        out["herd_return"], out["herd_total"] = timed(lambda: ckpt.save(1, state, data), ckpt.close)

    def bare() -> None:
        manager = bare_orbax(f"{root}/bare/checkpoints", async_save)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        out["bare_return"], out["bare_total"] = timed(lambda: manager.save(1, args=args, force=True), manager.close)

    for run in ((herd, bare) if herd_first else (bare, herd)):
        run()
    shutil.rmtree(root)
    return out


def main(argv: list[str]) -> None:
    del argv
    common.restart_with_malloc(FLAGS.malloc)  # restarts this process when tuned and GLIBC_TUNABLES lacks it
    config = common.single_device_synthetic(common.experiment())
    state = Runtime(config, model_config(config), jax.devices()[:1]).initial_state()  # what a save holds: its size
    data = {"train": {"0": {"step": 1}}}
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    print(f"state: {len(jax.tree.leaves(state))} arrays, {n_bytes / 2**20:.1f} MiB; {jax.devices()[0].device_kind}")
    digest_s: dict[bool, list[float]] = {True: [], False: []}
    for as_matmul in (True, False):
        tree_digests(state, as_matmul)  # compile once
    for _ in range(FLAGS.rounds):
        for as_matmul in (True, False):
            start = time.perf_counter()
            tree_digests(state, as_matmul)
            digest_s[as_matmul].append(time.perf_counter() - start)
    totals = {}
    for async_save in (False, True):
        rounds = [one_round(state, data, tempfile.mkdtemp(prefix="herd_bench_"), async_save, i % 2 == 0)
                  for i in range(FLAGS.rounds + 1)][1:]  # the first round warms up orbax and the digest jit
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        paired = {k: statistics.median(r[f"herd_{k}"] / r[f"bare_{k}"] for r in rounds) for k in ("return", "total")}
        kind = "async" if async_save else "sync"
        totals[kind] = med["herd_total"]
        print(f"{kind}: save() returns after {med['herd_return'] * 1e3:.1f} ms with digests vs "
              f"{med['bare_return'] * 1e3:.1f} ms bare (x{paired['return']:.2f} paired); whole save "
              f"{med['herd_total'] * 1e3:.1f} ms vs {med['bare_total'] * 1e3:.1f} ms (x{paired['total']:.2f} paired)")
    record_s = []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        make_record(1, state, data)
        record_s.append(time.perf_counter() - start)
    record = statistics.median(record_s)
    print(f"the whole record (every digest, the seal): {record * 1e3:.1f} ms = "
          + ", ".join(f"{record / t * 100:.1f} % of a {k} save" for k, t in totals.items()))
    for as_matmul, name in ((True, "matrix product (CPU default)"), (False, "fused reduction")):
        med_digest = statistics.median(digest_s[as_matmul])
        print(f"tree_digests alone, {name}: {med_digest * 1e3:.1f} ms ({n_bytes / med_digest / 2**30:.2f} GiB/s)")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
