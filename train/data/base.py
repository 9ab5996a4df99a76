"""The dataset interface, the source registry and the synthetic sources."""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any, Callable

import ml_collections
import numpy as np

Batch = dict[str, np.ndarray]


class BatchIterator(abc.ABC):
    """Yields host-local batches; its state is JSON-able and restores the exact position."""

    @abc.abstractmethod
    def __next__(self) -> Batch: ...

    def __iter__(self) -> "BatchIterator":
        return self

    @abc.abstractmethod
    def get_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def set_state(self, state: dict[str, Any]) -> None: ...


class Dataset(abc.ABC):
    """A split of a corpus, already tokenized and packed into fixed-length rows."""

    #: Vocabulary the data needs, or None when any model vocabulary fits.
    vocab_size: int | None = None

    @abc.abstractmethod
    def iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1) -> BatchIterator:
        """Batches of `global_batch` rows of which this process reads its own slice."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short hash identifying exactly what is read (recorded in run.json)."""

    def decode(self, tokens: list[int]) -> str:
        """Text for tokens, where the source has a tokenizer."""
        return " ".join(map(str, tokens))


def local_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The rows of the global batch that this process reads."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)


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


def _synthetic(kind: str) -> Callable[..., Dataset]:
    def build(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
        return SyntheticDataset(kind, split, config.data.seq_len, vocab_size, config.seed)

    return build


def _tfds(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
    # Imported on use: TFDS is slow to import and synthetic runs do not need it.
    from train.data.pipeline import build_tfds

    return build_tfds(config, split, vocab_size)


# name -> builder(config, split, model vocab size) -> Dataset. Real corpora register here too.
SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str, int], Dataset]] = {
    "synthetic_random": _synthetic("random"),
    "synthetic_pattern": _synthetic("pattern"),
    "tfds": _tfds,  # train/data/pipeline.py: TFDS text -> tokenize -> pack -> batch, with grain
}


def build_dataset(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
    name = config.data.source
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not registered; valid sources: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](config, split, vocab_size)
