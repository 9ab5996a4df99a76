"""`herd plan`: HLO accounting, targets, the analytic memory model against compiled executables, golden shardings.

The golden sharding snapshot (tests/golden/llama3_8b_shardings.json) is the PartitionSpec of
every llama3_8b parameter under each rule preset on a data=2, fsdp=2, tensor=2 mesh. When a
change to model/axes.py or the model is meant to move shardings, regenerate it and review the diff:
    HERD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_plan.py -k golden
TPU tests compile with libtpu's compile-only devices and skip (saying why) without libtpu.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from model import VARIANTS, axes
from model.llama import abstract_params
from train import hlo_stats, plan, plan_memory, plan_search, plan_target
from train.config import apply_overrides, model_config
from train.mesh import make_mesh, shardings_for
from train.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "llama3_8b_shardings.json")
HAVE_LIBTPU, NO_LIBTPU = plan_target.libtpu_available()
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason=f"needs libtpu for TPU compiles: {NO_LIBTPU}")

# A small Llama (4 layers, d_model 256) on a 2 x 2 x 2 mesh of the 8 test devices, tensor parallel.
SMALL = {"model.variant": "small", "data.seq_len": 256, "train.batch_size": 16, "mesh.rules": "fsdp_tp",
         "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _spec_json(spec: jax.sharding.PartitionSpec) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _param_specs(preset: str) -> dict[str, list]:
    mesh = make_mesh(apply_overrides(_base(), {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}).mesh,
                     jax.devices()[:8])
    shardings = shardings_for(abstract_params(VARIANTS["llama3_8b"]), mesh, axes.get_rules(preset))
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): _spec_json(s.spec) for path, s in flat}


def _base():
    from experiments import base

    return base.get_config()


def test_golden_shardings_of_llama3_8b():
    got = {preset: _param_specs(preset) for preset in sorted(axes.RULES)}
    if os.environ.get("HERD_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        text = json.dumps(got, indent=1, sort_keys=True)
        # One line per parameter: a reviewer reads the diff of a spec, not of its brackets.
        text = re.sub(r"\[\s+([^\[\]]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        with open(GOLDEN, "w") as f:
            f.write(text + "\n")
    with open(GOLDEN) as f:
        want = json.load(f)
    for preset in want:
        assert got[preset] == want[preset], f"the {preset} shardings changed; see this module's docstring"
    assert set(got) == set(want)
    # The snapshot means something: fsdp splits every matrix, fsdp_tp also splits heads over `tensor`.
    assert want["fsdp"]["layers/attn/q"] == [None, "fsdp", None, None]
    assert want["fsdp_tp"]["layers/attn/q"] == [None, "fsdp", "tensor", None]
    assert all(spec == [None] * len(spec) or spec == [] for spec in want["dp"].values())


# ----------------------------------------------------------------------------- HLO accounting


def _scan_fn(x, w):
    def body(c, _):
        return jnp.tanh(c @ w), None

    c, _ = jax.lax.scan(body, x, None, length=7)
    return c.sum()


def test_matmul_flops_weights_loop_bodies_by_trip_count():
    lowered = jax.jit(jax.grad(_scan_fn, argnums=1)).lower(jnp.ones((4, 8)), jnp.ones((8, 8)))
    exact = 7 * 3 * (2 * 4 * 8 * 8)  # forward, and two backward matmuls, in each of 7 iterations
    flops, unknown = hlo_stats.matmul_flops(lowered.as_text(dialect="hlo"))
    assert (flops, unknown) == (exact, [])
    compiled = lowered.compile()
    assert hlo_stats.matmul_flops(compiled.as_text())[0] == exact
    # The reason this module exists: XLA's own count sees each loop body once.
    assert hlo_stats.cost_analysis_dict(compiled.cost_analysis())["flops"] < exact / 2


def test_memory_traffic_follows_xlas_model_and_weights_loops():
    x, w = jnp.ones((256, 512)), jnp.ones((512, 512))
    compiled = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T).lower(x, w).compile()
    xla = hlo_stats.cost_analysis_dict(compiled.cost_analysis())["bytes accessed"]
    assert hlo_stats.memory_bytes(compiled.as_text()) == pytest.approx(xla, rel=0.25)
    looped = jax.jit(jax.grad(_scan_fn, argnums=1)).lower(x, w).compile().as_text()
    once, weighted = hlo_stats.memory_bytes(looped, loops=False), hlo_stats.memory_bytes(looped)
    # The scan's body runs 7 times: its traffic counts 7 times (what lies outside the loop, once).
    assert 3 * once < weighted < 7 * once


@pytest.mark.parametrize("attrs, group", [
    ("replica_groups={{0,4,8,12},{1,5,9,13}}, dimensions={0}", [0, 4, 8, 12]),
    ("replica_groups=[16,4]<=[64], dimensions={0}", [0, 1, 2, 3]),
    ("replica_groups=[16,4]<=[16,4]T(1,0), dimensions={0}", [0, 4, 8, 12]),
    ("replica_groups=[16,4]<=[4,4,4]T(2,1,0), to_apply=%add", [0, 16, 32, 48]),
    ("replica_groups=mesh['axis_0'=16,'axis_1'=1,'axis_2'=4] {'axis_2'}, use_global_device_ids=true", [0, 1, 2, 3]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=4,'axis_2'=4], device_ids=([4,4,4]T(2,1,0)) {'axis_1'}, x=1",
     [0, 4, 8, 12]),
])
def test_replica_group_forms(attrs, group):
    # The forms XLA:CPU and the TPU compiler print (copied from compiled train steps).
    assert hlo_stats.replica_group(attrs) == group


# ----------------------------------------------------------------------------- targets and errors


@pytest.mark.parametrize("spec, words", [
    (None, "--target is required"),
    ("tpu:v5p", "expected three parts"),
    ("tpu:v7:4x4", "unknown TPU 'v7'"),
    ("tpu:v5p:8x8", "3 positive sizes"),
    ("gpu:b300:8", "unknown GPU 'b300'"),
    ("gpu:h100:0", "positive integer"),
    ("cpu:two", "optional device count"),
])
def test_bad_targets_name_the_flag_and_the_valid_forms(spec, words):
    with pytest.raises(ValueError) as e:
        plan_target.parse_target(spec)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert "--target" in str(e.value)


def test_mesh_that_does_not_match_the_target_fails_before_compiling(tiny_config):
    config = tiny_config(**{"mesh.data": 3, "mesh.fsdp": 1})
    with pytest.raises(ValueError, match=r"mesh data\*fsdp\*tensor = 3\*1\*1 = 3 but there are 8 devices"):
        plan.plan(config, "cpu:8")


def test_a_gpu_target_larger_than_the_process_says_how_to_get_the_devices(tiny_config):
    with pytest.raises(ValueError, match="needs 16 simulated CPU devices.*xla_force_host_platform_device_count=16"):
        plan.plan(tiny_config(**{"train.batch_size": 16}), "gpu:h100:16")


def test_chip_table_covers_the_issue_targets():
    for name in ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200"):
        chip = plan_target.hardware.get_chip(name)
        assert chip.peak_flops > 1e14 and chip.hbm_bytes > 15 * 2**30 and chip.hbm_bandwidth > 5e11
        assert chip.link_bandwidth > 1e10 and chip.source


# ----------------------------------------------------------------------------- FLOPs and memory, compiled on CPU


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "save_dots_no_batch"])
def test_executed_flops_match_the_analytic_count(tiny_config, remat):
    # float32: with bfloat16 on a CPU host model/layers.einsum wraps each dot in a custom VJP, which
    # the save_dots policies cannot see (the plan notes this).
    config = tiny_config(**SMALL, **{"model.remat_policy": remat})
    runtime = Runtime(config, model_config(config), jax.devices()[:8])
    flops, unknown = hlo_stats.matmul_flops(runtime.lower_train_step().as_text(dialect="hlo"))
    tokens = config.train.batch_size * config.data.seq_len
    expected = plan.expected_executed_flops_per_token(runtime.model_cfg, config.data.seq_len) * tokens
    assert unknown == []
    assert flops == pytest.approx(expected, rel=1e-6)
    if remat == "full":  # remat costs something, and more than the MFU convention counts
        assert expected > plan.flops_per_token(runtime.model_cfg, config.data.seq_len) * tokens * 1.2


@pytest.mark.slow
@pytest.mark.parametrize("remat, microbatches", [("none", 1), ("full", 2)])
def test_plan_on_cpu_devices(tiny_config, remat, microbatches):
    config = tiny_config(**SMALL, **{"model.remat_policy": remat, "train.microbatches": microbatches})
    result = plan.plan(config, "cpu:8")
    json.dumps(result)  # --format=json
    m = result["memory"]
    compiled, analytic = m["compiled"], m["analytic"]
    # The state is counted exactly: the compiled arguments are the parameters, moments and batch.
    assert compiled["arguments"] == pytest.approx(analytic["parameters"] + analytic["optimizer_state"]
                                                  + analytic["batch"], rel=1e-3)
    assert analytic["total"] == pytest.approx(compiled["peak"], rel=plan_memory.PEAK_TOLERANCE)
    assert m["fits"] and m["source"] == "compiled"
    assert result["flops"]["executed_vs_expected"] == pytest.approx(1.0, rel=1e-6)
    axes_seen = {(r["kind"], r["axes"]) for r in result["collectives"]}
    assert ("all-reduce", "tensor") in axes_seen  # Megatron's activation all-reduces
    assert any(a.startswith("all-") and "fsdp" in ax for a, ax in axes_seen)  # gathers / gradient reductions
    r = result["roofline"]
    assert r["step_s"] == max(r["compute_s"], r["memory_s"], r["collective_s"]) > 0
    assert 0 < r["mfu"] <= 1


def test_analytic_state_bytes_equal_the_sharded_state(tiny_config):
    config = tiny_config(**SMALL)
    runtime = Runtime(config, model_config(config), jax.devices()[:8])
    from train.state import abstract_state

    boxed = abstract_state(runtime.model_cfg, runtime.tx)
    sharded = runtime.abstract_state()
    shape = dict(runtime.mesh.shape)
    assert plan_memory.logical_shard_bytes(boxed.params, shape, runtime.rules) == \
        plan_memory.shard_bytes(sharded.params)
    assert plan_memory.logical_shard_bytes(boxed.opt_state, shape, runtime.rules) == \
        plan_memory.shard_bytes(sharded.opt_state)


# ----------------------------------------------------------------------------- search


def test_search_finds_no_layout_for_405b_on_8_h100s_and_says_how_many_would_do(tiny_config):
    config = apply_overrides(_base(), {"model.variant": "llama3_1_405b", "model.dtype": "bfloat16",
                                       "data.seq_len": 8192, "train.batch_size": 512})
    chip = plan_target.hardware.get_chip("h100")
    ranked = plan_search.candidates(config, 8, chip)
    assert ranked and all(c.memory > chip.hbm_bytes for c in ranked)
    change = plan_search.smallest_change(config, 8, chip, ranked)
    # 405B parameters with float32 AdamW state are 4.9 TB before activations: over 61 H100s' 80 GB.
    assert change["shortfall_bytes"] > 0 and change.get("devices", 0) >= 64
    assert change["bytes"] * (1 + plan_memory.PEAK_TOLERANCE) <= chip.hbm_bytes


@pytest.mark.slow
def test_search_compiles_the_fastest_fitting_layout(tiny_config):
    config = tiny_config(**{"model.variant": "small", "data.seq_len": 128, "train.batch_size": 16})
    result = plan_search.search(config, "cpu:8", budget=1)
    assert result["best"] is not None and result["best"]["memory"]["fits"]
    assert len(result["search"]["compiled"]) == 1 and result["search"]["candidates"] > 20
    assert "fastest plan that fits" in plan_search.format_any(result)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_plans_a_gpu_cluster_on_simulated_devices(tmp_path):
    env = {**os.environ, "HERD_XLA_CACHE": ""}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    cmd = [sys.executable, "-m", "train.main", "plan", "--config=experiments/base.py:smoke", "--target=gpu:h100:16",
           "--format=json", "--config.mesh.rules=fsdp_tp", "--config.mesh.tensor=2", "--config.mesh.data=-1",
           "--config.train.batch_size=16", "--config.model.dtype=bfloat16", "--config.model.attention_impl=cudnn"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["target"]["devices"] == 16 and result["config"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 2}
    assert result["memory"]["source"].startswith("analytic") and result["memory"]["fits"]
    assert result["collectives"]
    assert any("attention_impl='cudnn' was traced as 'xla'" in note for note in result["notes"])  # no CPU kernel
    bad = subprocess.run(cmd[:5] + ["--target=gpu:h100:16", "--config.mesh.data=3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "mesh" in bad.stderr, bad.stderr[-2000:]


# ----------------------------------------------------------------------------- TPU compiles (libtpu)


@needs_libtpu
@pytest.mark.slow
def test_405b_on_too_few_v5p_chips_does_not_fit_by_the_tpu_compilers_count():
    from experiments import llama3_pretraining

    config = llama3_pretraining.get_config("size=405b")
    result = plan.plan(config, "tpu:v5p:4x4x8")  # 128 chips; the experiment plans for 1,024
    m = result["memory"]
    assert not m["fits"] and m["compiler_error"] and "RESOURCE_EXHAUSTED" in m["compiler_error"]
    assert m["shortfall"]["source"] == "TPU compiler" and m["shortfall"]["bytes"] > 0
    assert m["analytic"]["total"] > m["capacity"]  # the analytic model agrees
    assert "DOES NOT FIT" in plan.verdict_line(result)


@needs_libtpu
@pytest.mark.slow
def test_tpu_compiled_memory_agrees_with_the_analytic_model():
    # llama3_8b's layer shapes (2 of its 32 layers) at 4,096 tokens on a v5p-8 slice, fsdp.
    config = apply_overrides(_base(), {"model.variant": "llama3_8b", "model.n_layers": 2, "model.dtype": "bfloat16",
                                       "model.remat_policy": "full", "data.seq_len": 4096, "train.batch_size": 4,
                                       "mesh.data": 1, "mesh.fsdp": -1})
    result = plan.plan(config, "tpu:v5p:2x2x1")
    m = result["memory"]
    assert m["source"] == "compiled (TPU compiler)" and m["fits"]
    assert m["analytic"]["total"] == pytest.approx(m["compiled"]["peak"], rel=plan_memory.PEAK_TOLERANCE)
    assert result["flops"]["executed_vs_expected"] == pytest.approx(1.0, rel=1e-6)
    assert {r["axes"] for r in result["collectives"]} == {"fsdp"}
    assert math.isclose(result["target"]["peak_flops"], 459e12)
