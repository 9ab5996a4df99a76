"""Accelerator facts: peak FLOP/s per device (the denominator of MFU), and the chip table `herd plan` uses.

`KNOWN_PEAK_FLOPS` is the datasheet peak of every device kind we know; `CHIPS` adds,
for the chips `herd plan --target` names, memory capacity and bandwidth and the
interconnect, each figure with its source.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
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


GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator as the planner's roofline sees it. Bandwidths are bytes/s, one direction."""

    name: str  # the --target spelling: tpu:<name>:<topology> or gpu:<name>:<count>
    device_kind: str  # a key of KNOWN_PEAK_FLOPS (what jax reports as device.device_kind)
    hbm_bytes: float  # memory capacity per device
    hbm_bandwidth: float
    link_bandwidth: float  # one ICI link (TPU) or the NVLink domain per GPU (GPU), one direction
    network_bandwidth: float = 0.0  # GPU: per GPU between nodes, one direction; TPU: 0 (one slice is all ICI)
    node_size: int = 0  # GPU: GPUs per NVLink domain; TPU: 0
    source: str = ""
    measured_peak_flops: float = 0.0  # a measured peak (this CPU) instead of the datasheet's

    @property
    def peak_flops(self) -> float:
        return self.measured_peak_flops or KNOWN_PEAK_FLOPS[self.device_kind]

    @property
    def is_tpu(self) -> bool:
        return self.node_size == 0


# Cloud TPU pages give "bidirectional ICI bandwidth per chip" over all ports; one link one way is
# that / ports / 2. NVIDIA gives NVLink as bidirectional per GPU (one way is half) and the network as
# one ConnectX-7 NDR 400 Gb/s (H100/H200) or HDR 200 Gb/s (A100) NIC per GPU in DGX/HGX systems.
CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4: 32 GiB HBM2 at 1200 GBps; ICI per link 4.5e10 B/s one way, 6 ports
    # (Austin et al. 2025, "How to Scale Your Model", jax-ml.github.io/scaling-book/tpus).
    "v4": Chip("v4", "TPU v4", 32 * GiB, 1200e9, 45e9, source="cloud.google.com/tpu/docs/v4; scaling-book/tpus"),
    # cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 at 819 GBps; bidirectional ICI 400 GBps per chip over 4 ports.
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 819e9, 400e9 / 4 / 2, source="cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e at 2765 GBps; bidirectional ICI 1200 GBps per chip over 6 ports.
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2765e9, 1200e9 / 6 / 2, source="cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 32 GB HBM at 1638 GBps; bidirectional ICI 800 GBps per chip over 4 ports.
    "v6e": Chip("v6e", "TPU v6 lite", 32e9, 1638e9, 800e9 / 4 / 2, source="cloud.google.com/tpu/docs/v6e"),
    # NVIDIA A100 datasheet (SXM 80GB): 80 GB HBM2e at 2,039 GB/s; NVLink 600 GB/s; DGX A100: HDR 200 Gb/s per GPU.
    "a100": Chip("a100", "A100", 80e9, 2039e9, 300e9, 25e9, 8, source="NVIDIA A100 datasheet; DGX A100 user guide"),
    # NVIDIA H100 datasheet (SXM): 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s; DGX H100: NDR 400 Gb/s per GPU.
    "h100": Chip("h100", "H100", 80e9, 3.35e12, 450e9, 50e9, 8, source="NVIDIA H100 datasheet; DGX H100 user guide"),
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s; HGX H200: NDR 400 Gb/s per GPU.
    "h200": Chip("h200", "H200", 141e9, 4.8e12, 450e9, 50e9, 8, source="NVIDIA H200 datasheet"),
}


def get_chip(name: str) -> Chip:
    """The chip `name` of the table, or a ValueError listing the known ones."""
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; known chips: {', '.join(CHIPS)}")
    return CHIPS[name]


def host_chip(device: jax.Device | None = None) -> Chip:
    """This machine's CPU as a chip: measured matmul peak and memory bandwidth, physical memory as capacity.

    Measured rather than looked up: CPUs differ too much for a table. Simulated devices share the
    host, so its memory bandwidth is also their "interconnect".
    """
    device = device if device is not None else jax.devices("cpu")[0]
    memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    bandwidth = measure_copy_bandwidth()
    return Chip("cpu", device.device_kind, memory, bandwidth, bandwidth, node_size=1 << 30,
                source="measured on this host (matmul peak, numpy copy bandwidth)",
                measured_peak_flops=measure_matmul_flops(device))


@functools.lru_cache(maxsize=None)
def measure_copy_bandwidth(megabytes: int = 256, trials: int = 3) -> float:
    """Bytes/s this host reads plus writes copying a large numpy array (best of `trials`)."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


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
