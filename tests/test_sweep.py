"""Sweeps and reports: planning and its one-line errors, real `herd sweep` processes, resume after kill -9,
failures, Ctrl-C, and `herd report`'s table, intervals and plots."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from train import sweep_plan
from train.report import rows, write_report, load
from train.sweep_space import chain, one_at_a_time, product, zipped

ROOT = Path(__file__).resolve().parents[1]
# 300 steps of the smoke model: long enough to catch a trial between its checkpoints.
LONG = ["--config.train.steps=300", "--config.checkpoint.every=100", "--config.eval.every=100",
        "--config.checkpoint.async_save=false"]


def write_experiment(path: Path, sweep_body: str, *, extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f'''\
        """A test experiment: the smoke config and a small sweep."""
        from experiments import base
        from train.sweep_space import product


        def get_config(arg=None):
            c = base.get_config("smoke")
            c.log.peak_flops = 1e12
            return c


        def sweep():
            {sweep_body}
        {extra}'''))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a `herd sweep` process: one CPU device per trial, a compile cache shared by trials."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               HERD_XLA_CACHE=str(tmp_path_factory.mktemp("sweep_xla")))
    return env


def herd(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "train.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def losses(trial_dir: Path) -> dict[int, float]:
    """Per-step train losses; a step written twice (a resumed run) keeps its later row, as the report does."""
    out = {}
    for line in (trial_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def lr_experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("exp") / "lrsweep.py",
                            'return product({"optimizer.lr": [1e-3, 3e-3]})')


@pytest.fixture(scope="module")
def full_sweep(env, lr_experiment, tmp_path_factory):
    """2 points x 2 seeds, run to the end two at a time."""
    out = tmp_path_factory.mktemp("sweeps") / "full_sweep_group"
    # With Weights & Biases logging on, offline (no API key; its own files kept in the temporary folder).
    wandb_env = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
    wandb_env.update({f"WANDB_{d}_DIR": str(tmp_path_factory.mktemp(f"wandb_{d.lower()}")) for d in ("CACHE",
                                                                                                   "CONFIG", "DATA")})
    proc = herd(wandb_env, "sweep", f"--config={lr_experiment}", f"--workdir={out}", "--seeds=2", "--parallel=2",
                "--config.log.wandb=true", *LONG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- sweep definitions


def test_helpers_compose():
    assert product({"a": [1, 2]}, {"b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert zipped({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    grid = product({"lr": [1, 2]}, zipped({"d": [64, 128], "h": [2, 4]}))
    assert grid == [{"lr": 1, "d": 64, "h": 2}, {"lr": 1, "d": 128, "h": 4},
                    {"lr": 2, "d": 64, "h": 2}, {"lr": 2, "d": 128, "h": 4}]
    assert one_at_a_time({"a": [1, 2], "b": [5]}, baseline={"a": 1}) == [{}, {"a": 2}, {"b": 5}]
    assert chain([{"a": 1}], [{"b": 2}]) == [{"a": 1}, {"b": 2}]
    for bad, match in [(lambda: zipped({"a": [1], "b": [1, 2]}), "equal lengths"),
                       (lambda: product({"a": [1]}, {"a": [2]}), "both set 'a'"),
                       (lambda: product({"a": 1}), "list of values"),
                       (lambda: product({"a": []}), "no values")]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_plan_names_hashes_and_seeds(lr_experiment):
    trials = sweep_plan.plan(str(lr_experiment), {}, seeds=2, n_devices=1)
    assert [t.slug for t in trials] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1"]
    assert len({t.hash for t in trials}) == 4 and all(len(t.hash) == 6 for t in trials)
    assert [t.config.seed for t in trials] == [0, 1, 0, 1]
    again = sweep_plan.plan(str(lr_experiment), {}, seeds=2, n_devices=1)
    assert [t.name for t in again] == [t.name for t in trials]  # names are a function of the config
    other = sweep_plan.plan(str(lr_experiment), {"train.steps": 7}, seeds=2, n_devices=1)
    assert not {t.hash for t in other} & {t.hash for t in trials}  # CLI overrides are part of every trial


BAD_SWEEPS = {
    "undeclared key": ('return [{"optimizer.lrr": 1e-3}]', "sweep point 0 (lrr=0.001): optimizer.lrr is not declared"),
    "wrong type": ('return [{"train.steps": "many"}]', "train.steps='many' is a str, but train.steps takes an int"),
    "rejected value": ('return [{"optimizer.name": "adam"}]', "optimizer.name='adam' is not one of"),
    "batch not divisible": ('return [{"train.batch_size": 6, "train.microbatches": 4}]', "not divisible"),
    "empty": ("return []", "sweep() gave no points"),
    "duplicate": ('return [{"optimizer.lr": 1e-3}, {"optimizer.lr": 0.001}]', "is the same trial as sweep point 0"),
    "baseline twice": ('return [{}, {"optimizer.lr": 3e-4}]', "is the same trial as sweep point 0"),
    "not a dict": ('return ["optimizer.lr=1e-3"]', "not a dict of dotted keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_definitions_fail_before_anything_runs(case, tmp_path):
    body, expected = BAD_SWEEPS[case]
    path = write_experiment(tmp_path / "bad.py", body)
    with pytest.raises(ValueError) as err:
        sweep_plan.plan(str(path), {}, seeds=0, n_devices=1)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_seed_twice_and_no_sweep_function(tmp_path):
    path = write_experiment(tmp_path / "s.py", 'return [{"seed": 3}]')
    with pytest.raises(ValueError, match="sets seed, which --seeds=2 also sets"):
        sweep_plan.plan(str(path), {}, seeds=2, n_devices=1)
    (tmp_path / "none.py").write_text("from experiments.base import get_config\n")
    with pytest.raises(ValueError, match="defines no sweep"):
        sweep_plan.plan(str(tmp_path / "none.py"), {}, seeds=0, n_devices=1)


def test_cli_bad_point_is_one_line_and_writes_nothing(env, tmp_path):
    path = write_experiment(tmp_path / "bad.py", 'return [{"optimizer.lr": 1e-3}, {"model.d_modle": 32}]')
    out = tmp_path / "sweep"
    proc = herd(env, "sweep", f"--config={path}", f"--workdir={out}")
    assert proc.returncode == 1
    assert proc.stderr == (  # the whole of stderr
        "herd sweep: error: sweep point 1 (d_modle=32): model.d_modle is not declared in the experiment schema; "
        "did you mean model.d_model, model.d_ff, model.n_layers?\n")
    assert not out.exists()


# ----------------------------------------------------------------------------- running


def test_sweep_runs_every_trial_and_records_it(full_sweep):
    listed = json.loads((full_sweep / "sweep.json").read_text())["trials"]
    assert len(listed) == 4
    for name in listed:
        record = json.loads((full_sweep / name / "trial.json").read_text())
        assert record["status"] == "done" and record["attempts"] == 1 and record["error"] is None
        assert record["final"]["step"] == 300 and np.isfinite(record["final"]["eval/bits_per_byte"])
        assert (full_sweep / name / "checkpoints" / "300").is_dir()
        assert json.loads((full_sweep / name / "run.json").read_text())["config"]["seed"] == record["seed"]
    # Different seeds of one point really are different runs.
    a, b = (losses(full_sweep / n) for n in listed[:2])
    assert a[1] != b[1]


def test_rerun_skips_done_trials_and_dry_run_shows_them(env, lr_experiment, full_sweep):
    before = {p: p.stat().st_mtime_ns for p in full_sweep.rglob("*") if p.is_file() and p.name != "sweep.json"}
    proc = herd(env, "sweep", f"--config={lr_experiment}", f"--workdir={full_sweep}", "--seeds=2", *LONG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in full_sweep.rglob("*") if p.is_file() and p.name != "sweep.json"}
    assert after == before  # nothing re-run, nothing rewritten
    dry = herd(env, "sweep", f"--config={lr_experiment}", f"--workdir={full_sweep}", "--seeds=2", "--dry_run", *LONG)
    assert dry.returncode == 0 and dry.stdout.count(" done ") == 4


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_sweep(env, lr_experiment, full_sweep, tmp_path):
    out = tmp_path / "killed"
    # One seed: the trials are the full sweep's seed-0 trials (same resolved config, so the same names).
    args = ["sweep", f"--config={lr_experiment}", f"--workdir={out}", "--seeds=1", "--parallel=1", *LONG]
    proc = subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = json.loads((full_sweep / "sweep.json").read_text())["trials"][::2]
    second = out / names[1]
    _wait_for(lambda: (second / "checkpoints" / "100").is_dir())
    proc.kill()
    proc.wait()
    first = out / names[0]
    assert json.loads((first / "trial.json").read_text())["status"] == "done"
    assert json.loads((second / "trial.json").read_text())["status"] == "running"  # as the kill left it
    kept = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    done = herd(env, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == kept  # not re-run
    record = json.loads((second / "trial.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 2
    run_info = json.loads((second / "run.json").read_text())
    assert run_info["extra"]["start_step"] >= 100  # the second attempt resumed from a checkpoint
    for name in names:  # every trial's per-step losses are the uninterrupted sweep's, bit for bit
        assert losses(out / name) == losses(full_sweep / name), name


def test_a_failing_point_is_recorded_and_the_others_finish(env, tmp_path):
    bad = f'{{"data.source": "tfds", "data.dataset": "no_such_dataset", "data.data_dir": "{tmp_path / "tfds"}"}}'
    path = write_experiment(tmp_path / "f.py", f'return [{bad}, {{"optimizer.lr": 1e-3}}]')
    out = tmp_path / "sweep"
    args = ["sweep", f"--config={path}", f"--workdir={out}", "--parallel=1"]
    # --max_failures=0 stops at the first failure: the second point is never started.
    proc = herd(env, *args, "--max_failures=0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("herd sweep: error: 1 of 2 trials failed (stopped after "
                                                           "--max_failures)")
    names = json.loads((out / "sweep.json").read_text())["trials"]
    records = [json.loads((out / n / "trial.json").read_text()) for n in names]
    assert [r["status"] for r in records] == ["failed", "pending"]
    assert records[0]["error"].startswith("herd train: error:") and "no_such_dataset" in records[0]["error"]
    # Without a limit the other point completes; the failure is left alone unless asked to retry it.
    again = herd(env, *args)
    assert again.returncode == 1 and "1 of 2 trials failed" in again.stderr
    records = [json.loads((out / n / "trial.json").read_text()) for n in names]
    assert [(r["status"], r["attempts"]) for r in records] == [("failed", 1), ("done", 1)]
    herd(env, *args, "--retry_failed")
    assert json.loads((out / names[0] / "trial.json").read_text())["attempts"] == 2


@pytest.mark.parametrize("log, line", [
    ("Traceback (most recent call last):\n  File \"x.py\"\njax.errors.JaxRuntimeError: INTERNAL: boom\n"
     "--------------------\nFor simplicity, JAX has removed its internal frames from the traceback\n",
     "jax.errors.JaxRuntimeError: INTERNAL: boom"),
    ("W0000 a warning\nherd train: error: data.dataset='x' is not built\nexiting\n",
     "herd train: error: data.dataset='x' is not built"),
    ("", "herd train exited with status 3"),
])
def test_a_failed_trials_error_is_the_line_that_says_why(tmp_path, log, line):
    from train.trial import LOG_FILE, _error_line

    (tmp_path / LOG_FILE).write_text(log)
    assert _error_line(tmp_path, 3) == line


@pytest.mark.slow
def test_ctrl_c_checkpoints_running_trials_and_a_grown_sweep_runs_only_new_points(env, tmp_path):
    path = write_experiment(tmp_path / "e.py", 'return product({"optimizer.lr": [1e-3]})')
    out = tmp_path / "sweep"
    args = ["sweep", f"--config={path}", f"--workdir={out}", "--config.train.steps=400",
            "--config.checkpoint.every=200", "--config.eval.every=200"]
    proc = subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "sweep.json").exists())
    (name,) = json.loads((out / "sweep.json").read_text())["trials"]
    _wait_for(lambda: (out / name / "metrics.jsonl").exists() and (out / name / "metrics.jsonl").stat().st_size > 0)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C would; the sweep passes it on to its trial as SIGTERM
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    record = json.loads((out / name / "trial.json").read_text())
    assert record["status"] == "interrupted" and record["returncode"] == 128 + signal.SIGTERM
    steps = sorted(int(p.name) for p in (out / name / "checkpoints").iterdir())
    assert steps and steps[-1] < 400  # it saved where it stopped
    # The sweep grows by one point: only the new trial runs; the interrupted one resumes and finishes.
    path.write_text(path.read_text().replace("[1e-3]", "[1e-3, 2e-3]"))
    done = herd(env, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = json.loads((out / "sweep.json").read_text())["trials"]
    assert listed[0] == name and len(listed) == 2
    assert [json.loads((out / n / "trial.json").read_text())["attempts"] for n in listed] == [2, 1]


def test_wandb_offline_names_project_group_and_run(full_sweep):
    name = json.loads((full_sweep / "sweep.json").read_text())["trials"][0]
    (run_file,) = (full_sweep / name / "wandb").glob("offline-run-*/run-*.wandb")  # offline: no API key
    blob = run_file.read_bytes()
    for text in ("lrsweep", "full_sweep_group", "lr=0.001,seed=0", "eval/bits_per_byte"):  # project, group, run
        assert text.encode() in blob, text


# ----------------------------------------------------------------------------- reports


def test_report_has_a_row_per_point_with_intervals_and_plots(full_sweep):
    paths = write_report([full_sweep])
    assert [Path(p).name for p in paths] == ["report.md", "curves.png", "final_vs_lr.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in paths[1:])  # real plots, not empty canvases
    runs, _ = load([full_sweep], "eval/bits_per_byte")
    table = rows(runs)
    assert [r.point for r in table] == [{"optimizer.lr": 0.001}, {"optimizer.lr": 0.003}]
    for row in table:
        finals = row.finals
        assert len(finals) == 2 and row.mean == pytest.approx(sum(finals) / 2)
        # Two seeds: the 95 % half-width is t(0.975, 1) = 12.706 times the standard error.
        sd = abs(finals[0] - finals[1]) / np.sqrt(2)
        assert row.half_width == pytest.approx(12.7062047 * sd / np.sqrt(2), rel=1e-6)
    assert sum(r.best for r in table) == 1 and min(table, key=lambda r: r.mean).best
    text = Path(paths[0]).read_text()
    assert sum("± " in line for line in text.splitlines() if line.startswith("| 0.00")) == 2 and "**best**" in text


def test_report_formats_and_a_single_run(full_sweep, capsys):
    write_report([full_sweep], fmt="json")
    records = json.loads(capsys.readouterr().out)
    assert [r["seeds_done"] for r in records] == [2, 2] and all(r["ci95"] > 0 for r in records)
    write_report([full_sweep], fmt="csv")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("optimizer.lr,eval/bits_per_byte,ci95") and len(lines) == 3
    name = json.loads((full_sweep / "sweep.json").read_text())["trials"][0]
    single = write_report([full_sweep / name], metric="loss")
    assert Path(single[0]).exists() and Path(single[1]).name == "curves.png"
    with pytest.raises(ValueError, match="--x=model.d_model is not a swept key"):
        write_report([full_sweep], x="model.d_model")
