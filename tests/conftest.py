"""Test-wide set-up: eight fake CPU devices for the sharding tests."""

import os
import re

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is dominated by XLA:CPU compile time on two cores; LLVM optimisation
# level 0 roughly halves it and does not change what is computed.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import pytest  # noqa: E402


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
