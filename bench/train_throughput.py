"""Training throughput on CPU: herd's jitted train step against transformers + torch, in the same run.

Both sides train the *same* model (our initial parameters, exported with
`model.hf.save` and loaded by `transformers.LlamaForCausalLM`) on the same
batch, with the same AdamW hyperparameters, weight-decay groups and
global-norm clipping:

  herd       `Runtime(config, model_cfg, jax.devices()[:1]).train_step` (jitted, state donated)
  reference  model.train(); loss = model(input_ids, labels=..., shift_labels=targets).loss;
             loss.backward(); clip_grad_norm_(1.0); AdamW.step(); zero_grad(set_to_none=True)

Each precision warms both up (our compile and the first steps are excluded),
then times `--rounds` rounds of `--steps` steps of each, alternating which goes
first, and reports the median round. bfloat16 is our `model.dtype=bfloat16`
(float32 parameters and optimizer state; float32 norms, softmax and logits)
against `torch.autocast("cpu", dtype=torch.bfloat16)` around the reference's
forward. torch gets as many intra-op threads as CPUs this process may use; XLA
uses all of them by default (the reported CPU seconds per wall second show it).
MFU = flops_per_token(cfg, seq_len) * tokens/s / peak, where the peak is a
float32 1024^3 matmul measured in this run (train.hardware.measure_matmul_flops,
best of two); bfloat16 MFU uses the same float32 peak.

    python bench/train_throughput.py                 # the shape flags' model (d_model 256, 4 layers)
    python bench/train_throughput.py --config=experiments/shakespeare.py
    python bench/train_throughput.py --config.model.scan_layers=False --dtypes=float32

Like the `herd` CLI on CPU, it restarts itself with glibc's malloc tuned
(`--malloc=system` keeps the defaults, for both sides). See bench/README.md.
The last stdout line is one JSON object with every figure; `--out FILE` appends it to FILE.
"""

from __future__ import annotations

import common  # noqa: F401  (first: environment and sys.path)

import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model import flops_per_token  # noqa: E402
from model import hf as hf_lib  # noqa: E402
from train import hardware, metrics  # noqa: E402
from train.config import apply_overrides  # noqa: E402

FLAGS = flags.FLAGS
common.define_experiment_flag(
    str(common.ROOT / "experiments" / "base.py"),
    "Experiment whose model shape, seq_len and batch size to measure, e.g. experiments/shakespeare.py. Without "
    "it the shape flags below apply; --config.model.<field>=... (scan_layers, remat_policy, ...) works either way.",
)
# A small Llama 3 architecture model, the shape the figures in bench/README.md were first recorded at.
SHAPE_FLAGS = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, vocab=2048, seq_len=256, batch=8)
for _name, _default in SHAPE_FLAGS.items():
    flags.DEFINE_integer(_name, _default, "Model / batch shape when --config is not given.")
flags.DEFINE_bool("tie_embeddings", False, "Tie the output head to the embedding (without --config).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure (float32, bfloat16).")
flags.DEFINE_integer("steps", 10, "Timed steps per round, per side.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per side; the median round counts.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per side after the first (our compile) step.")
flags.DEFINE_integer("threads", None, "torch intra-op threads; default: the CPUs this process may run on.")
flags.DEFINE_enum("reference_attn", "auto", ["auto", "sdpa", "eager"],
                  "transformers attention; auto times both for --probe_steps per dtype and keeps the faster.")
flags.DEFINE_integer("probe_steps", 2, "Steps per attention implementation with --reference_attn=auto.")
flags.DEFINE_enum("malloc", "tuned", ["tuned", "system"],
                  "tuned: restart with train.malloc.MALLOC_TUNABLES, as the herd CLI does on CPU (both sides); "
                  "system: glibc's defaults.")
flags.DEFINE_string("out", None, "Also append the JSON result line to this file.")


# ----------------------------------------------------------------------------- configuration


