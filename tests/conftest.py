"""Test-wide set-up: eight fake CPU devices for the sharding tests."""

import os
import re
import tempfile

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hermetic: matplotlib's font cache goes to a temporary folder, not ~/.cache.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="herd_test_mpl_"))
# Hermetic too: `herd` subprocesses cache compiled steps, and TFDS prepares datasets (and herd its trained
# tokenizers), in temporary folders instead of ~/.cache/herd and ~/tensorflow_datasets.
os.environ.setdefault("HERD_XLA_CACHE", tempfile.mkdtemp(prefix="herd_test_xla_"))
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="herd_test_tfds_"))
# The suite is dominated by XLA:CPU compile time on two cores; LLVM optimisation
# level 0 roughly halves it and does not change what is computed.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# The test session is the program here, as the herd CLI is for a run: it owns absl's flag state.
# grain's worker processes (data.worker_count > 0) read grain's absl flags.
flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import jax

    if jax.default_backend() == "gpu":
        return
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A per-session persistent XLA cache: tests that build the same step reuse one compile."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in the optimized HLO of jit(fn)(*args)."""
    import jax

    text = jax.jit(fn).lower(*args).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
    return [(types[a], types[b]) for a, b in re.findall(r"= \S+ dot\(%([\w.\-]+), %([\w.\-]+)\)", text)]


@pytest.fixture
def dot_operand_dtypes():
    """`f(fn, *args)`: the operand element types of each dot XLA compiles for jit(fn)(*args).

    XLA:CPU runs a dot on its bf16 kernels only when both operands are bf16.
    """
    return _dot_operand_dtypes


# A few-second training run on the synthetic pattern: 4 steps of 8 x 16 tokens, eval and checkpoint every 2.
TINY_TRAIN = {
    "model.variant": "tiny",
    "data.seq_len": 16,
    "train.batch_size": 8,
    "train.steps": 4,
    "schedule.warmup_steps": 2,
    "checkpoint.every": 2,
    "eval.every": 2,
    "eval.batches": 1,
    "log.progress": False,
    "log.peak_flops": 1e12,  # skip measuring the CPU peak in every run
}


@pytest.fixture(scope="session")
def tiny_config():
    """`make(base=None, **overrides)`: `base` (default: experiments/base.py) with TINY_TRAIN and dotted overrides."""
    from experiments import base as base_experiment
    from train.config import apply_overrides

    def make(base=None, **overrides):
        return apply_overrides(base if base is not None else base_experiment.get_config(), {**TINY_TRAIN, **overrides})

    return make


# Tiny random transformers Llamas, the independent reference of test_hf and test_decode.
# Tests import these constants (`from conftest import HF_BASE, HF_CASES`) to parametrize over them.
HF_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500_000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,  # tests run past it, so the scaled band matters
)
HF_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
HF_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim": dict(num_key_value_heads=2, head_dim=32),
    "llama3_rope": dict(num_key_value_heads=2, rope_parameters=HF_LLAMA3_ROPE),
}


def hf_random_llama(case: str, seed: int = 0):
    """A transformers LlamaForCausalLM of `case` whose weights are spread out enough that layout bugs show in
    logits and greedy choices are clear-cut."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**HF_BASE, **HF_CASES[case], attn_implementation="eager")
    m = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory: pytest.TempPathFactory):
    """`get(case)` -> (transformers model, its save_pretrained directory); built once per case and session.

    Tests must not modify the returned model or directory (copy the directory first)."""
    cache: dict[str, tuple] = {}

    def get(case: str) -> tuple:
        if case not in cache:
            m = hf_random_llama(case)
            path = tmp_path_factory.mktemp(f"hf_{case}")
            m.save_pretrained(path)
            cache[case] = (m, path)
        return cache[case]

    return get
