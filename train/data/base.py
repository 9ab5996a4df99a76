"""The dataset interface every source implements: host-local batches and a resumable position."""

from __future__ import annotations

import abc
from typing import Any

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


def local_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The rows of the global batch that this process reads."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)
