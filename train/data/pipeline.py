"""Text corpora from TFDS through grain: shuffle, tokenize, pack with document masking, batch.

`data.source="tfds"` reads `data.dataset` (prepared by `train.data.builders`) with
this pipeline, run independently by every process on its own documents:

    tfds.data_source(split)             random-access array_record records
    .shuffle(seed).repeat()             train only: epoch e is permuted with seed + e
    [process_index::process_count]      this process's documents (disjoint, together all)
    .map(tokenize)                      [BOS] + text + [EOS], and each token's UTF-8 bytes
    .to_iter_dataset() / .mp_prefetch() data.worker_count processes tokenize ahead (train)
    PackIterDataset                     concatenate, cut into rows of seq_len + 1 tokens
    RowShuffleIterDataset               train only: blocks of ~data.shuffle_tokens tokens of rows, each in a seeded order
    .batch(global_batch // process_count).map(lm_batch)

Why rows are shuffled too: shuffling whole documents alone leaves every batch
(and hundreds of batches in a row) cut from one long document, e.g. one play,
so consecutive gradients are strongly correlated. Permuting blocks of
data.shuffle_tokens // (seq_len + 1) rows makes each batch a sample from many
documents, as random windows would, while keeping the stream position exact and
cheap to restore (the default 2^21 tokens, 32 MB, is the whole Shakespeare
train split; see experiments/LOG.md for what it changes).

Packing (as Llama 3, arXiv:2407.21783 §3.2: attention never crosses a document):
a row holds consecutive pieces of the document stream; `segment_ids` number them
1, 2, ... and `positions` restart at 0 for each, including a document's tail
continued from the previous row. `inputs` / `targets` are the row shifted by one;
`loss_mask` is 1 where the target is in the input's document (0 across a document
boundary and on padding, which only a finite pass's last row has). `target_bytes`
comes from `Tokenizer.token_bytes` on the whole document, so summed over all of a
process's targets plus its rows' first tokens it is exactly the text's UTF-8 bytes.

Processes: process p of P reads documents p, p + P, ... of the epoch order and
emits global_batch / P rows per batch; the global batch k is the processes' batch k
side by side, so it depends on P (and a saved position is only valid for the same
P and p). Over an epoch the processes together read every document exactly once.

Determinism and state: batch k of a process is a function of (seed, k, process
index, process count) alone. The iterator's state is a position in the
process's document stream, `{"document": d, "offset": t, "row": r}`: the block
of shuffled rows that starts at token t of its d-th document, r of whose rows
have been emitted (r = 0 and the next row's start without row shuffling).
JSON-able, independent of batch size and worker count (with row shuffling it
depends on the rows per block, which data.seq_len sets); restoring it
re-tokenizes the documents of one block and yields exactly the batches the
interrupted run would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from typing import Any, Callable, Iterator

import grain
from absl import flags as absl_flags
import ml_collections
import numpy as np

from train.data import builders
from train.data.base import Batch, BatchIterator, Dataset, local_rows
from train.data.tokenizers import Tokenizer, build_tokenizer

TOKENIZER_CACHE = "herd_tokenizers"  # under the TFDS data dir: trained SentencePiece models
_STATE_VERSION = 1
_TOKENIZERS: dict[str, Tokenizer] = {}  # one tokenizer per (corpus, tokenizer config) and process
# What a saved position depends on (not seq_len, batch size or worker count, which may change on resume).
_LAYOUT_HINTS = {
    "stream": "the same data.dataset, split, tokenizer, seed, data.shuffle and rows per shuffled block "
              "(data.shuffle_tokens // (data.seq_len + 1))",
    "process_count": "the same number of processes (each reads its own documents)",
    "process_index": "the process that saved it: the checkpoint must keep every process's data state",
}


def record_text(record: dict[str, Any], text_key: str) -> str:
    """The document under `text_key` of a record (UTF-8 bytes from TFDS; str from mocks)."""
    value = record[text_key]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"a document's data.text_key={text_key!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None


class Tokenize:
    """grain map: record -> int32 [n, 2] of (token id, UTF-8 bytes it stands for); picklable for workers."""

    def __init__(self, tokenizer: Tokenizer, text_key: str):
        self.tokenizer, self.text_key = tokenizer, text_key

    def __call__(self, record: dict[str, Any]) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode_document(record_text(record, self.text_key)), np.int32)
        return np.stack([ids, self.tokenizer.token_bytes(ids).astype(np.int32)], axis=-1)


class _PackIterator(grain.DatasetIterator):
    """Concatenates [n, 2] documents and cuts the stream into rows of `length` (see module doc)."""

    def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int, document: int, offset: int):
        super().__init__(parent)
        self._length, self._pad_id = length, pad_id
        self._fetched = document  # documents of the stream taken so far (the parent starts at `document`)
        self._skip = offset  # tokens of the parent's first document emitted before a resume
        self._doc: np.ndarray | None = None  # the document being cut, if any
        self._offset = 0  # its tokens already emitted
        self._arange = np.arange(length, dtype=np.int32)

    def _next_document(self) -> tuple[np.ndarray, int]:
        doc, skip = next(self._parent), self._skip
        if skip >= len(doc):
            raise ValueError(f"data iterator state offset {skip} is past the end of document {self._fetched} "
                             f"({len(doc)} tokens): it was saved with another dataset, tokenizer or seed")
        self._fetched, self._skip = self._fetched + 1, 0
        return doc, skip

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._length
        tokens, nbytes = np.full(n, self._pad_id, np.int32), np.zeros(n, np.int32)
        segments, positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
        filled, segment = 0, 0
        while filled < n:
            if self._doc is None:
                try:
                    self._doc, self._offset = self._next_document()
                except StopIteration:
                    if not filled:
                        raise
                    break  # a finite pass ends: pad the last row
            take = min(n - filled, len(self._doc) - self._offset)
            piece = self._doc[self._offset : self._offset + take]
            segment += 1
            tokens[filled : filled + take], nbytes[filled : filled + take] = piece[:, 0], piece[:, 1]
            segments[filled : filled + take], positions[filled : filled + take] = segment, self._arange[:take]
            filled += take
            self._offset += take
            if self._offset == len(self._doc):
                self._doc = None
        return {"tokens": tokens, "bytes": nbytes, "segment_ids": segments, "positions": positions}

    def get_state(self) -> dict[str, int]:
        if self._doc is None:
            return {"document": self._fetched, "offset": self._skip}
        return {"document": self._fetched - 1, "offset": self._offset}

    def set_state(self, state: dict[str, int]) -> None:
        # grain cannot seek an interleaved multi-worker parent, so a position is restored by
        # building the pipeline from that document instead (PackIterDataset(document=, offset=)).
        raise NotImplementedError("restore a packed stream with TfdsIterator.set_state, which rebuilds it there")


class PackIterDataset(grain.IterDataset):
    """Concatenate-and-split packing of token documents into rows of `length`, with segment ids and positions.

    The parent yields the stream from document `document` on; the first `offset` tokens of that one are skipped.
    """

    def __init__(self, parent: grain.IterDataset, length: int, pad_id: int, document: int = 0, offset: int = 0):
        super().__init__(parent)
        self._length, self._pad_id, self._start = length, pad_id, (document, offset)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._length, self._pad_id, *self._start)


class _RowShuffleIterator(grain.DatasetIterator):
    """Reads blocks of `block` packed rows and emits each block in a random order seeded by its start."""

    def __init__(self, parent: _PackIterator, block: int, seed: int, row: int):
        super().__init__(parent)
        self._block, self._seed = block, seed
        self._skip = row  # rows of the first block emitted before a resume
        self._rows: list[dict[str, np.ndarray]] = []  # the current block, in emission order
        self._next = 0  # rows of it emitted
        self._start: dict[str, int] = {}  # the stream position where the current block starts

    def _fill(self) -> None:
        self._start = self._parent.get_state()
        rows = []
        for _ in range(self._block):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        order = np.random.default_rng([self._seed, self._start["document"], self._start["offset"]]).permutation(
            len(rows))
        self._rows, self._next, self._skip = [rows[i] for i in order], self._skip, 0
        if self._next > len(self._rows):
            raise ValueError(f"data iterator state row {self._next} is past the end of its block of "
                             f"{len(self._rows)} rows: it was saved with another dataset, tokenizer or seed")

    def __next__(self) -> dict[str, np.ndarray]:
        while self._next >= len(self._rows):
            self._fill()
        self._next += 1
        return self._rows[self._next - 1]

    def get_state(self) -> dict[str, int]:
        if self._next >= len(self._rows):  # between blocks (or none read yet)
            return {**self._parent.get_state(), "row": self._skip}
        return {**self._start, "row": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        raise NotImplementedError("restore a packed stream with TfdsIterator.set_state, which rebuilds it there")


class RowShuffleIterDataset(grain.IterDataset):
    """Packed rows in blocks of `block`, each block permuted with a seed of (`seed`, the block's start).

    The parent (a PackIterDataset) must start where the block to resume starts; `row` rows of it are skipped.
    """

    def __init__(self, parent: PackIterDataset, block: int, seed: int, row: int = 0):
        super().__init__(parent)
        self._block, self._seed, self._row = block, seed, row

    def __iter__(self) -> _RowShuffleIterator:
        return _RowShuffleIterator(self._parent.__iter__(), self._block, self._seed, self._row)


def lm_batch(rows: dict[str, np.ndarray]) -> Batch:
    """Packed [B, T + 1] rows -> the [B, T] training batch of `train.step` (inputs/targets shifted by one)."""
    tokens, segments = rows["tokens"], rows["segment_ids"]
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": same_document.astype(np.float32),
        "positions": rows["positions"][:, :-1],
        "segment_ids": segments[:, :-1],
        "target_bytes": rows["bytes"][:, 1:],
    }


class TfdsIterator(BatchIterator):
    """This process's batches of a TfdsDataset; state = stream position + the layout it belongs to."""

    def __init__(self, build: Callable[[int, int], grain.IterDataset], layout: dict[str, Any]):
        self._build, self._layout = build, layout
        self._batches = 0  # yielded since position 0: checkpoints cross-check it against the train step
        self._start(0, 0)

    def _start(self, document: int, offset: int, row: int = 0) -> None:
        self._it = iter(self._build(document, offset, row))
        # Worker processes must stop before the interpreter tears down what grain needs to stop them.
        weakref.finalize(self, self._it.close)

    def __next__(self) -> Batch:
        try:
            batch = next(self._it)
            self._batches += 1
            return batch
        except absl_flags.UnparsedFlagAccessError:
            # grain's worker processes read grain's absl flags; an absl app (the herd CLI) has parsed them.
            raise ValueError("data.worker_count > 0 needs absl flags parsed: run inside an absl app (the herd CLI) "
                             "or call absl.flags.FLAGS.mark_as_parsed() first") from None

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, **self._layout, "position": self._it.get_state(), "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        position = state.get("position")
        if state.get("version") != _STATE_VERSION or not isinstance(position, dict):
            raise ValueError(f"data iterator state {state!r} was not written by the tfds pipeline "
                             f"(version {_STATE_VERSION}); start a new --workdir")
        for key, value in self._layout.items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this run has {value!r}: "
                                 f"a position is only valid for {_LAYOUT_HINTS[key]}")
        self.close()
        self._start(int(position["document"]), int(position["offset"]), int(position.get("row", 0)))
        self._batches = int(state.get("batches", 0))

    def close(self) -> None:
        """Stops grain's worker processes, if any."""
        self._it.close()


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _texts(config: ml_collections.ConfigDict) -> Callable[[], Iterator[str]]:
    """Restartable texts of the train split: what a SentencePiece tokenizer is trained on."""

    def texts() -> Iterator[str]:
        source = builders.data_source(config, config.data.train_split)
        for i in range(len(source)):
            yield record_text(source[i], config.data.text_key)

    return texts


