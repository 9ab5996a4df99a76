"""Every bad input: one line on stderr naming the culprit, exit != 0, nothing created or destroyed.

A table of bad command lines across every subcommand, each run as a real `herd`
subprocess. Each case asserts the exit status (1 for herd's own errors, 2 for
flags absl cannot parse), that the whole of stderr is one line naming the flag,
key, file or value at fault, and that the files under the test's folder and the
shared trained run are exactly as they were (paths, sizes, modification times).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import pytest

from train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.reliability
SMOKE = "--config=experiments/base.py:smoke"


def herd(*args: str) -> subprocess.CompletedProcess:
    # Eight fake devices, so a mesh that does not divide them is a real case; no XLA cache anywhere.
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": "",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    env.pop("HERD_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(*roots: Path) -> dict[tuple[int, str], tuple[int, int]]:
    """(size, mtime in ns) of every file and folder under `roots`, by (root, relative path); empty folders count."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for i, root in enumerate(roots):
        for d, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.stat(os.path.join(d, name))
                out[i, os.path.relpath(os.path.join(d, name), root)] = (st.st_size if name in files else 0,
                                                                       st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config) -> Path:
    """A finished 2-step run with one checkpoint (the subject of eval, sample, convert and report cases)."""
    workdir = tmp_path_factory.mktemp("bad_inputs_run")
    config = tiny_config(**{"train.steps": 2, "mesh.data": 1})
    train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    return workdir


# ------------------------------------------------------------------------------------------ set-ups


def _dict_config(tmp: Path, run: Path) -> None:
    (tmp / "dict_config.py").write_text("def get_config(arg=None):\n    return {'seed': 0}\n")


def _no_get_config(tmp: Path, run: Path) -> None:
    (tmp / "no_get_config.py").write_text("CONFIG = {}\n")


def _regular_file(tmp: Path, run: Path) -> None:
    (tmp / "file").write_text("not a folder\n")


def _text_file(tmp: Path, run: Path) -> None:
    (tmp / "a.txt").write_text("some text to train on\n" * 50)


def _garbled_run_json(tmp: Path, run: Path) -> None:
    (tmp / "garbled").mkdir()
    (tmp / "garbled" / "run.json").write_text('{"config": {"seed": ')


def _run_json_only(tmp: Path, run: Path) -> None:
    (tmp / "fresh").mkdir()
    (tmp / "fresh" / "run.json").write_bytes((run / "run.json").read_bytes())


