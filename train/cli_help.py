"""`herd --help` and `herd <command> --help`: the subcommands, each one's flags and an example."""

from __future__ import annotations

import re
import textwrap
from typing import NamedTuple

from absl import flags


class Usage(NamedTuple):
    summary: str
    flags: tuple[str, ...]
    example: str


USAGES: dict[str, Usage] = {
    "train": Usage("Train (or resume) an experiment in a run directory.", ("config", "workdir"),
                   "herd train --config=experiments/base.py:smoke --workdir=runs/smoke --config.optimizer.lr=1e-3"),
    "sample": Usage("Stream text from a run's latest checkpoint or a Hugging Face Llama folder.",
                    ("workdir", "hf", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed"),
                    'herd sample --workdir=runs/shakespeare --prompt="ROMEO:" --max_tokens=200 --temperature=0.8'),
    "eval": Usage("Loss, perplexity and bits per byte of a run's model on a split or your own text.",
                  ("workdir", "data", "batches"), "herd eval --workdir=runs/shakespeare --data=validation"),
    "convert": Usage("Export a run to a Hugging Face folder, or import one; verified against transformers.",
                     ("workdir", "to-hf", "from-hf", "dtype"),
                     "herd convert --workdir=runs/shakespeare --to-hf=out/hf_model"),
    "sweep": Usage("Run every trial of an experiment's sweep(), resumably, here or on SLURM.",
                   ("config", "workdir", "seeds", "parallel", "executor", "max_failures", "retry_failed", "dry_run"),
                   "herd sweep --config=experiments/shakespeare.py --workdir=sweeps/lr --seeds=2"),
    "report": Usage("Tables with confidence intervals and plots of a sweep or a run (positional directories).",
                    ("metric", "maximize", "x", "by", "where", "format"),
                    "herd report sweeps/lr --x=optimizer.lr --by=optimizer.name"),
    "plan": Usage("Will a config fit, how is it sharded, how fast will it run on a target (compiled ahead).",
                  ("config", "target", "search", "format"),
                  "herd plan --config=experiments/llama3_pretraining.py:size=8b --target=tpu:v5p:2x2x2"),
}


_OWNER = re.compile(r"^[a-z]+( --[\w-]+)?: ")


def _flag_lines(names: tuple[str, ...]) -> list[str]:
    lines = []
    for name in names:
        if name not in flags.FLAGS:
            continue
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, "") else f" (default: {flag.default})"
        # Flag help names the command it belongs to ("sweep: ..."); within one command's help that is noise.
        text = f"  --{name}: {_OWNER.sub('', flag.help)}{default}"
        lines += textwrap.wrap(text, width=100, subsequent_indent="      ")
    return lines


def help_text(commands: list[str], command: str | None = None) -> str:
    """The overview (`command` None) or one subcommand's usage, flags and example."""
    if command is None:
        width = max(map(len, commands))
        rows = [f"  {c:<{width}}  {USAGES[c].summary if c in USAGES else ''}" for c in commands]
        return "\n".join(["usage: herd <command> [--flags]   (herd <command> --help for its flags)", "",
                          "commands:", *rows, "", "example:", f"  {USAGES['train'].example}"])
    usage = USAGES.get(command)
    if usage is None:
        return f"herd {command}: no help written for this command"
    extra = ["  --config.KEY=VALUE: set any key the experiment schema declares (train/config.py)"] \
        if "config" in usage.flags else []
    return "\n".join([f"usage: herd {command} [--flags]", "", usage.summary, "", "flags:",
                      *_flag_lines(usage.flags), *extra, "", "example:", f"  {usage.example}"])
