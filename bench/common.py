"""What every benchmark script shares: start-up, the experiment flag, timing rounds, the JSON record.

Imported first by each script (`import common`, which works because a script's
own folder is on sys.path): it keeps JAX on the CPU unless JAX_PLATFORMS says
otherwise and puts the repository on sys.path, so `python bench/x.py` needs no
PYTHONPATH. Not a benchmark itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, TypeVar  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402

from train.config import apply_overrides  # noqa: E402
from train.experiment import experiment_from_cli, split_cli_overrides  # noqa: E402
from train.data import open_data  # noqa: E402
from train.malloc import tune_malloc  # noqa: E402
from train.runtime import Runtime  # noqa: E402

T = TypeVar("T")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def define_experiment_flag(default: str | None, help_text: str) -> None:
    """`--config=path[:arg]` plus any `--config.KEY=VALUE`, parsed as `herd train` parses them."""
    flags.DEFINE_string("config", default, help_text + " --config.KEY=VALUE overrides any declared key.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser for app.run: keeps --config.KEY=VALUE aside for `experiment()`."""
    rest, overrides = split_cli_overrides(argv)
    _OVERRIDES.extend(overrides)
    return FLAGS(rest)


def experiment() -> ml_collections.ConfigDict:
    """The --config experiment with its overrides applied."""
    return experiment_from_cli(FLAGS.config, _OVERRIDES)


def overridden(key: str) -> bool:
    """Whether --config.KEY=... was given on the command line."""
    return any(arg.partition("=")[0] == key for arg in _OVERRIDES)


def restart_with_malloc(choice: str) -> None:
    """As the herd CLI does on CPU: restart once with glibc's malloc tuned ("tuned") or keep it ("system")."""
    os.environ["HERD_MALLOC"] = choice
    tune_malloc()


def single_device_synthetic(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The experiment on one device and random synthetic tokens, the model vocabulary its tokenizer's.

    Nothing is read from disk, so only the step is measured; a transformers reference (which
    has no packed-document masking) computes exactly the same function on such rows.
    """
    overrides: dict[str, Any] = {"data.source": "synthetic_random", "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    if config.model.vocab_size is None:
        vocab = tokenizer_vocab(config)
        if vocab is not None:
            overrides["model.vocab_size"] = vocab
    return apply_overrides(config, overrides)


def tokenizer_vocab(config: ml_collections.ConfigDict) -> int | None:
    """The vocabulary the experiment's tokenizer gives the model, without reading data (None: the variant's)."""
    tok = config.data.tokenizer
    if config.data.source.startswith("synthetic"):
        return None
    if tok.name == "byte":
        from train.data.tokenizers import ByteTokenizer

        return ByteTokenizer.vocab_size
    if tok.name == "sentencepiece" and tok.path is None:
        return int(tok.vocab_size)
    print(f"note: the vocabulary of tokenizer {tok.name!r} is unknown without loading it; using the variant's "
          "(set --config.model.vocab_size to pin it)")
    return None


class Stepper:
    """herd's jitted train step on one fixed batch of the config's (synthetic) data."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None):
        data = open_data(config)
        self.runtime = Runtime(config, data.model_cfg, devices)
        self.model_cfg = data.model_cfg
        self.state = self.runtime.initial_state()
        self.local_batch = next(data.batches(data.train))
        self.batch = self.runtime.to_global(self.local_batch)
        self.metrics: Any = None

    def step(self) -> None:
        self.state, self.metrics = self.runtime.train_step(self.state, self.batch)

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps, from an idle device to the last result."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - t0) / steps


def alternate(sides: dict[str, Callable[[], T]], rounds: int,
              after_round: Callable[[int, dict[str, list[T]]], None] | None = None) -> dict[str, list[T]]:
    """Calls every side once per round, reversing the order each round so none always runs first.

    `after_round(r, results so far)` runs after each round (e.g. to print it).
    """
    out: dict[str, list[T]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else list(reversed(sides)):
            out[name].append(sides[name]())
        if after_round is not None:
            after_round(r, out)
    return out


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in rounds.items()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(bench: str, **fields: Any) -> dict[str, Any]:
    """The JSON record every benchmark ends with: its name, the date, the command, the machine, then `fields`."""
    return {
        "bench": bench,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        **fields,
    }


def emit(summary: dict[str, Any], out: str | None = None) -> None:
    """Prints the record as the last stdout line, and appends it to `out` when given."""
    line = json.dumps(summary, default=str)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
