"""Training a Llama 2 style SentencePiece BPE model on a corpus, cached by content (used by `tokenizers`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from typing import Callable, Iterable, Iterator

import sentencepiece as spm


def digest(*parts: bytes) -> str:
    """A short hex hash of `parts` (length-prefixed, so the split between parts counts)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


# The Llama 2 recipe (arXiv:2307.09288 §2.1, reusing arXiv:2302.13971 §2): SentencePiece BPE,
# numbers split into digits, unknown UTF-8 decomposed into bytes. The other values are the
# trainer_spec stored in Meta's released Llama 2 tokenizer.model: identity normalization and
# whitespace kept as is, so text round-trips.
TRAINER_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.99995,
    max_sentence_length=4192, max_sentencepiece_length=16,
    # Ours: Llama 2 adds a dummy prefix, which charges a phantom space to every text and makes a
    # line start inside a document (after "\n") tokenize unlike the training lines. We train on
    # lines without one, so both agree; "\n" is never a piece and encodes as its byte <0x0A>.
    add_dummy_prefix=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    # The learned merges depend on the thread count (measured); one thread gives every machine the same model.
    num_threads=1,
    input_sentence_size=5_000_000, shuffle_input_sentence=True,  # more lines: a seeded random sample
    minloglevel=2,
)  # fmt: skip
_SP_SEED = 0
_SP_MAX_LINE_CHARS = 1024  # <= 4096 UTF-8 bytes, inside max_sentence_length
_SP_MIN_VOCAB = 256 + 4  # byte-fallback pieces + unk, bos, eos, pad


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on sentences: the non-empty lines, long ones cut to fit max_sentence_length."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training_texts must yield str to train data.tokenizer, got {type(text).__name__}")
        for line in text.split("\n"):
            for start in range(0, len(line), _SP_MAX_LINE_CHARS):
                yield line[start : start + _SP_MAX_LINE_CHARS]


def _trainer_error(err: RuntimeError, vocab_size: int) -> ValueError:
    """SentencePiece's trainer complaints as one line naming the config field."""
    msg = str(err)
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        why = f"too small: the training text needs at least {m.group(1)} (256 bytes + 4 specials + its characters)"
    elif m := re.search(r"value <= (\d+)", msg):
        why = f"too large for the training text, which supports at most {m.group(1)}"
    else:
        why = f"rejected by the SentencePiece trainer: {msg.splitlines()[0] if msg else err!r}"
    return ValueError(f"data.tokenizer.vocab_size={vocab_size} is {why}")


def train_sentencepiece(
    training_texts: Callable[[], Iterable[str]], vocab_size: int, cache_dir: str | os.PathLike | None = None
) -> bytes:
    """A serialized Llama 2 style BPE model trained on `training_texts()`, cached in `cache_dir`.

    The cache file name holds a hash of the text, the options and the SentencePiece version,
    so a second call with the same inputs loads instead of training. `training_texts` is
    called twice when training (once to hash, once to train), so it must restart each time.
    """
    if not isinstance(vocab_size, int) or vocab_size < _SP_MIN_VOCAB:
        raise ValueError(
            f"data.tokenizer.vocab_size={vocab_size!r} is too small for a byte-fallback SentencePiece model; "
            f"it needs at least {_SP_MIN_VOCAB} (256 byte pieces + 4 specials) plus the text's characters"
        )
    h, n_lines = hashlib.sha256(), 0
    for n_lines, line in enumerate(training_lines(training_texts()), 1):
        h.update(line.encode("utf-8") + b"\n")
    if not n_lines:
        raise ValueError("training_texts yielded no text to train the data.tokenizer (sentencepiece) model on")
    options = dict(TRAINER_OPTIONS, vocab_size=vocab_size, seed=_SP_SEED, sentencepiece=spm.__version__)
    key = digest(h.digest(), json.dumps(options, sort_keys=True).encode())
    path = os.path.join(os.fspath(cache_dir), f"sentencepiece-bpe{vocab_size}-{key}.model") if cache_dir else None
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()

    spm.set_random_generator_seed(_SP_SEED)  # the input_sentence_size sample
    writer = io.BytesIO()
    try:
        lines = training_lines(training_texts())
        trainer = dict(TRAINER_OPTIONS, vocab_size=vocab_size)
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=writer, **trainer)
    except RuntimeError as e:
        raise _trainer_error(e, vocab_size) from None
    model = writer.getvalue()
    if path:  # write then rename: concurrent processes never read a half-written model
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
            f.write(model)
        os.replace(f.name, path)
    return model
