"""What an optimizer costs per train step: herd's jitted step with each optimizer, in the same process.

Every variant trains the experiment's model (its dtype) on the same synthetic
batch on one device; rounds of `--steps` steps alternate between the variants and
the median round counts. The ratio is each variant's step time over the first
variant's (the reference, adamw by default), so a shared, noisy machine
affects both sides alike.

    python bench/optimizer_step.py                       # the default experiment
    python bench/optimizer_step.py --variants=adamw,muon:5,muon:3,sgd
    python bench/optimizer_step.py --variants=adamw,muon:3:float32,muon:3:bfloat16

A variant is `name[:ns_steps[:ns_dtype]]`; `muon:3` is Muon with three Newton-Schulz
steps, `muon:3:float32` the same with float32 iterates; unset parts keep the experiment's.
Like the `herd` CLI on CPU, it restarts itself with glibc's malloc tuned. The
last stdout line is one JSON object with every figure. See bench/README.md.
"""

from __future__ import annotations

import common  # noqa: F401  (first: environment and sys.path)

import os  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402

from train.config import apply_overrides  # noqa: E402
from train.optimizer import OPTIMIZERS  # noqa: E402

FLAGS = flags.FLAGS
common.define_experiment_flag(str(common.ROOT / "experiments" / "shakespeare.py"),
                              "Experiment whose model, batch and optimizer settings to use.")
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
    overrides: dict[str, object] = {"optimizer.name": name}
    if ns:
        if not ns.isdigit() or int(ns) < 1:
            raise app.UsageError(f"--variants: {variant!r}: the Newton-Schulz steps must be a positive integer")
        overrides["optimizer.muon_ns_steps"] = int(ns)
    if ns_dtype:  # checked with the other optimizer fields when the runtime is built
        overrides["optimizer.muon_ns_dtype"] = ns_dtype
    return common.single_device_synthetic(apply_overrides(config, overrides))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common.restart_with_malloc("tuned")
    config = common.experiment()
    sides = {v: common.Stepper(variant_config(config, v), jax.devices()[:1]) for v in FLAGS.variants}
    for side in sides.values():
        side.run(1 + FLAGS.warmup)
    times = common.alternate({v: (lambda s=side: s.run(FLAGS.steps)) for v, side in sides.items()}, FLAGS.rounds)
    ref = FLAGS.variants[0]
    median = common.medians(times)
    tokens = config.train.batch_size * config.data.seq_len
    print(f"{'variant':<12} {'s/step':>8} {'tok/s':>8} {'ratio':>6}   ({tokens} tokens per step; load {os.getloadavg()})")
    for v in sides:
        print(f"{v:<12} {median[v]:>8.4f} {tokens / median[v]:>8.0f} {median[v] / median[ref]:>6.2f}")
    common.emit(common.record(
        "optimizer_step",
        config=FLAGS.config,
        tokens_per_step=tokens,
        rounds={v: [round(t, 5) for t in ts] for v, ts in times.items()},
        median_s_per_step=median,
        ratio_to_first={v: median[v] / median[ref] for v in sides},
        load_after=common.load_average(),
    ))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
