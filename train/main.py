"""The `herd` command line: `herd train --config=experiments/<name>.py[:arg] --workdir=DIR`.

Subcommands live in a registry; each takes the parsed absl flags.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/base.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run.json.")


def _require(*names: str) -> None:
    for name in names:
        if FLAGS[name].value is None:
            raise ValueError(f"--{name} is required")


def cmd_train() -> None:
    _require("config", "workdir")
    from train.loop import train_and_evaluate

    train_and_evaluate(FLAGS.config, FLAGS.workdir)


COMMANDS: dict[str, Callable[[], None]] = {"train": cmd_train}


def _run(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: herd {{{'|'.join(COMMANDS)}}} [--flags]; got {' '.join(argv[1:]) or 'nothing'}")
    from train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any other JAX call
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        COMMANDS[argv[1]]()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("HERD_DEBUG"):
            raise
        # Errors about configs, data and checkpoints are for people: one line, no traceback.
        print(f"herd {argv[1]}: error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    app.run(_run)


if __name__ == "__main__":
    main()
