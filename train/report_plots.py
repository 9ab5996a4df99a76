"""The report's plots (matplotlib, written as PNG): learning curves, and the final metric against a swept key."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from train.sweep_plan import short_names, show_value  # noqa: E402

if TYPE_CHECKING:
    from train.report import Row


def _label(point: dict[str, Any], names: dict[str, str]) -> str:
    return ", ".join(f"{names.get(k, k)}={show_value(v)}" for k, v in point.items()) or "baseline"


def _band(row: Row) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, low, high) over the row's seeds, on the steps every seed with data has reached."""
    curves = [dict(r.curve) for r in row.runs if r.curve]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if not steps:
        return None
    values = np.array([[c[s] for s in steps] for c in curves])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_curves(table: Sequence[Row], metric: str, out_dir: Path, suffix: str = "") -> Path:
    """The metric against steps, tokens and training FLOPs: one line per point, the seeds' range as a band."""
    names = short_names([k for row in table for k in row.point])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(table), 1)))
    for row, color in zip(table, colors):
        band = _band(row)
        if band is None:
            continue
        steps, mean, low, high = band
        run = next(r for r in row.runs if r.curve)
        scales = [1.0, run.tokens_per_step, (run.tokens_per_step or 0) * (run.flops_per_token or 0) or None]
        label = _label(row.point, names) + (f" ({len(row.finals)} seeds)" if len(row.runs) > 1 else "")
        for ax, scale in zip(axes, scales):
            if scale is None:
                continue
            # Markers too when there are few evaluations, so a run evaluated once still shows.
            ax.plot(steps * scale, mean, color=color, label=label, lw=1.5, marker="o" if len(steps) <= 12 else None,
                    ms=3)
            if len(row.runs) > 1:
                ax.fill_between(steps * scale, low, high, color=color, alpha=0.2, lw=0)
    for ax, xlabel in zip(axes, ("steps", "tokens", "training FLOPs (6N + attention per token)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{metric} during training (line: mean over seeds; band: their range)")
    fig.tight_layout()
    path = out_dir / f"curves{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def pick_x(table: Sequence[Row], x: str | None) -> str | None:
    """The key for the x axis: `x`, else the first swept key (not the seed) taking two or more values."""
    keys = list(dict.fromkeys(k for row in table for k in row.point))
    if x is not None:
        if x not in keys:
            raise ValueError(f"--x={x} is not a swept key; swept keys: {', '.join(keys) or 'none'}")
        return x
    return next((k for k in keys if len({json.dumps(row.point.get(k)) for row in table}) > 1), None)


def plot_final(table: Sequence[Row], metric: str, out_dir: Path, *, x: str | None = None,
               by: str | None = None, suffix: str = "") -> Path | None:
    """The final metric against `x` (log axis for learning-rate-like keys), one line per value of `by`,
    error bars = the 95 % confidence interval over seeds; None when nothing was swept."""
    x = pick_x(table, x)
    if x is None:
        return None
    keys = {k for row in table for k in row.point}
    if by is not None and by not in keys:
        raise ValueError(f"--by={by} is not a swept key; swept keys: {', '.join(sorted(keys))}")
    groups: dict[str, list[Row]] = {}
    for row in table:
        if row.mean is not None and x in row.point:
            groups.setdefault(show_value(row.point.get(by)) if by else "", []).append(row)
    if not groups:
        return None
    xs_all = [row.point[x] for rows in groups.values() for row in rows]
    numeric = _numeric(xs_all)
    categories = list(dict.fromkeys(map(show_value, xs_all)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("plasma")(np.linspace(0, 0.85, max(len(groups), 1)))
    for (group, rows), color in zip(groups.items(), colors):
        rows = sorted(rows, key=lambda r: r.point[x] if numeric else categories.index(show_value(r.point[x])))
        xs = [r.point[x] if numeric else categories.index(show_value(r.point[x])) for r in rows]
        errs = [r.half_width or 0.0 for r in rows]
        label = f"{short_names([by])[by]}={group}" if by else None
        # A line joins numeric values only: between categories it would suggest an order that is not there.
        ax.errorbar(xs, [r.mean for r in rows], yerr=errs, marker="o", capsize=3, color=color, label=label,
                    linestyle="-" if numeric else "none")
    if numeric and min(xs_all) > 0 and (max(xs_all) / min(xs_all) >= 10 or x.endswith("lr")):
        ax.set_xscale("log", base=2 if x.endswith("lr") else 10)
        values = sorted(set(xs_all))
        if len(values) <= 10 and not all(float(np.log2(v)).is_integer() for v in values):
            # A few values that are not powers of two: label them, not the axis' powers.
            ax.set_xticks(values, [show_value(v) for v in values])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)
    if by:
        ax.legend(fontsize=8)
    ax.set_title(f"final {metric} against {x}\n(mean ± 95 % confidence interval over seeds)", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"final_vs_{short_names([x])[x].replace('/', '_')}{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