def bench_config(config: ml_collections.ConfigDict, from_experiment: bool) -> ml_collections.ConfigDict:
    """The experiment config adjusted for a one-device, synthetic-data measurement."""
    shape_keys = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
                  "model.vocab_size", "model.tie_embeddings", "data.seq_len", "train.batch_size")
    if not from_experiment:
        # The shape comes from the shape flags; refuse --config.<shape key> overrides that would be lost.
        lost = [k for k in shape_keys if common.overridden(k)]
        if lost:
            raise app.UsageError(f"--config.{lost[0]} needs --config=experiments/<name>.py; use the shape flags")
        config = apply_overrides(config, {
            "model.d_model": FLAGS.d_model, "model.n_layers": FLAGS.n_layers, "model.n_heads": FLAGS.n_heads,
            "model.n_kv_heads": FLAGS.n_kv_heads, "model.d_ff": FLAGS.d_ff, "model.vocab_size": FLAGS.vocab,
            "model.tie_embeddings": FLAGS.tie_embeddings, "data.seq_len": FLAGS.seq_len,
            "train.batch_size": FLAGS.batch})
    else:
        given = [n for n in (*SHAPE_FLAGS, "tie_embeddings") if FLAGS[n].present]
        if given:
            raise app.UsageError(
                f"--{given[0]} cannot be combined with --config; override the experiment instead, "
                "e.g. --config.model.d_model=... --config.data.seq_len=... --config.train.batch_size=..."
            )
    overrides: dict[str, Any] = {
        "train.microbatches": 1,  # one pass over the batch, as the reference does
        "model.param_dtype": "float32",  # float32 master weights on both sides
    }
    if config.model.max_seq_len is None:
        overrides["model.max_seq_len"] = max(config.data.seq_len, 512)
    return common.single_device_synthetic(apply_overrides(config, overrides))


# ----------------------------------------------------------------------------- the two sides


class Ours(common.Stepper):
    """herd's jitted train step on one CPU device, at compute dtype `dtype`."""

    def __init__(self, config: ml_collections.ConfigDict, dtype: str):
        super().__init__(apply_overrides(config, {"model.dtype": dtype}), jax.devices()[:1])


class Reference:
    """transformers LlamaForCausalLM + torch.optim.AdamW with our optimizer's hyperparameters."""

    def __init__(self, ckpt: str, c: ml_collections.ConfigDict, batch: dict[str, np.ndarray], dtype: str,
                 attn: str):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.model = transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation=attn,
                                                                   dtype=torch.float32)
        self.model.train()
        oc = c.optimizer
        # Our weight-decay mask: matrices always, norm scales and the input embedding only when configured.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            skip = (p.ndim == 1 and not oc.decay_norms) or (name.endswith("embed_tokens.weight")
                                                             and not oc.decay_embeddings)
            (no_decay if skip else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps)
        self.clip = float(oc.grad_clip)
        self.input_ids = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
        self.targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
        self.autocast = dtype == "bfloat16"
        self.last_loss: Any = None

    def step(self) -> None:
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            # `labels` switches the loss on; `shift_labels` are our targets, so both sides fit the same tokens.
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids, shift_labels=self.targets).loss
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def sync(self) -> None:
        pass  # eager and synchronous on CPU

    def loss(self) -> float:
        return float(self.last_loss)


def timed(side: Any, steps: int) -> dict[str, float]:
    """Per step: wall seconds, user and system CPU seconds, minor page faults (whole process)."""
    side.sync()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        side.step()
    side.sync()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": wall / steps, "user": (r1.ru_utime - r0.ru_utime) / steps,
            "sys": (r1.ru_stime - r0.ru_stime) / steps, "minflt": (r1.ru_minflt - r0.ru_minflt) / steps}


def run_dtype(config: ml_collections.ConfigDict, dtype: str) -> dict[str, Any]:
    """Builds both sides for one compute dtype, checks they agree, and times them in alternating rounds."""
    t0 = time.perf_counter()
    ours = Ours(config, dtype)
    cfg, c = ours.model_cfg, ours.runtime.config
    with tempfile.TemporaryDirectory() as ckpt:
        hf_lib.save(cfg.replace(dtype="float32"), jax.device_get(ours.state.params), ckpt)
        ours.step()  # compile; its loss is on the initial parameters, as is the reference's first
        ours_loss0, compile_s = ours.loss(), time.perf_counter() - t0
        attns = ["sdpa", "eager"] if FLAGS.reference_attn == "auto" else [FLAGS.reference_attn]
        probes: dict[str, float] = {}
        candidates: dict[str, tuple[Reference, float]] = {}
        for attn in attns:
            candidate = Reference(ckpt, c, ours.local_batch, dtype, attn)
            candidate.step()
            candidates[attn] = (candidate, candidate.loss())
            if len(attns) > 1:
                probes[attn] = timed(candidate, FLAGS.probe_steps)["wall"]
    ref_attn = min(attns, key=lambda a: probes.get(a, 0.0))
    ref, ref_loss0 = candidates.pop(ref_attn)
    del candidates
    print(f"[{dtype}] first-step loss, same batch and parameters: ours {ours_loss0:.5f}, reference {ref_loss0:.5f}; "
          f"our compile + first step {compile_s:.1f}s", flush=True)
    if probes:
        print(f"[{dtype}] reference attention probe (s/step): "
              + ", ".join(f"{k} {v:.3f}" for k, v in probes.items()) + f" -> {ref_attn}", flush=True)
    for _ in range(FLAGS.warmup):
        ours.step()
        ref.step()

    def report(r: int, rounds: dict[str, list[dict[str, float]]]) -> None:
        print(f"[{dtype}] round {r + 1}/{FLAGS.rounds}: " + ", ".join(
            f"{k} {v[-1]['wall']:.3f} s/step ({v[-1]['user']:.2f} user + {v[-1]['sys']:.2f} sys CPU-s, "
            f"{v[-1]['minflt']:.0f} page faults)" for k, v in rounds.items()) + f"; load {common.load_average()}",
            flush=True)

    rounds = common.alternate({"ours": lambda: timed(ours, FLAGS.steps), "reference": lambda: timed(ref, FLAGS.steps)},
                              FLAGS.rounds, after_round=report)
    tokens_per_step = c.train.batch_size * c.data.seq_len
    median = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rounds.items()}
    tps = {k: tokens_per_step / v["wall"] for k, v in median.items()}
    return {
        "dtype": dtype,
        "reference_attn": ref_attn,
        "attn_probe_s_per_step": probes or None,
        "first_loss": {"ours": ours_loss0, "reference": ref_loss0},
        "compile_s": round(compile_s, 2),
        "rounds": rounds,
        "median": median,
        "tokens_per_s": tps,
        "ratio": tps["ours"] / tps["reference"],
        "flops_per_token": flops_per_token(cfg, c.data.seq_len),
        "model": cfg.to_dict(),
    }


