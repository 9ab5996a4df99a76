"""Tokenizers behind one interface: bytes, SentencePiece BPE (Llama 2 style), tiktoken BPE (Llama 3).

Every tokenizer keeps two invariants, for any text (tests/test_tokenizers.py):

* `decode(encode(text)) == text` (lossless, whatever the unicode), and
* `sum(token_bytes(encode(text))) == len(text.encode("utf-8"))`: each token is
  charged the UTF-8 bytes of source text it stands for, so bits per byte
  compares fairly across tokenizers.

`build_tokenizer(config.data.tokenizer, ...)` picks one from `TOKENIZERS`.
"""

from __future__ import annotations

import abc
import base64
import binascii
import logging
import os
import re
from typing import Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
import tiktoken

from train.data.sentencepiece_training import digest, train_sentencepiece

log = logging.getLogger(__name__)


class Tokenizer(abc.ABC):
    """Text <-> token ids; every id is below `vocab_size` (the embedding rows a model needs)."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens are dropped, malformed UTF-8 becomes U+FFFD."""

    @abc.abstractmethod
    def token_bytes(self, ids: Sequence[int]) -> np.ndarray:
        """int32 UTF-8 byte count of source text per token (specials 0); call it on whole documents."""

    def model_file(self) -> bytes | None:
        """The bytes of a `tokenizer.model` that recreates this tokenizer, where one exists."""
        return None

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short stable hash of the vocabulary (recorded in run.json)."""

    def encode_document(self, text: str) -> list[int]:
        """`[bos] + encode(text) + [eos]`: as Llama 3 does, both ends of every document are marked."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def _as_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"token ids must be one sequence (1-D), got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size}) for the {self.name} tokenizer")
        return arr

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


# ----------------------------------------------------------------------------- byte


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; then pad=256, bos=257, eos=258, so vocab_size is 259."""

    name = "byte"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        arr = self._as_ids(ids)
        return bytes(arr[arr < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> np.ndarray:
        return (self._as_ids(ids) < 256).astype(np.int32)

    def fingerprint(self) -> str:
        return "byte-" + digest(b"utf8-bytes;pad=256;bos=257;eos=258")


# ----------------------------------------------------------------------------- sentencepiece

_SPACE = "\u2581"  # SentencePiece's visible space "▁"
# Appended to a serialized ModelProto, this is a second normalizer_spec (field 3) holding only
# add_dummy_prefix=false (field 3); protobuf merges repeated embedded messages, so it overrides that flag.
_NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])
_UNK_TEXT = "\u2047".encode()  # what SentencePiece shows for <unk> ("⁇")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; with byte fallback (Llama 2) every text round-trips exactly.

    Two SentencePiece details would break the invariants and are handled here: the
    dummy-prefix space a Llama 2 model puts before each text (charged 0 bytes and dropped
    on decode, at the start of `ids` and after every BOS), and a literal "▁" in the text
    (SentencePiece reads it as a space; we encode it as its three byte pieces). <unk>,
    which byte fallback never emits, decodes as "⁇".
    """

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(
                f"{source} is not a SentencePiece model ({e}); a Llama 3 tiktoken file needs "
                "data.tokenizer.name='tiktoken'"
            ) from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{source}: the SentencePiece model defines no BOS/EOS piece (bos_id/eos_id = -1)")
        # Llama 2 has no pad piece (pad_id = -1). <unk> never appears in byte-fallback output,
        # so it is a pad id that cannot be mistaken for real text (or for the EOS that ends a document).
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()
        self._dummy_prefix = sp.normalize("a").startswith(_SPACE)
        self._plain = sp  # encodes text that follows a literal "▁": never a dummy prefix
        if self._dummy_prefix:
            self._plain = spm.SentencePieceProcessor(model_proto=model_proto + _NO_DUMMY_PREFIX)
        probe = "a  b\tc\u00e9"
        if sp.normalize(probe) != (_SPACE if self._dummy_prefix else "") + probe.replace(" ", _SPACE):
            log.warning("%s does not use identity normalization: text will not round-trip exactly", source)

        # Each id's text as bytes; specials (control pieces, pad) have none, so decode drops them.
        pieces, leading_space = [], np.zeros(self.vocab_size, bool)
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or i == self.pad_id:
                data = b""
            elif sp.is_byte(i):
                data = bytes([int(piece[3:5], 16)])  # "<0xNN>"
            elif sp.is_unknown(i):
                data = _UNK_TEXT
            else:
                data = piece.replace(_SPACE, " ").encode("utf-8")
                leading_space[i] = piece.startswith(_SPACE)
            pieces.append(data)
        self._pieces, self._leading_space = pieces, leading_space
        self._lengths = np.array([len(p) for p in pieces], np.int32)
        bar = [sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE.encode()]
        self._bar_ids = bar if all(sp.is_byte(i) for i in bar) else None
        if self._bar_ids is None:
            log.warning("%s has no byte fallback: characters outside its vocabulary become <unk>", source)
        self._fingerprint = "spm-" + digest(model_proto)
        self._model_proto = model_proto

    def encode(self, text: str) -> list[int]:
        if self._bar_ids is None or _SPACE not in text:
            return self._sp.encode(text)
        head, *rest = text.split(_SPACE)
        ids = self._sp.encode(head)
        for part in rest:  # a literal "▁": its bytes, then the text after it (no second dummy prefix)
            ids += self._bar_ids + self._plain.encode(part)
        return ids

    def _dummy_spaces(self, arr: np.ndarray) -> np.ndarray:
        """Where a token carries the dummy-prefix space: the first token of a text (start, or after BOS)."""
        if not self._dummy_prefix or not arr.size:
            return np.zeros(arr.shape, bool)
        starts = np.ones(arr.shape, bool)
        starts[1:] = arr[:-1] == self.bos_id
        return starts & self._leading_space[arr]

    def decode(self, ids: Sequence[int]) -> str:
        arr = self._as_ids(ids)
        dummy = self._dummy_spaces(arr)
        data = b"".join(self._pieces[i][d:] for i, d in zip(arr.tolist(), dummy.tolist()))
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> np.ndarray:
        arr = self._as_ids(ids)
        return self._lengths[arr] - self._dummy_spaces(arr).astype(np.int32)

    def model_file(self) -> bytes:
        return self._model_proto

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- tiktoken

