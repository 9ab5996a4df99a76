"""Turns JAX's C++ abort on a lost coordinator into one line (multi-process runs).

When the coordinator process dies, JAX's C++ client in every other process
aborts at once (LOG(FATAL) "Terminating process because the JAX distributed
service detected fatal errors"), printing a C++ stack trace and Python's
fault dump; no Python code runs first. `install(message)` therefore routes
this process's stderr (fd 2) through a small child process running `main`,
which passes everything through except that abort: the coordination-service
errors leading up to it and everything after it are replaced by `message` and
the abort's own reason, on one line. The child ends when this process's
stderr closes (its exit or its abort). Imports nothing heavy: it starts in
milliseconds.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys

FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
# Lines of the coordination service's errors that precede the abort: held until it is clear none follows.
_SUSPECT = re.compile(rb"^([EWF]\d{4} .*(coordination|preemption|client\.h|grpc|distributed)|Additional GRPC error"
                      rb"|:UNKNOWN:|RPC: /xla\.coordination|\s*$)")
_HOLD_S = 3.0


_child: subprocess.Popen | None = None


def install(message: str) -> None:
    """Routes fd 2 through the filter; `message` starts the one line that replaces an abort."""
    global _child
    read, write = os.pipe()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {root!r}); from train.fatal_filter import main; main()"
    _child = subprocess.Popen([sys.executable, "-I", "-c", code, message], stdin=read, stdout=2, stderr=2,
                              close_fds=True, start_new_session=True)  # own session: a Ctrl-C leaves it to finish
    os.close(read)
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)


def drain(timeout: float = 2.0) -> None:
    """Before an immediate exit: closes stderr and lets the filter write out everything it holds."""
    if _child is None:
        return
    sys.stderr.flush()
    os.close(2)
    try:
        _child.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def _reason(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    status = text.split("absl::Status:", 1)[-1].strip() if "absl::Status:" in text else ""
    return " ".join(status.split())[:200]


def main() -> None:
    """The child: copies stdin to stdout, replacing a fatal coordination-service abort by one line."""
    message = sys.argv[1]
    out = sys.stdout.buffer
    held: list[bytes] = []
    pending = b""  # an incomplete line that may be the start of a suspect one
    swallowing = False
    while True:
        ready, _, _ = select.select([0], [], [], _HOLD_S if held or pending else None)
        if not ready:  # nothing more came: what was held was not the prelude of an abort
            out.write(b"".join(held) + pending)
            out.flush()
            held, pending = [], b""
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        if swallowing:
            continue
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line += b"\n"
            if FATAL in line:
                reason = _reason(line)
                out.write(f"{message}{': ' + reason if reason else ''}\n".encode())
                out.flush()
                held, pending, swallowing = [], b"", True
                break
            if _SUSPECT.match(line):
                held.append(line)
            else:
                out.write(b"".join(held) + line)
                held = []
        if pending and not swallowing and not re.match(rb"^[EWF]\d|^Add|^:UNK|^RPC", pending):
            out.write(b"".join(held) + pending)  # e.g. a progress bar redrawn with \r: shown as it comes
            held, pending = [], b""
        out.flush()
    if not swallowing:
        out.write(b"".join(held) + pending)
        out.flush()
