"""The `herd` command line: `herd train --config=experiments/<name>.py[:arg] --workdir=DIR [--config.KEY=VALUE]`.

Subcommands live in a registry; each reads the parsed absl flags. `--config.KEY=VALUE`
arguments are taken out before absl parses the rest and applied with
`train.config.apply_overrides`, the same function sweeps and tests use.
"""

from __future__ import annotations

import logging
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
flags.DEFINE_string("data", None, "eval: SPLIT or DATASET:SPLIT (default: the run's eval split).")
flags.DEFINE_integer("batches", 0, "eval: number of batches (0 = the whole split once).")
# convert
flags.DEFINE_string("to-hf", None, "convert: write the run's latest checkpoint as a Hugging Face folder here.")
flags.DEFINE_string("from-hf", None, "convert: import this Hugging Face folder into --workdir.")
flags.DEFINE_string("dtype", "float32", "convert --to-hf: stored dtype (float32, bfloat16 or float16).")

_CONFIG_OVERRIDES: list[str] = []  # the `KEY=VALUE` of each --config.KEY=VALUE, in order
# Subcommands that read an experiment (--config and its overrides).
_EXPERIMENT_COMMANDS = ("train",)


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
    from train.loop import train_and_evaluate

    train_and_evaluate(experiment_config(), FLAGS.workdir)


def cmd_sample() -> None:
    from train import inference

    if (FLAGS.workdir is None) == (FLAGS.hf is None):
        raise ValueError("give exactly one of --workdir (a herd run) or --hf (a Hugging Face folder)")
    _require("prompt")
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
    print(json.dumps({"workdir": FLAGS.workdir, "step": loaded.step, "split": split, **result}))


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


COMMANDS: dict[str, Callable[[], None]] = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "convert": cmd_convert,
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


def _run(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: herd {{{'|'.join(COMMANDS)}}} [--flags]; got {' '.join(argv[1:]) or 'nothing'}")
    if _CONFIG_OVERRIDES and argv[1] not in _EXPERIMENT_COMMANDS:
        raise app.UsageError(f"herd {argv[1]} takes no --config.KEY=VALUE overrides (only herd "
                             f"{'/'.join(_EXPERIMENT_COMMANDS)} reads an experiment)")
    from train.mesh import maybe_initialize_distributed

    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX reports probing for absent backends ("Unable to initialize backend 'tpu'") at INFO, which absl shows.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    maybe_initialize_distributed()  # before any other JAX call
    _enable_compilation_cache()
    try:
        COMMANDS[argv[1]]()
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


def main() -> None:
    try:
        tune_malloc()
    except ValueError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
