"""`herd sample`, `herd eval`, `herd convert` end to end, and their one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from experiments import base
from train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def herd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": ""}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("herd"), last
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = base.get_config("smoke")
    config.log.peak_flops = 1e12
    config.mesh.data = 1
    train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    proc = herd("convert", f"--workdir={run}", f"--to-hf={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-4 and report["step"] == 6
    return out


def _greedy(*source: str) -> list[int]:
    proc = herd("sample", *source, "--prompt=5 10 15", "--max_tokens=8", "--temperature=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = proc.stdout.split()
    assert tokens[:3] == ["5", "10", "15"] and len(tokens) == 11
    return [int(t) for t in tokens]


@pytest.mark.slow
def test_export_import_and_sample_agree(run, exported, tmp_path):
    assert sorted(os.listdir(exported)) == ["config.json", "model.safetensors"]
    imported = tmp_path / "imported"
    proc = herd("convert", f"--workdir={imported}", f"--from-hf={exported}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_diff"] < 1e-4
    from_run = _greedy(f"--workdir={run}")
    assert _greedy(f"--hf={exported}") == from_run
    assert _greedy(f"--workdir={imported}") == from_run


@pytest.mark.slow
def test_eval_reports_loss_and_bits_per_byte(run):
    proc = herd("eval", f"--workdir={run}", "--batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["batches"] == 2 and result["split"] == "validation"
    assert result["loss"] > 0 and result["bits_per_byte"] > 0
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-3 * result["perplexity"]


def test_workdir_without_checkpoint(tmp_path):
    assert_one_line_error(herd("sample", f"--workdir={tmp_path}", "--prompt=1 2"), "run.json")


def test_checkpoint_of_another_config(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    info = json.load(open(tmp_path / "run" / "run.json"))
    info["extra"]["model"]["d_ff"] = 256
    json.dump(info, open(tmp_path / "run" / "run.json", "w"))
    assert_one_line_error(herd("sample", f"--workdir={tmp_path / 'run'}", "--prompt=1 2"), "mlp", "shape")


def test_hf_folder_with_a_missing_shard(tmp_path):
    import model
    from model import hf

    cfg = model.VARIANTS["tiny"]
    hf.save(cfg, model.init_params(cfg, jax.random.key(0)), tmp_path / "m", max_shard_bytes=100_000)
    shards = sorted(f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))
    os.remove(tmp_path / "m" / shards[-1])
    assert_one_line_error(herd("sample", f"--hf={tmp_path / 'm'}", "--prompt=1 2"), shards[-1])


def test_empty_prompt(run):
    assert_one_line_error(herd("sample", f"--workdir={run}", "--prompt=  "), "--prompt")


def test_prompt_longer_than_the_context(run):
    prompt = " ".join(["1"] * 250)
    assert_one_line_error(herd("sample", f"--workdir={run}", f"--prompt={prompt}", "--max_tokens=10"), "256")


def test_convert_refuses_to_overwrite(run, exported):
    assert_one_line_error(herd("convert", f"--workdir={run}", f"--to-hf={exported}"), "config.json")


def test_malloc_tuning_applies_to_cpu_runs_only():
    from train.malloc import MALLOC_TUNABLES, malloc_tuned_env

    tuned = malloc_tuned_env({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert tuned["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{MALLOC_TUNABLES}"
    assert malloc_tuned_env({"JAX_PLATFORMS": "cuda"}) is None
    assert malloc_tuned_env({"JAX_PLATFORMS": "cuda", "HERD_MALLOC": "tuned"}) is not None
    assert malloc_tuned_env({"JAX_PLATFORMS": "cpu", "HERD_MALLOC": "system"}) is None
    assert malloc_tuned_env({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) is None
    with pytest.raises(ValueError, match="HERD_MALLOC='fast' must be one of auto, tuned, system"):
        malloc_tuned_env({"HERD_MALLOC": "fast"})


def test_cli_restarts_itself_with_malloc_tuning_once():
    from train.malloc import MALLOC_TUNABLES

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = ("import os; from train.malloc import tune_malloc; print('start', flush=True); tune_malloc(); "
            "print(os.environ.get('GLIBC_TUNABLES'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "HERD_MALLOC": "tuned"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n") == ["start", "start", MALLOC_TUNABLES, ""]
    bad = subprocess.run([sys.executable, "-m", "train.main", "train"], cwd=ROOT, env={**env, "HERD_MALLOC": "x"},
                         capture_output=True, text=True, timeout=120)
    assert_one_line_error(bad, "HERD_MALLOC='x' must be one of auto, tuned, system")