def _non_empty_folder(tmp: Path, run: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")


def _empty_folder(tmp: Path, run: Path) -> None:
    (tmp / "empty").mkdir()


def _not_hf(tmp: Path, run: Path) -> None:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


class Case(NamedTuple):
    args: tuple[str, ...]  # {tmp}: the test's folder; {run}: the shared trained run
    needles: tuple[str, ...]  # each must appear in the one line
    setup: Callable[[Path, Path], None] | None = None
    rc: int = 1  # 1: herd's own error; 2: absl could not parse a flag


def _train(*overrides: str, needles: tuple[str, ...], workdir: str = "{tmp}/w",
           setup: Callable[[Path, Path], None] | None = None) -> Case:
    """herd train of the smoke experiment with a batch of 8, which the 8 devices divide, and `overrides`."""
    return Case(("train", SMOKE, f"--workdir={workdir}", "--config.train.batch_size=8", *overrides), needles, setup)


R = "--workdir={run}"  # the shared trained run
P = "--prompt=1 2"

CASES: dict[str, Case] = {
    # --- herd train: the experiment file and the workdir
    "config_missing_file": Case(("train", "--config={tmp}/nope.py", "--workdir={tmp}/w"),
                                ("--config={tmp}/nope.py: the experiment file does not exist",)),
    "config_is_a_directory": Case(("train", "--config={tmp}", "--workdir={tmp}/w"),
                                  ("--config={tmp}: the experiment file is a directory",)),
    "config_not_python": Case(("train", "--config={tmp}/file", "--workdir={tmp}/w"),
                              ("--config={tmp}/file: the experiment file is not a .py file",), _regular_file),
    "config_returns_a_dict": Case(("train", "--config={tmp}/dict_config.py", "--workdir={tmp}/w"),
                                  ("--config={tmp}/dict_config.py: get_config() returned a dict", "ConfigDict"),
                                  _dict_config),
    "config_without_get_config": Case(("train", "--config={tmp}/no_get_config.py", "--workdir={tmp}/w"),
                                      ("--config={tmp}/no_get_config.py defines no get_config",), _no_get_config),
    "config_unknown_arg": Case(("train", "--config=experiments/base.py:smok", "--workdir={tmp}/w"),
                               ("unknown experiment argument 'smok'", "valid: smoke")),
    "config_missing": Case(("train", "--workdir={tmp}/w"), ("--config is required",)),
    "workdir_missing": Case(("train", SMOKE), ("--workdir is required",)),
    "workdir_is_a_file": _train(needles=("--workdir={tmp}/file is a file",), workdir="{tmp}/file",
                                setup=_regular_file),
    "unknown_flag": Case(("train", SMOKE, "--workdir={tmp}/w", "--lr=3"), ("Unknown command line flag 'lr'",), rc=2),
    "unknown_command": Case(("frobnicate",), ("got frobnicate", "herd --help"), rc=2),
    # --- herd train: keys and their types
    "misspelt_key": _train("--config.optimizer.lrr=0.1", needles=("--config.optimizer.lrr is not declared",
                                                                  "did you mean optimizer.lr")),
    "misspelt_group": _train("--config.optimiser.lr=0.1", needles=("--config.optimiser.lr is not declared",
                                                                   "did you mean optimizer.lr")),
    "group_as_a_key": _train("--config.optimizer=1", needles=("--config.optimizer is not declared", "optimizer.lr")),
    "key_without_value": _train("--config.optimizer.lr", needles=("optimizer.lr needs a value",)),
    "int_key_given_text": _train("--config.train.steps=ten", needles=("train.steps='ten' is not an int",)),
    "bool_key_given_text": _train("--config.data.shuffle=maybe", needles=("data.shuffle='maybe'", "true or false")),
    "none_for_a_required_key": _train("--config.optimizer.lr=None", needles=("optimizer.lr=None",)),
    # --- herd train: values
    "init_std_nan": _train("--config.model.init_std=nan", needles=("model.init_std must be a finite number",)),
    "lr_nan": _train("--config.optimizer.lr=nan", needles=("optimizer.lr=nan must be in",)),
    "rope_theta_nan": _train("--config.model.rope_theta=nan", needles=("model.rope_theta must be a finite",)),
    "norm_eps_inf": _train("--config.model.norm_eps=inf", needles=("model.norm_eps must be a finite",)),
    "z_loss_inf": _train("--config.train.z_loss=inf", needles=("train.z_loss=inf must be a finite",)),
    "seq_len_zero": _train("--config.data.seq_len=0", needles=("data.seq_len=0 must be positive",)),
    "seq_len_beyond_context": _train("--config.data.seq_len=100000", needles=("data.seq_len=100000 exceeds",
                                                                              "model.max_seq_len=256")),
    "steps_negative": _train("--config.train.steps=-1", needles=("train.steps=-1 must be a positive integer",)),
    "batch_size_zero": _train("--config.train.batch_size=0", needles=("train.batch_size=0 must be positive",)),
    "batch_not_divisible_by_microbatches": _train(
        "--config.train.microbatches=3", needles=("train.batch_size=8 is not divisible by train.microbatches=3",)),
    "mesh_does_not_divide_devices": _train("--config.mesh.data=3", needles=("mesh data*fsdp*tensor = 3*1*1 = 3",
                                                                            "8 devices")),
    "batch_not_divisible_by_mesh": _train("--config.train.batch_size=4", "--config.mesh.data=8",
                                          needles=("train.batch_size", "4 rows", "8 data-parallel devices")),
    "vocab_below_the_tokenizers": _train(
        "--config.data.source=tfds", "--config.data.dataset=text_folder", "--config.data.text_path={tmp}",
        "--config.data.data_dir={tmp}/tfds", "--config.model.vocab_size=100",
        needles=("model.vocab_size=100 is smaller than the byte tokenizer's 259 tokens",), setup=_text_file),
    # --- herd train: registry names
    "unknown_variant": _train("--config.model.variant=llama9", needles=("'llama9'", "tiny")),
    "unknown_optimizer": _train("--config.optimizer.name=adam", needles=("optimizer.name='adam'", "adamw")),
    "unknown_schedule": _train("--config.schedule.name=cosin", needles=("schedule.name='cosin'", "cosine")),
    "unknown_rules": _train("--config.mesh.rules=zero3", needles=("'zero3'", "fsdp_tp")),
    "unknown_data_source": _train("--config.data.source=nope", needles=("data.source='nope' is not registered",)),
    "unknown_tokenizer": _train("--config.data.tokenizer.name=wordpiece",
                                needles=("data.tokenizer.name='wordpiece' is not one of", "sentencepiece")),
    "unknown_nonfinite_policy": _train("--config.train.on_nonfinite=ignore", needles=("train.on_nonfinite='ignore'",)),
    # --- herd eval
    "eval_batches_negative": Case(("eval", R, "--batches=-3"), ("--batches=-3 must be >= 0",)),
    "eval_batches_not_a_number": Case(("eval", R, "--batches=all"), ("--batches=all",), rc=2),
    "eval_workdir_is_a_file": Case(("eval", "--workdir={tmp}/file"), ("--workdir={tmp}/file has no run.json",),
                                   _regular_file),
    "eval_not_a_run": Case(("eval", "--workdir={tmp}"), ("--workdir={tmp} has no run.json",)),
    "eval_garbled_run_json": Case(("eval", "--workdir={tmp}/garbled"), ("{tmp}/garbled/run.json is not valid JSON",),
                                  _garbled_run_json),
    "eval_without_checkpoints": Case(("eval", "--workdir={tmp}/fresh"), ("--workdir={tmp}/fresh has no checkpoint",),
                                     _run_json_only),
    "eval_unknown_split": Case(("eval", R, "--data=nosuchsplit"), ("'nosuchsplit'",)),
    "eval_text_without_a_tokenizer": Case(("eval", R, "--data={tmp}/file"), ("--data={tmp}/file", "no tokenizer"),
                                          _regular_file),
    "eval_takes_no_overrides": Case(("eval", R, "--config.optimizer.lr=1"), ("herd eval takes no --config.KEY",),
                                    rc=2),
    # --- herd sample
    "sample_max_tokens_zero": Case(("sample", R, P, "--max_tokens=0"), ("--max_tokens=0 must be a positive",)),
    "sample_max_tokens_negative": Case(("sample", R, P, "--max_tokens=-5"), ("--max_tokens=-5 must be a positive",)),
    "sample_temperature_negative": Case(("sample", R, P, "--temperature=-1"), ("--temperature=-1.0 must be",)),
    "sample_temperature_nan": Case(("sample", R, P, "--temperature=nan"), ("--temperature=nan must be",)),
    "sample_top_p_zero": Case(("sample", R, P, "--top_p=0"), ("--top_p=0.0 must be in (0, 1]",)),
    "sample_top_p_above_one": Case(("sample", R, P, "--top_p=1.5"), ("--top_p=1.5 must be in (0, 1]",)),
    "sample_top_k_negative": Case(("sample", R, P, "--top_k=-1"), ("--top_k=-1 must be",)),
    "sample_empty_prompt": Case(("sample", R, "--prompt= "), ("--prompt is empty",)),
    "sample_prompt_not_ids": Case(("sample", R, "--prompt=hello"), ("--prompt must be token ids",)),
    "sample_prompt_outside_vocab": Case(("sample", R, "--prompt=1 99999"), ("--prompt token 99999",)),
    "sample_prompt_beyond_context": Case(("sample", R, P, "--max_tokens=1000"), ("--max_tokens=1000", "256")),
    "sample_prompt_missing": Case(("sample", R), ("--prompt is required",)),
    "sample_both_sources": Case(("sample", R, "--hf={tmp}", P), ("give exactly one of --workdir", "--hf")),
    "sample_hf_missing": Case(("sample", "--hf={tmp}/nope", P), ("--hf={tmp}/nope is not a directory",)),
    "sample_hf_garbled_config": Case(("sample", "--hf={tmp}/hf", P), ("{tmp}/hf/config.json: not valid JSON",),
                                     _not_hf),
    "sample_not_a_run": Case(("sample", "--workdir={tmp}/empty", P), ("--workdir={tmp}/empty has no run.json",),
                             _empty_folder),
    # --- herd convert
    "convert_into_a_non_empty_folder": Case(("convert", R, "--to-hf={tmp}/out"),
                                            ("--to-hf={tmp}/out", "not empty", "notes.txt"), _non_empty_folder),
    "convert_from_hf_into_a_non_empty_workdir": Case(("convert", "--workdir={tmp}/out", "--from-hf={run}"),
                                                     ("--workdir={tmp}/out", "not empty"), _non_empty_folder),
    "convert_to_hf_onto_a_file": Case(("convert", R, "--to-hf={tmp}/file"),
                                      ("--to-hf={tmp}/file exists and is not a folder",), _regular_file),
    "convert_from_hf_into_a_file": Case(("convert", "--workdir={tmp}/file", "--from-hf={tmp}/hf"),
                                        ("--workdir={tmp}/file exists and is not a folder",), _regular_file),
    "convert_unknown_dtype": Case(("convert", R, "--to-hf={tmp}/o", "--dtype=int8"), ("--dtype='int8'", "bfloat16")),
    "convert_both_directions": Case(("convert", R, "--to-hf={tmp}/o", "--from-hf={tmp}/i"),
                                    ("give exactly one of --to-hf",)),
    "convert_from_a_missing_folder": Case(("convert", "--workdir={tmp}/w", "--from-hf={tmp}/nope"),
                                          ("--from-hf={tmp}/nope is not a directory",)),
    "convert_to_hf_of_a_non_run": Case(("convert", "--workdir={tmp}/empty", "--to-hf={tmp}/o"),
                                       ("--workdir={tmp}/empty has no run.json",), _empty_folder),
    # --- herd sweep
    "sweep_parallel_zero": Case(("sweep", SMOKE, "--workdir={tmp}/s", "--parallel=0"),
                                ("--parallel=0 must be a positive",)),
    "sweep_parallel_not_a_number": Case(("sweep", SMOKE, "--workdir={tmp}/s", "--parallel=many"),
                                        ("--parallel=many",), rc=2),
    "sweep_unknown_executor": Case(("sweep", SMOKE, "--workdir={tmp}/s", "--executor=k8s"),
                                   ("--executor='k8s' is not one of",)),
    "sweep_seeds_negative": Case(("sweep", SMOKE, "--workdir={tmp}/s", "--seeds=-1"), ("--seeds=-1 must be >= 0",)),
    "sweep_misspelt_key": Case(("sweep", SMOKE, "--workdir={tmp}/s", "--config.optimizer.lrr=1"),
                               ("--config.optimizer.lrr is not declared", "did you mean optimizer.lr")),
    "sweep_without_sweep": Case(("sweep", "--config=experiments/llama3_pretraining.py", "--workdir={tmp}/s"),
                                ("llama3_pretraining.py defines no sweep()",)),
    "sweep_workdir_is_a_file": Case(("sweep", SMOKE, "--workdir={tmp}/file"), ("--workdir={tmp}/file is a file",),
                                    _regular_file),
    "sweep_into_a_run": Case(("sweep", SMOKE, R), ("--workdir={run} is a training run directory, not a sweep",)),
    # --- herd report
    "report_nothing": Case(("report",), ("herd report needs a sweep or run directory",)),
    "report_not_a_sweep": Case(("report", "{tmp}"), ("{tmp} holds neither sweep.json",)),
    "report_missing_folder": Case(("report", "{tmp}/nope"), ("{tmp}/nope holds neither sweep.json",)),
    "report_unknown_format": Case(("report", "{run}", "--format=xml"), ("--format='xml' is not one of",)),
    "report_unknown_metric": Case(("report", "{run}", "--metric=eval/nope", "--format=json"),
                                  ("--metric=eval/nope is in no trial's metrics.jsonl", "eval/loss")),
    "report_bad_where": Case(("report", "{run}", "--where=nonsense"), ("--where=nonsense: 'nonsense' is not KEY=",)),
    # --- herd plan
    "plan_nonsense_target": Case(("plan", SMOKE, "--target=nonsense"), ("--target=nonsense", "valid forms")),
    "plan_unknown_tpu": Case(("plan", SMOKE, "--target=tpu:v9:2x2"), ("--target=tpu:v9:2x2: unknown TPU 'v9'",)),
    "plan_zero_gpus": Case(("plan", SMOKE, "--target=gpu:h100:0"), ("--target=gpu:h100:0: the GPU count",)),
    "plan_without_target": Case(("plan", SMOKE), ("--target is required",)),
    "plan_unknown_format": Case(("plan", SMOKE, "--target=cpu:1", "--format=xml"), ("--format=xml",)),
    "plan_misspelt_key": Case(("plan", SMOKE, "--target=cpu:1", "--config.model.d_modle=8"),
                              ("--config.model.d_modle is not declared", "model.d_model")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, run, tmp_path):
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path, run)
    args = [a.format(tmp=tmp_path, run=run) for a in case.args]
    before = snapshot(tmp_path, run)
    proc = herd(*args)
    assert proc.returncode == case.rc, (proc.returncode, proc.stderr[-3000:])
    # The whole of stderr is one line: no warning, no traceback, no second message.
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith("herd"), line
    for needle in case.needles:
        needle = needle.format(tmp=tmp_path, run=run)
        assert needle in line, (needle, line)
    assert snapshot(tmp_path, run) == before


def test_the_table_is_large():
    assert len(CASES) >= 40
    assert {c.args[0] for c in CASES.values()} >= {"train", "eval", "sample", "convert", "sweep", "report", "plan"}
