"""Nothing silently wrong: damaged checkpoints, kill -9 mid-save, failed saves.

Every damage ends either in a fallback to an older checkpoint whose arrays are
bit-identical to what was saved, or in one clear line; never in a run that
silently continues from something else. The damaged runs are copies of one
finished run (module fixture); crashes are real subprocesses. Missing and dead
peers are in tests/test_multiprocess.py (also marked `reliability`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest

from train.checkpoint import RECORD_ITEM, Checkpointer, CheckpointError, Damaged
from train.config import model_config
from train.digest import json_digest, tree_digests
from train.loop import train_and_evaluate
from train.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.reliability
STEPS = {"train.steps": 6}  # checkpoints 2, 4 and 6 (checkpoint.every=2, keep=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config):
    """An uninterrupted 6-step run: its losses and the digests of every checkpoint's arrays."""
    workdir = tmp_path_factory.mktemp("reference")
    out = train_and_evaluate(tiny_config(**STEPS), workdir, devices=jax.devices()[:1])
    ckpt = Checkpointer(workdir, every=2, keep=3, read_only=True)
    digests = {s: tree_digests(ckpt.restore(out["runtime"].abstract_state(), s)[1]) for s in (2, 4, 6)}
    return workdir, out["losses"], digests


@pytest.fixture(scope="module")
def abstract(tiny_config):
    config = tiny_config(**STEPS)
    return Runtime(config, model_config(config), jax.devices()[:1]).abstract_state()


@pytest.fixture
def preempted(reference, tmp_path):
    """A copy of the reference run as if preempted after step 4: checkpoints 2 and 4."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    return workdir


def test_digests_depend_on_every_bit_and_not_on_sharding_or_implementation():
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    tree = {"x": jax.numpy.asarray(x), "b": jax.numpy.asarray(x, "bfloat16"), "s": jax.numpy.int32(7)}
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = {**tree, "x": jax.device_put(x, NamedSharding(mesh, PartitionSpec("b", "a")))}
    want = tree_digests(tree, as_matmul=True)
    assert tree_digests(tree, as_matmul=False) == want  # a GPU's fused reduction = a CPU's matrix product
    assert tree_digests(sharded, as_matmul=True) == tree_digests(sharded, as_matmul=False) == want
    seen = {want["x"]["digest"]}
    for index, bit in [((0, 0), 0), ((0, 0), 31), ((63, 47), 7), ((17, 5), 22)]:
        flipped = x.copy()
        flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
        seen.add(tree_digests({"x": jax.numpy.asarray(flipped)})["x"]["digest"])
    assert len(seen) == 5
    assert tree_digests({"x": jax.numpy.asarray(x[::-1].copy())})["x"] != want["x"]  # order matters


# ------------------------------------------------------------------------------------------ the damage table


def _array_file(ck, step=4):
    """The biggest array-data file of a checkpoint (the optimizer moments are most of it)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(ck / str(step) / "state") for f in fs if "/d" in r]
    return max(files, key=os.path.getsize)


def _flip(fraction):
    def damage(ck):
        path = _array_file(ck)
        data = bytearray(open(path, "rb").read())
        data[int(len(data) * fraction)] ^= 0x10
        open(path, "wb").write(bytes(data))
    return damage


def _rewrite(fn):
    def damage(ck):
        path = _array_file(ck)
        data = open(path, "rb").read()
        open(path, "wb").write(fn(data))
    return damage


def _empty_all_arrays(ck):
    for root, _, files in os.walk(ck / "4" / "state"):
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").close()


def _remove(*parts):
    def damage(ck):
        path = ck.joinpath("4", *parts)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def _data_record(content):
    def damage(ck):
        (ck / "4" / "data" / "metadata").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return damage


def _record_edit(ck):
    path = ck / "4" / RECORD_ITEM / "metadata"
    record = json.loads(path.read_text())
    record["leaves"]["params.embedding"]["digest"] = "0" * 16  # as if to make damaged arrays pass
    path.write_text(json.dumps(record))


