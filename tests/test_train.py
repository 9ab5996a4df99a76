"""The training system: sharding invariance, exact resume, checkpoints across meshes, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train.checkpoint import CheckpointError
from train.data import open_data
from train.loop import train_and_evaluate
from train.runtime import Runtime
from train.state import state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_losses(config, n_steps, devices=None):
    """Per-step losses of `n_steps` steps, without the loop (no checkpoints, no files)."""
    data = open_data(config)
    runtime = Runtime(config, data.model_cfg, devices)
    state = runtime.initial_state()
    it = data.batches(data.train)
    losses = []
    for _ in range(n_steps):
        state, metrics = runtime.train_step(state, runtime.to_global(next(it)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), runtime, state


@pytest.fixture(scope="module")
def reference_losses(tiny_config):
    return run_losses(tiny_config(**{"mesh.data": 1}), 3, jax.devices()[:1])[0]


MESHES = [
    ("dp", (8, 1, 1)),
    ("fsdp", (1, 8, 1)),
    ("fsdp", (2, 2, 2)),
    ("fsdp_tp", (2, 2, 2)),
    ("fsdp_tp", (1, 4, 2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("rules, shape", MESHES, ids=[f"{r}-{'x'.join(map(str, s))}" for r, s in MESHES])
def test_same_losses_on_every_mesh(reference_losses, rules, shape, tiny_config):
    config = tiny_config(**{"mesh.rules": rules, "mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]})
    losses, runtime, state = run_losses(config, 3)
    assert runtime.mesh.devices.size == 8
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
    assert losses[-1] < losses[0]


def test_fsdp_shards_every_large_parameter_and_optimizer_state(tiny_config):
    config = tiny_config(**{"mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": 8})
    runtime = Runtime(config, open_data(config).model_cfg)
    shardings = state_shardings(runtime.model_cfg, runtime.tx, runtime.mesh, runtime.rules)
    abstract = runtime.abstract_state()
    replicated_bytes = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        if sharding.is_fully_replicated:
            replicated_bytes += leaf.size * leaf.dtype.itemsize
        elif leaf.size >= 4096:
            assert "fsdp" in str(sharding.spec)
    # Only norm scales, scalars and the RNG stay replicated.
    assert replicated_bytes < 8 * 1024, replicated_bytes


def test_microbatches_give_the_same_update(reference_losses, tiny_config):
    config = tiny_config(**{"mesh.data": 1, "train.microbatches": 4})
    losses, _, _ = run_losses(config, 3, jax.devices()[:1])
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_config):
    workdir = tmp_path_factory.mktemp("full")
    out = train_and_evaluate(tiny_config(), workdir, devices=jax.devices()[:1])
    return workdir, out


def test_two_identical_runs_are_identical(uninterrupted, tmp_path, tiny_config):
    _, first = uninterrupted
    again = train_and_evaluate(tiny_config(), tmp_path, devices=jax.devices()[:1])
    assert again["losses"] == first["losses"]
    assert list(first["losses"]) == [1, 2, 3, 4]


def test_interrupted_and_resumed_run_matches_bit_for_bit(uninterrupted, tmp_path, tiny_config):
    _, full = uninterrupted
    part = train_and_evaluate(tiny_config(), tmp_path, devices=jax.devices()[:1], stop_at=3)
    assert sorted(part["losses"]) == [1, 2, 3]
    rest = train_and_evaluate(tiny_config(), tmp_path, devices=jax.devices()[:1])
    assert sorted(rest["losses"]) == [4]
    assert {**part["losses"], **rest["losses"]} == full["losses"]  # exact float equality
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_muon_state_shards_over_fsdp_and_resumes_bit_for_bit(tmp_path, tiny_config):
    # optax.partition leaves empty placeholders in Muon's state for the parameters AdamW owns;
    # they must survive sharding, an orbax checkpoint and the restore.
    config = tiny_config(**{"optimizer.name": "muon", "mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": 8})
    full = train_and_evaluate(config, tmp_path / "full")
    part = train_and_evaluate(config, tmp_path / "part", stop_at=3)
    rest = train_and_evaluate(config, tmp_path / "part")
    assert sorted(rest["losses"]) == [4]
    assert {**part["losses"], **rest["losses"]} == full["losses"]
    assert full["losses"][4] < full["losses"][1]


def test_run_json_is_complete(uninterrupted):
    workdir, _ = uninterrupted
    info = json.load(open(workdir / "run.json"))
    for key in ("config", "versions", "git", "mesh", "devices", "data_fingerprint", "timestamp"):
        assert info[key] is not None, key
    assert info["config"]["train"]["steps"] == 4
    assert info["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert info["data_fingerprint"].startswith("synthetic-")
    assert info["versions"]["jax"] == jax.__version__
    assert set(info["git"]) == {"commit", "dirty"}


def test_metrics_and_eval_are_written(uninterrupted):
    workdir, out = uninterrupted
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "step_time_s"):
        assert key in train_rows[-1], key
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert 0 < out["eval"]["bits_per_byte"] < 16
    assert os.listdir(workdir / "tensorboard")


def test_finished_run_says_so(uninterrupted, capsys, tiny_config):
    workdir, _ = uninterrupted
    out = train_and_evaluate(tiny_config(), workdir, devices=jax.devices()[:1])
    assert out["losses"] == {}
    assert "already finished" in capsys.readouterr().out


def test_resume_with_different_shapes_names_the_parameter(uninterrupted, tmp_path, tiny_config):
    workdir, _ = uninterrupted
    config = tiny_config(**{"model.d_ff": 128, "train.steps": 8})
    with pytest.raises(CheckpointError, match=r"mlp\.(down|gate|up)"):
        train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing lost


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("fsdp8", "one"), ("one", "fsdp8")])
def test_restore_onto_a_different_mesh(uninterrupted, tmp_path, first, second, tiny_config):
    _, full = uninterrupted
    setups = {
        "one": (tiny_config(**{"mesh.data": 1}), jax.devices()[:1]),
        "fsdp8": (tiny_config(**{"mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": 8}), None),
    }
    a = train_and_evaluate(setups[first][0], tmp_path, devices=setups[first][1], stop_at=2)
    b = train_and_evaluate(setups[second][0], tmp_path, devices=setups[second][1])
    losses = {**a["losses"], **b["losses"]}
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [full["losses"][s] for s in range(1, 5)], rtol=2e-5)


def test_loss_falls_on_the_learnable_pattern(tmp_path, tiny_config):
    config = tiny_config(**{"train.steps": 100, "optimizer.lr": 1e-2, "schedule.warmup_steps": 10, "eval.every": 100,
                            "checkpoint.every": 100, "mesh.data": 1, "data.seq_len": 32})
    out = train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    first, last = out["losses"][1], out["losses"][100]
    # Uniform over 256 tokens is ln 256 = 5.5 nats; predicting a progression needs the context.
    assert last < 0.5 * first, (first, last)
    assert out["eval"]["loss"] < 0.5 * first


def _herd(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_rejects_a_misspelt_key_with_close_matches(tmp_path):
    proc = _herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1")
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "lr" in proc.stderr
    assert not os.listdir(tmp_path)  # failed before anything was written


def test_cli_bad_value_is_one_line(tmp_path):
    proc = _herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path}", "--config.schedule.name=cosin")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "schedule.name" in last and "cosine" in last


@pytest.mark.slow
def test_cli_trains_the_smoke_experiment(tmp_path):
    proc = _herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path}", "--config.log.peak_flops=1e12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run.json").exists() and sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path, caplog, tiny_config):
    import shutil

    workdir, _ = uninterrupted
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").close()  # truncate the array data
    config = tiny_config(**{"train.steps": 6})
    out = train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    assert sorted(out["losses"]) == [3, 4, 5, 6]  # resumed from step 2
    assert "checkpoint 4" in caplog.text and "unreadable" in caplog.text
    assert os.listdir(tmp_path / "damaged_checkpoints")  # set aside, not deleted
