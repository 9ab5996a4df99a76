"""herd on a real single-node SLURM (tests/slurm_cluster.py): a sweep through the submitit executor gives the
local executor's results, and `srun -n 2 herd train` (JAX's own SLURM detection) trains as one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slurm_cluster
from test_sweep import LONG, herd, losses, write_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment of clients of a freshly started test cluster (stopped after the module)."""
    why = slurm_cluster.unavailable()
    if why:
        print(f"\nSLURM tests skipped: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    env = slurm_cluster.start(root)
    yield env
    slurm_cluster.stop(root)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(cluster, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               HERD_XLA_CACHE=str(tmp_path_factory.mktemp("slurm_xla")))
    return env


def test_sweep_on_slurm_matches_the_local_executor(env, tmp_path):
    path = write_experiment(tmp_path / "e.py", 'return product({"optimizer.lr": [1e-3, 3e-3]})')
    results = {}
    for executor in ("local", "slurm"):
        out = tmp_path / executor
        proc = herd(env, "sweep", f"--config={path}", f"--workdir={out}", f"--executor={executor}", "--parallel=2",
                    "--config.slurm.cpus_per_trial=1", "--config.slurm.time_min=10", *LONG)
        assert proc.returncode == 0, proc.stderr[-3000:]
        names = json.loads((out / "sweep.json").read_text())["trials"]
        results[executor] = {n: losses(out / n) for n in names}
        records = [json.loads((out / n / "trial.json").read_text()) for n in names]
        assert [r["status"] for r in records] == ["done"] * 2
        if executor == "slurm":
            assert all(r["executor"] == "slurm" and r["job_id"] and r["slurm_job"] for r in records)
            assert all((out / n / "train.log").exists() for n in names)
    assert results["slurm"] == results["local"]  # same trial names, same per-step losses bit for bit


def test_srun_two_processes_train_as_one(env, tmp_path):
    common = ["--config=experiments/base.py:smoke", "--config.train.batch_size=8", "--config.train.steps=6",
              "--config.log.peak_flops=1e12", "--config.mesh.rules=fsdp", "--config.mesh.fsdp=4",
              "--config.checkpoint.async_save=false"]
    # One process with 8 devices: the reference.
    one = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
    ref = herd(one, "train", f"--workdir={tmp_path / 'one'}", *common, "--config.mesh.data=2")
    assert ref.returncode == 0, ref.stderr[-3000:]
    # Two SLURM tasks of 4 devices each; jax.distributed.initialize() finds its peers from SLURM's variables.
    two = dict(env, HERD_DISTRIBUTED="1", XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    proc = subprocess.run(["srun", "-n", "2", "-c", "1", "--time=10", sys.executable, "-m", "train.main", "train",
                           f"--workdir={tmp_path / 'two'}", *common, "--config.mesh.data=2"],
                          cwd=ROOT, env=two, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["process_count"] == 2 and info["devices"]["count"] == 8
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-5)
