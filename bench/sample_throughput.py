"""Sampling throughput on CPU: herd's KV-cache `generate.generate` against transformers `generate`, in the same run.

Both sides decode the *same* model (our random initial parameters, exported
with `model.hf.save` and loaded by `transformers.LlamaForCausalLM` in float32)
from the same left-padded batch of prompts of different lengths, greedily, for
exactly `--new_tokens` tokens per row (no stop token):

  herd       generate.generate(cfg, params, prompts, max_new_tokens=N, rng=..., temperature=0)
             (one jitted prefill + one jitted decode step, reused for every token)
  reference  model.generate(input_ids, attention_mask, do_sample=False, use_cache=True,
             max_new_tokens=N, min_new_tokens=N, eos_token_id=None)  under torch.inference_mode()

The reference runs in its fastest configuration found in this run: attention
"sdpa" or "eager", and torch threads = the CPUs JAX's thread pool uses or 1
(on a loaded machine multi-threaded torch stalls on descheduled threads, which
would flatter us; `--noprobe_one_thread` turns that probe off). Both are
warmed up (our compile is excluded and reported separately), then
`--rounds` alternating rounds time one full `generate` call of each; the median
round counts. Throughput is new tokens per second, batch * new_tokens / time
(prefill included). Our prefill time (to the first token, read through
`generate.stream`) is reported beside it. The greedy tokens of the two sides are
compared token by token; on random weights two logits can be near-ties, so a
rare divergence (after which a row's continuation differs) is reported, not
treated as an error.

    python bench/sample_throughput.py
    python bench/sample_throughput.py --batch=1 --new_tokens=64 --reference_attn=eager

The last stdout line is one JSON object with every figure; `--out FILE` appends it to FILE.
"""

from __future__ import annotations

import common  # noqa: F401  (first: environment and sys.path)

import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from model import generate as gen  # noqa: E402
from model import hf as hf_lib  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.llama import init_params  # noqa: E402

FLAGS = flags.FLAGS
# A small Llama 3 architecture model (the "small" variant's shape).
SHAPE_FLAGS = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, vocab=2048, max_seq_len=512)
for _name, _default in SHAPE_FLAGS.items():
    flags.DEFINE_integer(_name, _default, f"Model shape. Default {_default}.")
flags.DEFINE_bool("scan_layers", True, "Our implementation toggle: scanned (True) or unrolled layers.")
flags.DEFINE_integer("batch", 8, "Prompts per batch.")
flags.DEFINE_integer("min_prompt", 16, "Shortest prompt (tokens); lengths are spread evenly up to --max_prompt.")
flags.DEFINE_integer("max_prompt", 64, "Longest prompt (tokens).")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt, on both sides.")
flags.DEFINE_integer("rounds", 3, "Alternating timed rounds per side; the median round counts.")
flags.DEFINE_integer("warmup", 1, "Untimed generate calls per side before timing (after our compile).")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and the prompts.")
flags.DEFINE_integer("threads", None, "torch intra-op threads; default: the CPUs this process may run on "
                     "(the size of XLA's CPU thread pool).")
flags.DEFINE_enum(
    "reference_attn", "auto", ["auto", "sdpa", "eager"],
    "transformers attention implementation; auto times each (best of two generate calls) and keeps the faster.",
)
flags.DEFINE_bool(
    "probe_one_thread", True,
    "Also probe the reference with 1 torch thread and keep it if faster: on a loaded machine torch's "
    "multi-threaded ops stall on a descheduled thread (10x slower here), which would flatter us.",
)
flags.DEFINE_enum("malloc", "tuned", ["tuned", "system"],
                  "tuned: restart with train.malloc.MALLOC_TUNABLES, as the herd CLI does on CPU (both sides); "
                  "system: glibc's defaults.")
flags.DEFINE_string("out", None, "Also append the JSON result line to this file.")

PAD_ID = 0


