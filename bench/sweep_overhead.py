"""What a sweep costs beyond training, and how many trials to run at once on this machine.

A sweep of `--trials` learning rates of one experiment runs twice through real
`herd sweep` processes: one trial at a time with all CPUs (`--parallel=1`), then
`--parallel=N` trials at once with the CPUs split between them. The compile
cache is warmed first by the same sweep in another directory, as a re-run or a
second sweep of the same trials finds it. For each trial:

  wall      trial.json's started -> ended (the `herd train` process)
  training  the sum of its steady-state step times (metrics.jsonl `step_time_s` x the steps each row covers)
  overhead  wall - training: process start, imports, config, data, compile from the warm cache, the first
            step, evaluations, checkpoints, exit

and for the sweep: its wall time against the sum of its trials' training times
(the issue's target: within 15 %), and parallel=N's wall against parallel=1's.

    python bench/sweep_overhead.py                                   # smoke-model trials of 2,000 steps
    python bench/sweep_overhead.py --config=experiments/shakespeare.py --steps=300 --trials=4

The last stdout line is one JSON object with every figure; `--out FILE` appends it to FILE.
"""

from __future__ import annotations

import common  # noqa: F401  (first: environment and sys.path)

import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "experiments/base.py:smoke", "The experiment whose trials are measured.")
flags.DEFINE_integer("steps", 2000, "Training steps per trial.")
flags.DEFINE_integer("trials", 4, "Trials per sweep (learning rates 1e-3, 2e-3, ...).")
flags.DEFINE_integer("parallel", 2, "Trials at once in the second sweep.")
flags.DEFINE_string("out", None, "Also append the JSON result line to this file.")


def experiment(tmp: Path) -> Path:
    """A module that sweeps `--trials` learning rates of `--config` (its checkpoint and eval every 1,000 steps)."""
    spec = FLAGS.config
    path, _, arg = spec.partition(":")
    lrs = [round(1e-3 * (i + 1), 6) for i in range(FLAGS.trials)]
    out = tmp / "bench_sweep.py"
    out.write_text(textwrap.dedent(f'''\
        """Learning rates of {spec} for bench/sweep_overhead.py."""
        from train.experiment import load_experiment


        def get_config(arg=None):
            return load_experiment({str(common.ROOT / path)!r} + ({':' + arg!r} if {bool(arg)} else ""))


        def sweep():
            return [{{"optimizer.lr": lr}} for lr in {lrs!r}]
        '''))
    return out


def sweep(exp: Path, workdir: Path, parallel: int, env: dict[str, str]) -> float:
    overrides = [f"--config.train.steps={FLAGS.steps}", "--config.checkpoint.every=1000", "--config.eval.every=1000",
                 "--config.log.peak_flops=1e12", "--config.log.every=10"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "train.main", "sweep", f"--config={exp}", f"--workdir={workdir}",
                    f"--parallel={parallel}", *overrides], check=True, env=env, cwd=common.ROOT)
    return time.perf_counter() - start


def trial_figures(trial_dir: Path) -> dict[str, float]:
    record = json.loads((trial_dir / "trial.json").read_text())
    wall = (datetime.datetime.fromisoformat(record["ended"]) - datetime.datetime.fromisoformat(record["started"]))
    training, previous = 0.0, 0
    for line in (trial_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step_time_s" in row:
            training += row["step_time_s"] * (row["step"] - previous)
        if "loss" in row:
            previous = row["step"]
    wall_s = wall.total_seconds()
    return {"wall_s": wall_s, "training_s": training, "overhead_s": wall_s - training}


def measure(exp: Path, workdir: Path, parallel: int, env: dict[str, str]) -> dict[str, Any]:
    wall = sweep(exp, workdir, parallel, env)
    names = json.loads((workdir / "sweep.json").read_text())["trials"]
    trials = {n: trial_figures(workdir / n) for n in names}
    training = sum(t["training_s"] for t in trials.values())
    return {"parallel": parallel, "sweep_wall_s": wall, "sum_training_s": training,
            "wall_over_training": wall / training, "median_overhead_s": statistics.median(
                t["overhead_s"] for t in trials.values()), "trials": trials}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HERD_XLA_CACHE=str(tmp / "xla"))
        env.pop("XLA_FLAGS", None)
        exp = experiment(tmp)
        load_before = common.load_average()
        warm = sweep(exp, tmp / "warm", 1, env)  # fills the compile cache with every trial's step
        one = measure(exp, tmp / "one", 1, env)
        many = measure(exp, tmp / "many", FLAGS.parallel, env)
    for m in (one, many):
        print(f"parallel={m['parallel']}: sweep {m['sweep_wall_s']:.1f} s, sum of training {m['sum_training_s']:.1f} s "
              f"(wall / training {m['wall_over_training']:.2f}), median trial overhead {m['median_overhead_s']:.1f} s")
    print(f"parallel={FLAGS.parallel} / parallel=1 wall: {many['sweep_wall_s'] / one['sweep_wall_s']:.2f}")
    common.emit(common.record("sweep_overhead", config=FLAGS.config, steps=FLAGS.steps, warm_sweep_s=warm,
                              one=one, many=many, ratio_parallel=many["sweep_wall_s"] / one["sweep_wall_s"],
                              load_before=load_before, load_after=common.load_average()), FLAGS.out)


if __name__ == "__main__":
    app.run(main)