# Llama 3's pre-tokenizer split, as written in Meta's llama/tokenizer.py (github.com/meta-llama/llama3);
# it is the cl100k_base pattern of tiktoken.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 appends 256 special tokens to its 128000 BPE ranks (vocabulary 128256, model card and
# llama/tokenizer.py). These slots are named; the rest are <|reserved_special_token_K|>, K counting up.
_LLAMA3_NAMED = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"
}  # fmt: skip
_LLAMA3_N_SPECIAL = 256
# Llama 3 has no pad token; Llama 3.1 names slot 4 <|finetune_right_pad_id|> (its llama/tokenizer.py).
_LLAMA3_PAD_SLOT = 4
# Meta's encoder cuts input into 400k-character windows and breaks runs of more than 25k
# (non-)whitespace characters, which tiktoken otherwise handles very slowly or not at all.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
# Anchored at run starts (lookbehind), so the scan stays linear in the text length.
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (_TIKTOKEN_MAX_RUN + 1, _TIKTOKEN_MAX_RUN + 1))


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3 special tokens in id order (id = number of BPE ranks + index)."""
    reserved = iter(range(_LLAMA3_N_SPECIAL))
    return [_LLAMA3_NAMED.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(_LLAMA3_N_SPECIAL)]


def _read_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parses a tiktoken BPE file: one `base64(token bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{source} line {lineno} is not 'base64-token rank' as in a tiktoken BPE file (Llama 3 "
                "tokenizer.model); a SentencePiece model needs data.tokenizer.name='sentencepiece'"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{source}: BPE ranks must be 0..{len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{source}: a byte-level BPE file must hold all 256 single bytes, so any text can be encoded")
    return ranks


def _tiktoken_chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _TIKTOKEN_MAX_CHARS):
        window, last = text[start : start + _TIKTOKEN_MAX_CHARS], 0
        for m in _LONG_RUN.finditer(window):
            for cut in range(m.start() + _TIKTOKEN_MAX_RUN, m.end(), _TIKTOKEN_MAX_RUN):
                yield window[last:cut]
                last = cut
        yield window[last:]


class TiktokenTokenizer(Tokenizer):
    """A Llama 3 style byte-level BPE: tiktoken ranks + the Llama 3 pattern and special tokens."""

    name = "tiktoken"

    def __init__(self, data: bytes, source: str):
        ranks = _read_tiktoken_ranks(data, source)
        self.n_ranks = len(ranks)
        specials = llama3_special_tokens()
        special_ids = {tok: self.n_ranks + i for i, tok in enumerate(specials)}
        self._fingerprint = "tiktoken-" + digest(data, "\n".join(specials).encode())
        self._data = data
        self._enc = tiktoken.Encoding(
            name=self._fingerprint, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids
        )
        self.vocab_size = self.n_ranks + len(specials)
        self.bos_id, self.eos_id = special_ids["<|begin_of_text|>"], special_ids["<|end_of_text|>"]
        self.pad_id = self.n_ranks + _LLAMA3_PAD_SLOT
        self._lengths = np.zeros(self.vocab_size, np.int32)
        for token, rank in ranks.items():
            self._lengths[rank] = len(token)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: text that spells a special token ("<|eot_id|>") is ordinary text.
        ids: list[int] = []
        for chunk in _tiktoken_chunks(text):
            ids += self._enc.encode_ordinary(chunk)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        arr = self._as_ids(ids)
        return self._enc.decode_bytes(arr[arr < self.n_ranks].tolist()).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> np.ndarray:
        return self._lengths[self._as_ids(ids)]

    def model_file(self) -> bytes:
        return self._data

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- registry


def _read_path(tok_cfg: ml_collections.ConfigDict) -> tuple[bytes, str]:
    path = os.path.expanduser(os.fspath(tok_cfg.get("path")))
    if not os.path.isfile(path):
        kind = tok_cfg.get("name")
        raise FileNotFoundError(f"data.tokenizer.path={path!r} is not a file (expected a {kind} tokenizer.model)")
    with open(path, "rb") as f:
        return f.read(), f"data.tokenizer.path={path!r}"


def _build_byte(tok_cfg: ml_collections.ConfigDict, **_: object) -> Tokenizer:
    if tok_cfg.get("path"):
        path = tok_cfg.get("path")
        raise ValueError(f"data.tokenizer.path={path!r} is set but the byte tokenizer reads no file; unset it")
    return ByteTokenizer()


def _build_sentencepiece(
    tok_cfg: ml_collections.ConfigDict,
    *,
    cache_dir: str | os.PathLike | None = None,
    training_texts: Callable[[], Iterable[str]] | None = None,
) -> Tokenizer:
    if tok_cfg.get("path"):
        return SentencePieceTokenizer(*_read_path(tok_cfg))
    if training_texts is None:
        raise ValueError(
            "data.tokenizer.path is unset, so the sentencepiece tokenizer must be trained, but no training text was "
            "given; set data.tokenizer.path to a SentencePiece tokenizer.model"
        )
    vocab_size = tok_cfg.get("vocab_size")
    model = train_sentencepiece(training_texts, vocab_size, cache_dir)
    return SentencePieceTokenizer(model, source=f"a trained model (data.tokenizer.vocab_size={vocab_size})")


def _build_tiktoken(tok_cfg: ml_collections.ConfigDict, **_: object) -> Tokenizer:
    if not tok_cfg.get("path"):
        raise ValueError("data.tokenizer.path is required for tiktoken: a Llama 3 tokenizer.model (tiktoken BPE file)")
    return TiktokenTokenizer(*_read_path(tok_cfg))


# name -> builder(tok_cfg, *, cache_dir, training_texts) -> Tokenizer.
TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    "byte": _build_byte,
    "sentencepiece": _build_sentencepiece,
    "tiktoken": _build_tiktoken,
}


def build_tokenizer(
    tok_cfg: ml_collections.ConfigDict,
    *,
    cache_dir: str | os.PathLike | None = None,
    training_texts: Callable[[], Iterable[str]] | None = None,
) -> Tokenizer:
    """The tokenizer `config.data.tokenizer` names.

    `cache_dir` keeps trained SentencePiece models (None: train in memory, keep nothing);
    `training_texts` restarts an iterable of training documents (sentencepiece without a path).
    """
    name = tok_cfg.get("name")
    if name not in TOKENIZERS:
        valid = ", ".join(sorted(TOKENIZERS))
        raise ValueError(f"data.tokenizer.name={name!r} is not registered; valid tokenizers: {valid}")
    return TOKENIZERS[name](tok_cfg, cache_dir=cache_dir, training_texts=training_texts)
