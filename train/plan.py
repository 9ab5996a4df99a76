"""`herd plan`: will this model, mesh and batch fit on a target, and how fast will a step run.

The exact step `herd train` runs (`Runtime.lower_train_step`, abstract state, nothing
allocated) is lowered and compiled for the target's devices (train/plan_target.py), then:

- memory per device: the compiled executable's memory analysis (the TPU compiler's own,
  including its out-of-memory verdict; on simulated GPUs only indicative) beside the
  analytic model of train/plan_memory.py, against the chip's capacity: fits or not, by how much;
- FLOPs: every dot of the step's unoptimised HLO weighted by its loops' trip counts
  (train/hlo_stats.py; XLA's cost analysis counts a scanned layer once), checked against
  the analytic count of what the step executes (6N + full attention + remat recomputation);
  `model.flops_per_token` (causal attention, no recomputation) stays the MFU numerator;
- collectives of the compiled HLO: count and bytes per step, per mesh axis;
- a roofline step time: compute at the chip's peak, memory traffic at its HBM bandwidth,
  collectives at its interconnect bandwidth (train/hardware.py cites each figure).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from model import ModelConfig, axes, count_params, flops_per_token
from model.flops import matmul_params
from train import hlo_stats, plan_memory, plan_target
from train.config import apply_overrides, model_config
from train.runtime import Runtime, check
from train.state import abstract_state

GiB = 2**30


def expected_executed_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs per token the step really executes: 6N, attention over every key, remat's recomputation.

    Unlike `flops_per_token` (the MFU convention) the masked half of the T x S scores is
    computed too, and remat recomputes the blocks' forward matmuls (`full`) or the attention
    matmuls alone (`save_dots_no_batch`) once more.
    """
    attention_fwd = 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
    # The MLP's down projection is not recomputed: the backward pass never needs its output.
    block_fwd = 2 * (matmul_params(cfg) - cfg.d_model * cfg.vocab_size - cfg.n_layers * cfg.d_ff * cfg.d_model)
    recompute = {"none": 0.0, "save_dots": 0.0, "save_dots_no_batch": attention_fwd,
                 "full": attention_fwd + block_fwd}[cfg.remat_policy]
    return 6.0 * matmul_params(cfg) + 3 * attention_fwd + recompute


def compute_split(mesh_shape: dict[str, int], rules: axes.Rules) -> int:
    """Over how many devices the step's matmuls are divided: the batch axes, and `tensor` if heads use it."""
    from train.mesh import data_parallel_size

    t = mesh_shape.get(axes.TENSOR, 1) if dict(rules).get(axes.HEADS) == axes.TENSOR else 1
    return data_parallel_size(mesh_shape, rules) * t


def _axes_of(group: list[int], mesh: jax.sharding.Mesh) -> str:
    """The mesh axes a replica group spans ('data+fsdp'), 'partial:...' if it covers them only in part."""
    shape = mesh.devices.shape
    if not group:
        spanned = [a for a, s in zip(mesh.axis_names, shape) if s > 1]
        return "+".join(spanned) or "none"
    coords = np.array(np.unravel_index(np.array(group), shape)).T
    varying = [i for i in range(len(shape)) if len(set(coords[:, i])) > 1]
    label = "+".join(mesh.axis_names[i] for i in varying) or "none"
    return label if math.prod(shape[i] for i in varying) == len(set(group)) else f"partial:{label}"


