"""What the laptop-scale paper reproductions share (not an experiment itself).

Data: the complete works of Shakespeare (the embedded default corpus, public domain)
at the byte level (vocabulary 259), so that small models are not dominated by their
embedding and no tokenizer is trained; rows of 128 bytes, batches of 8 rows. Every
trial evaluates once, at its end, on the first 16 batches (16,384 bytes) of the
held-out plays: the `eval/bits_per_byte` the reports compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from experiments import base

EVAL_BATCHES = 16


def laptop_config(steps: int, *, d_model: int, n_layers: int, n_heads: int, d_ff: int, lr: float,
                  warmup: int | None = None) -> ml_collections.ConfigDict:
    """A small Llama on byte-level Shakespeare, AdamW with cosine decay, evaluated once at the end."""
    c = base.get_config()
    c.data.source = "tfds"
    c.data.dataset = "shakespeare_works"
    c.data.tokenizer.name = "byte"
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = steps
    c.model.variant = "tiny"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = (
        d_model, n_layers, n_heads, n_heads, d_ff)
    c.model.max_seq_len = 128
    c.optimizer.name = "adamw"
    c.optimizer.lr = lr
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = warmup if warmup is not None else max(1, steps // 10)
    c.eval.every = steps
    c.eval.batches = EVAL_BATCHES
    c.checkpoint.every = steps
    c.log.every = max(1, steps // 100)
    c.log.progress = False
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds on a CPU: a few steps, a short eval (as experiments/base.py's smoke)."""
    base.apply_smoke(c)
    c.model.variant = "tiny"  # apply_smoke resets it; the experiment's own shape stays in the model keys
    c.data.seq_len = 32
    c.model.max_seq_len = 64
    return c


def finals(runs: Iterable[Any], key: Callable[[dict], Any]) -> dict[Any, list[float]]:
    """{group: final metric of each finished run}, grouped by `key(point)` (seed order: the runs' order)."""
    groups: dict[Any, list[float]] = {}
    for run in runs:
        if run.final is not None:
            groups.setdefault(key(run.point), []).append(run.final)
    return groups


def final_means(runs: Iterable[Any], key: Callable[[dict], Any]) -> dict[Any, tuple[float, float | None, int]]:
    """{group: (mean, 95 % half-width or None, seeds)} of the finished runs' final metric, grouped by `key(point)`."""
    from train.report import t_quantile

    out = {}
    for group, values in finals(runs, key).items():
        n, mean = len(values), sum(values) / len(values)
        half = None
        if n > 1:
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out[group] = (mean, half, n)
    return out


def fmt_interval(mean: float, half: float | None) -> str:
    return f"{mean:.4f}" + (f" ± {half:.4f}" if half is not None else "")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]
