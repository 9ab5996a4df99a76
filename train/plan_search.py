"""`herd plan --search`: the fastest layout that fits, or the smallest change that would make one fit.

Every combination of rule preset (dp, fsdp, fsdp_tp with tensor sizes 2..16), remat
policy and micro-batch count is first scored without compiling: the analytic memory
model (train/plan_memory.py) says whether it fits, and a device-free roofline (executed
FLOPs, and the bytes FSDP, tensor and data parallelism move per step) ranks the ones that
do. Only the best `COMPILE_BUDGET` are compiled for the target (train/plan.py); the fastest
compiled plan that fits wins. When none fits, the search doubles the device count until
the analytic model finds a layout that fits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections

from model import ModelConfig, axes, count_params
from model.config import REMAT_POLICIES
from train import hardware, optimizer as optimizer_lib, plan, plan_memory, plan_target
from train.config import apply_overrides, model_config
from train.mesh import data_parallel_size
from train.runtime import check
from train.state import abstract_state

COMPILE_BUDGET = 3  # compiles of a search; each is a full `herd plan` of one layout
TENSOR_SIZES = (2, 4, 8, 16)
MICROBATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_DOUBLINGS = 10  # the smallest change looks up to 1,024 times the devices


@dataclasses.dataclass
class Candidate:
    overrides: dict[str, Any]
    memory: float  # analytic bytes per device
    seconds: float  # device-free roofline step time

    def label(self) -> str:
        o = self.overrides
        mesh = f"{o['mesh.data']}/{o['mesh.fsdp']}/{o['mesh.tensor']}"
        return (f"rules={o['mesh.rules']} mesh(data/fsdp/tensor)={mesh} remat={o['model.remat_policy']} "
                f"microbatches={o['train.microbatches']}")


def layouts(n: int, cfg: ModelConfig) -> list[dict[str, Any]]:
    """Rule presets with their mesh on `n` devices: dp, fsdp, and fsdp_tp for each tensor size dividing the heads."""
    out = [{"mesh.rules": "dp", "mesh.data": n, "mesh.fsdp": 1, "mesh.tensor": 1},
           {"mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": n, "mesh.tensor": 1}]
    for t in TENSOR_SIZES:
        if t < n and n % t == 0 and cfg.n_heads % t == 0 and cfg.n_kv_heads % t == 0:
            out.append({"mesh.rules": "fsdp_tp", "mesh.data": 1, "mesh.fsdp": n // t, "mesh.tensor": t})
    return out


@functools.lru_cache(maxsize=None)
def _count_params(cfg: ModelConfig) -> int:
    return count_params(cfg)  # an abstract init: worth doing once per model, not once per layout


def comm_seconds(cfg: ModelConfig, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 rules: axes.Rules, chip: hardware.Chip) -> float:
    """Bytes each device sends per step for FSDP gathers and reduce-scatters, tensor-parallel all-reduces and
    data-parallel gradient all-reduces (ring algorithms), at the chip's interconnect bandwidth."""
    params = _count_params(cfg)
    p = 2 if cfg.dtype == "bfloat16" else 4
    m = config.train.microbatches
    t, _ = plan_memory.tensor_split(cfg, rules, mesh_shape)
    mapped = dict(rules)
    f = mesh_shape[axes.FSDP] if mapped.get(axes.EMBED) == axes.FSDP else 1
    dp = data_parallel_size(mesh_shape, rules)
    rows = config.train.batch_size / m / dp
    ring = lambda k: (k - 1) / k if k > 1 else 0.0  # noqa: E731
    wide = 2 * chip.link_bandwidth if chip.is_tpu else chip.network_bandwidth  # groups beyond one GPU node
    near = 2 * chip.link_bandwidth if chip.is_tpu else chip.link_bandwidth
    seconds = 0.0
    # FSDP: weights gathered for the forward and again for the backward, gradients reduce-scattered, per micro-batch.
    seconds += m * (2 * params * p / t + params * 4 / t) * ring(f) / (near if f <= chip.node_size else wide)
    # Data parallelism over what FSDP does not cover: the gradients all-reduced (dp rules: over every batch axis).
    replicas = dp // f
    seconds += m * 2 * params * 4 / (f * t) * ring(replicas) / (near if replicas <= chip.node_size else wide)
    # Megatron tensor parallelism: two all-reduces of the block's activations forward, two backward, two more
    # when remat recomputes the forward (arXiv:1909.08053 §3).
    per_layer = 4 + (2 if cfg.remat_policy == "full" else 0)
    seconds += m * per_layer * cfg.n_layers * 2 * rows * config.data.seq_len * cfg.d_model * p * ring(t) / near
    return seconds


def score(config: ml_collections.ConfigDict, overrides: dict[str, Any], chip: hardware.Chip, boxed: Any) -> Candidate:
    """The analytic memory and device-free roofline step time of `config` with `overrides` (already checked)."""
    cfg_c = apply_overrides(config, overrides)
    model_cfg = model_config(cfg_c)
    rules = axes.get_rules(cfg_c.mesh.rules)
    mesh_shape = {a: overrides[f"mesh.{a}"] for a in axes.MESH_AXES}
    est = plan_memory.estimate(model_cfg, cfg_c, mesh_shape, rules, boxed)
    tokens = cfg_c.train.batch_size * cfg_c.data.seq_len
    compute = (plan.expected_executed_flops_per_token(model_cfg, cfg_c.data.seq_len) * tokens
               / plan.compute_split(mesh_shape, rules) / chip.peak_flops)
    return Candidate(overrides, est.total, max(compute, comm_seconds(model_cfg, cfg_c, mesh_shape, rules, chip)))