def _bandwidth(c: hlo_stats.Collective, mesh: jax.sharding.Mesh, target: plan_target.Target) -> float:
    """Bytes/s one device sends for this collective: ICI links of the torus axes it spans, NVLink or network."""
    chip = target.chip
    flat = list(mesh.devices.flat)
    ids = c.group or list(range(len(flat)))
    members = [flat[i] for i in ids if i < len(flat)]
    if chip.is_tpu:
        # A ring over one torus axis uses that axis's two links (both directions); a permute uses one.
        links = 1 if c.kind == "collective-permute" else 2 * plan_target.physical_axes_spanned(members)
        return links * chip.link_bandwidth
    nodes = {d.id // chip.node_size for d in members}
    return chip.link_bandwidth if len(nodes) <= 1 else chip.network_bandwidth


def collective_table(text: str, mesh: jax.sharding.Mesh, target: plan_target.Target) -> tuple[list[dict], list[str]]:
    """Collectives per (kind, mesh axes): count, bytes and predicted seconds per step, per device."""
    items, unread = hlo_stats.collectives(text)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for c in items:
        axes_label = "unknown" if c.name in unread else _axes_of(c.group, mesh)
        row = rows.setdefault((c.kind, axes_label), {"kind": c.kind, "axes": axes_label, "count": 0.0, "bytes": 0.0,
                                                     "wire_bytes": 0.0, "seconds": 0.0})
        row["count"] += c.count
        row["bytes"] += c.count * c.operand_bytes
        row["wire_bytes"] += c.count * c.wire_bytes()
        row["seconds"] += c.count * c.wire_bytes() / _bandwidth(c, mesh, target)
    return sorted(rows.values(), key=lambda r: -r["seconds"]), unread


def _compile(lowered: jax.stages.Lowered, target: plan_target.Target) -> tuple[Any, str | None]:
    """(the compiled executable or None, the compiler's out-of-memory message or None)."""
    options = {}
    if target.kind != "tpu":
        # Nothing will run: skip LLVM's optimisation of the CPU code (buffer sizes do not depend on it).
        options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    try:
        return lowered.compile(compiler_options=options or None), None
    except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED is the TPU compiler's "does not fit"
        text = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return None, text[:600]
        raise


def _compiled_memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    get = lambda name: float(getattr(m, name, 0) or 0)  # noqa: E731
    out = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
           "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
           "code": get("generated_code_size_in_bytes")}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def plan(config: ml_collections.ConfigDict, target_spec: str) -> dict[str, Any]:
    """Compiles the train step of `config` for `target_spec` and returns the plan (JSON-ready)."""
    started = time.perf_counter()
    kind, _, _, count = plan_target.parse_target(target_spec)
    model_cfg = model_config(config)
    traced_as_xla = model_cfg.attention_impl == "cudnn"
    if traced_as_xla:  # cuDNN's kernel has no CPU lowering: plan jax's portable form of the same attention
        if kind != "gpu":
            raise ValueError(f"model.attention_impl='cudnn' runs on NVIDIA GPUs only, not on --target={target_spec}")
        config = apply_overrides(config, {"model.attention_impl": "xla"})
        model_cfg = model_config(config)
    check(config, model_cfg, count or len(jax.devices("cpu")))  # every field error before libtpu or a compile
    target, devices = plan_target.resolve(target_spec)
    try:
        runtime = Runtime(config, model_cfg, devices)
    except NotImplementedError as e:  # jax.make_mesh cannot lay this mesh onto the torus
        from train.mesh import mesh_shape

        raise plan_target.mesh_error_hint(e, target_spec, mesh_shape(config.mesh, len(devices))) from None
    mesh_shape = dict(runtime.mesh.shape)
    lowered = runtime.lower_train_step()
    lowered_s = time.perf_counter() - started
    hlo_flops, unknown_loops = hlo_stats.matmul_flops(lowered.as_text(dialect="hlo"))
    compiled, oom = _compile(lowered, target)
    compile_s = time.perf_counter() - started - lowered_s

    estimate = plan_memory.estimate(model_cfg, config, mesh_shape, runtime.rules,
                                    abstract_state(model_cfg, runtime.tx))
    tokens = config.train.batch_size * config.data.seq_len
    split = compute_split(mesh_shape, runtime.rules)
    executed = hlo_flops / split
    expected = expected_executed_flops_per_token(model_cfg, config.data.seq_len) * tokens / split
    model_flops = flops_per_token(model_cfg, config.data.seq_len) * tokens
    chip = target.chip
    notes: list[str] = []
    tensor_parallel = split > plan_memory.data_parallel_size(mesh_shape, runtime.rules)
    if target.kind != "cpu" and model_cfg.dtype != "float32" and (
            tensor_parallel or model_cfg.remat_policy.startswith("save_dots")):
        notes.append(f"traced on a CPU host, model/layers.einsum takes its CPU path for {model_cfg.dtype} dots (a "
                     "custom VJP accumulating in float32): tensor-parallel all-reduces here are float32 where the "
                     f"target's would be {model_cfg.dtype} (half the bytes), and save_dots policies recompute dots "
                     "the target would keep")
    if target.kind == "cpu" and target.n_devices > 1:
        notes.append(f"the {target.n_devices} simulated devices share this host: the roofline is that of "
                     f"{target.n_devices} such CPUs")
    if traced_as_xla:
        notes.append("model.attention_impl='cudnn' was traced as 'xla' (the same function): the compiled step "
                     "materialises the attention scores that cuDNN's fused kernel keeps on chip, so memory traffic "
                     "and temporaries here are upper bounds")
    if unknown_loops:
        notes.append(f"{len(unknown_loops)} loop(s) with an unreadable trip count were counted once")

    memory: dict[str, Any] = {"analytic": estimate.as_dict(), "capacity": chip.hbm_bytes, "compiled": None,
                              "compiler_error": oom}
    collectives_rows: list[dict] = []
    memory_traffic = None
    xla_cost: dict[str, float] = {}
    if compiled is not None:
        memory["compiled"] = _compiled_memory(compiled)
        text = compiled.as_text()
        collectives_rows, unread = collective_table(text, runtime.mesh, target)
        if unread:
            notes.append(f"{len(unread)} collective(s) with unreadable replica groups are listed under 'unknown'")
        memory_traffic = hlo_stats.memory_bytes(text)
        xla_cost = hlo_stats.cost_analysis_dict(compiled.cost_analysis())
    if target.memory_compiled:
        memory["source"] = "compiled" + (" (TPU compiler)" if target.kind == "tpu" else "")
        if oom is not None:
            peak, fits = None, False
        else:
            peak = memory["compiled"]["peak"]
            fits = target.kind == "tpu" or peak <= chip.hbm_bytes  # the TPU compiler fails when it does not fit
    else:
        memory["source"] = "analytic (the step was compiled on simulated CPU devices for its sharding only)"
        peak = estimate.total
        fits = peak <= chip.hbm_bytes
    # An analytic verdict within the model's tolerance of the capacity could go either way.
    uncertain = not target.memory_compiled and abs(estimate.total - chip.hbm_bytes) < \
        plan_memory.PEAK_TOLERANCE * chip.hbm_bytes
    memory.update(peak=peak, fits=fits, uncertain=uncertain, headroom=None if peak is None else chip.hbm_bytes - peak)
    if oom is not None:
        memory["shortfall"] = _shortfall_from_message(oom, chip.hbm_bytes, estimate.total)

    t_compute = executed / chip.peak_flops
    t_memory = (memory_traffic or 0.0) / chip.hbm_bandwidth
    t_comm = sum(r["seconds"] for r in collectives_rows)
    parts = {"compute": t_compute, "memory": t_memory, "collectives": t_comm}
    step = max(parts.values())
    roofline = {"compute_s": t_compute, "memory_s": t_memory, "collective_s": t_comm, "step_s": step,
                "serial_s": sum(parts.values()), "bound": max(parts, key=parts.get),
                "mfu": model_flops / (target.n_devices * chip.peak_flops * step) if step else None,
                "mfu_serial": model_flops / (target.n_devices * chip.peak_flops * sum(parts.values()))
                if step else None,
                "tokens_per_s": tokens / step if step else None}
    return {
        "target": target.as_dict(),
        "config": {"variant": config.model.variant, "params": count_params(model_cfg), "mesh": mesh_shape,
                   "rules": config.mesh.rules, "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
                   "microbatches": config.train.microbatches, "remat_policy": model_cfg.remat_policy,
                   "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype, "optimizer": config.optimizer.name,
                   "vocab_size": model_cfg.vocab_size},
        "seconds": {"lower": lowered_s, "compile": compile_s, "total": time.perf_counter() - started},
        "memory": memory,
        "flops": {"model_per_token": model_flops / tokens, "model_per_step": model_flops,
                  "executed_per_device": executed, "expected_executed_per_device": expected,
                  "executed_vs_expected": executed / expected if expected else None, "compute_split": split,
                  "xla_cost_analysis_per_device": xla_cost.get("flops")},
        "memory_traffic_per_device": memory_traffic,
        "collectives": collectives_rows,
        "roofline": roofline,
        "notes": notes,
    }