def corpus_tokenizer(config: ml_collections.ConfigDict, corpus: str) -> Tokenizer:
    """`data.tokenizer` for corpus `corpus`; trained on its train split once, cached in <data_dir>/herd_tokenizers."""
    d = config.data
    key = _spec_hash(dict(tokenizer=d.tokenizer.to_dict(), corpus=corpus, dir=builders.data_dir(config),
                          split=d.train_split, text_key=d.text_key))
    if key not in _TOKENIZERS:
        cache = os.path.join(builders.data_dir(config), TOKENIZER_CACHE)
        _TOKENIZERS[key] = build_tokenizer(d.tokenizer, cache_dir=cache, training_texts=_texts(config))
    return _TOKENIZERS[key]


class TfdsDataset(Dataset):
    """A split of a TFDS text dataset, tokenized and packed by grain (see the module docstring).

    `train=True`: shuffled, repeated, tokenized by data.worker_count processes. Otherwise
    (evaluation) read in order in this process, since the loop rebuilds that iterator
    for every evaluation and worker processes take seconds to start.
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str, train: bool):
        d = config.data
        if d.seq_len <= 0:
            raise ValueError(f"data.seq_len={d.seq_len} must be positive")
        if d.worker_count < 0:
            raise ValueError(f"data.worker_count={d.worker_count} must be >= 0 (0 tokenizes in the main process)")
        builder = builders.prepare(config)
        try:
            empty = builder.info.splits[split].num_examples == 0
        except (KeyError, ValueError):
            empty = False  # an unknown split: data_source names the valid ones
        if empty:  # checked first: array_record cannot even open a split without files
            raise ValueError(f"split {split!r} of data.dataset={d.dataset!r} ({builder.data_dir}) holds no documents")
        self.source = builders.data_source(config, split)
        self.name, self.split, self.text_key = builder.info.full_name, split, d.text_key
        self.tokenizer = corpus_tokenizer(config, self.name)
        self.vocab_size = self.tokenizer.vocab_size
        self.seq_len, self.seed = d.seq_len, config.seed % 2**32  # grain shuffle seeds are uint32
        self.shuffle, self.workers = bool(d.shuffle and train), d.worker_count if train else 0
        if not isinstance(d.shuffle_tokens, int) or d.shuffle_tokens < 0:
            raise ValueError(f"data.shuffle_tokens={d.shuffle_tokens!r} must be an integer >= 0 (0: rows in order)")
        rows = d.shuffle_tokens // (d.seq_len + 1)
        self.shuffle_rows = rows if self.shuffle and rows > 1 else 0

    def pipeline(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                 epochs: int | None = None, document: int = 0, offset: int = 0, row: int = 0) -> grain.IterDataset:
        """This process's batches from token `offset` of its `document`-th document (then `row` rows into
        the shuffled block that starts there); `epochs=None` repeats forever."""
        rows = local_rows(global_batch, process_index, process_count)
        if len(self.source) < process_count:
            raise ValueError(f"split {self.split!r} of {self.name} has {len(self.source)} documents, fewer than the "
                             f"{process_count} processes that each read their own")
        ds = grain.MapDataset.source(self.source)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        # After shuffle: each epoch gets its own permutation. Before slicing: over an epoch the
        # processes together read every document once.
        ds = ds.repeat(epochs)[process_index::process_count][document:].map(Tokenize(self.tokenizer, self.text_key))
        docs = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            docs = docs.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=2))
        packed = PackIterDataset(docs, self.seq_len + 1, self.tokenizer.pad_id, document, offset)
        if self.shuffle_rows:
            packed = RowShuffleIterDataset(packed, self.shuffle_rows, self.seed, row)
        elif row:
            raise ValueError(f"data iterator state row={row} was saved with row shuffling (data.shuffle_tokens), "
                             "which this run has off")
        return packed.batch(len(rows), drop_remainder=False).map(lm_batch)

    def iterator(self, global_batch: int, process_index: int = 0, process_count: int = 1,
                 epochs: int | None = None) -> TfdsIterator:
        """Batches of `global_batch // process_count` rows from this process's documents.

        The train split repeats (reshuffled each epoch); the eval split is read in order
        and starts over when it runs out. `epochs` instead ends after that many passes,
        the last row padded and the last batch possibly short.
        """
        layout = dict(stream=self.stream(), process_count=process_count, process_index=process_index)
        build = functools.partial(self.pipeline, global_batch, process_index, process_count, epochs)
        return TfdsIterator(build, layout)

    def stream(self) -> str:
        """A hash of what fixes the document token stream (what an iterator position refers to)."""
        spec = dict(dataset=self.name, split=self.split, text_key=self.text_key,
                    tokenizer=self.tokenizer.fingerprint(), seed=self.seed, shuffle=self.shuffle)
        if self.shuffle_rows:  # (absent when off, so positions saved before row shuffling existed stay valid)
            spec["shuffle_rows"] = self.shuffle_rows
        return _spec_hash(spec)

    def fingerprint(self) -> str:
        return "tfds-" + _spec_hash(dict(stream=self.stream(), seq_len=self.seq_len))


def build_tfds(config: ml_collections.ConfigDict, split: str, vocab_size: int) -> Dataset:
    """SOURCES entry. Split "train" or data.train_split (TFDS split syntax, e.g. "train[:90%]")
    is the training data, read as data.train_split; any other split (data.eval_split) is
    evaluation data. The model's vocabulary is replaced by the tokenizer's (`Dataset.vocab_size`).
    """
    del vocab_size
    train = split in ("train", config.data.train_split)
    return TfdsDataset(config, config.data.train_split if train else split, train)


__all__ = ["PackIterDataset", "RowShuffleIterDataset", "TfdsDataset", "TfdsIterator", "Tokenize", "build_tfds", "lm_batch"]