def make_prompts(vocab: int, batch: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """`batch` random prompts with lengths spread evenly over [lo, hi]; ids avoid the pad id."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(lo, hi, batch).round().astype(int)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


class Ours:
    """herd's `generate.generate` (greedy) on the default JAX CPU device."""

    def __init__(self, cfg: ModelConfig, params: Any, prompts: list[list[int]], new_tokens: int):
        self.cfg, self.params, self.prompts, self.new = cfg, params, prompts, new_tokens
        self.rng = jax.random.key(0)

    def generate(self) -> list[list[int]]:
        return gen.generate(self.cfg, self.params, self.prompts, max_new_tokens=self.new, rng=self.rng,
                               temperature=0.0, pad_id=PAD_ID, padding="left")

    def prefill_s(self) -> float:
        """Seconds from the call to the first token on the host (the prefill and its sampling), via `stream`."""
        t0 = time.perf_counter()
        it = gen.stream(self.cfg, self.params, self.prompts, max_new_tokens=self.new, rng=self.rng, pad_id=PAD_ID)
        next(it)
        elapsed = time.perf_counter() - t0
        for _ in it:  # drain, so the next measurement starts idle
            pass
        return elapsed


class Reference:
    """transformers LlamaForCausalLM.generate, greedy, with a KV cache, on the same weights and prompts."""

    @staticmethod
    def load(ckpt: str, attn: str) -> Any:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        return transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation=attn, dtype=torch.float32).eval()

    def __init__(self, model: Any, threads: int, prompts: list[list[int]], new_tokens: int):
        import torch

        self.torch, self.model, self.threads = torch, model, threads
        tokens, lengths = gen.pad_prompts(prompts, PAD_ID, "left")
        mask = np.arange(tokens.shape[1])[None] >= (tokens.shape[1] - lengths)[:, None]
        self.input_ids = torch.as_tensor(tokens, dtype=torch.long)
        self.attention_mask = torch.as_tensor(mask, dtype=torch.long)
        self.new = new_tokens

    def generate(self) -> list[list[int]]:
        self.torch.set_num_threads(self.threads)
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=self.input_ids, attention_mask=self.attention_mask, do_sample=False, use_cache=True,
                max_new_tokens=self.new, min_new_tokens=self.new, eos_token_id=None, pad_token_id=PAD_ID,
            )
        return out[:, self.input_ids.shape[1]:].tolist()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds per wall second) of one call; CPU/wall far below the
    threads in use means the run was starved by other load."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - cpu0) / wall


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict[str, Any]:
    """Fraction of identical tokens, rows identical throughout, and each row's first differing position."""
    same = sum(a == b for o, r in zip(ours, ref) for a, b in zip(o, r))
    total = sum(max(len(o), len(r)) for o, r in zip(ours, ref))
    first = []
    for o, r in zip(ours, ref):
        tail = None if len(o) == len(r) else min(len(o), len(r))  # a length difference counts as a divergence
        first.append(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), tail))
    return {"identical_fraction": same / total, "rows_identical": sum(f is None for f in first), "rows": len(ours),
            "first_divergence": first}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not 1 <= FLAGS.min_prompt <= FLAGS.max_prompt:
        raise app.UsageError(f"need 1 <= --min_prompt ({FLAGS.min_prompt}) <= --max_prompt ({FLAGS.max_prompt})")
    common.restart_with_malloc(FLAGS.malloc)  # restarts this process when tuned and GLIBC_TUNABLES lacks it
    import torch
    import transformers

    threads = FLAGS.threads or len(os.sched_getaffinity(0))
    log = lambda s: print(s, flush=True)  # noqa: E731
    device = jax.devices()[0]
    load_before = common.load_average()
    log(f"herd vs transformers {transformers.__version__} / torch {torch.__version__} on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} "
        f"usable); torch threads {threads}; jax {jax.__version__} on {device}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {load_before}")

    cfg = ModelConfig(vocab_size=FLAGS.vocab, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=FLAGS.n_heads,
                      n_kv_heads=FLAGS.n_kv_heads, d_ff=FLAGS.d_ff, max_seq_len=FLAGS.max_seq_len,
                      scan_layers=FLAGS.scan_layers)
    prompts = make_prompts(cfg.vocab_size, FLAGS.batch, FLAGS.min_prompt, FLAGS.max_prompt, FLAGS.seed)
    new = FLAGS.new_tokens
    if FLAGS.max_prompt + new > cfg.max_seq_len:
        raise app.UsageError(f"--max_prompt + --new_tokens = {FLAGS.max_prompt + new} exceeds --max_seq_len")
    params = init_params(cfg, jax.random.key(FLAGS.seed))
    ours = Ours(cfg, params, prompts, new)

    # Our first call compiles the prefill and the step; the second shows what the compile cost.
    first_s, ours_tokens = timed(ours.generate)
    second_s, _ = timed(ours.generate)
    compile_s = first_s - second_s
    log(f"ours: first generate {first_s:.2f}s (compile + run), second {second_s:.3f}s -> compile ~{compile_s:.2f}s")

    with tempfile.TemporaryDirectory() as ckpt:
        hf_lib.save(cfg, jax.device_get(params), ckpt)
        attns = ["sdpa", "eager"] if FLAGS.reference_attn == "auto" else [FLAGS.reference_attn]
        models = {attn: Reference.load(ckpt, attn) for attn in attns}
    thread_options = [threads, 1] if FLAGS.probe_one_thread and threads > 1 else [threads]
    candidates = {(a, n): Reference(models[a], n, prompts, new) for a in attns for n in thread_options}
    probes: dict[str, float] = {}
    ref_tokens: dict[tuple[str, int], list[list[int]]] = {}
    for key, candidate in candidates.items():
        candidate.generate()  # first call: lazy initialisation
        probe, ref_tokens[key] = timed(candidate.generate)
        probes[f"{key[0]}/{key[1]}t"] = min(probe, timed(candidate.generate)[0])  # best of two: robust to a spike
    ref_key = min(candidates, key=lambda k: probes[f"{k[0]}/{k[1]}t"])
    ref_attn, ref_threads = ref_key
    ref = candidates[ref_key]
    if len(probes) > 1:
        log("reference probe (s/generate, attention/torch threads): "
            + ", ".join(f"{k} {v:.3f}" for k, v in probes.items()) + f" -> {ref_attn}, {ref_threads} thread(s)")
    agree = agreement(ours_tokens, ref_tokens[ref_key])
    log(f"greedy agreement: {agree['identical_fraction']:.2%} of tokens identical, {agree['rows_identical']}/"
        f"{agree['rows']} rows identical throughout; first divergence per row {agree['first_divergence']}")

    for _ in range(FLAGS.warmup):
        ours.generate()
        ref.generate()
    prefill: list[float] = []

    def after_round(r: int, done: dict[str, list[tuple[float, float]]]) -> None:
        prefill.append(ours.prefill_s())
        (ours_s, ours_cpu), (ref_s, ref_cpu) = done["ours"][-1], done["reference"][-1]
        log(f"round {r + 1}/{FLAGS.rounds}: ours {ours_s:.3f}s (cpu/wall {ours_cpu:.2f}), reference {ref_s:.3f}s "
            f"(cpu/wall {ref_cpu:.2f}) per generate; our prefill {prefill[-1] * 1e3:.1f} ms "
            f"(load {common.load_average()})")

    timed_rounds = common.alternate({"ours": lambda: timed_cpu(ours.generate),
                                     "reference": lambda: timed_cpu(ref.generate)}, FLAGS.rounds, after_round)
    rounds = {k: [wall for wall, _ in v] for k, v in timed_rounds.items()}
    util = {k: [round(cpu, 2) for _, cpu in v] for k, v in timed_rounds.items()}
    med = common.medians(rounds)
    tokens = FLAGS.batch * new
    tps = {k: tokens / v for k, v in med.items()}
    ratio = tps["ours"] / tps["reference"]
    # Each side's fastest round: less sensitive to other jobs than the median on a shared machine.
    best = {k: tokens / min(v) for k, v in rounds.items()}
    prefill_s = statistics.median(prefill)
    summary = common.record(
        "sample_throughput",
        shape={k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size",
                                            "max_seq_len", "scan_layers")},
        batch=FLAGS.batch,
        prompt_lengths=[len(p) for p in prompts],
        new_tokens=new,
        cpus=len(os.sched_getaffinity(0)),
        torch_threads=ref_threads,
        versions={"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        reference_attn=ref_attn,
        reference_probe_s=probes,
        compile_s=round(compile_s, 3),
        first_call_s=round(first_s, 3),
        s_per_generate_rounds=rounds,
        cpu_util_rounds=util,
        s_per_generate=med,
        tokens_per_s=tps,
        ratio=ratio,
        tokens_per_s_best=best,
        ratio_best=best["ours"] / best["reference"],
        ours_prefill_s=prefill_s,
        ours_decode_tokens_per_s=FLAGS.batch * (new - 1) / (med["ours"] - prefill_s),
        greedy_agreement=agree,
        load_before=load_before,
        load_after=common.load_average(),
    )
    log("")
    log(f"{'':<10} {'tok/s':>9} {'s/generate':>11}")
    log(f"{'ours':<10} {tps['ours']:>9.0f} {med['ours']:>11.3f}   (prefill {prefill_s * 1e3:.1f} ms, "
        f"compile {compile_s:.2f}s)")
    log(f"{'reference':<10} {tps['reference']:>9.0f} {med['reference']:>11.3f}   (attn {ref_attn}, "
        f"{ref_threads} torch thread(s))")
    log(f"best rounds: ours {best['ours']:.0f}, reference {best['reference']:.0f} tok/s, ratio "
        f"{best['ours'] / best['reference']:.2f}x")
    log(f"ratio {ratio:.2f}x (medians); target >= 2x -> {'met' if ratio >= 2 else 'NOT met'}; "
        f"load {load_before} before, {summary['load_after']} after")
    common.emit(summary, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
