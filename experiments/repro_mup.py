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
Expected runtime: ~47 min on a 2-core CPU (measured: experiments/REPRODUCTIONS.md).
`:full` (widths 256 .. 2048, 2,000 steps) is for a GPU or a cluster
(`--executor=slurm`). `:smoke` runs in seconds (tests).
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


def _vertex(points: dict[float, float]) -> float:
    """log2 of the learning rate at the vertex of the parabola through the best grid point and its two neighbours
    (the grid point itself at an edge of the grid): a best learning rate finer than the grid."""
    lrs = sorted(points)
    i = min(range(len(lrs)), key=lambda j: points[lrs[j]])
    if i in (0, len(lrs) - 1):
        return math.log2(lrs[i])
    x0, x1 = math.log2(lrs[i - 1]), math.log2(lrs[i])
    y0, y1, y2 = (points[lr] for lr in lrs[i - 1:i + 2])
    curvature = y0 - 2 * y1 + y2  # equal log2 spacing of 1 grid step h: vertex = x1 + h (y0 - y2) / (2 curvature)
    return x1 + (x1 - x0) * (y0 - y2) / (2 * curvature) if curvature > 0 else x1


def report(runs: list[Any], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Best learning rate per width and parametrization (grid, interpolated, per seed), the verdict's two tests, the
    two parametrizations' best losses side by side, and a two-panel plot of loss against learning rate."""
    import matplotlib.pyplot as plt
    import numpy as np

    def cell(p: dict) -> tuple[str, int, float]:
        return p["model.parametrization"], p["model.d_model"], p["optimizer.lr"]

    means, values = _repro.final_means(runs, cell), _repro.finals(runs, cell)
    per_seed = {(r.point["model.parametrization"], r.point["model.d_model"], r.seed, r.point["optimizer.lr"]): r.final
                for r in runs if r.final is not None}
    seeds = sorted({k[2] for k in per_seed}, key=lambda s: (s is None, s))
    lines = ["## μP transfer", "",
             ("Best learning rate per width: the grid point with the lowest mean final bits per byte over seeds, the "
              "vertex of a parabola through it and its neighbours (log2 lr), and each seed's own best grid point:"), ""]
    rows, best = [], {}
    for param in ("sp", "mup"):
        for width in sorted({w for p, w, _ in means if p == param}):
            cells = {lr: m for (p, w, lr), m in means.items() if p == param and w == width}
            lr, (mean, half, n) = min(cells.items(), key=lambda kv: kv[1][0])
            best[(param, width)] = (lr, _vertex({k: m[0] for k, m in cells.items()}), mean)
            by_seed = []
            for seed in seeds:
                mine = {k[3]: v for k, v in per_seed.items() if k[:3] == (param, width, seed)}
                by_seed.append(f"2^{int(round(math.log2(min(mine, key=mine.get))))}" if mine else "-")
            rows.append((param, width, f"2^{int(round(math.log2(lr)))}", f"{best[(param, width)][1]:+.2f}",
                         ", ".join(by_seed), _repro.fmt_interval(mean, half), n))
    lines += _repro.md_table(["parametrization", "width", "best lr", "interpolated log2 lr", "best lr per seed",
                              "bits per byte at best lr", "seeds"], rows)
    for param in ("sp", "mup"):
        grid = [math.log2(best[k][0]) for k in sorted(best) if k[0] == param]
        vertex = [best[k][1] for k in sorted(best) if k[0] == param]
        if grid:
            lines.append(f"\n{param}: best log2(lr) from the narrowest to the widest: {[int(round(x)) for x in grid]} "
                         f"(spread {max(grid) - min(grid):.0f} grid steps); interpolated: "
                         f"{', '.join(f'{v:+.2f}' for v in vertex)} (spread {max(vertex) - min(vertex):.2f})")
    wider_better = []
    for lr in sorted({lr for _, _, lr in means}):
        losses = [means[k][0] for k in sorted(means) if k[0] == "mup" and k[2] == lr]
        wider_better.append(all(b <= a for a, b in zip(losses, losses[1:])))
    lines.append(f"\nμP, wider is better (mean loss falls with every doubling of width) at {sum(wider_better)} of "
                 f"{len(wider_better)} learning rates.")
    widths = sorted({w for p, w in best if p == "mup"} & {w for p, w in best if p == "sp"})
    if widths:
        lines.append("\nBest mean bits per byte, μP against SP: " + "; ".join(
            f"width {w}: {best[('mup', w)][2]:.4f} vs {best[('sp', w)][2]:.4f}" for w in widths) + ".")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, param in zip(axes, ("sp", "mup")):
        widths = sorted({w for p, w, _ in means if p == param})
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(widths), 1)))
        for width, color in zip(widths, colors):
            lrs = sorted(lr for (p, w, lr) in means if p == param and w == width)
            mean = np.array([means[(param, width, lr)][0] for lr in lrs])
            spread = [values[(param, width, lr)] for lr in lrs]
            yerr = np.array([[m - min(s), max(s) - m] for m, s in zip(mean, spread)]).T
            ax.errorbar(lrs, mean, yerr=yerr, marker="o", ms=3, capsize=2, color=color, label=f"width {width}")
            ax.plot([best[(param, width)][0]], [best[(param, width)][2]], "*", ms=13, color=color, mec="black", mew=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title({"sp": "standard parametrization", "mup": f"μP (base width {BASE_WIDTH})"}[param])
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("final eval bits per byte")
    lo = min(m[0] for m in means.values())
    axes[0].set_ylim(lo - 0.05, lo + 1.0)
    fig.suptitle("Learning-rate transfer across width (TP5 Figure 1, laptop scale)\n"
                 "mean over seeds; bars: min..max over seeds; star: the best learning rate of each width", fontsize=11)
    fig.tight_layout()
    path = out_dir / "mup_transfer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lines, [path]