def torch_matmul_flops(size: int = 1024, trials: int = 5) -> float:
    """The float32 matmul chain of measure_matmul_flops, in torch: context for the two libraries' GEMMs."""
    import torch

    x, w = torch.randn(size, size), torch.randn(size, size) / size**0.5
    (x @ w) @ w
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        (x @ w) @ w
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * 2 / best


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common.restart_with_malloc(FLAGS.malloc)  # restarts this process when tuned and GLIBC_TUNABLES lacks it
    import torch
    import transformers

    from_experiment = bool(FLAGS["config"].present)
    config = bench_config(common.experiment(), from_experiment)
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(FLAGS.threads or cpus)
    device = jax.devices()[0]
    load_before = common.load_average()
    print(f"herd (jax {jax.__version__}, {device}) vs transformers {transformers.__version__} + torch "
          f"{torch.__version__}; {cpus} usable CPUs of {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"malloc={FLAGS.malloc}; load {load_before}", flush=True)
    peak_a = hardware.measure_matmul_flops(device, trials=5)
    results = [run_dtype(config, dtype) for dtype in FLAGS.dtypes]
    peak_b = hardware.measure_matmul_flops(device, trials=6)  # a second measurement (another cache key)
    peak, torch_peak = max(peak_a, peak_b), torch_matmul_flops()
    for res in results:
        res["mfu"] = {k: metrics.mfu(v, res["flops_per_token"], peak, 1) for k, v in res["tokens_per_s"].items()}
    shape_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "tie_embeddings",
                  "scan_layers", "remat_policy")
    summary = common.record(
        "train_throughput",
        config=FLAGS.config if from_experiment else None,
        malloc=FLAGS.malloc,
        shape={**{k: results[0]["model"][k] for k in shape_keys},
               "seq_len": config.data.seq_len, "batch": config.train.batch_size},
        torch_threads=torch.get_num_threads(),
        versions={"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        env={k: os.environ.get(k, "") for k in ("XLA_FLAGS", "GLIBC_TUNABLES")},
        peak_matmul_flops=peak,
        peak_measurements=[peak_a, peak_b],
        torch_matmul_flops=torch_peak,
        load_before=load_before,
        load_after=common.load_average(),
        steps=FLAGS.steps,
        rounds=FLAGS.rounds,
        results={r["dtype"]: r for r in results},
    )
    print(f"\npeak: float32 1024^3 matmul measured here {peak / 1e9:.1f} GFLOP/s (torch, same matmul: "
          f"{torch_peak / 1e9:.1f}); {summary['shape']}")
    print(f"{'dtype':<9} {'ours tok/s':>10} {'ref tok/s':>10} {'ratio':>6} {'ours MFU':>9} {'ref MFU':>8}  reference attn")
    for r in results:
        print(f"{r['dtype']:<9} {r['tokens_per_s']['ours']:>10.0f} {r['tokens_per_s']['reference']:>10.0f} "
              f"{r['ratio']:>6.2f} {r['mfu']['ours']:>9.1%} {r['mfu']['reference']:>8.1%}  {r['reference_attn']}")
    met = all(r["ratio"] >= 1.0 for r in results)
    print(f"target ratio >= 1.0: {'met' if met else 'NOT met'}; load {load_before} before, {summary['load_after']} after")
    common.emit(summary, FLAGS.out)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
