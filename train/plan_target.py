"""`herd plan --target`: which machine a plan is for, and the devices its step is compiled for.

- `tpu:<chip>:<topology>` (`tpu:v5p:8x8x16`, `tpu:v5e:16x16`): compile-only TPU devices from
  libtpu's topology API (`jax.experimental.topologies`); the TPU compiler itself compiles
  the step, so memory and its out-of-memory verdict are its own. Needs `libtpu` (the `tpu` extra).
- `gpu:<chip>:<count>` (`gpu:h100:1024`): `count` simulated CPU devices, for the sharding and
  the collectives; memory comes from the analytic model (XLA:CPU's buffer sizes are not a GPU's).
- `cpu[:<count>]`: this machine's CPU (simulated devices if `count` > 1), compiled for real.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from train import hardware

TARGET_FORMS = "tpu:<v4|v5e|v5p|v6e>:<AxB or AxBxC>, gpu:<a100|h100|h200>:<count> or cpu[:<count>]"
_TPU_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
# v4 and v5p chips hold two TensorCores that JAX uses as one device ("megacore"), as on a real slice.
_MEGACORE = {"v4", "v5p"}


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str  # as given on the command line
    kind: str  # tpu | gpu | cpu
    chip: hardware.Chip
    topology: str  # tpu: "8x8x16"; gpu and cpu: the device count
    n_devices: int

    @property
    def memory_compiled(self) -> bool:
        """Whether the compiled executable's memory is the target's (TPU, CPU) or only indicative (GPU)."""
        return self.kind != "gpu"

    def as_dict(self) -> dict[str, object]:
        c = self.chip
        return {"spec": self.spec, "kind": self.kind, "chip": c.name, "devices": self.n_devices,
                "peak_flops": c.peak_flops, "hbm_bytes": c.hbm_bytes, "hbm_bandwidth": c.hbm_bandwidth,
                "link_bandwidth": c.link_bandwidth, "network_bandwidth": c.network_bandwidth, "source": c.source}


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"--target={spec}: {why}; valid forms: {TARGET_FORMS}")


def parse_target(spec: str | None) -> tuple[str, str, str, int | None]:
    """(kind, chip name, topology, device count) of a --target string; cheap, starts no JAX backend."""
    if not spec:
        raise ValueError(f"--target is required; valid forms: {TARGET_FORMS}")
    parts = spec.lower().split(":")
    kind = parts[0]
    if kind == "cpu":
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise _bad(spec, "cpu takes an optional device count, e.g. cpu:8")
        count = int(parts[1]) if len(parts) == 2 else None
        if count == 0:
            raise _bad(spec, "the device count must be positive")
        return "cpu", "cpu", str(count or ""), count
    if kind not in ("tpu", "gpu") or len(parts) != 3:
        raise _bad(spec, "expected three parts, kind:chip:shape")
    chip, shape = parts[1], parts[2]
    if kind == "tpu":
        if chip not in _TPU_DIMS:
            raise _bad(spec, f"unknown TPU {chip!r} (known: {', '.join(_TPU_DIMS)})")
        dims = shape.split("x")
        if len(dims) != _TPU_DIMS[chip] or not all(d.isdigit() and int(d) > 0 for d in dims):
            example = "8x8x16" if _TPU_DIMS[chip] == 3 else "16x16"
            raise _bad(spec, f"a {chip} topology has {_TPU_DIMS[chip]} positive sizes, e.g. tpu:{chip}:{example}")
        return "tpu", chip, shape, math.prod(int(d) for d in dims)
    gpus = [name for name, c in hardware.CHIPS.items() if not c.is_tpu]
    if chip not in gpus:
        raise _bad(spec, f"unknown GPU {chip!r} (known: {', '.join(gpus)})")
    if not shape.isdigit() or int(shape) <= 0:
        raise _bad(spec, "the GPU count must be a positive integer, e.g. gpu:h100:1024")
    return "gpu", chip, shape, int(shape)


def simulated_devices_needed(spec: str) -> int:
    """How many CPU devices this process must start with for `spec` (1 for TPU targets)."""
    kind, _, _, count = parse_target(spec)
    return 1 if kind == "tpu" else count or 1


def prepare_process(spec: str) -> None:
    """Before any JAX backend starts: CPU-only JAX with as many simulated devices as the target needs.

    `herd plan` never runs a computation, so it needs no accelerator even where one is attached.
    The libtpu settings let a CPU-only host load libtpu for compiling: `ALLOW_MULTIPLE_LIBTPU_LOAD`
    skips its single-process lock file (another JAX process on the host may hold it) and the worker
    settings stand in for the TPU VM metadata it would otherwise query (it prints errors without them).
    """
    parse_target(spec)
    jax.config.update("jax_platforms", "cpu")
    n = simulated_devices_needed(spec)
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)
    _libtpu_compile_only_env()


def quiet_libtpu_without_tpus() -> None:
    """With libtpu installed (the `tpu` extra) on a host without TPU chips, JAX still tries the TPU backend,
    and libtpu prints five lines of errors about missing TPU VM metadata before JAX falls back. The stand-in
    settings of a compile-only host silence it; hosts with TPU chips, or an explicit JAX_PLATFORMS, are left alone.
    """
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    try:
        from jax._src import hardware_utils  # JAX's own check, the one that decides its TPU start-up

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # a private helper: if it moves, keep JAX's default behaviour
        return
    if chips == 0:
        _libtpu_compile_only_env()


def _libtpu_compile_only_env() -> None:
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_HOST_BOUNDS", "1,1,1")):
        os.environ.setdefault(key, value)


def libtpu_available() -> tuple[bool, str]:
    """(whether libtpu can be imported, why not)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return False, f"libtpu is not installed ({e}); pip install -e '.[tpu]' (libtpu matching jax {jax.__version__})"
    return True, ""


