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
    """Exit status != 0 and the whole of stderr is one line starting `herd`, holding every needle."""
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith("herd"), line
    for needle in needles:
        assert needle in line, (needle, line)


def tree_listing(root) -> dict[str, int]:
    """Every file under `root` with its size: what a read-only command must leave exactly as it was."""
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


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
    before = tree_listing(exported)
    assert_one_line_error(herd("convert", f"--workdir={run}", f"--to-hf={exported}"), f"--to-hf={exported}",
                          "is not empty")
    assert tree_listing(exported) == before


def test_convert_refuses_any_non_empty_target_and_keeps_the_users_files(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(herd("convert", f"--workdir={run}", f"--to-hf={out}"), "not empty", "notes.txt")
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left beside it
    assert_one_line_error(herd("convert", f"--workdir={out}", f"--from-hf={run}"), f"--workdir={out}", "not empty")
    assert os.listdir(out) == ["notes.txt"]


def test_convert_from_hf_refuses_a_logit_mismatch_and_leaves_nothing(tmp_path):
    """A tied config whose folder also holds a different lm_head: transformers uses it, herd cannot."""
    import dataclasses

    import numpy as np

    import model
    from model import hf
    from model.safetensors_io import read_safetensors, write_safetensors

    cfg = dataclasses.replace(model.VARIANTS["tiny"], tie_embeddings=True)
    hf.save(cfg, model.init_params(cfg, jax.random.key(0)), tmp_path / "m")
    tensors = {k: np.array(v) for k, v in read_safetensors(tmp_path / "m" / hf.SINGLE_FILE).items()}
    tensors["lm_head.weight"] = np.ones_like(tensors["model.embed_tokens.weight"])
    write_safetensors(tmp_path / "m" / hf.SINGLE_FILE, tensors, {"format": "pt"})
    target = tmp_path / "runs" / "imported"
    proc = herd("convert", f"--workdir={target}", f"--from-hf={tmp_path / 'm'}")
    assert_one_line_error(proc, "logits differ from transformers'", "nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no workdir, no parent, no temporary folder


def test_safetensors_header_nested_200000_deep(tmp_path):
    import model
    from model import hf

    cfg = model.VARIANTS["tiny"]
    hf.save(cfg, model.init_params(cfg, jax.random.key(0)), tmp_path / "m")
    header = b"[" * 200_000 + b"]" * 200_000
    (tmp_path / "m" / hf.SINGLE_FILE).write_bytes(len(header).to_bytes(8, "little") + header)
    assert_one_line_error(herd("sample", f"--hf={tmp_path / 'm'}", "--prompt=1 2"), hf.SINGLE_FILE, "nests too deeply")


def test_eval_batches_must_not_be_negative(run):
    assert_one_line_error(herd("eval", f"--workdir={run}", "--batches=-3"), "--batches=-3 must be >= 0")


def test_eval_without_checkpoints_creates_nothing(run, tmp_path):
    shutil.copyfile(run / "run.json", tmp_path / "run.json")
    assert_one_line_error(herd("eval", f"--workdir={tmp_path}"), "has no checkpoint yet")
    assert os.listdir(tmp_path) == ["run.json"]


def test_an_invalid_train_config_creates_nothing(tmp_path):
    proc = herd("train", "--config=experiments/base.py:smoke", f"--workdir={tmp_path / 'run'}", "--config.data.seq_len=0")
    assert_one_line_error(proc, "data.seq_len=0")
    assert os.listdir(tmp_path) == []


def test_garbled_run_json_is_named(tmp_path):
    (tmp_path / "run.json").write_text('{"config": {"seed": ')
    assert_one_line_error(herd("eval", f"--workdir={tmp_path}"), str(tmp_path / "run.json"), "not valid JSON")


@pytest.mark.slow
def test_read_only_commands_skip_a_damaged_checkpoint_and_move_nothing(run, tmp_path):
    """herd eval and convert (sample loads the same way) fall back without moving anything."""
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "6" / "data" / "metadata").write_text('{"train": {"0": {"step": 5}}}')
    before = tree_listing(tmp_path / "run")
    proc = herd("eval", f"--workdir={tmp_path / 'run'}", "--batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 3
    assert "checkpoints/6 is damaged (its data-iterator record does not match its digest)" in proc.stderr
    proc = herd("convert", f"--workdir={tmp_path / 'run'}", f"--to-hf={tmp_path / 'hf'}")
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 3, proc.stderr[-3000:]
    assert tree_listing(tmp_path / "run") == before


# ------------------------------------------------------------------------------------------ eval on any text


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run trained on a text_folder corpus (byte tokenizer) of five 300-byte documents, one held out."""
    from train.config import apply_overrides
    from train.data.builders import split_files

    root = tmp_path_factory.mktemp("text_run")
    corpus = root / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog and sings of summer rain ".split()
    for i in range(5):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(200))[:299] + "\n"
        (corpus / f"doc{i}.txt").write_text(text)
    config = apply_overrides(base.get_config(), {
        "model.variant": "tiny", "data.source": "tfds", "data.dataset": "text_folder", "data.text_path": str(corpus),
        "data.data_dir": str(root / "tfds"), "data.validation_fraction": 0.2, "data.seq_len": 16,
        "data.shuffle_tokens": 0,  # row-shuffle blocks would read the tiny corpus thousands of times over
        "train.batch_size": 8, "train.steps": 2, "checkpoint.every": 2, "eval.every": 2, "eval.batches": 1,
        "log.progress": False, "log.peak_flops": 1e12, "mesh.data": 1, "schedule.warmup_steps": 1})
    train_and_evaluate(config, root / "run", devices=jax.devices()[:1])
    _, validation = split_files(sorted(os.listdir(corpus)), 0.2)
    return root / "run", corpus, validation


def _eval(*args: str) -> dict:
    proc = herd("eval", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eval_of_a_whole_split_counts_every_token_and_the_short_last_batch(text_run):
    workdir, corpus, validation = text_run
    assert len(validation) == 1
    result = _eval(f"--workdir={workdir}")
    doc_tokens = len((corpus / validation[0]).read_bytes()) + 2  # BOS, one token per byte, EOS
    rows = -(-doc_tokens // 17)  # rows of seq_len + 1 tokens; each row's first token is no target
    assert rows % 8 and result["batches"] == -(-rows // 8)  # the last batch is short (and counted)
    assert result["tokens"] == doc_tokens - rows
    # The same document given as a file, and as a glob, is the same evaluation.
    assert _eval(f"--workdir={workdir}", f"--data={corpus / validation[0]}") == {**result, "split": str(
        corpus / validation[0])}
    glob = str(corpus / validation[0]).replace(".txt", ".t?t")
    assert _eval(f"--workdir={workdir}", f"--data={glob}") == {**result, "split": glob}


@pytest.mark.slow
def test_eval_on_a_folder_of_the_users_text(text_run, tmp_path):
    workdir, corpus, _ = text_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("sings of summer rain and the lazy dog " * 20)
    (mine / "b.jsonl").write_text(json.dumps({"text": "over a lazy dog " * 30}) + "\n")
    result = _eval(f"--workdir={workdir}", f"--data={mine}")
    assert result["tokens"] > 0 and 0 < result["bits_per_byte"] < 16
    assert sorted(os.listdir(mine)) == ["a.txt", "b.jsonl"]  # nothing prepared beside the user's files


def test_eval_on_text_it_cannot_read(run, text_run, tmp_path):
    assert_one_line_error(herd("eval", f"--workdir={text_run[0]}", f"--data={tmp_path}/nothing*.txt"),
                          "matched no .txt or .jsonl files")
    (tmp_path / "a.txt").write_text("text")
    assert_one_line_error(herd("eval", f"--workdir={run}", f"--data={tmp_path / 'a.txt'}"), "has no tokenizer")


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
