"""glibc malloc tuning for CPU runs, applied by re-executing the process (glibc reads it only at start-up).

Imports nothing heavy and defines no flags, so entry points (the `herd` CLI,
bench scripts) can call `tune_malloc()` first thing.
"""

from __future__ import annotations

import os
import sys

# One malloc arena that never returns memory to the kernel: XLA:CPU's per-step
# buffers (hundreds of MB) are then reused instead of being mmapped, page-faulted
# and zeroed again on every step, 0.35-0.7 CPU-s of kernel time per step of the
# Shakespeare model on 2 cores (bench/README.md, finding 1).
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
_ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")


def malloc_tuned_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart a CPU-only run with MALLOC_TUNABLES; None if it is set, off or not applicable.

    Applies on Linux with glibc when JAX will run on the CPU (JAX_PLATFORMS is
    unset with no GPU or TPU device node, or is "cpu"). HERD_MALLOC=system
    keeps glibc's defaults; HERD_MALLOC=tuned applies the setting anyway.
    """
    import platform

    mode = environ.get("HERD_MALLOC", "auto")
    if mode not in ("auto", "tuned", "system"):
        raise ValueError(f"HERD_MALLOC={mode!r} must be one of auto, tuned, system")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if mode == "system" or "glibc.malloc.arena_max" in tunables:
        return None
    if mode == "auto":
        if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
            return None
        platforms = environ.get("JAX_PLATFORMS", "")
        if platforms not in ("", "cpu") or (not platforms and any(map(os.path.exists, _ACCELERATOR_DEVICES))):
            return None
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, MALLOC_TUNABLES])))


def tune_malloc() -> None:
    """Re-executes this process with `malloc_tuned_env` when it applies (glibc reads it only at start-up)."""
    env = malloc_tuned_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
