"""The training system: sharding invariance, exact resume, checkpoints across meshes, the CLI."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from train.checkpoint import CheckpointError
from train.data import open_data
from train.loop import train_and_evaluate
from train.config import model_config
from train.runtime import Runtime, check
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
    # The synthetic data is one byte per token: bits per byte is the loss in bits.
    assert out["eval"]["bits_per_byte"] == pytest.approx(out["eval"]["loss"] / math.log(2), rel=1e-6)
    for r in eval_rows:
        assert r["eval/bits_per_byte"] == pytest.approx(r["eval/loss"] / math.log(2), rel=1e-6)
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


def test_loss_at_initialisation_is_about_ln_vocab(uninterrupted):
    """Small initial weights predict a near-uniform distribution: the first step's loss is about ln V."""
    workdir, out = uninterrupted
    vocab = json.load(open(workdir / "run.json"))["extra"]["model"]["vocab_size"]  # synthetic data spans it all
    assert abs(out["losses"][1] - math.log(vocab)) < 0.05, (out["losses"][1], math.log(vocab))


@pytest.mark.slow
def test_z_loss_is_reported_and_pulls_log_z_towards_zero(tiny_config):
    """train.z_loss adds z_loss * log(Z)^2 per token (arXiv:2204.02311 §5): the reported z_loss is the mean log(Z)^2
    of an independent computation, the reported loss stays the cross-entropy, and the term drives log Z down."""
    from scipy.special import logsumexp

    from model import forward

    def run(z_loss: float) -> tuple[float, list[tuple[float, float]]]:
        config = tiny_config(**{"mesh.data": 1, "train.z_loss": z_loss, "optimizer.lr": 1e-2,
                                "schedule.warmup_steps": 1})
        data = open_data(config)
        runtime = Runtime(config, data.model_cfg, jax.devices()[:1])
        state, it = runtime.initial_state(), data.batches(data.train)
        batch = next(it)
        logits = forward(data.model_cfg, jax.device_get(state.params), batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        mask = np.asarray(batch["loss_mask"], np.float64)
        expected = float((logsumexp(np.asarray(logits, np.float64), axis=-1) ** 2 * mask).sum() / mask.sum())
        reported = []
        for _ in range(6):
            state, metrics = runtime.train_step(state, runtime.to_global(batch))
            reported.append((float(metrics["loss"]), float(metrics["z_loss"])))
            batch = next(it)
        return expected, reported

    expected, plain = run(0.0)
    _, pulled = run(1.0)
    assert plain[0][1] == pytest.approx(expected, rel=1e-5)
    assert pulled[0] == plain[0]  # the same batch and parameters; the reported loss leaves the z-loss out
    assert pulled[-1][1] < 0.9 * plain[-1][1], (pulled, plain)


def _herd(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_rejects_a_misspelt_key_with_close_matches(tmp_path):
    proc = _herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]  # the whole of stderr is the one line
    assert re.match(r"herd train: error: --config\.optimizer\.lrr is not declared in the experiment schema; "
                    r"did you mean optimizer\.lr[,?]", proc.stderr), proc.stderr
    assert not os.listdir(tmp_path)  # failed before anything was written


def test_cli_bad_value_is_one_line(tmp_path):
    proc = _herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path}", "--config.schedule.name=cosin")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]  # the whole of stderr is the one line
    assert proc.stderr.startswith("herd train: error: schedule.name='cosin'") and "cosine" in proc.stderr, proc.stderr


def test_cudnn_attention_is_refused_where_there_is_no_gpu(tiny_config):
    config = tiny_config(**{"model.attention_impl": "cudnn", "model.dtype": "bfloat16"})
    with pytest.raises(ValueError, match=r"^model.attention_impl='cudnn' needs NVIDIA GPUs .* has cpu devices"):
        check(config, model_config(config), 1)


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


@pytest.mark.parametrize("batch, microbatches, data", [(16, 1, 8), (4, 1, 4), (12, 1, 6), (12, 2, 6), (6, 2, 3)])
def test_a_run_is_read_on_as_many_devices_as_its_batch_splits_over(tiny_config, batch, microbatches, data):
    """herd eval/sample/convert on a host with more devices (8 here) than the run's batch splits over."""
    from train.runtime import local_data_parallel, mesh_devices

    config = local_data_parallel(tiny_config(**{"train.batch_size": batch, "train.microbatches": microbatches,
                                                "mesh.fsdp": 2}))
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (data, 1, 1)
    devices = mesh_devices(config)
    assert devices == jax.devices()[:data]
    Runtime(config, model_config(config), devices)  # accepted: the mesh matches and the batch splits
