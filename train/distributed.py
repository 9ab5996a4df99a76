"""Multi-process start-up that never hangs: missing or dead peers end every process with one line.

Left to itself, `jax.distributed.initialize` waits 5 minutes for missing peers
and then aborts with a C++ stack trace; a peer that dies mid-run leaves the
others with a Gloo traceback, then a wait at the shutdown barrier and another
C++ abort about 100 s later. Here every wait is bounded by
HERD_DISTRIBUTED_TIMEOUT seconds (default 60), always enforced by herd's own
Python watchdogs, which fire before JAX's (given longer limits) and print one
line naming the coordinator and the number of processes:

- start-up: `initialize` not returning in time (a peer never started, a wrong
  address or process count);
- while running: each process bumps a counter in the coordination service's
  key-value store every second and watches its ring neighbours' counters; a
  neighbour whose counter stops for the timeout ends every process (through a
  shared failure key), and so does a coordinator that stops answering;
- a collective that fails because its peer is gone (an uncaught JAX runtime
  error) is reported as one line at once instead of a traceback;
- at exit: the shutdown barrier waits at most the timeout;
- a lost coordinator, which JAX's C++ client answers with an immediate abort
  that no Python code can intercept, is turned into one line by a stderr
  filter (train/fatal_filter.py).

The heartbeat thread needs the GIL: a C extension holding it for longer than
the timeout would look like a dead process (raise HERD_DISTRIBUTED_TIMEOUT).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, NoReturn

import jax

from train import fatal_filter

TIMEOUT_ENV = "HERD_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
# JAX's own limits sit this far beyond herd's, so that herd's one-line errors always come first.
_JAX_MARGIN_S = 30
_KEY_PREFIX = "herd/alive/"
_FAILED_PREFIX = "herd/failed/"
_EXITING = "exiting"


def timeout_s() -> float:
    """HERD_DISTRIBUTED_TIMEOUT as positive seconds."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        _die(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def _command() -> str:
    return f"herd {sys.argv[1]}" if len(sys.argv) > 1 and sys.argv[1].isidentifier() else "herd"


def _die(message: str) -> NoReturn:
    """One line on stderr and an immediate exit: other threads may be stuck in a collective or a barrier."""
    sys.stderr.write(f"{_command()}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    fatal_filter.drain()  # so the line is out before this process's exit is seen
    os._exit(1)


def _seconds_since_process_start() -> float:
    """How long this process has run (Linux /proc; 0 elsewhere). An exec (herd's malloc restart) keeps it."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class Cluster:
    """Who this process is and how long it waits; `where()` names it in messages."""

    def __init__(self, address: str | None, processes: int | None, process_id: int | None, timeout: float):
        self.address, self.processes, self.process_id, self.timeout = address, processes, process_id, timeout

    def where(self) -> str:
        address = self.address or "auto-detected"
        count = self.processes if self.processes is not None else "?"
        return f"coordinator {address}, {count} processes, this is process {self.process_id}"


def initialize_from_env() -> Cluster | None:
    """Starts jax.distributed when the environment says this is one of several processes (else None)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        ints = {}
        for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            try:
                ints[name] = int(os.environ.get(name, ""))
            except ValueError:
                _die(f"{name}={os.environ.get(name)!r} must be an integer when JAX_COORDINATOR_ADDRESS is set")
        return initialize(os.environ["JAX_COORDINATOR_ADDRESS"], ints["JAX_NUM_PROCESSES"], ints["JAX_PROCESS_ID"])
    if os.environ.get("HERD_DISTRIBUTED") == "1":
        return initialize(None, None, None)
    return None


def initialize(address: str | None, processes: int | None, process_id: int | None) -> Cluster:
    """`jax.distributed.initialize` under a start-up watchdog, then the peer monitor and exit handlers."""
    cluster = Cluster(address, processes, process_id, timeout_s())
    # jax logs the service address at INFO, which absl would print; herd's messages name it when it matters.
    logging.getLogger("jax._src.distributed").setLevel(logging.WARNING)
    if (processes is None or processes > 1) and not os.environ.get("HERD_DEBUG"):
        fatal_filter.install(f"{_command()}: error: the distributed runtime stopped this process ({cluster.where()}): "
                             "another process died or the coordinator is unreachable; restart all processes to "
                             "resume from the last checkpoint")
    started = threading.Event()

    # Counted from the process's start (imports take seconds), with a second left to exit in.
    wait = max(cluster.timeout - _seconds_since_process_start() - 1.0, 1.0)

    def startup_watchdog() -> None:
        if not started.wait(wait):
            _die(f"process {cluster.process_id}: not all {cluster.processes} processes joined the coordinator at "
                 f"{cluster.address or 'an auto-detected address'} within {cluster.timeout:.0f} s; start every "
                 f"process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES={cluster.processes} (or "
                 f"raise {TIMEOUT_ENV}={cluster.timeout:.0f})")

    threading.Thread(target=startup_watchdog, name="herd-startup-watchdog", daemon=True).start()
    jax_timeout = int(cluster.timeout) + _JAX_MARGIN_S
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=processes, process_id=process_id,
                                   initialization_timeout=jax_timeout, heartbeat_timeout_seconds=2 * jax_timeout,
                                   shutdown_timeout_seconds=jax_timeout)
    except Exception as e:  # noqa: BLE001 - a bad address, a port in use, an undetectable cluster
        _die(f"could not start the distributed runtime ({cluster.where()}): {' '.join(str(e).split())[:300]}")
    started.set()
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    cluster.address = cluster.address or state.coordinator_address
    cluster.processes, cluster.process_id = state.num_processes, state.process_id
    if cluster.processes > 1:
        monitor = PeerMonitor(state.client, cluster)
        monitor.start()
        _install_excepthook(cluster)
        atexit.register(monitor.exit)  # registered after jax's own clean-up, so it runs first
    return cluster


