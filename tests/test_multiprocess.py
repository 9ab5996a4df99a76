"""Real processes train as one mesh; missing, dead or silent peers end every process with one line.

Two processes (4 fake CPU devices each) train together as one 8-device mesh and
match one process. A process whose peers never start, and the survivors of a
peer killed mid-training (a worker, the coordinator, one of four), exit within
HERD_DISTRIBUTED_TIMEOUT (set short here) with one line naming the coordinator.
"""

import json
import os
import socket
import subprocess
import sys
import time

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
                "--config.mesh.fsdp=4", "--config.schedule.name=constant"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        # Nothing from the peer watchdogs or the shutdown guard (train/distributed.py) in a healthy run.
        assert not [line for line in err.splitlines() if line.startswith("herd")], err[-3000:]


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
    # A constant schedule: 6 steps and then 2 more see the learning rates of 8 steps run in one go.
    config.train.batch_size, config.train.steps, config.schedule.name, config.log.peak_flops = 8, 8, "constant", 1e12
    config.mesh.rules, config.mesh.data, config.mesh.fsdp = "fsdp", 2, 4
    single = train_and_evaluate(config, tmp_path / "single", devices=jax.devices()[:8])["losses"]
    multi = _losses(tmp_path / "mp")
    assert sorted(multi) == list(range(1, 7))
    np.testing.assert_allclose([multi[s] for s in range(1, 7)], [single[s] for s in range(1, 7)], rtol=2e-5)
    # A second launch resumes from checkpoint 6 (not 3, not from scratch), each process from its own data
    # state, and continues as the uninterrupted one-process run does.
    _launch(tmp_path / "mp", steps=8)
    rows = [json.loads(line) for line in open(tmp_path / "mp" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # steps 7 and 8 once, nothing again
    info = json.load(open(tmp_path / "mp" / "run.json"))
    assert info["extra"]["start_step"] == 6 and [p["extra"]["start_step"] for p in info["previous"]] == [0]
    multi = _losses(tmp_path / "mp")
    np.testing.assert_allclose([multi[s] for s in (7, 8)], [single[s] for s in (7, 8)], rtol=2e-5)
    assert sorted(os.listdir(tmp_path / "mp" / "checkpoints"), key=int)[-1] == "8"


# ------------------------------------------------------------------------------------------ missing and dead peers


def _peer(port, process_id, workdir, timeout, steps=100_000):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(process_id), "HERD_DISTRIBUTED_TIMEOUT": str(timeout)}
    args = [sys.executable, "-m", "train.main", "train", "--config=experiments/base.py:smoke", f"--workdir={workdir}",
            f"--config.train.steps={steps}", "--config.log.peak_flops=1e12", "--config.checkpoint.every=100000",
            "--config.eval.every=100000"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multiprocess
@pytest.mark.reliability
def test_a_process_whose_peers_never_start_exits_with_one_line(tmp_path):
    port = _free_port()
    start = time.monotonic()
    proc = _peer(port, 0, tmp_path / "run", timeout=5)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert err == (f"herd train: error: process 0: not all 2 processes joined the coordinator at localhost:{port} "
                   "within 5 s; start every process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES=2 "
                   "(or raise HERD_DISTRIBUTED_TIMEOUT=5)\n")
    assert elapsed < 5 + 1, elapsed  # counted from the process's start, not JAX's 5 minutes
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.reliability
@pytest.mark.parametrize("dead", [1, 0], ids=["worker dies", "coordinator dies"])
def test_a_dead_peer_ends_the_other_process_with_one_line(dead, tmp_path):
    port = _free_port()
    workdir = tmp_path / "run"
    procs = [_peer(port, i, workdir, timeout=10) for i in range(2)]
    alive = procs[1 - dead]
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() or sum(1 for _ in open(workdir / "metrics.jsonl")) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.2)
        procs[dead].kill()  # SIGKILL mid-training
        killed = time.monotonic()
        _, err = alive.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert alive.returncode != 0
    assert elapsed < 10 + 5, elapsed
    # The rest of stderr is what a healthy run prints too (Gloo's connection notes, XLA warnings).
    assert "Traceback" not in err and "Check failure" not in err and "Fatal Python" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("herd")]
    assert len(errors) == 1 and errors == [err.strip().splitlines()[-1]], err[-3000:]
    assert errors[0].startswith("herd train: error: ") and f"coordinator localhost:{port}, 2 processes" in errors[0]


# Only the distributed start-up and the heartbeats, in processes that then wait: no training.
WAITER = r"""
import sys, time
sys.argv = ["herd", "train"]
from train.distributed import initialize_from_env
initialize_from_env()
print("joined", flush=True)
time.sleep(300)
"""


@pytest.mark.multiprocess
@pytest.mark.reliability
def test_every_process_of_a_larger_job_learns_that_one_died(tmp_path):
    """With 4 processes each watches only its ring neighbours; process 0 is told through the failure key."""
    port = _free_port()
    procs = []
    for i in range(4):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": str(i),
               "HERD_DISTRIBUTED_TIMEOUT": "10"}  # also the join deadline: 4 JAX starts on busy cores
        procs.append(subprocess.Popen([sys.executable, "-c", WAITER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        assert all(p.stdout.readline() == "joined\n" for p in procs)
        procs[2].kill()
        killed = time.monotonic()
        errs = [procs[i].communicate(timeout=60)[1] for i in (0, 1, 3)]
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert elapsed < 10 + 3, elapsed
    for i, err in zip((0, 1, 3), errs):
        assert procs[i].returncode == 1
        assert err.count("\n") == 1 and err.startswith("herd train: error: process 2 sent no heartbeat for 10 s "), err
        assert f"coordinator localhost:{port}, 4 processes" in err

