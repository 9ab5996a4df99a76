"""The registry of data sources, and the train/eval data of an experiment.

A source is `builder(config, split, model_vocab_size) -> Dataset`. Entries are
callables or `"module:function"` paths imported on first use, so a slow import
(TFDS) is paid only by runs that read it and the registry imports no plug-in.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import ml_collections

from model import ModelConfig
from train.config import model_config
from train.data.base import BatchIterator, Dataset
from train.data.synthetic import synthetic_source

Builder = Callable[[ml_collections.ConfigDict, str, int], Dataset]

SOURCES: dict[str, Builder | str] = {
    "synthetic_random": synthetic_source("random"),
    "synthetic_pattern": synthetic_source("pattern"),
    # TFDS text -> tokenize -> pack -> batch, with grain (train/data/pipeline.py)
    "tfds": "train.data.pipeline:build_tfds",
}


def register_source(name: str, builder: Builder | str) -> None:
    """Adds a source under `name` (a builder, or the "module:function" that is one)."""
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is already registered")
    SOURCES[name] = builder


def _builder(name: str) -> Builder:
    entry = SOURCES[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = SOURCES[name] = getattr(importlib.import_module(module), attr)
    return entry


def check_data(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first data field that no source would accept; reads nothing."""
    from train.data.tokenizers import TOKENIZERS, ByteTokenizer

    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r} is not registered; valid sources: {', '.join(sorted(SOURCES))}")
    if d.seq_len <= 0:
        raise ValueError(f"data.seq_len={d.seq_len} must be positive")
    if d.worker_count < 0:
        raise ValueError(f"data.worker_count={d.worker_count} must be >= 0 (0 tokenizes in the main process)")
    if d.shuffle_tokens < 0:
        raise ValueError(f"data.shuffle_tokens={d.shuffle_tokens} must be >= 0 (0: rows in order)")
    if d.tokenizer.name not in TOKENIZERS:
        raise ValueError(f"data.tokenizer.name={d.tokenizer.name!r} is not one of: {', '.join(TOKENIZERS)}")
    # A tokenizer's vocabulary known without preparing any data (the byte one's, or one trained to a declared
    # size): a model.vocab_size below it fails here, not after the dataset was prepared (train/config.py).
    vocab, tok = config.model.vocab_size, d.tokenizer
    known = ByteTokenizer.vocab_size if tok.name == "byte" else tok.vocab_size if (
        tok.name == "sentencepiece" and tok.path is None) else None
    if d.source == "tfds" and vocab is not None and known is not None and vocab < known:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the {tok.name} tokenizer's {known} tokens")


def build_dataset(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
    """The `split` of `config.data.source`, for a model of `vocab_size` tokens."""
    name = config.data.source
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not registered; valid sources: {', '.join(sorted(SOURCES))}")
    return _builder(name)(config, split, vocab_size)


@dataclasses.dataclass
class RunData:
    """An experiment's train and eval splits, and its ModelConfig (whose vocabulary the tokenizer sets)."""

    train: Dataset
    eval: Dataset
    model_cfg: ModelConfig
    global_batch: int

    def batches(self, dataset: Dataset, **kwargs: int) -> BatchIterator:
        """This process's slice of every global batch of `dataset`."""
        return dataset.iterator(self.global_batch, jax.process_index(), jax.process_count(), **kwargs)


def open_data(config: ml_collections.ConfigDict) -> RunData:
    """Opens (and prepares, on first use) both splits; the model takes the tokenizer's vocabulary."""
    train = build_dataset(config, config.data.train_split, model_config(config).vocab_size)
    model_cfg = model_config(config, train.vocab_size)
    evaluation = build_dataset(config, config.data.eval_split, model_cfg.vocab_size)
    return RunData(train, evaluation, model_cfg, config.train.batch_size)
