"""The layout of a run directory, named in one place.

    <workdir>/checkpoints/<step>/     orbax checkpoints: train state + data iterator state
    <workdir>/damaged_checkpoints/    unreadable checkpoints moved aside (never deleted)
    <workdir>/metrics.jsonl           one JSON row of scalars per logged step (and eval/ rows)
    <workdir>/tensorboard/            the same scalars as TensorBoard events
    <workdir>/run.json                resolved config, versions, git commit, mesh, devices, data fingerprint
    <workdir>/tokenizer.model         the run's tokenizer, so sampling and export need no data
"""

from __future__ import annotations

import os
from pathlib import Path


class RunDir:
    """Paths of the files of one run directory (nothing is created here)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.abspath(root))
        self.checkpoints = self.root / "checkpoints"
        self.damaged_checkpoints = self.root / "damaged_checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.run_info = self.root / "run.json"
        self.tokenizer = self.root / "tokenizer.model"
