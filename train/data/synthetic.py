"""Generated data for tests and benchmarks: random tokens, or a learnable pattern of packed documents."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import ml_collections
import numpy as np

from train.data.base import Batch, BatchIterator, Dataset, local_rows


class _SyntheticIterator(BatchIterator):
    def __init__(self, dataset: "SyntheticDataset", global_batch: int, process_index: int, process_count: int):
        self.dataset = dataset
        self.rows = local_rows(global_batch, process_index, process_count)
        self.step = 0

    def __next__(self) -> Batch:
        rows = [self.dataset.row(self.step, r) for r in self.rows]
        self.step += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class SyntheticDataset(Dataset):
    """Generated rows: `random` tokens (nothing to learn) or a learnable `pattern`.

    A pattern row packs one to three documents, each an arithmetic progression
    modulo the vocabulary with a random start and stride, so a model must read
    the context to predict and packed documents exercise segment masking.
    """

    SPLITS = {"train": 0, "validation": 1, "test": 2}

    def __init__(self, kind: str, split: str, seq_len: int, vocab_size: int, seed: int):
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r} for synthetic data; valid: {', '.join(self.SPLITS)}")
        self.kind, self.split, self.seq_len, self.vocab, self.seed = kind, split, seq_len, vocab_size, seed

    def row(self, step: int, row: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], step, row])
        t = self.seq_len + 1
        if self.kind == "random":
            tokens = rng.integers(0, self.vocab, t)
            segments, positions = np.ones(t, np.int32), np.arange(t, dtype=np.int32)
        else:
            cuts = np.sort(rng.choice(np.arange(4, t - 4), size=rng.integers(0, 3), replace=False))
            bounds = [0, *cuts.tolist(), t]
            tokens, segments, positions = [], [], []
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                start, stride = rng.integers(0, self.vocab), rng.integers(1, 8)
                tokens.append((start + stride * np.arange(hi - lo)) % self.vocab)
                segments.append(np.full(hi - lo, i + 1))
                positions.append(np.arange(hi - lo))
            tokens, segments, positions = map(np.concatenate, (tokens, segments, positions))
        # A target is only learnable within its own document.
        same_doc = segments[1:] == segments[:-1]
        return {
            "inputs": tokens[:-1].astype(np.int32),
            "targets": tokens[1:].astype(np.int32),
            "loss_mask": same_doc.astype(np.float32),
            "positions": np.asarray(positions[:-1], np.int32),
            "segment_ids": np.asarray(segments[:-1], np.int32),
            "target_bytes": np.ones(self.seq_len, np.int32),
        }

    def iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1) -> BatchIterator:
        return _SyntheticIterator(self, global_batch, process_index, process_count)

    def fingerprint(self) -> str:
        spec = dict(kind=self.kind, split=self.split, seq_len=self.seq_len, vocab=self.vocab, seed=self.seed)
        return "synthetic-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def synthetic_source(kind: str) -> Callable[[ml_collections.ConfigDict, str, int], Dataset]:
    """The source builder of `kind` ("random" or "pattern") for the registry."""

    def build(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
        return SyntheticDataset(kind, split, config.data.seq_len, vocab_size, config.seed)

    return build