# name -> (damage of the checkpoints folder, the step restored, the steps set aside)
DAMAGES = {
    "bit flip near the start of the array data": (_flip(0.1), 2, [4]),
    "bit flip in the middle of the array data": (_flip(0.5), 2, [4]),
    "bit flip near the end of the array data": (_flip(0.97), 2, [4]),
    "array data truncated to half": (_rewrite(lambda b: b[: len(b) // 2]), 2, [4]),
    "array data zeroed": (_rewrite(lambda b: bytes(len(b))), 2, [4]),
    "every array file emptied": (_empty_all_arrays, 2, [4]),
    "state/_METADATA deleted": (_remove("state", "_METADATA"), 2, [4]),
    "state/manifest.ocdbt deleted": (_remove("state", "manifest.ocdbt"), 2, [4]),
    "state item deleted": (_remove("state"), 2, [4]),
    "digest record deleted": (_remove(RECORD_ITEM), 2, [4]),
    "digest record garbled": (lambda ck: (ck / "4" / RECORD_ITEM / "metadata").write_bytes(b'{"format": 1, "st'), 2, [4]),
    "digest record with an edited digest": (_record_edit, 2, [4]),
    "data record {}": (_data_record({}), 2, [4]),
    "data record []": (_data_record([]), 2, [4]),
    "data record without its step": (_data_record({"train": {"0": {}}}), 2, [4]),
    "data record at a valid-looking wrong position": (_data_record({"train": {"0": {"step": 3}}}), 2, [4]),
    "data record not JSON": (_data_record(b"\x00\xff not json"), 2, [4]),
    "data record deleted": (_remove("data"), 2, [4]),
    "fake newer step: a copy of step 4 named 6": (lambda ck: shutil.copytree(ck / "4", ck / "6"), 4, [6]),
    "fake newer step: an empty folder 6": (lambda ck: (ck / "6").mkdir(), 4, [6]),
}


def _listing(workdir):
    return {d: sorted(os.listdir(workdir / d)) for d in ("checkpoints", "damaged_checkpoints") if (workdir / d).is_dir()}


@pytest.mark.parametrize("name", DAMAGES)
def test_damaged_checkpoint_falls_back_to_a_verified_one(name, preempted, reference, abstract, caplog):
    damage, want, aside = DAMAGES[name]
    ck = preempted / "checkpoints"
    damage(ck)
    before = _listing(preempted)
    # Read-only (herd eval / sample / convert): the same fallback, and nothing is moved.
    step, state, _ = Checkpointer(preempted, every=2, keep=3, read_only=True).restore(abstract)
    assert step == want and _listing(preempted) == before
    caplog.clear()
    step, state, data = Checkpointer(preempted, every=2, keep=3).restore(abstract)
    assert step == want
    assert tree_digests(state) == reference[2][want]  # bit-identical to what was saved at that step
    assert data == {"train": {"0": {"step": want}}}
    assert sorted(os.listdir(ck)) == sorted({"2", "4"} - {str(s) for s in aside} | {str(want)})
    assert sorted(p.split(".")[0] for p in os.listdir(preempted / "damaged_checkpoints")) == [str(s) for s in aside]
    warnings = [r.getMessage() for r in caplog.records if r.name == "train.checkpoint"]
    assert warnings and all("\n" not in w for w in warnings), warnings
    assert any(f"checkpoints/{aside[0]} is damaged" in w for w in warnings), warnings


def test_every_checkpoint_damaged_is_one_line_and_nothing_moves(preempted, abstract):
    _flip(0.5)(preempted / "checkpoints")
    (preempted / "checkpoints" / "2" / "data" / "metadata").write_text("{}")
    before = _listing(preempted)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(preempted, every=2, keep=3).restore(abstract)
    message = str(e.value)
    assert "\n" not in message and "step 4: " in message and "step 2: its data-iterator record" in message
    assert _listing(preempted) == before  # a rerun fails the same way instead of silently starting over


def test_nan_state_sealed_by_a_faulty_writer_is_damage(preempted, abstract):
    """A checkpoint whose record matches its arrays but whose arrays hold NaN is not used."""
    ckpt = Checkpointer(preempted, every=2, keep=3)
    _, state, _ = ckpt.restore(abstract, 4)
    state = state.replace(step=state.step + 2, params={**state.params, "embedding": state.params["embedding"] * float("nan")})
    data = {"train": {"0": {"step": 6}}}
    digests = tree_digests(state)
    from train.checkpoint import leaf_names

    record = {"format": 1, "step": 6, "data": json_digest(data), "processes": 1, "imported_from": None,
              "leaves": {n: {"shape": list(x.shape), "dtype": str(x.dtype), "digest": digests[n]["digest"]}
                         for n, x in leaf_names(state).items()}}
    record["seal"] = json_digest(record)
    raw = ocp.CheckpointManager(preempted / "checkpoints", item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(), RECORD_ITEM: ocp.JsonCheckpointHandler()})
    raw.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                        **{RECORD_ITEM: ocp.args.JsonSave(record)}))
    raw.wait_until_finished()
    with pytest.raises(Damaged, match="params.embedding holds NaN"):
        ckpt._restore_verified(6, abstract, None)
    assert ckpt.restore(abstract)[0] == 4


