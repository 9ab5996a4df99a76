"""Reproduction: Chinchilla's approach 2, IsoFLOP profiles (Hoffmann et al. 2022, arXiv:2203.15556, §3.2, Table 2).

Claim: at a fixed compute budget C, the final loss against model size N is a
valley; its minimum N_opt grows as a power of C, N_opt ∝ C^a with a ≈ 0.5 (the
paper's approach 2: a = 0.49), so parameters and training tokens should grow
in equal proportion (about 20 tokens per parameter at the paper's scale).

Setup (laptop scale): byte-level Shakespeare (experiments/_repro.py); 4-layer
Llamas of widths 16 .. 192 (21,744 to 1,870,656 parameters; head dim 16, SwiGLU
d_ff ~8/3 width, untied embeddings); for each budget C in {3e11, 1e12, 3e12,
1e13} FLOPs four to six sizes around the optimum (the report checks that each
budget's valley was sampled), each trained for C / (6N + attention) tokens
(the project's FLOP formula, model/flops.py, counting every parameter including
the embedding and the output layer, as Porian et al. 2024 and Pearce & Song
2024 advise); a
held-out budget of 2e12 tests the fit. Learning rates: μP with base width 32 and
one learning rate for every size (its transfer across width is what
experiments/repro_mup.py tests), warmup 5 % of each run, cosine decay to 10 %.

Commands:
  herd sweep --config=experiments/repro_chinchilla.py --workdir=sweeps/repro_chinchilla
  herd report sweeps/repro_chinchilla --x=model.d_model
Expected runtime: ~36 min on a 2-core CPU (measured: experiments/REPRODUCTIONS.md).
`:full` (budgets 1e15 .. 1e17) is for a GPU or a cluster. `:smoke` runs in
seconds (tests).
Expected result: a near 0.5, with a wide interval from four budgets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

from experiments import _repro
from model import ModelConfig, count_params, flops_per_token, get_variant
from train.experiment import parse_arg

VOCAB = 259  # the byte tokenizer
SEQ, BATCH = 128, 8
N_LAYERS, HEAD_DIM, BASE_WIDTH, LR = 4, 16, 32, 2.0**-6
# Budget (FLOPs) -> the widths trained at it; 2e12 is held out of the power-law fit.
# The first run (LOG, 2026-12-02) trained only the larger sizes of each grid below: the smallest size was the best at
# every budget, so the valleys were not sampled; the grid now reaches down to width 16 (21,744 parameters).
BUDGETS = {3e11: (16, 32, 48, 64), 1e12: (16, 32, 48, 64, 96), 2e12: (32, 48, 64, 96, 128),
           3e12: (32, 48, 64, 96, 128), 1e13: (32, 48, 64, 96, 128, 192)}
HELD_OUT = 2e12
FULL_BUDGETS = {1e15: (256, 384, 512, 768), 1e16: (384, 512, 768, 1024), 1e17: (768, 1024, 1536, 2048)}


def _shape(width: int) -> dict[str, int]:
    d_ff = int(round(8 / 3 * width / 16)) * 16
    return {"model.d_model": width, "model.n_heads": width // HEAD_DIM, "model.n_kv_heads": width // HEAD_DIM,
            "model.d_ff": d_ff}


def model_cfg(width: int) -> ModelConfig:
    s = _shape(width)
    return get_variant("tiny", vocab_size=VOCAB, d_model=width, n_layers=N_LAYERS, n_heads=s["model.n_heads"],
                       n_kv_heads=s["model.n_kv_heads"], d_ff=s["model.d_ff"], max_seq_len=SEQ)


def steps_for(budget: float, width: int) -> int:
    """Steps of BATCH x SEQ tokens that spend `budget` FLOPs on a model of `width`."""
    return max(1, round(budget / (flops_per_token(model_cfg(width), SEQ) * BATCH * SEQ)))


def _budgets(arg: str | None) -> dict[float, tuple[int, ...]]:
    args = parse_arg(arg, smoke=False, full=False)
    if args.smoke:
        return {2e9: (32,), 4e9: (32,)}
    return FULL_BUDGETS if args.full else BUDGETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _repro.laptop_config(1000, d_model=64, n_layers=N_LAYERS, n_heads=4, d_ff=176, lr=LR)
    c.model.vocab_size = VOCAB
    c.model.parametrization = "mup"
    c.model.mup_base_width = BASE_WIDTH
    c.model.head_dim = HEAD_DIM  # fixed: width grows by adding heads (μP's attention scale uses it)
    c.eval.every = c.checkpoint.every = 10**9  # every trial evaluates and saves once, at its last step
    if parse_arg(arg, smoke=False, full=False).smoke:
        _repro.smoke(c)
        c.data.seq_len = SEQ  # the FLOP budget counts rows of SEQ tokens
        c.model.max_seq_len = SEQ
    return c


def sweep(arg: str | None = None) -> list[dict[str, Any]]:
    points = []
    for budget, widths in _budgets(arg).items():
        for width in widths:
            steps = steps_for(budget, width)
            points.append({**_shape(width), "train.steps": steps, "schedule.warmup_steps": max(1, steps // 20)})
    return points


def _budget_of(run: Any) -> float | None:
    if not run.curve or run.tokens_per_step is None or run.flops_per_token is None:
        return None
    flops = run.curve[-1][0] * run.tokens_per_step * run.flops_per_token
    budgets = list(FULL_BUDGETS) + list(BUDGETS) + [2e9, 4e9]
    return min(budgets, key=lambda b: abs(math.log(b / flops)))


def report(runs: list[Any], out_dir: Path) -> tuple[list[str], list[Path]]:
    """Parabola per budget, the power law N_opt ∝ C^a with its 95 % interval, the held-out budget's error.

    A budget whose parabola has its minimum outside the sizes trained at it (or no minimum) has not sampled its
    valley: it is listed, and left out of the power law, since its N_opt would be an extrapolation."""
    import matplotlib.pyplot as plt
    import numpy as np

    from train.report import t_quantile

    by_budget: dict[float, list[tuple[float, float]]] = {}
    sizes: dict[float, float] = {}  # parameters -> FLOPs per token
    for run in runs:
        budget = _budget_of(run)
        if run.final is not None and budget is not None:
            n = count_params(model_cfg(run.point["model.d_model"]))
            by_budget.setdefault(budget, []).append((n, run.final))
            sizes[n] = run.flops_per_token
    # FLOPs per token between the sizes trained (attention adds to 6N at these widths): a power law in N.
    fpt_fit = np.polyfit(np.log10(list(sizes)), np.log10(list(sizes.values())), 1) if len(sizes) >= 2 else None

    def tokens_per_param(budget: float, n: float) -> float:
        fpt = 10 ** np.polyval(fpt_fit, math.log10(n)) if fpt_fit is not None else 6 * n
        return budget / fpt / n

    fits, outside = {}, {}
    for budget, points in sorted(by_budget.items()):
        if len(points) >= 3:
            x, y = np.log10([p[0] for p in points]), np.array([p[1] for p in points])
            a2, a1, a0 = np.polyfit(x, y, 2)
            if a2 <= 0:
                outside[budget] = "no valley: the loss is not convex in log N over the sizes trained"
                continue
            n_opt = 10 ** (-a1 / (2 * a2))
            fits[budget] = (n_opt, (a2, a1, a0))
            lo, hi = min(p[0] for p in points), max(p[0] for p in points)
            if not lo < n_opt < hi:
                outside[budget] = (f"N_opt outside the sizes trained ({lo:,.0f} .. {hi:,.0f})"
                                   + (": the smallest is best" if n_opt <= lo else ""))
    lines = ["## IsoFLOP profiles (approach 2)", ""]
    rows = []
    for b in sorted(set(fits) | set(outside)):
        n = fits[b][0] if b in fits else None
        rows.append((f"{b:.0e}", len(by_budget[b]), f"{n:,.0f}" if n else "-",
                     f"{tokens_per_param(b, n):.1f}" if n else "-", "held out" if b == HELD_OUT else "fit",
                     "yes" if b not in outside else f"**no**: {outside[b]}"))
    lines += _repro.md_table(["budget C (FLOPs)", "sizes", "N_opt (parameters)",
                              "tokens per parameter at N_opt", "use", "valley sampled"], rows)
    lines.append("\n(Tokens per parameter: C / (FLOPs per token at N_opt) / N_opt, with the FLOPs per token of "
                 "model/flops.py, attention included.)")
    fit_budgets = [b for b in fits if b != HELD_OUT and b not in outside]
    if excluded := [b for b in fits if b != HELD_OUT and b in outside]:
        lines.append(f"\nLeft out of the power law (valley not sampled): {', '.join(f'{b:.0e}' for b in excluded)}.")
    paths = []
    if len(fit_budgets) >= 2:
        lx, ly = np.log10(fit_budgets), np.log10([fits[b][0] for b in fit_budgets])
        slope, intercept = np.polyfit(lx, ly, 1)
        line = f"\nPower law over {len(fit_budgets)} budgets: N_opt ∝ C^{slope:.3f}"
        if len(fit_budgets) >= 3:
            resid = ly - (slope * lx + intercept)
            se = math.sqrt(float(resid @ resid) / (len(lx) - 2) / float(((lx - lx.mean()) ** 2).sum()))
            half = t_quantile(0.975, len(lx) - 2) * se
            line += f" (95 % interval {slope - half:.3f} .. {slope + half:.3f}, Student t with {len(lx) - 2} dof)"
        lines.append(line + "; the paper's approach 2: a = 0.49.")
        if HELD_OUT in fits:
            predicted = 10 ** (slope * math.log10(HELD_OUT) + intercept)
            lines.append(f"Held-out budget {HELD_OUT:.0e}: predicted N_opt {predicted:,.0f}, measured "
                         f"{fits[HELD_OUT][0]:,.0f} ({100 * (predicted / fits[HELD_OUT][0] - 1):+.0f} %)"
                         + (" (its own valley not sampled)." if HELD_OUT in outside else "."))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        colors = plt.get_cmap("plasma")(np.linspace(0, 0.85, len(by_budget)))
        for (budget, points), color in zip(sorted(by_budget.items()), colors):
            ns, losses = zip(*sorted(points))
            tag = " (held out)" if budget == HELD_OUT else " (valley not sampled)" if budget in outside else ""
            ax1.plot(ns, losses, "o", color=color, label=f"C = {budget:.0e}{tag}")
            if budget in fits:
                xs = np.linspace(math.log10(min(ns)), math.log10(max(ns)), 50)
                ax1.plot(10**xs, np.polyval(fits[budget][1], xs), "-", color=color, lw=1)
                if budget not in outside:
                    ax1.plot([fits[budget][0]], [np.polyval(fits[budget][1], math.log10(fits[budget][0]))], "*",
                             color=color, ms=12)
        ax1.set_xscale("log")
        ax1.set_xlabel("parameters N (all, embeddings included)")
        ax1.set_ylabel("final eval bits per byte")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        ends = [*lx, math.log10(HELD_OUT)]
        cs = np.logspace(min(ends) - 0.2, max(ends) + 0.2, 20)
        ax2.plot(cs, 10 ** (slope * np.log10(cs) + intercept), "-", label=f"fit: N_opt ∝ C^{slope:.2f}")
        ax2.plot(fit_budgets, [fits[b][0] for b in fit_budgets], "o", label="N_opt (fit budgets)")
        if HELD_OUT in fits:
            ax2.plot([HELD_OUT], [fits[HELD_OUT][0]], "s", label="held-out budget")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("compute C (FLOPs)")
        ax2.set_ylabel("N_opt (parameters)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3, which="both")
        fig.suptitle("Chinchilla approach 2 at laptop scale: IsoFLOP profiles (left) and N_opt against compute (right)")
        fig.tight_layout()
        path = out_dir / "isoflop.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return lines, paths