class PeerMonitor:
    """Heartbeats through the coordination service's key-value store; ends the process when a peer stops.

    Each process watches its two ring neighbours (O(1) requests per second each, so the
    coordinator's load grows linearly with the job) and a shared failure key: the first
    process to find a neighbour silent records it there, and every other process sees it
    within a second and stops too, with the same explanation.
    """

    def __init__(self, client: Any, cluster: Cluster):
        self.client, self.cluster = client, cluster
        self.interval = min(1.0, cluster.timeout / 10)
        now = time.monotonic()
        self.last_answer = now  # when the coordinator last answered
        me, n = cluster.process_id, cluster.processes
        self.peers = sorted({(me - 1) % n, (me + 1) % n} - {me})
        self.last_change = {p: now for p in self.peers}
        self.values: dict[int, str | None] = {p: None for p in self.peers}
        self.failure: str | None = None  # another process's reason to stop, from the failure key
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._beat, name="herd-heartbeat", daemon=True).start()
        threading.Thread(target=self._watch, name="herd-peer-watchdog", daemon=True).start()

    def _read(self, prefix: str) -> str | None:
        entries = self.client.key_value_dir_get(prefix)  # [] when absent (try_get would raise)
        return entries[0][1] if entries else None

    def _beat(self) -> None:
        count = 0
        own = f"{_KEY_PREFIX}{self.cluster.process_id}/beat"
        while not self.stopped.is_set():
            try:
                self.client.key_value_set(own, str(count), allow_overwrite=True)
                values = {p: self._read(f"{_KEY_PREFIX}{p}/") for p in self.peers}
                failure = self._read(_FAILED_PREFIX)
            except Exception:  # noqa: BLE001 - an unreachable coordinator: the watchdog judges how long
                values = failure = None
            now = time.monotonic()
            if values is not None:
                self.last_answer, self.failure = now, failure
                for p, value in values.items():
                    if value != self.values[p]:
                        self.values[p], self.last_change[p] = value, now
            count += 1
            self.stopped.wait(self.interval)

    def _watch(self) -> None:
        limit = max(self.cluster.timeout - 2 * self.interval, self.interval)
        while not self.stopped.wait(self.interval):
            now = time.monotonic()
            if self.failure is not None:
                _die(self.failure)
            if now - self.last_answer > limit:
                _die(f"the coordinator stopped answering for {self.cluster.timeout:.0f} s ({self.cluster.where()}): "
                     "process 0 died or its host is unreachable; restart all processes to resume from the last "
                     "checkpoint")
            for p in self.peers:
                if self.values[p] != _EXITING and now - self.last_change[p] > limit:
                    reason = (f"process {p} sent no heartbeat for {self.cluster.timeout:.0f} s "
                              f"({self.cluster.where()}): it died or hangs; restart all processes to resume from "
                              "the last checkpoint")
                    try:  # tell everyone else at once
                        self.client.key_value_set(f"{_FAILED_PREFIX}{self.cluster.process_id}", reason)
                    except Exception:  # noqa: BLE001
                        pass
                    _die(reason)

    def exit(self) -> None:
        """At interpreter exit: tell the peers, stop watching, and bound JAX's shutdown barrier."""
        self.stopped.set()
        try:
            self.client.key_value_set(f"{_KEY_PREFIX}{self.cluster.process_id}/beat", _EXITING, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already
            pass

        def shutdown_watchdog() -> None:
            time.sleep(self.cluster.timeout)
            _die(f"waited {self.cluster.timeout:.0f} s at exit for the other processes to finish "
                 f"({self.cluster.where()}); one of them died or hangs")

        threading.Thread(target=shutdown_watchdog, name="herd-shutdown-watchdog", daemon=True).start()


def _install_excepthook(cluster: Cluster) -> None:
    """An uncaught error ends this process at once: waiting at the shutdown barrier would hang on dead peers."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if threading.current_thread() is not threading.main_thread():  # e.g. a C++ callback's error: not fatal
            previous(kind, exc, tb)
            return
        if isinstance(exc, jax.errors.JaxRuntimeError) and not os.environ.get("HERD_DEBUG"):
            _die(f"a collective operation with the other processes failed ({cluster.where()}): "
                 f"{' '.join(str(exc).split())[:300]}; another process probably died; restart all processes to "
                 "resume from the last checkpoint")
        previous(kind, exc, tb)
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook
