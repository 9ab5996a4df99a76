"""Reproduction: μP learning-rate transfer (Tensor Programs V, Yang et al. 2022, arXiv:2203.03466, Figure 1).

Claim: with Adam, under the standard parametrization (SP) the best learning rate
drifts as the model gets wider, while under μP it stays put, and wider is better
at every learning rate, so a learning rate tuned on a small model transfers.

Setup (laptop scale): byte-level Shakespeare (experiments/_repro.py); 2-layer
Llamas of widths 32, 64, 128, 256 (8x), head dim 16 (2 to 16 heads), SwiGLU d_ff
4 x width; AdamW without weight decay and without clipping (both would change
the effective step size by other rules), 300 steps, cosine decay; learning rates
2^-12 .. 2^-5 (a log2 grid); 2 seeds; SP and μP with base width 32
(model/mup.py states the multipliers). 4 x 8 x 2 x 2 = 128 trials.

Commands:
  herd sweep --config=experiments/repro_mup.py --workdir=sweeps/repro_mup --seeds=2
  herd report sweeps/repro_mup --x=optimizer.lr --by=model.d_model
Expected runtime: ~30-45 min on a 2-core CPU. `:full` (widths 256 .. 2048, 2,000 steps)
is for a GPU or a cluster (`--executor=slurm`). `:smoke` runs in seconds (tests).
Expected result (the paper's): SP's best lr falls with width; μP's does not move by
more than a grid step, and its loss falls with width at every lr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

from experiments import _repro
from train.experiment import parse_arg
from train.sweep_space import product, zipped

BASE_WIDTH = 32
HEAD_DIM = 16


def _shape(width: int) -> dict[str, int]:
    return {"model.d_model": width, "model.n_heads": width // HEAD_DIM, "model.n_kv_heads": width // HEAD_DIM,
            "model.d_ff": 4 * width}


def _grid(arg: str | None) -> tuple[list[int], list[float], int]:
    args = parse_arg(arg, smoke=False, full=False)
    if args.smoke:
        return [64], [2.0**-7], 6
    if args.full:
        return [256, 512, 1024, 2048], [2.0**k for k in range(-14, -5)], 2000
    return [32, 64, 128, 256], [2.0**k for k in range(-12, -4)], 300


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    widths, lrs, steps = _grid(arg)
    shape = _shape(widths[0])
    c = _repro.laptop_config(steps, d_model=shape["model.d_model"], n_layers=2, n_heads=shape["model.n_heads"],
                             d_ff=shape["model.d_ff"], lr=lrs[0])
    c.model.mup_base_width = BASE_WIDTH
    c.model.head_dim = HEAD_DIM  # fixed: width grows by adding heads (μP's attention scale uses it)
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 0.0
    if parse_arg(arg, smoke=False, full=False).smoke:
        _repro.smoke(c)
    return c


def sweep(arg: str | None = None) -> list[dict[str, Any]]:
    widths, lrs, _ = _grid(arg)
    shapes = zipped({k: [_shape(w)[k] for w in widths] for k in _shape(widths[0])})
    return product({"model.parametrization": ["sp", "mup"]}, shapes, {"optimizer.lr": lrs})


def report(runs: list[Any], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Best learning rate per width and parametrization, the verdict's two tests, and a two-panel plot."""
    import matplotlib.pyplot as plt
    import numpy as np

    means = _repro.final_means(runs, lambda p: (p["model.parametrization"], p["model.d_model"], p["optimizer.lr"]))
    lines = ["## μP transfer", "", "Best learning rate (lowest mean final bits per byte over seeds) per width:", ""]
    rows, best = [], {}
    for param in ("sp", "mup"):
        for width in sorted({w for p, w, _ in means if p == param}):
            cells = {lr: m for (p, w, lr), m in means.items() if p == param and w == width}
            lr, (mean, half, n) = min(cells.items(), key=lambda kv: kv[1][0])
            best[(param, width)] = lr
            rows.append((param, width, f"2^{int(round(math.log2(lr)))}", _repro.fmt_interval(mean, half), n))
    lines += _repro.md_table(["parametrization", "width", "best lr", "bits per byte", "seeds"], rows)
    for param in ("sp", "mup"):
        logs = [math.log2(best[k]) for k in sorted(best) if k[0] == param]
        if logs:
            lines.append(f"\n{param}: best log2(lr) from the narrowest to the widest: {[int(round(x)) for x in logs]} "
                         f"(spread {max(logs) - min(logs):.0f} grid steps)")
    wider_better = []
    for lr in sorted({lr for _, _, lr in means}):
        losses = [means[k][0] for k in sorted(means) if k[0] == "mup" and k[2] == lr]
        wider_better.append(all(b <= a for a, b in zip(losses, losses[1:])))
    lines.append(f"\nμP, wider is better (loss falls with width) at {sum(wider_better)} of {len(wider_better)} "
                 "learning rates.")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, param in zip(axes, ("sp", "mup")):
        widths = sorted({w for p, w, _ in means if p == param})
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(widths), 1)))
        for width, color in zip(widths, colors):
            points = sorted((lr, m) for (p, w, lr), m in means.items() if p == param and w == width)
            ax.errorbar([lr for lr, _ in points], [m[0] for _, m in points], yerr=[m[1] or 0 for _, m in points],
                        marker="o", ms=3, capsize=2, color=color, label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_title({"sp": "standard parametrization", "mup": f"μP (base width {BASE_WIDTH})"}[param])
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final eval bits per byte (mean ± 95 % CI)")
    lo = min(m[0] for m in means.values())
    axes[0].set_ylim(lo - 0.05, lo + 1.5)
    fig.suptitle("Learning-rate transfer across width (TP5 Figure 1, laptop scale)")
    fig.tight_layout()
    path = out_dir / "mup_transfer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines, [path]
