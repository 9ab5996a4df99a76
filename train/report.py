"""`herd report`: a sweep's (or a run's) results as a table with confidence intervals, and plots.

    herd report sweeps/x [--metric=eval/bits_per_byte] [--x=optimizer.lr] [--by=model.d_model] [--format=md|csv|json]

Reads `sweep.json`, each trial's `trial.json`, `run.json` and `metrics.jsonl`
(so it works on a sweep that is still running, and on a single run directory).
One row per point: its overrides, the final metric as mean ± 95 % confidence
interval over the seeds that finished (Student t), how many seeds finished,
failed or are unfinished; the best point is marked. `md` writes `report.md`
and PNG plots (train/report_plots.py) beside the sweep and returns their paths;
`csv` and `json` print the table for scripts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model import ModelConfig, flops_per_token
from train import trial as trial_lib
from train.sweep_plan import SWEEP_FILE, short_names, show_value
from train.workdir import RunDir

FORMATS = ("md", "csv", "json")


@dataclasses.dataclass
class Run:
    """One trial (or plain run) as the report sees it."""

    name: str
    path: Path
    point: dict[str, Any]
    seed: int | None
    status: str
    error: str | None
    curve: list[tuple[int, float]]  # (step, metric) rows, later rows winning on repeated steps
    tokens_per_step: float | None
    flops_per_token: float | None

    @property
    def final(self) -> float | None:
        return self.curve[-1][1] if self.status == "done" and self.curve else None


@dataclasses.dataclass
class Row:
    """One point of the sweep: its runs over seeds, and the mean and 95 % interval of their final metric."""

    point: dict[str, Any]
    runs: list[Run]
    mean: float | None = None
    half_width: float | None = None  # of the 95 % confidence interval; None with fewer than two seeds
    best: bool = False

    @property
    def finals(self) -> list[float]:
        return [r.final for r in self.runs if r.final is not None]

    def count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.runs)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` in metrics.jsonl; a step written twice (a resumed run) keeps its later row."""
    by_step: dict[int, float] = {}
    path = RunDir(run_dir).metrics
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            value = row.get(metric)
            if value is not None and math.isfinite(value):
                by_step[int(row["step"])] = float(value)
    return sorted(by_step.items())


def recorded_metrics(run_dir: Path) -> set[str]:
    """Every metric name in a run's metrics.jsonl."""
    path = RunDir(run_dir).metrics
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        names |= set(row) - {"step"} if isinstance(row, dict) else set()
    return names


def _run(path: Path, metric: str, record: Mapping[str, Any]) -> Run:
    info = _read_json(RunDir(path).run_info) or {}
    tokens = flops = None
    config, model = info.get("config"), info.get("extra", {}).get("model")
    if config and model:
        seq_len = config["data"]["seq_len"]
        tokens = float(config["train"]["batch_size"] * seq_len)
        flops = float(flops_per_token(ModelConfig(**model), seq_len))
    return Run(record.get("name", path.name), path, dict(record.get("point", {})), record.get("seed"),
               record.get("status", "pending"), record.get("error"), read_curve(path, metric), tokens, flops)


def load(paths: Sequence[str | Path], metric: str) -> tuple[list[Run], Path]:
    """The runs under `paths` (sweep directories or run directories) and where the report goes."""
    runs: list[Run] = []
    for path in map(Path, paths):
        sweep = _read_json(path / SWEEP_FILE)
        if sweep is not None:
            for name in sweep.get("trials", []):
                runs.append(_run(path / name, metric, trial_lib.read(path / name) or {"name": name}))
        elif RunDir(path).run_info.exists():
            record = trial_lib.read(path) or {"name": path.name, "status": "done"}
            runs.append(_run(path, metric, record))
        else:
            raise FileNotFoundError(f"{path} holds neither {SWEEP_FILE} (a sweep) nor run.json (a run)")
    return runs, Path(paths[0])


def t_quantile(p: float, dof: int) -> float:
    """Student t quantile (scipy), for the confidence intervals over seeds."""
    from scipy import stats

    return float(stats.t.ppf(p, dof))


def rows(runs: Sequence[Run], maximize: bool = False) -> list[Row]:
    """Runs grouped by point (in sweep order), each with mean ± 95 % CI of the final metric; the best marked."""
    grouped: dict[str, Row] = {}
    for run in runs:
        key = json.dumps(run.point, sort_keys=True)
        grouped.setdefault(key, Row(run.point, [])).runs.append(run)
    out = list(grouped.values())
    for row in out:
        finals = row.finals
        if finals:
            row.mean = sum(finals) / len(finals)
        if len(finals) >= 2:
            sd = math.sqrt(sum((f - row.mean) ** 2 for f in finals) / (len(finals) - 1))
            row.half_width = t_quantile(0.975, len(finals) - 1) * sd / math.sqrt(len(finals))
    scored = [r for r in out if r.mean is not None]
    if scored:
        (max if maximize else min)(scored, key=lambda r: r.mean).best = True
    return out


def table_records(table: Sequence[Row], metric: str) -> list[dict[str, Any]]:
    """The table as plain records (the csv/json output and the markdown table's source)."""
    return [{
        "point": row.point,
        metric: row.mean,
        "ci95": row.half_width,
        "seeds_done": len(row.finals),
        "failed": row.count("failed"),
        "unfinished": row.count("pending", "running", "interrupted"),
        "best": row.best,
        "trials": [r.name for r in row.runs],
        "errors": [r.error for r in row.runs if r.error],
    } for row in table]


