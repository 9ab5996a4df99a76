"""The baseline experiment: the schema's defaults (train/config.py), a smoke shrink, an example sweep.

Experiments import `get_config` from here and change a few fields; the config
is locked, so a misspelt key fails with the closest declared keys. Every key,
its default and its meaning are declared once, in train/config.py.

Arguments (`path:arg`, big_vision's `key=value,flag` convention): `smoke`.
Run: herd train --config=experiments/base.py:smoke --workdir=/tmp/base
"""

from __future__ import annotations

import ml_collections

from train import config as config_lib
from train.experiment import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, smoke=False)
    c = config_lib.defaults()
    if args.smoke:
        apply_smoke(c)
    return c


def sweep():
    """A learning-rate sweep over the baseline: dotted-key overrides, one dict per run."""
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        yield {"optimizer.lr": lr}


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any experiment to a few CPU seconds."""
    c.model.variant = "tiny"
    c.data.seq_len = 32
    c.data.shuffle_tokens = 2**12  # a few rows per block: the first batch needs no long read-ahead
    c.train.steps = 6
    c.train.batch_size = 4
    c.schedule.warmup_steps = 2
    c.eval.every = 3
    c.eval.batches = 2
    c.checkpoint.every = 3
    c.log.progress = False
    return c
