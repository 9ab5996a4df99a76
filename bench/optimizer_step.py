"""What an optimizer costs per train step: herd's jitted step with each optimizer, in the same process.

Every variant trains the experiment's model (its dtype) on the same synthetic
batch on one device; rounds of `--steps` steps alternate between the variants and
the median round counts. The ratio is each variant's step time over the first
variant's (the reference, adamw by default), so a shared, noisy machine
affects both sides alike.

    PYTHONPATH=. python bench/optimizer_step.py                       # the default experiment
    PYTHONPATH=. python bench/optimizer_step.py --variants=adamw,muon:5,muon:3,sgd
    PYTHONPATH=. python bench/optimizer_step.py --variants=adamw,muon:3:float32,muon:3:bfloat16

A variant is `name[:ns_steps[:ns_dtype]]`; `muon:3` is Muon with three Newton-Schulz
steps, `muon:3:float32` the same with float32 iterates; unset parts keep the experiment's.
Like the `herd` CLI on CPU, it restarts itself with glibc's malloc tuned. The
last stdout line is one JSON object with every figure. See bench/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # `python bench/optimizer_step.py` without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train.loop import Trainer, to_global  # noqa: E402
from train.malloc import tune_malloc  # noqa: E402
from train.optimizer import OPTIMIZERS  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).resolve().parents[1] / "experiments" / "shakespeare.py"),
    "Experiment whose model, batch and optimizer settings to use.",
    lock_config=True,
)
flags.DEFINE_list(
    "variants", ["adamw", "muon:3:float32", "muon:3:bfloat16"],
    "optimizer[:muon_ns_steps[:muon_ns_dtype]]; the first is the reference.",
)
flags.DEFINE_integer("steps", 10, "Timed steps per round, per variant.")
flags.DEFINE_integer("rounds", 5, "Alternating timed rounds per variant; the median round counts.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per variant after the first (compiling) step.")


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    name, ns, ns_dtype = (variant.split(":") + ["", ""])[:3]
    if variant.count(":") > 2:
        raise app.UsageError(f"--variants: {variant!r} has more than three parts: name[:ns_steps[:ns_dtype]]")
    if name not in OPTIMIZERS:
        raise app.UsageError(f"--variants: {name!r} is not one of: {', '.join(OPTIMIZERS)}")
    c = config.copy_and_resolve_references()
    c.optimizer.name = name
    if ns:
        if not ns.isdigit() or int(ns) < 1:
            raise app.UsageError(f"--variants: {variant!r}: the Newton-Schulz steps must be a positive integer")
        c.optimizer.muon_ns_steps = int(ns)
    if ns_dtype:  # checked with the other optimizer fields when the Trainer is built
        c.optimizer.muon_ns_dtype = ns_dtype
    if c.model.vocab_size is None and c.data.tokenizer.name == "sentencepiece" and c.data.tokenizer.path is None:
        c.model.vocab_size = int(c.data.tokenizer.vocab_size)
    c.data.source = "synthetic_random"  # nothing read from disk; the step is what is timed
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


class Side:
    def __init__(self, config: ml_collections.ConfigDict):
        self.trainer = Trainer(config, jax.devices()[:1])
        self.state = self.trainer.initial_state()
        self.batch = to_global(next(self.trainer.batches(self.trainer.train_data)), self.trainer.batch_shardings)
        self.metrics = None

    def run(self, steps: int) -> float:
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.trainer.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return (time.perf_counter() - t0) / steps


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tune_malloc()
    sides = {v: Side(variant_config(FLAGS.config, v)) for v in FLAGS.variants}
    for side in sides.values():
        side.run(1 + FLAGS.warmup)
    times: dict[str, list[float]] = {v: [] for v in sides}
    for r in range(FLAGS.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for v in order:
            times[v].append(sides[v].run(FLAGS.steps))
    ref = FLAGS.variants[0]
    median = {v: statistics.median(t) for v, t in times.items()}
    tokens = FLAGS.config.train.batch_size * FLAGS.config.data.seq_len
    print(f"{'variant':<12} {'s/step':>8} {'tok/s':>8} {'ratio':>6}   ({tokens} tokens per step; load {os.getloadavg()})")
    for v in sides:
        print(f"{v:<12} {median[v]:>8.4f} {tokens / median[v]:>8.0f} {median[v] / median[ref]:>6.2f}")
    print(json.dumps({
        "bench": "optimizer_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "tokens_per_step": tokens,
        "rounds": {v: [round(t, 5) for t in ts] for v, ts in times.items()},
        "median_s_per_step": median,
        "ratio_to_first": {v: median[v] / median[ref] for v in sides},
        "load_after": os.getloadavg(),
    }), flush=True)


if __name__ == "__main__":
    app.run(main)
