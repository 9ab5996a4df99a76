"""The sweep's progress line: trials done / running / failed / pending, and an ETA from finished trials."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from train import trial as trial_lib


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class Progress:
    """Prints one line whenever a trial starts or ends; the ETA assumes `parallel` trials at a time."""

    def __init__(self, workdir: Path, names: Sequence[str], parallel: int, out: TextIO = sys.stderr):
        self.workdir, self.names, self.parallel, self.out = workdir, list(names), max(parallel, 1), out
        self.durations: list[float] = []  # wall seconds of the trials that ended in this invocation
        self.started = time.monotonic()
        self._last = ""

    def counts(self) -> Counter:
        statuses = [(trial_lib.read(self.workdir / n) or {}).get("status", "pending") for n in self.names]
        return Counter("pending" if s == "interrupted" else s for s in statuses)

    def line(self) -> str:
        c = self.counts()
        text = (f"herd sweep: {c['done']}/{len(self.names)} done, {c['running']} running, {c['failed']} failed, "
                f"{c['pending']} pending")
        if self.durations and (c["pending"] or c["running"]):
            mean = sum(self.durations) / len(self.durations)
            text += f"; ETA {_duration(mean * math.ceil((c['pending'] + c['running']) / self.parallel))}"
        return text

    def update(self) -> None:
        line = self.line()
        if line != self._last:
            print(line, file=self.out, flush=True)
            self._last = line

    def finished(self, record: Mapping[str, Any]) -> None:
        """Called when a trial's process ends: its duration feeds the ETA; a failure is shown with its reason."""
        started = record.get("started")
        if started and record.get("ended"):
            from datetime import datetime

            self.durations.append((datetime.fromisoformat(record["ended"]) - datetime.fromisoformat(started))
                                  .total_seconds())
        if record.get("status") == "failed":
            print(f"herd sweep: trial {record.get('name')} failed: {record.get('error')}", file=self.out, flush=True)
        self.update()
