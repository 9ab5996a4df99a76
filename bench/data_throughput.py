"""Does the tfds -> grain pipeline outrun training? Tokens/s of the data pipeline alone vs a train step.

Setup: the default Shakespeare corpus (`shakespeare_works`), a SentencePiece BPE
tokenizer of 2048 pieces trained on its train split, seq_len 256, global batch 8,
the baseline model (`tiny`). The pipeline is timed alone for `--seconds`, then the
train step on one fixed batch (unless `--train_tokens_per_sec` gives it); the
target is a ratio of at least 20, so data loading never shows up in step time.

Run:
    python bench/data_throughput.py [--data_dir=/tmp/tfds] [--worker_count=0]

Prints one line per measurement and a final JSON record; exits 1 if the ratio is under 20.
"""

from __future__ import annotations

import common  # noqa: F401  (first: environment and sys.path)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from train.config import apply_overrides, defaults  # noqa: E402
from train.data import build_dataset  # noqa: E402

TARGET_RATIO = 20.0


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The baseline experiment reading Shakespeare through the tfds pipeline."""
    return apply_overrides(defaults(), {
        "data.source": "tfds",
        "data.dataset": "shakespeare_works",
        "data.data_dir": args.data_dir,
        "data.seq_len": args.seq_len,
        "data.worker_count": args.worker_count,
        "data.tokenizer.name": "sentencepiece",
        "data.tokenizer.vocab_size": args.vocab_size,
        "train.batch_size": args.batch_size,
    })


def pipeline_rate(config: ml_collections.ConfigDict, seconds: float) -> dict[str, Any]:
    """Tokens per second that the train split's iterator delivers, after its first batch."""
    start = time.perf_counter()
    dataset = build_dataset(config, "train", 0)
    it = dataset.iterator(config.train.batch_size)
    next(it)
    ready = time.perf_counter()
    batches, tokens, loss_tokens = 0, 0, 0.0
    while time.perf_counter() - ready < seconds:
        batch = next(it)
        batches += 1
        tokens += batch["inputs"].size
        loss_tokens += float(batch["loss_mask"].sum())
    elapsed = time.perf_counter() - ready
    if hasattr(it, "close"):
        it.close()
    return {"setup_s": ready - start, "batches": batches, "tokens_per_sec": tokens / elapsed,
            "loss_token_share": loss_tokens / max(tokens, 1), "fingerprint": dataset.fingerprint()}


def train_rate(config: ml_collections.ConfigDict, seconds: float) -> dict[str, Any]:
    """Tokens per second that jitted train steps consume (on all local devices), after compiling."""
    stepper = common.Stepper(config)
    stepper.run(1)  # compile
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        stepper.step()
        steps += 1
    stepper.sync()
    elapsed = time.perf_counter() - start
    tokens = steps * config.train.batch_size * config.data.seq_len
    return {"steps": steps, "tokens_per_sec": tokens / elapsed, "model": stepper.model_cfg.to_dict(),
            "devices": f"{stepper.runtime.mesh.size} x {jax.devices()[0].device_kind}"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS default)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to time the pipeline")
    parser.add_argument("--train_seconds", type=float, default=5.0, help="how long to time train steps")
    parser.add_argument("--train_tokens_per_sec", type=float, default=None, help="skip the train measurement")
    parser.add_argument("--worker_count", type=int, default=0, help="data.worker_count")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args(argv)
    config = bench_config(args)

    data = pipeline_rate(config, args.seconds)
    print(f"pipeline: {data['tokens_per_sec']:,.0f} tokens/s over {data['batches']} batches "
          f"(setup {data['setup_s']:.1f} s, {data['loss_token_share']:.1%} of tokens carry loss)")
    if args.train_tokens_per_sec is None:
        train = train_rate(config, args.train_seconds)
        print(f"train step: {train['tokens_per_sec']:,.0f} tokens/s over {train['steps']} steps on {train['devices']}")
    else:
        train = {"tokens_per_sec": args.train_tokens_per_sec, "given": True}
        print(f"train step: {train['tokens_per_sec']:,.0f} tokens/s (given)")
    ratio = data["tokens_per_sec"] / train["tokens_per_sec"]
    met = ratio >= TARGET_RATIO
    print(f"ratio: {ratio:,.1f}x (target >= {TARGET_RATIO:.0f}x: {'met' if met else 'NOT met'})")
    common.emit(common.record("data_throughput", args=vars(args), pipeline=data, train=train, ratio=ratio,
                              target=TARGET_RATIO, backend=jax.default_backend(), numpy=np.__version__))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