def resolve(spec: str) -> tuple[Target, list[jax.Device]]:
    """The target and its devices: compile-only TPU devices, or (simulated) CPU devices."""
    kind, chip_name, topology, count = parse_target(spec)
    if kind == "tpu":
        ok, why = libtpu_available()
        if not ok:
            raise ValueError(f"--target={spec}: {why}")
        from jax.experimental import topologies

        _libtpu_compile_only_env()  # read when libtpu loads, on the first topology
        kwargs = {"chip_config_name": "megacore"} if chip_name in _MEGACORE else {}
        try:
            topo = topologies.get_topology_desc(f"{chip_name}:{topology}", "tpu", **kwargs)
            devices = list(topo.devices)
        except Exception as e:  # libtpu rejects topologies it does not know (e.g. v5p:3x3x3)
            why = " ".join(str(e).split())[:300]
            raise ValueError(f"--target={spec}: libtpu rejects this topology: {why}") from None
        if len(devices) != count:
            raise ValueError(f"--target={spec}: libtpu made {len(devices)} devices, expected {count}")
        return Target(spec, kind, hardware.get_chip(chip_name), topology, count), devices
    cpus = jax.devices("cpu")
    count = count or len(cpus)
    if len(cpus) < count:
        raise ValueError(f"--target={spec} needs {count} simulated CPU devices but this process has {len(cpus)}; "
                         "`herd plan` starts with enough (jax_num_cpu_devices), a library caller must set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts")
    chip = hardware.host_chip(cpus[0]) if kind == "cpu" else hardware.get_chip(chip_name)
    return Target(spec, kind, chip, str(count), count), list(cpus[:count])


def physical_axes_spanned(devices: list[jax.Device]) -> int:
    """How many torus axes a group of TPU devices spans (1 if their coordinates are unknown)."""
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    if not coords or not coords[0]:
        return 1
    return max(1, sum(len({c[i] for c in coords}) > 1 for i in range(len(coords[0]))))


def mesh_error_hint(error: Exception, spec: str, shape: tuple[int, ...]) -> ValueError:
    """A one-line error for a mesh that cannot be laid onto a TPU torus (jax.make_mesh's NotImplementedError)."""
    text = " ".join(str(error).split())
    m = re.search(r"physical mesh axis sizes|product of some subset", text)
    why = "each mesh axis size must be a product of the topology's axis sizes" if m else text[:200]
    return ValueError(f"mesh.data/fsdp/tensor = {'/'.join(map(str, shape))} does not fit the torus of --target={spec}: "
                      f"{why}")
