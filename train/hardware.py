"""Accelerator facts: peak FLOP/s per device, from datasheets or measured (the denominator of MFU)."""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# as a case-insensitive substring of `device.device_kind`; the longest
# matching key wins, so "H100 PCIe" beats "H100" and "TPU v5 lite" beats
# "TPU v5". NVIDIA datasheets quote bf16 "with sparsity"; dense is half.
KNOWN_PEAK_FLOPS: dict[str, float] = {
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (SXM and PCIe).
    "A100": 312e12,
    # NVIDIA H100 datasheet: BF16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with sparsity.
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    # NVIDIA H200 datasheet: BF16 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity.
    "H200": 989e12,
    "H200 NVL": 835e12,
    # NVIDIA GH200 datasheet: the Hopper GPU's BF16 1,979 TFLOPS with sparsity.
    "GH200": 989e12,
    # NVIDIA HGX B200 datasheet: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs.
    "B200": 2250e12,
    # NVIDIA L4 / L40 / L40S datasheets: BF16 242 / 362 / 733 TFLOPS with sparsity.
    "L4": 121e12,
    "L40": 181e12,
    "L40S": 366e12,
    # Cloud TPU system architecture docs (cloud.google.com/tpu/docs/system-architecture-tpu-vm
    # and the per-version pages), bf16 per chip. On v2/v3 each TensorCore (two
    # per chip) is its own JAX device: 45 / 123 TFLOPS per chip.
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    # v4 onwards: one JAX device per chip (megacore or a single core).
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i: Jouppi et al., ISCA 2021 "Ten Lessons From Three Generations"
    "TPU v5 lite": 197e12,  # v5e: cloud.google.com/tpu/docs/v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p: cloud.google.com/tpu/docs/v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium): cloud.google.com/tpu/docs/v6e
    "TPU v6e": 918e12,
}


def known_peak_flops(device_kind: str) -> float | None:
    """Table peak for `device_kind` (longest substring match), or None if unknown."""
    kind = device_kind.lower()
    matches = [key for key in KNOWN_PEAK_FLOPS if key.lower() in kind]
    return KNOWN_PEAK_FLOPS[max(matches, key=len)] if matches else None


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(device: jax.Device, size: int = 1024, repeats: int = 2, trials: int = 3) -> float:
    """Measured FLOP/s of a chain of `repeats` size x size matmuls on `device`; cached.

    float32 on CPU (what the CPU runs fast), bfloat16 elsewhere. Best of
    `trials` timed runs after one compile-and-warm-up run. Inputs come from
    numpy: compiling jax.random would cost more than the measurement.
    """
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((size, size), np.float32), device).astype(dtype)
    # Scaled by 1/sqrt(size) so repeated products stay O(1) instead of overflowing.
    w = jax.device_put(rng.standard_normal((size, size), np.float32) / math.sqrt(size), device).astype(dtype)

    @jax.jit
    def chain(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, repeats, lambda _, y: y @ w, x)

    chain(x, w).block_until_ready()
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        chain(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * repeats / best


def peak_flops_per_device(device: jax.Device | None = None, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override`, else the known table, else measured.

    Measuring is meant for CPU; an accelerator missing from the table is
    measured too (with a warning), which understates its real peak.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"log.peak_flops must be positive FLOP/s per device, got {override}")
        return float(override)
    device = device if device is not None else jax.devices()[0]
    peak = known_peak_flops(device.device_kind)
    if peak is not None:
        return peak
    if device.platform != "cpu":
        log.warning(
            "no known peak FLOP/s for device kind %r; measuring a matmul instead (set log.peak_flops to override)",
            device.device_kind,
        )
        return measure_matmul_flops(device, size=4096, repeats=16)
    return measure_matmul_flops(device)
