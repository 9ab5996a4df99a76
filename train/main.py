"""The `herd` command line: `herd train --config=experiments/<name>.py[:arg] --workdir=DIR [--config.KEY=VALUE]`.

Subcommands live in a registry; each reads the parsed absl flags. `--config.KEY=VALUE`
arguments are taken out before absl parses the rest and applied with
`train.config.apply_overrides`, the same function sweeps and tests use.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags

from train.malloc import tune_malloc

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "train: the experiment file, path[:arg], e.g. experiments/base.py:smoke; "
                    "--config.KEY=VALUE sets any declared key (train/config.py).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run.json.")
# sample
flags.DEFINE_string("hf", None, "sample: a Hugging Face Llama folder to load instead of --workdir.")
flags.DEFINE_string("prompt", None, "sample: the text to continue.")
flags.DEFINE_integer("max_tokens", 200, "sample: most new tokens.")
flags.DEFINE_float("temperature", 0.8, "sample: 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "sample: keep the k most likely tokens (0 keeps all).")
flags.DEFINE_float("top_p", 1.0, "sample: nucleus probability mass (1 keeps all).")
flags.DEFINE_integer("seed", 0, "sample: random seed.")
# eval
flags.DEFINE_string("data", None, "eval: SPLIT, DATASET:SPLIT, or your own text: a .txt/.jsonl file, a folder or "
                    "a glob, read with the run's tokenizer (default: the run's eval split).")
flags.DEFINE_integer("batches", 0, "eval: number of batches (0 = the whole split once).")
# convert
flags.DEFINE_string("to-hf", None, "convert: write the run's latest checkpoint as a Hugging Face folder here.")
flags.DEFINE_string("from-hf", None, "convert: import this Hugging Face folder into --workdir.")
flags.DEFINE_string("dtype", "float32", "convert --to-hf: stored dtype (float32, bfloat16 or float16).")
# sweep
flags.DEFINE_integer("seeds", 0, "sweep: repeat every point with seed = 0 .. N-1 (0: the experiment's own seed).")
flags.DEFINE_integer("parallel", None, "sweep: trials at once on this machine, each pinned to its share of the CPUs "
                     "(default: 2 on a CPU-only host with 2+ CPUs, else 1; bench/README.md, \"Sweeps\").")
flags.DEFINE_string("executor", "local", "sweep: local (a process pool here) or slurm (a submitit job array).")
flags.DEFINE_integer("max_failures", -1, "sweep: stop starting trials after this many failures (-1: never).")
flags.DEFINE_bool("retry_failed", False, "sweep: run failed trials again (done ones never are).")
flags.DEFINE_bool("dry_run", False, "sweep: print the trial table (status, directory, overrides) and exit.")
# report
flags.DEFINE_string("metric", "eval/bits_per_byte", "report: the metric of the table and plots (lower is better "
                    "unless --maximize).")
flags.DEFINE_bool("maximize", False, "report: higher --metric is better.")
flags.DEFINE_string("x", None, "report: the swept key on the x axis of the final-metric plot (default: the first).")
flags.DEFINE_string("by", None, "report: one line per value of this swept key in the final-metric plot.")
flags.DEFINE_string("where", None, "report: only the trials whose point has KEY=VALUE[,KEY=VALUE].")
flags.DEFINE_string("format", "md", "report: md (report.md and PNG plots), csv or json (printed).")
# plan
flags.DEFINE_string("target", None, "plan: tpu:<v4|v5e|v5p|v6e>:<topology> (e.g. tpu:v5p:8x8x16), "
                    "gpu:<a100|h100|h200>:<count> or cpu[:<count>]; --format=json prints JSON.")
flags.DEFINE_bool("search", False, "plan: also try micro-batch counts, remat policies and rule presets; print the "
                  "fastest plan that fits, or the smallest change that would.")

_CONFIG_OVERRIDES: list[str] = []  # the `KEY=VALUE` of each --config.KEY=VALUE, in order
# Subcommands that read an experiment (--config and its overrides).
_EXPERIMENT_COMMANDS = ("train", "sweep", "plan")
_POSITIONAL: list[str] = []  # arguments after the subcommand (herd report takes its directories so)


def _require(*names: str) -> None:
    for name in names:
        if FLAGS[name].value is None:
            raise ValueError(f"--{name} is required")


def experiment_config() -> ml_collections.ConfigDict:
    """The --config experiment with every --config.KEY=VALUE override applied (and checked)."""
    from train.experiment import experiment_from_cli

    _require("config")
    return experiment_from_cli(FLAGS.config, _CONFIG_OVERRIDES)


def cmd_train() -> None:
    _require("config", "workdir")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        raise ValueError(f"--workdir={FLAGS.workdir} is a file, not a run directory")
    from train.loop import train_and_evaluate

    train_and_evaluate(experiment_config(), FLAGS.workdir)


def cmd_sample() -> None:
    from train import inference

    if (FLAGS.workdir is None) == (FLAGS.hf is None):
        raise ValueError("give exactly one of --workdir (a herd run) or --hf (a Hugging Face folder)")
    _require("prompt")
    # Checked here, before a checkpoint is read, and named as the flags the user typed.
    for name, ok, valid in (("max_tokens", FLAGS.max_tokens >= 1, "a positive integer"),
                            ("temperature", math.isfinite(FLAGS.temperature) and FLAGS.temperature >= 0,
                             "a finite number >= 0 (0 = greedy)"),
                            ("top_k", FLAGS.top_k >= 0, "an integer >= 0 (0 keeps all)"),
                            ("top_p", 0 < FLAGS.top_p <= 1, "in (0, 1] (1 keeps all)")):
        if not ok:
            raise ValueError(f"--{name}={FLAGS[name].value} must be {valid}")
    loaded = inference.load_workdir(FLAGS.workdir) if FLAGS.workdir else inference.load_hf_dir(FLAGS.hf)
    pieces = inference.sample_text(loaded, FLAGS.prompt, max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                   top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    print(FLAGS.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def cmd_eval() -> None:
    import json

    from train import inference

    _require("workdir")
    loaded = inference.load_workdir(FLAGS.workdir)
    dataset, _, split = (FLAGS.data or "").rpartition(":")
    split = split or loaded.config.data.eval_split
    result = inference.evaluate_split(loaded, split, batches=FLAGS.batches, dataset=dataset or None)
    # JSON has no NaN or Infinity: a diverged model's loss is reported as null (and named), not as invalid JSON.
    bad = sorted(k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v))
    result = {k: None if k in bad else v for k, v in result.items()} | ({"not_finite": bad} if bad else {})
    print(json.dumps({"workdir": FLAGS.workdir, "step": loaded.step, "split": split, **result}, allow_nan=False))


def cmd_convert() -> None:
    import json

    from train import convert

    from model.config import DTYPES

    to_hf, from_hf = FLAGS["to-hf"].value, FLAGS["from-hf"].value
    _require("workdir")
    if FLAGS.dtype not in DTYPES:
        raise ValueError(f"--dtype={FLAGS.dtype!r} is not one of {', '.join(DTYPES)}")
    if (to_hf is None) == (from_hf is None):
        raise ValueError("give exactly one of --to-hf=OUT (export --workdir) or --from-hf=PATH (import into --workdir)")
    report = convert.to_hf(FLAGS.workdir, to_hf, dtype=FLAGS.dtype) if to_hf else convert.from_hf(from_hf, FLAGS.workdir)
    print(json.dumps({"verified_against": "transformers", **report}))


def cmd_sweep() -> None:
    from train.sweep import run_sweep

    _require("config", "workdir")
    from train.experiment import parse_cli_overrides

    config = experiment_config()  # checks the experiment and every --config.KEY=VALUE first
    result = run_sweep(FLAGS.config, FLAGS.workdir, parse_cli_overrides(config, _CONFIG_OVERRIDES),
                       seeds=FLAGS.seeds, parallel=FLAGS.parallel, executor=FLAGS.executor,
                       max_failures=FLAGS.max_failures, retry_failed=FLAGS.retry_failed, dry_run=FLAGS.dry_run)
    if result.outcome == "interrupted":
        print("herd sweep: interrupted; running trials saved a checkpoint; run the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    if result.failed or result.outcome == "stopped":
        stopped = " (stopped after --max_failures)" if result.outcome == "stopped" else ""
        raise ValueError(f"{len(result.failed)} of {len(result.statuses)} trials failed{stopped}; their errors are in "
                         f"{FLAGS.workdir}/*/trial.json; --retry_failed runs them again")


def cmd_report() -> None:
    from train.report import write_report

    if not _POSITIONAL:
        raise ValueError("herd report needs a sweep or run directory: herd report sweeps/x [--metric=...]")
    for path in write_report(_POSITIONAL, metric=FLAGS.metric, maximize=FLAGS.maximize, x=FLAGS.x, by=FLAGS.by,
                             fmt=FLAGS.format, where=FLAGS.where):
        print(path)


def cmd_plan() -> None:
    import json

    import jax

    from train import plan_target

    _require("config")
    fmt = FLAGS.format if FLAGS["format"].present else "text"
    if fmt not in ("text", "json"):
        raise ValueError(f"--format={fmt}: herd plan prints text or json")
    plan_target.prepare_process(FLAGS.target)  # CPU-only JAX with the target's simulated devices, before any backend
    # Compile-only TPU executables do not serialise, and a plan compiles each configuration once.
    jax.config.update("jax_enable_compilation_cache", False)
    config = experiment_config()
    from train import plan, plan_search

    result = plan_search.search(config, FLAGS.target) if FLAGS.search else plan.plan(config, FLAGS.target)
    print(json.dumps(result, indent=1, default=float) if fmt == "json" else plan_search.format_any(result))


COMMANDS: dict[str, Callable[[], None]] = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "convert": cmd_convert,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "plan": cmd_plan,
}


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing of everything but the --config.KEY=VALUE overrides, which are kept for the experiment."""
    from train.experiment import split_cli_overrides

    rest, overrides = split_cli_overrides(argv)
    _CONFIG_OVERRIDES.extend(overrides)
    try:
        return FLAGS(rest)
    except flags.Error as e:
        print(f"herd: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


def _usage_error(message: str) -> None:
    """One line and exit 2, as for a flag absl cannot parse (absl's UsageError would print every flag's help)."""
    print(f"herd: error: {message}; herd --help lists the commands and their flags", file=sys.stderr)
    sys.exit(2)


def _run(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS or (len(argv) > 2 and argv[1] != "report"):
        _usage_error(f"usage: herd {{{'|'.join(COMMANDS)}}} [--flags]; got {' '.join(argv[1:]) or 'nothing'}")
    _POSITIONAL.extend(argv[2:])
    if _CONFIG_OVERRIDES and argv[1] not in _EXPERIMENT_COMMANDS:
        _usage_error(f"herd {argv[1]} takes no --config.KEY=VALUE overrides (only herd "
                     f"{'/'.join(_EXPERIMENT_COMMANDS)} reads an experiment)")
    from train.mesh import maybe_initialize_distributed
    from train.plan_target import quiet_libtpu_without_tpus

    quiet_libtpu_without_tpus()  # libtpu (the `tpu` extra, for herd plan) on a host without TPUs

    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX reports probing for absent backends ("Unable to initialize backend 'tpu'") at INFO, which absl shows.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    maybe_initialize_distributed()  # before any other JAX call
    _enable_compilation_cache()
    from train.signals import Interrupted

    try:
        COMMANDS[argv[1]]()
    except Interrupted as e:
        print(f"herd {argv[1]}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("HERD_DEBUG"):
            raise
        # Errors about configs, data and checkpoints are for people: one line, no traceback.
        print(f"herd {argv[1]}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


def _enable_compilation_cache() -> None:
    """Reuses compiled steps across runs (HERD_XLA_CACHE='' turns it off)."""
    import jax

    directory = os.environ.get("HERD_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "herd", "xla"))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)


def _help(argv: list[str]) -> bool:
    """Prints help for `herd [command] (-h | --help | help)`; False when no help was asked for."""
    words = argv[1:]
    asked = [w for w in words if w in ("-h", "--help", "-help", "--helpfull", "help")]
    if not asked:
        return False
    from train.cli_help import help_text

    named = [w for w in words if w in COMMANDS]
    print(help_text(list(COMMANDS), named[0] if named else None))
    return True


def main() -> None:
    if _help(sys.argv):
        sys.exit(0)
    try:
        tune_malloc()
    except ValueError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