def candidates(config: ml_collections.ConfigDict, n: int, chip: hardware.Chip, boxed: Any = None) -> list[Candidate]:
    """Every valid layout x remat policy x micro-batch count on `n` devices, scored, fastest first."""
    model_cfg = model_config(config)
    if boxed is None:  # shapes do not depend on the layout, the remat policy or the micro-batches
        boxed = abstract_state(model_cfg, optimizer_lib.build_optimizer(config, model_cfg)[0])
    batch = config.train.batch_size
    out = []
    for layout in layouts(n, model_cfg):
        try:  # every field check of `herd train`, once per layout (micro-batches are checked below, as it does)
            check(apply_overrides(config, {**layout, "train.microbatches": 1}), model_cfg, n)
        except ValueError:
            continue
        dp = data_parallel_size({a: layout[f"mesh.{a}"] for a in axes.MESH_AXES}, axes.get_rules(layout["mesh.rules"]))
        for micro in (m for m in MICROBATCHES if batch % m == 0 and (batch // m) % dp == 0):
            for remat in REMAT_POLICIES:
                out.append(score(config, {**layout, "model.remat_policy": remat, "train.microbatches": micro}, chip,
                                 boxed))
    return sorted(out, key=lambda c: c.seconds)


def search(config: ml_collections.ConfigDict, target_spec: str, budget: int = COMPILE_BUDGET) -> dict[str, Any]:
    """Compiles the most promising layouts for the target; returns the fastest that fits (or why none does)."""
    kind, chip_name, _, count = plan_target.parse_target(target_spec)
    chip = hardware.get_chip(chip_name) if kind != "cpu" else plan_target.resolve(target_spec)[0].chip
    n = count or plan_target.resolve(target_spec)[0].n_devices
    ranked = candidates(config, n, chip)
    fitting = [c for c in ranked if c.memory <= chip.hbm_bytes]
    tried: list[dict[str, Any]] = []
    best = None
    for cand in fitting[:budget]:
        try:
            result = plan.plan(apply_overrides(config, cand.overrides), target_spec)
        except ValueError as e:  # e.g. a mesh the torus cannot hold
            tried.append({"layout": cand.label(), "error": str(e)})
            continue
        tried.append({"layout": cand.label(), "fits": result["memory"]["fits"], "peak": result["memory"]["peak"],
                      "step_s": result["roofline"]["step_s"], "mfu": result["roofline"]["mfu"]})
        if result["memory"]["fits"] and (best is None or result["roofline"]["step_s"] < best["roofline"]["step_s"]):
            best = result
    out: dict[str, Any] = {"search": {"candidates": len(ranked), "analytic_fits": len(fitting), "compiled": tried,
                                      "budget": budget}, "best": best, "change": None}
    if best is None:
        out["change"] = smallest_change(config, n, chip, ranked)
    return out


def smallest_change(config: ml_collections.ConfigDict, n: int, chip: hardware.Chip,
                    ranked: list[Candidate]) -> dict[str, Any]:
    """The least memory any layout needs here, and the fewest devices (doubling) on which one would fit."""
    closest = min(ranked, key=lambda c: c.memory) if ranked else None
    change: dict[str, Any] = {"closest": closest.label() if closest else None,
                              "closest_bytes": closest.memory if closest else None,
                              "shortfall_bytes": closest.memory - chip.hbm_bytes if closest else None}
    model_cfg = model_config(config)
    boxed = abstract_state(model_cfg, optimizer_lib.build_optimizer(config, model_cfg)[0])
    for k in range(1, MAX_DOUBLINGS + 1):
        more = candidates(config, n * 2**k, chip, boxed)
        # With the analytic model's tolerance to spare: a suggestion should not be a coin toss.
        fit = [c for c in more if c.memory * (1 + plan_memory.PEAK_TOLERANCE) <= chip.hbm_bytes]
        if fit:
            change.update(devices=n * 2**k, layout=fit[0].label(), bytes=fit[0].memory)
            break
    return change


def format_any(result: dict[str, Any]) -> str:
    """The text report of a plan or of a search."""
    if "search" not in result:
        return plan.format_text(result)
    s = result["search"]
    lines = [f"searched {s['candidates']} layouts analytically; {s['analytic_fits']} fit by the analytic model"
             + (f"; compiled the {len(s['compiled'])} fastest of those:" if s["compiled"] else "")]
    for t in s["compiled"]:
        if "error" in t:
            lines.append(f"  {t['layout']}: {t['error']}")
        else:
            lines.append(f"  {t['layout']}: {'fits' if t['fits'] else 'does not fit'}, "
                         f"{plan._gib(t['peak'])}, step {t['step_s']:.3f} s, MFU {100 * (t['mfu'] or 0):.1f} %")
    if result["best"] is not None:
        return "\n".join(lines + ["", "fastest plan that fits:", plan.format_text(result["best"])])
    c = result["change"]
    lines.append("")
    if c.get("closest"):
        lines.append(f"nothing fits: the least memory is {plan._gib(c['closest_bytes'])} per device "
                     f"({plan._gib(c['shortfall_bytes'])} over capacity) with {c['closest']}")
    if c.get("devices"):
        lines.append(f"smallest change: {c['devices']} devices, where {c['layout']} needs {plan._gib(c['bytes'])} "
                     f"by the analytic model ({plan_memory.PEAK_TOLERANCE:.0%} below capacity, its tolerance)")
    else:
        lines.append(f"smallest change: none found up to {2 ** MAX_DOUBLINGS}x the devices; shrink the sequence "
                     "(one sequence per device must fit) or the model")
    return "\n".join(lines)