def _shortfall_from_message(message: str, capacity: float, analytic: float) -> dict[str, Any]:
    """The TPU compiler's 'required (X G) exceeds available (Y G)' as bytes, else the analytic shortfall."""
    import re

    m = re.search(r"\(([\d.]+)([GMK])\)[^()]*exceeds[^()]*\(([\d.]+)([GMK])\)", message)
    if m:
        unit = {"G": 2**30, "M": 2**20, "K": 2**10}
        required, available = float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]
        return {"required": required, "available": available, "bytes": required - available, "source": "TPU compiler"}
    return {"required": analytic, "available": capacity, "bytes": analytic - capacity, "source": "analytic"}


# ----------------------------------------------------------------------------- the report


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:,.2f} GiB"


def _time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1e3:.3f} ms"


def _count(x: float) -> str:
    return f"{x / 1e9:,.2f}B" if x >= 1e9 else f"{x / 1e6:,.2f}M"


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}{unit}"
    return f"{x:,.2f} {unit}"


def verdict_line(result: dict[str, Any]) -> str:
    """FITS / DOES NOT FIT, by how much, and whose figure it is."""
    m = result["memory"]
    capacity = m["capacity"]
    if m["fits"]:
        line = f"FITS: {_gib(m['peak'])} of {_gib(capacity)} per device ({_gib(m['headroom'])} free)"
        if m["peak"] > 0.97 * capacity and result["target"]["kind"] == "tpu":
            line += "; at the limit: the TPU compiler rematerialised to fit, expect extra recomputation"
        if m.get("uncertain"):
            line = "PROBABLY " + line + f"; within the analytic model's {plan_memory.PEAK_TOLERANCE:.0%} tolerance"
        return line + f" [{m['source']}]"
    if m.get("shortfall"):
        s = m["shortfall"]
        return (f"DOES NOT FIT: needs {_gib(s['required'])}, {_gib(s['bytes'])} more than the {_gib(s['available'])} "
                f"available per device [{s['source']}]")
    maybe = f"; within the analytic model's {plan_memory.PEAK_TOLERANCE:.0%} tolerance" if m.get("uncertain") else ""
    return (f"{'PROBABLY ' if maybe else ''}DOES NOT FIT: needs {_gib(m['peak'])}, {_gib(-m['headroom'])} more than "
            f"{_gib(capacity)}{maybe} [{m['source']}]")