def markdown_table(table: Sequence[Row], metric: str) -> str:
    keys = list(dict.fromkeys(k for row in table for k in row.point))
    names = short_names(keys)
    head = [*(names[k] for k in keys), metric, "seeds", "failed", "unfinished", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        value = "—" if row.mean is None else f"{row.mean:.4f}" + (
            f" ± {row.half_width:.4f}" if row.half_width is not None else "")
        cells = [*(show_value(row.point.get(k, "")) for k in keys), value, str(len(row.finals)),
                 str(row.count("failed")), str(row.count("pending", "running", "interrupted")),
                 "**best**" if row.best else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_where(text: str | None) -> dict[str, str]:
    """`--where=KEY=VALUE[,KEY=VALUE]` as a dict (values compared as the report prints them)."""
    out: dict[str, str] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--where={text}: {part!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def experiment_hook(paths: Sequence[str | Path]) -> Any:
    """The sweep's experiment module's `report(runs, out_dir)`, if it defines one (its own analysis and plots)."""
    sweep = _read_json(Path(paths[0]) / SWEEP_FILE)
    if not sweep:
        return None
    from train.experiment import load_module

    path = sweep["experiment"].partition(":")[0]
    return getattr(load_module(path), "report", None) if Path(path).is_file() else None


def write_report(paths: Sequence[str | Path], *, metric: str = "eval/bits_per_byte", maximize: bool = False,
                 x: str | None = None, by: str | None = None, fmt: str = "md", where: str | None = None) -> list[str]:
    """Writes report.md and its plots (`fmt="md"`), or prints the table as csv / json; returns the files written.

    `where` keeps the trials whose point has KEY=VALUE. A sweep whose experiment module defines
    `report(runs, out_dir) -> (markdown lines, plot paths)` gets that analysis appended.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is not one of: {', '.join(FORMATS)}")
    runs, out_dir = load(paths, metric)
    if not runs:
        raise ValueError(f"{out_dir} lists no trials yet")
    if not any(r.curve for r in runs):  # a misspelt --metric, rather than trials that have not logged it yet?
        recorded = set().union(*(recorded_metrics(r.path) for r in runs))
        if recorded and metric not in recorded:
            raise ValueError(f"--metric={metric} is in no trial's metrics.jsonl; recorded metrics: "
                             f"{', '.join(sorted(recorded))}")
    conditions = parse_where(where)
    keys = {k for r in runs for k in r.point}
    for key in conditions:
        if key not in keys:
            raise ValueError(f"--where: {key} is not a swept key; swept keys: {', '.join(sorted(keys)) or 'none'}")
    runs = [r for r in runs if all(show_value(r.point.get(k)) == v for k, v in conditions.items())]
    if not runs:
        raise ValueError(f"--where={where} keeps no trial")
    table = rows(runs, maximize)
    records = table_records(table, metric)
    if fmt == "json":
        print(json.dumps(records, indent=2))
        return []
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        keys = list(dict.fromkeys(k for row in table for k in row.point))
        writer.writerow([*keys, metric, "ci95", "seeds_done", "failed", "unfinished", "best"])
        for rec in records:
            writer.writerow([*(rec["point"].get(k, "") for k in keys), rec[metric], rec["ci95"], rec["seeds_done"],
                             rec["failed"], rec["unfinished"], rec["best"]])
        print(buf.getvalue(), end="")
        return []
    from train.report_plots import plot_curves, plot_final

    suffix = "".join(f"_{k.rpartition('.')[2]}={v}" for k, v in conditions.items())
    curve_table, curve_label = table, metric
    if all(len(r.curve) <= 1 for r in runs) and metric != "loss":
        # Evaluated once, at the end (as the reproductions are): learning curves of the training loss instead.
        loss_runs = [dataclasses.replace(r, curve=read_curve(r.path, "loss")) for r in runs]
        if any(len(r.curve) > 1 for r in loss_runs):
            curve_table, curve_label = rows(loss_runs, maximize=False), f"training loss ({metric} was evaluated once)"
    plots = [plot_curves(curve_table, curve_label, out_dir, suffix)]
    final_plot = plot_final(table, metric, out_dir, x=x, by=by, suffix=suffix)
    if final_plot is not None:
        plots.append(final_plot)
    extra: list[str] = []
    hook = experiment_hook(paths) if not conditions else None
    if hook is not None:
        lines, more = hook(runs, out_dir)
        extra, plots = list(lines), plots + list(more)
    failures = [f"- `{r.name}`: {r.error}" for r in runs if r.status == "failed"]
    scope = f" (trials with {', '.join(f'{k}={v}' for k, v in conditions.items())})" if conditions else ""
    text = [f"# Report: {out_dir.name}{scope}", "",
            f"Metric: `{metric}` ({'higher' if maximize else 'lower'} is better), final value of each finished "
            "trial; mean ± 95 % confidence interval over seeds (Student t).", "",
            markdown_table(table, metric), ""]
    if failures:
        text += ["Failed trials:", "", *failures, ""]
    text += [*extra, *([""] if extra else []), *(f"![{Path(p).stem}]({Path(p).name})\n" for p in plots)]
    report = out_dir / f"report{suffix}.md"
    report.write_text("\n".join(text) + "\n", encoding="utf-8")
    return [str(report), *map(str, plots)]