def test_a_readable_checkpoint_of_another_config_is_a_mismatch_not_damage(preempted, tiny_config):
    config = tiny_config(**STEPS, **{"model.d_ff": 128})
    other = Runtime(config, model_config(config), jax.devices()[:1]).abstract_state()
    (preempted / "checkpoints" / "4" / "state" / "_METADATA").unlink()  # no longer misread as "another config"
    with pytest.raises(CheckpointError, match=r"mlp\.(down|gate|up)"):
        Checkpointer(preempted, every=2, keep=3).restore(other)
    assert sorted(os.listdir(preempted / "checkpoints")) == ["2", "4"]


def test_saving_a_non_finite_state_is_refused(preempted, abstract):
    ckpt = Checkpointer(preempted, every=2, keep=3)
    _, state, _ = ckpt.restore(abstract, 4)
    state = state.replace(step=state.step + 1, params={**state.params, "embedding": state.params["embedding"] / 0.0})
    with pytest.raises(CheckpointError, match="checkpoint 5 not saved: params.embedding holds NaN or infinite"):
        ckpt.save(5, state, {"train": {"0": {"step": 5}}})
    ckpt.close()
    assert sorted(os.listdir(preempted / "checkpoints")) == ["2", "4"]


def test_nothing_is_created_before_the_first_save(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", every=2, keep=3)
    assert ckpt.latest_step() is None
    ckpt.close()
    assert not (tmp_path / "run").exists()
    ro = Checkpointer(tmp_path / "run", every=2, keep=3, read_only=True)
    assert ro.latest_step() is None and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_resumed_past_a_damaged_checkpoint_matches_the_uninterrupted_run(preempted, reference, tiny_config):
    _flip(0.5)(preempted / "checkpoints")
    out = train_and_evaluate(tiny_config(**STEPS), preempted, devices=jax.devices()[:1])
    assert sorted(out["losses"]) == [3, 4, 5, 6]  # from step 2: checkpoint 4 was set aside
    assert {s: out["losses"][s] for s in (3, 4, 5, 6)} == {s: reference[1][s] for s in (3, 4, 5, 6)}
    assert tree_digests(out["state"]) == reference[2][6]


# ------------------------------------------------------------------------------------------ kill -9

# Runs the 6-step tiny run in a subprocess and SIGKILLs it at a chosen point.
DRIVER = r"""
import json, os, signal, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import jax
jax.config.update("jax_compilation_cache_dir", os.environ["TEST_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
import orbax.checkpoint as ocp
from experiments import base
from train import checkpoint
from train.config import apply_overrides
from train.loop import train_and_evaluate
from train.runtime import Runtime
workdir, overrides, point = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
kind, at = point.split(":")
at = int(at)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "step":  # between checkpoints: as step `at` + 1 is dispatched, once the last save has committed
    import time
    init = Runtime.__init__
    def patched(self, *a, **k):
        init(self, *a, **k)
        step, calls = self.train_step, [0]
        def counting(*a, **k):
            calls[0] += 1
            if calls[0] > at:
                while not os.path.isdir(os.path.join(workdir, "checkpoints", str(at - at % 2))):
                    time.sleep(0.01)
                die()
            return step(*a, **k)
        self.train_step = counting
    Runtime.__init__ = patched
elif kind == "saving":  # the async save of step `at` has started writing in the background
    save = checkpoint.Checkpointer.save
    def patched(self, step, *a, **k):
        save(self, step, *a, **k)
        if step == at:
            die()
    checkpoint.Checkpointer.save = patched
elif kind == "finalizing":  # the arrays of step `at` are being written; it is not committed yet
    finalize = ocp.CheckpointManager._finalize
    def patched(self, step, *a, **k):
        if step == at:
            die()
        return finalize(self, step, *a, **k)
    ocp.CheckpointManager._finalize = patched
config = apply_overrides(base.get_config(), overrides)
train_and_evaluate(config, workdir, devices=jax.devices()[:1])
"""


def _losses_per_step(workdir):
    """Every logged loss by step: a step run again after a crash must log the same loss again."""
    seen = {}
    for line in open(workdir / "metrics.jsonl"):
        row = json.loads(line)
        if "loss" in row:
            seen.setdefault(row["step"], set()).add(row["loss"])
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_from", [("step:5", 4), ("saving:4", 2), ("finalizing:4", 2)])
def test_kill_9_then_resume_is_bit_identical(point, resumes_from, reference, tiny_config, tmp_path):
    from conftest import TINY_TRAIN

    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
           "TEST_XLA_CACHE": jax.config.jax_compilation_cache_dir}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(workdir), json.dumps({**TINY_TRAIN, **STEPS}), point],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = sorted(os.listdir(workdir / "checkpoints"))
    if point.startswith(("saving", "finalizing")):
        assert "4" not in left and any(p.startswith("4.orbax-checkpoint-tmp") for p in left), left  # killed mid-save
    out = train_and_evaluate(tiny_config(**STEPS), workdir, devices=jax.devices()[:1])
    assert min(out["losses"]) == resumes_from + 1
    assert tree_digests(out["state"]) == reference[2][6]
    logged = _losses_per_step(workdir)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert {s: losses.pop() for s, losses in logged.items() if len(losses) == 1} == reference[1]  # one value per step
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]  # a half-written save was cleaned up


# ------------------------------------------------------------------------------------------ a failed save


SMALL_DISK = r"""
import resource, signal, subprocess, sys
limit = int(sys.argv[1])
def small_disk():  # every file this process writes stops at `limit` bytes, as a full disk would stop it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(subprocess.run(sys.argv[2:], preexec_fn=small_disk).returncode)
"""


@pytest.mark.slow
def test_a_failed_save_is_one_line_and_leaves_nothing_half_written(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": "",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # one device
    args = [sys.executable, "-m", "train.main", "train", "--config=experiments/base.py:smoke", f"--workdir={workdir}",
            "--config.log.peak_flops=1e12"]
    proc = subprocess.run([sys.executable, "-c", SMALL_DISK, str(300_000), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith("herd train: error: saving checkpoint 3 to ") and "File too large (errno 27)" in line, line
    assert "nothing half-written was left behind" in line
    assert os.listdir(workdir / "checkpoints") == []
