"""Keeps orbax's internal logging out of herd's output; herd reports checkpoint failures itself.

Every failure of an orbax save or restore reaches `train.checkpoint` as an
exception, which it reports as one line (falling back, for a restore). Orbax
also logs each one, often with a traceback from a background thread, and
warns about options herd sets on purpose (read-only managers); when a write
fails, tensorstore's pending callbacks print "Event loop is closed" tracebacks
for every array still in flight, and the abandoned futures and coroutines of a
failed read print theirs (or a "never awaited" warning) when collected.
`install()` filters all of that out of the `absl` and `asyncio` loggers, the
interpreter's hooks and the warnings; `HERD_DEBUG=1` keeps everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
import warnings
from types import TracebackType

_installed = False
_lock = threading.Lock()
_ORBAX = f"{os.sep}orbax{os.sep}"


class _OrbaxFilter(logging.Filter):
    """Drops log records emitted from orbax's own source files, or (asyncio) about its abandoned tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _ORBAX in record.pathname or _ORBAX in message:
            return False
        if "exception was never retrieved" in message and re.search("ocdbt|tensorstore", message, re.I):
            return False  # a tensorstore read or write of orbax's, failed and reported already
        tb = record.exc_info[2] if record.exc_info else None
        return tb is None or not any(_ORBAX in frame.filename for frame in traceback.extract_tb(tb))


def _closed_loop_noise(exc: BaseException | None) -> bool:
    """A callback that found its asyncio loop closed: orbax's loop ended with the failure already reported."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _orbax_object(obj: object) -> bool:
    """A coroutine of orbax's, abandoned when a read or write it belonged to failed (and was reported)."""
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    return code is not None and _ORBAX in code.co_filename


def install() -> None:
    """Installs the filters once per process (not with HERD_DEBUG set)."""
    global _installed
    with _lock:
        if _installed or os.environ.get("HERD_DEBUG"):
            return
        _installed = True
    for name in ("absl", "asyncio"):  # orbax logs through absl; asyncio reports orbax's failed tasks
        logging.getLogger(name).addFilter(_OrbaxFilter())
    # The coroutines of a failed orbax read, collected unawaited (herd itself runs no coroutines).
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not _closed_loop_noise(exc):
            previous_excepthook(kind, exc, tb)

    def unraisablehook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not (_closed_loop_noise(unraisable.exc_value) or _orbax_object(unraisable.object)):
            previous_unraisable(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook

