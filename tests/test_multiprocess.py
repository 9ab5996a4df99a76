"""Two real processes (4 fake CPU devices each) train together as one 8-device mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, steps: int) -> None:
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": "",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        args = [sys.executable, "-m", "train.main", "train", "--config=experiments/base.py:smoke",
                f"--workdir={workdir}", "--config.train.batch_size=8", f"--config.train.steps={steps}",
                "--config.log.peak_flops=1e12", "--config.mesh.rules=fsdp", "--config.mesh.data=2",
                "--config.mesh.fsdp=4"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_and_resume(tmp_path):
    import jax

    from experiments import base
    from train.loop import train_and_evaluate

    _launch(tmp_path / "mp", steps=6)
    config = base.get_config("smoke")
    config.train.batch_size, config.log.peak_flops = 8, 1e12
    config.mesh.rules, config.mesh.data, config.mesh.fsdp = "fsdp", 2, 4
    single = train_and_evaluate(config, tmp_path / "single", devices=jax.devices()[:8])["losses"]
    multi = _losses(tmp_path / "mp")
    assert sorted(multi) == list(range(1, 7))
    np.testing.assert_allclose([multi[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=2e-5)
    # A second launch resumes from step 6, each process from its own data state.
    _launch(tmp_path / "mp", steps=8)
    assert sorted(_losses(tmp_path / "mp")) == list(range(1, 9))
    assert sorted(os.listdir(tmp_path / "mp" / "checkpoints"))[-1] == "8"
