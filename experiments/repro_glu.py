"""Reproduction: GLU variants in the feed-forward block (Shazeer 2020, arXiv:2002.05202, Table 1).

Claim: at matched parameters and compute, the gated feed-forward variants (SwiGLU,
GEGLU, ReGLU) reach a lower held-out loss than the ungated ReLU and GELU ones.
The paper trains T5 for 65,536 steps on C4 and reports held-out log-perplexity.

Setup (laptop scale): byte-level Shakespeare (experiments/_repro.py); a 4-layer
Llama, width 128, 4 heads; gated MLPs with d_ff 384 (three matrices), ungated
ones 3/2 as wide, 576 (two matrices), so every variant has the same parameters and
FLOPs, as in the paper (d_ff 2048 gated against 3072); AdamW lr 2e-3, 1,500
steps, cosine decay; 2 seeds. 5 variants x 2 seeds = 10 trials.

Commands:
  herd sweep --config=experiments/repro_glu.py --workdir=sweeps/repro_glu --seeds=2
  herd report sweeps/repro_glu --x=model.mlp_activation
Expected runtime: ~25 min on a 2-core CPU. `:full` (width 512, 8 layers, 20,000
steps) is for a GPU or a cluster. `:smoke` runs in seconds (tests).
Expected result (the paper's): the three gated variants below ReLU and GELU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from experiments import _repro
from train.experiment import parse_arg

GATED = ("swiglu", "geglu", "reglu")
UNGATED = ("relu", "gelu")


def _args(arg: str | None) -> Any:
    return parse_arg(arg, smoke=False, full=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _args(arg)
    if args.full:
        c = _repro.laptop_config(20_000, d_model=512, n_layers=8, n_heads=8, d_ff=1536, lr=1e-3)
    else:
        c = _repro.laptop_config(1500, d_model=128, n_layers=4, n_heads=4, d_ff=384, lr=2e-3)
    if args.smoke:
        _repro.smoke(c)
        c.model.d_model, c.model.n_layers, c.model.d_ff = 64, 2, 128
    return c


def sweep(arg: str | None = None) -> list[dict[str, Any]]:
    variants = ("swiglu", "relu") if _args(arg).smoke else GATED + UNGATED
    return [{"model.mlp_activation": v} for v in variants]


def report(runs: list[Any], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Gated against ungated: each variant's mean and interval, and the gap between the best ungated and the
    worst gated variant."""
    means = _repro.final_means(runs, lambda p: p["model.mlp_activation"])
    rows = [(v, "gated" if v in GATED else "ungated", _repro.fmt_interval(m, h), n)
            for v, (m, h, n) in sorted(means.items(), key=lambda kv: kv[1][0])]
    lines = ["## Gated against ungated", "", *_repro.md_table(["MLP", "kind", "final bits per byte", "seeds"], rows)]
    gated = [means[v][0] for v in GATED if v in means]
    ungated = [means[v][0] for v in UNGATED if v in means]
    if gated and ungated:
        lines.append(f"\nWorst gated {max(gated):.4f} against best ungated {min(ungated):.4f}: every gated variant "
                     f"is {'below' if max(gated) < min(ungated) else 'NOT below'} every ungated one.")
    lines += ["", *paired_by_seed(runs)]
    return lines, []


def paired_by_seed(runs: list[Any]) -> list[str]:
    """Within each seed (the same data order for every variant): the variants in order, and the gated mean minus
    the ungated mean. Seed-to-seed spread moves all variants together, so this is the sharper comparison."""
    by_seed: dict[Any, dict[str, float]] = {}
    for run in runs:
        if run.final is not None:
            by_seed.setdefault(run.seed, {})[run.point["model.mlp_activation"]] = run.final
    rows = []
    for seed, finals in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        gated = [finals[v] for v in GATED if v in finals]
        ungated = [finals[v] for v in UNGATED if v in finals]
        gap = f"{sum(gated) / len(gated) - sum(ungated) / len(ungated):+.4f}" if gated and ungated else "-"
        order = " < ".join(f"{v} {finals[v]:.4f}" for v in sorted(finals, key=finals.get))
        rows.append((seed, order, gap))
    return ["## Paired by seed", "", *_repro.md_table(["seed", "variants, best first", "gated − ungated mean"], rows)]