def format_text(result: dict[str, Any]) -> str:
    """The plan as a terminal report."""
    t, c, m, f, r = result["target"], result["config"], result["memory"], result["flops"], result["roofline"]
    mesh = " ".join(f"{k}={v}" for k, v in c["mesh"].items())
    lines = [
        f"herd plan: {c['variant']} ({_count(c['params'])} parameters) on {t['spec']}: {t['devices']} x {t['chip']} "
        f"({_si(t['peak_flops'], 'FLOP/s')} peak, {_gib(t['hbm_bytes'])} at {_si(t['hbm_bandwidth'], 'B/s')}; "
        f"{t['source']})",
        f"  mesh {mesh}, rules {c['rules']}; batch {c['batch_size']} x {c['seq_len']} tokens in {c['microbatches']} "
        f"micro-batch(es); remat {c['remat_policy']}; {c['dtype']} compute, {c['param_dtype']} parameters, "
        f"{c['optimizer']}; vocabulary {c['vocab_size']:,}",
        f"  compiled in {result['seconds']['total']:.0f} s (lowering {result['seconds']['lower']:.0f} s)",
        "",
        f"memory per device            {'compiled':>14}  {'analytic':>14}",
    ]
    a, comp = m["analytic"], m["compiled"] or {}
    rows = [("parameters", None, a["parameters"]), ("optimizer state", None, a["optimizer_state"]),
            ("arguments (state + batch)", comp.get("arguments"), a["parameters"] + a["optimizer_state"] + a["batch"]),
            ("gradients + temporaries", comp.get("temporaries"), a["gradients"] + a["activations"] + a["working_set"]),
            ("  of which activations", None, a["activations"]),
            ("outputs (not aliased)", comp["outputs"] - comp["aliased"] if comp else None, None),
            ("program", comp.get("code"), None),
            ("total", comp.get("peak"), a["total"])]
    for name, x, y in rows:
        lines.append(f"  {name:<26} {_gib(x) if x is not None else '':>14}  {_gib(y) if y is not None else '':>14}")
    lines += [f"  capacity {_gib(m['capacity'])}", f"  {verdict_line(result)}"]
    if m["compiler_error"]:
        lines.append(f"  compiler: {m['compiler_error'][:300]}")
    lines += [
        "",
        "FLOPs",
        f"  model (6N + causal attention, the MFU numerator): {_si(f['model_per_token'], 'FLOP')}/token, "
        f"{_si(f['model_per_step'], 'FLOP')}/step",
        f"  executed per device (HLO dots x loop trip counts): {_si(f['executed_per_device'], 'FLOP')}/step, "
        f"{f['executed_vs_expected']:.3f} x the analytic count (full attention + remat recomputation)",
        "  XLA cost analysis (counts each scanned layer once, not used): "
        f"{_si(f['xla_cost_analysis_per_device'], 'FLOP')}",
        "",
        "collectives per step, per device      count        bytes    seconds",
    ]
    for row in result["collectives"] or [{"kind": "(none compiled)", "axes": "", "count": 0, "bytes": 0, "seconds": 0}]:
        lines.append(f"  {row['kind'] + ' ' + row['axes']:<34} {row['count']:>8,.0f} {_si(row['bytes'], 'B'):>12} "
                     f"{row['seconds']:>10.4f}")
    if m["compiled"] is None:
        return "\n".join(lines + ["", f"roofline: no executable to time; its matmuls alone would take "
                                       f"{r['compute_s']:.3f} s per step"] + [f"note: {n}" for n in result["notes"]])
    lines += [
        "",
        f"roofline step time: {_time(r['step_s'])} ({r['bound']}-bound; compute {_time(r['compute_s'])}, "
        f"HBM traffic {_time(r['memory_s'])} for {_si(result['memory_traffic_per_device'], 'B')}, "
        f"collectives {_time(r['collective_s'])}; without overlap {_time(r['serial_s'])})",
        f"  predicted MFU {100 * (r['mfu'] or 0):.1f} % ({100 * (r['mfu_serial'] or 0):.1f} % without overlap), "
        f"{_si(r['tokens_per_s'], 'tokens/s')}",
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
