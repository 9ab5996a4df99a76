"""Reproduction: grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245).

Claim: grouped-query attention (GQA: a few key/value heads, each shared by a group
of query heads) keeps nearly all of multi-head attention's (MHA) quality at close
to multi-query attention's (MQA, one key/value head) decoding speed. The paper
uptrains T5-XXL checkpoints and reports quality and time per sample.

Setup (laptop scale): byte-level Shakespeare (experiments/_repro.py); a 4-layer
Llama, width 128, 8 query heads of 16, SwiGLU d_ff 384, trained from scratch
with 8 (MHA), 4, 2 (GQA) and 1 (MQA) key/value heads; AdamW lr 2e-3, 1,500 steps;
2 seeds: 8 trials. Quality: held-out bits per byte. Speed (`herd report` measures
it on the trained models, in one process, alternating rounds): greedy KV-cache
decoding of 16 prompts of 384 bytes, 64 new tokens each, with model/generate.py.

Commands:
  herd sweep --config=experiments/repro_gqa.py --workdir=sweeps/repro_gqa --seeds=2
  herd report sweeps/repro_gqa --x=model.n_kv_heads
Expected runtime: ~20 min on a 2-core CPU (report ~1 min). `:full` (width 1024, 16
heads, 10,000 steps) is for a GPU. `:smoke` runs in seconds (tests).
Expected result (the paper's): GQA's quality close to MHA's, its speed close to MQA's.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import ml_collections

from experiments import _repro
from train.experiment import parse_arg

DECODE = dict(batch=16, prompt=384, new=64, rounds=5)


def _args(arg: str | None) -> Any:
    return parse_arg(arg, smoke=False, full=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _args(arg)
    if args.full:
        c = _repro.laptop_config(10_000, d_model=1024, n_layers=8, n_heads=16, d_ff=2816, lr=1e-3)
    else:
        c = _repro.laptop_config(1500, d_model=128, n_layers=4, n_heads=8, d_ff=384, lr=2e-3)
    c.model.max_seq_len = 512  # room for the decoding measurement's long prompts (training rows stay 128)
    if args.smoke:
        _repro.smoke(c)
        c.model.max_seq_len = 512
    return c


def sweep(arg: str | None = None) -> list[dict[str, Any]]:
    heads = 16 if _args(arg).full else 8
    kv = (heads, 1) if _args(arg).smoke else (heads, heads // 2, heads // 4, 1)
    return [{"model.n_kv_heads": k} for k in kv]


def decode_seconds(runs: list[Any], batch: int, prompt: int, new: int, rounds: int) -> dict[int, float]:
    """Median seconds of one greedy `generate` call per key/value head count, alternating the models each round."""
    import jax
    import numpy as np

    from model import generate
    from train.inference import load_workdir

    models = {}
    for run in runs:
        k = run.point["model.n_kv_heads"]
        if k not in models and run.status == "done":
            loaded = load_workdir(run.path, devices=jax.devices()[:1])
            models[k] = (loaded.model_cfg, loaded.params)
    prompts = np.random.default_rng(0).integers(0, 256, (batch, prompt)).tolist()

    def call(k: int) -> float:
        cfg, params = models[k]
        t0 = time.perf_counter()
        generate.generate(cfg, params, prompts, max_new_tokens=new, rng=jax.random.key(0))
        return time.perf_counter() - t0

    for k in models:
        call(k)  # compile
    times: dict[int, list[float]] = {k: [] for k in models}
    for r in range(rounds):
        for k in sorted(models) if r % 2 == 0 else sorted(models, reverse=True):
            times[k].append(call(k))
    return {k: statistics.median(v) for k, v in times.items()}


def report(runs: list[Any], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Quality and decoding speed per key/value head count."""
    means = _repro.final_means(runs, lambda p: p["model.n_kv_heads"])
    seq_len = json.loads((runs[0].path / "run.json").read_text())["config"]["data"]["seq_len"]
    spec = dict(DECODE, prompt=16, new=8, rounds=1) if seq_len < 128 else DECODE  # a smoke sweep: seconds
    seconds = decode_seconds(runs, **spec)
    heads = max(means)
    rows = []
    for k in sorted(means, reverse=True):
        kind = "MHA" if k == heads else "MQA" if k == 1 else f"GQA-{k}"
        tok_s = spec["batch"] * spec["new"] / seconds[k] if k in seconds else float("nan")
        rows.append((kind, k, _repro.fmt_interval(*means[k][:2]), means[k][2], f"{seconds.get(k, float('nan')):.3f}",
                     f"{tok_s:,.0f}"))
    lines = ["## Quality and decoding speed", "",
             f"Decoding: {spec['batch']} prompts of {spec['prompt']} bytes, {spec['new']} new tokens each, greedy, "
             f"median of {spec['rounds']} alternating rounds on one CPU device.", "",
             *_repro.md_table(["attention", "kv heads", "final bits per byte", "seeds", "s / generate", "tokens/s"],
                              rows)]
    return lines, []
