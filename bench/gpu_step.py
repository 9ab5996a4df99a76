"""One GPU against `herd plan`: a Llama 3 8B-shaped layer stack's measured train step beside the plan's prediction.

The model is llama3_8b at full width (d_model 4,096, 32 query and 8 kv heads of 128, d_ff 14,336,
vocabulary 128,256, arXiv:2407.21783 Table 3) with `--layers` layers (default 4: with float32
parameters and AdamW moments the whole model must fit one device), bfloat16 compute, sequences
of `--seq_len` tokens and cuDNN's fused attention (`model.attention_impl=cudnn`, jax's
`jax.nn.dot_product_attention`). Two measurements of the same config:

  plan      train.plan.plan(config, --target): the step compiled for the target's sharding, the
            analytic memory model, the roofline step time and MFU (README, "Planning a big run")
  measured  herd's jitted train step (`Runtime.train_step`, state donated) on this machine's first
            device on synthetic tokens: compile, `--warmup` steps, then the median of `--rounds`
            rounds of `--steps` steps; tokens/s, MFU (model FLOPs per token, model/flops.py,
            against the chip's bf16 peak from train/hardware.py), peak device memory
            (`memory_stats()["peak_bytes_in_use"]`)

and their ratios. Issue 16's targets: MFU >= 50 %, predicted step time within 25 % of measured.

    python bench/gpu_step.py                      # on a machine with an NVIDIA GPU (jax[cuda] installed)
    python bench/gpu_step.py --smoke              # any CPU, in a minute: a small shape, xla attention

The last stdout line is one JSON object with every figure; `--out FILE` appends it to FILE.
"""

from __future__ import annotations

import os
import sys

# The plan compiles on (simulated) CPU devices beside the GPU the step is measured on.
if "--smoke" not in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")

import common  # noqa: E402  (environment and sys.path)

import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from model import flops_per_token  # noqa: E402
from train import hardware  # noqa: E402
from train.config import apply_overrides  # noqa: E402
from train.plan import plan  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "Decoder layers of the 8B-wide stack.")
flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence (Llama 3's pre-training length).")
flags.DEFINE_integer("batch", 2, "Sequences per step.")
flags.DEFINE_string("attention", "cudnn", "model.attention_impl: cudnn (GPU), xla or herd.")
flags.DEFINE_string("remat", "none", "model.remat_policy.")
flags.DEFINE_string("target", "gpu:h200:1", "herd plan's --target for the prediction.")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds; the median counts.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after the compiling one.")
flags.DEFINE_bool("smoke", False, "A small model on CPU with xla attention: checks this script, measures nothing.")
flags.DEFINE_string("out", None, "Also append the JSON result line to this file.")


def bench_config() -> Any:
    from experiments import llama3_pretraining

    overrides: dict[str, Any] = {
        "model.n_layers": FLAGS.layers, "model.attention_impl": FLAGS.attention, "model.remat_policy": FLAGS.remat,
        "data.seq_len": FLAGS.seq_len, "train.batch_size": FLAGS.batch, "train.microbatches": 1,
        "mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
    }
    if FLAGS.smoke:
        overrides.update({"model.d_model": 256, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 512,
                          "model.vocab_size": 1024, "model.n_layers": 2, "model.attention_impl": "xla",
                          "data.seq_len": 256, "train.batch_size": 2})
    config = llama3_pretraining.get_config("size=8b")
    config = common.single_device_synthetic(apply_overrides(config, overrides))
    return config


def main(argv: list[str]) -> None:
    del argv
    config = bench_config()
    device = jax.devices()[0]
    target = "cpu:1" if FLAGS.smoke else FLAGS.target
    predicted = plan(config, target)
    print(f"plan for {target}: step {predicted['roofline']['step_s']:.4f} s ({predicted['roofline']['bound']}-bound), "
          f"MFU {predicted['roofline']['mfu']:.1%}, peak memory {predicted['memory']['peak'] / 2**30:.2f} GiB")

    stepper = common.Stepper(config, [device])
    cfg = stepper.model_cfg
    t0 = time.perf_counter()
    stepper.step()
    stepper.sync()
    compile_s = time.perf_counter() - t0
    stepper.run(FLAGS.warmup)
    seconds = statistics.median(stepper.run(FLAGS.steps) for _ in range(FLAGS.rounds))
    tokens = config.train.batch_size * config.data.seq_len
    model_flops = flops_per_token(cfg, config.data.seq_len) * tokens
    peak = hardware.peak_flops_per_device(device)
    stats = device.memory_stats() or {}
    measured = {"step_s": seconds, "tokens_per_s": tokens / seconds, "mfu": model_flops / (seconds * peak),
                "peak_memory_bytes": stats.get("peak_bytes_in_use"), "compile_s": compile_s,
                "loss": stepper.loss()}
    print(f"measured on {device.device_kind}: step {seconds:.4f} s, {tokens / seconds:,.0f} tokens/s, "
          f"MFU {measured['mfu']:.1%} of {peak / 1e12:.3g} TFLOP/s")
    ratios = {"step_predicted_over_measured": predicted["roofline"]["step_s"] / seconds,
              "memory_predicted_over_measured": (predicted["memory"]["peak"] / measured["peak_memory_bytes"]
                                                 if measured["peak_memory_bytes"] else None)}
    common.emit(common.record(
        "gpu_step", device=device.device_kind, target=target, layers=cfg.n_layers, seq_len=config.data.seq_len,
        batch=config.train.batch_size, attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy,
        measured=measured, plan={"roofline": predicted["roofline"], "memory": predicted["memory"],
                                 "notes": predicted["notes"]}, ratios=ratios), FLAGS.out)


if __name__ == "__main__":
    app.run(main)
