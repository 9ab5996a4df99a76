"""Tokenizers: lossless round trips, byte accounting, specials, caching, errors."""

import base64
import glob
import io
import os
import pathlib
import random

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from train.data import sentencepiece_training as spt
from train.data import tokenizers as tk

TEXTS = sorted(glob.glob(os.path.join(os.path.dirname(__import__("shksprdata").__file__), "texts", "*_gut.txt")))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


TRAIN_PLAYS = [_read(p) for p in TEXTS[:3]]
HELD_OUT = _read(TEXTS[3])[:30_000]  # a play the models were not trained on

TRICKY = [
    "",
    " ",
    "\n",
    "  leading, trailing and   multiple spaces  ",
    "lines\n\nwith a blank one\n    indented\n\ttabbed\n\n\n",
    "emoji 🤖 👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "CJK 漢字 かな カナ 한국어; RTL עברית العربية",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zalgo z\u0336\u0317a\u0335",
    "controls \x00\x01\x07\x1b\x7f and \r\n crlf \r",
    "\ufeffBOM, zero width\u200b joiner\u200d, odd spaces \u00a0\u2028\u2029\u3000",
    "▁",
    "▁starts with a literal ▁ and ▁▁ two",
    "specials spelt out: <|begin_of_text|> <|eot_id|> <s> </s> <unk> <pad> <0x41>",
    "digits 1234567890 3.14159 1e-9",
]
TRICKY.append("".join(TRICKY))


def _tok_cfg(**kw: object) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(name="byte", path=None, vocab_size=512))
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def spm_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("spm_cache"))


@pytest.fixture(scope="module")
def trained(spm_cache: str) -> tk.Tokenizer:
    return tk.build_tokenizer(_tok_cfg(name="sentencepiece"), cache_dir=spm_cache, training_texts=lambda: TRAIN_PLAYS)


@pytest.fixture(scope="module")
def llama2_style_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model with Llama 2's exact normalizer (dummy prefix on) and no pad piece."""
    writer = io.BytesIO()
    lines = (line for play in TRAIN_PLAYS for line in play.split("\n") if line)
    options = dict(spt.TRAINER_OPTIONS, add_dummy_prefix=True, pad_id=-1)
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=writer, vocab_size=512, **options)
    path = tmp_path_factory.mktemp("llama2") / "tokenizer.model"
    path.write_bytes(writer.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny tiktoken BPE file: the 256 bytes, then a few merges, ranked in order."""
    merges = [b"th", b"he", b"the", b" t", b" the", b"an", b" a", b"nd", b" and", b"  ", b"    ", b"\n\n", b"ou", b"er"]
    tokens = [bytes([b]) for b in range(256)] + merges
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return str(path)


@pytest.fixture(scope="module", params=["byte", "sentencepiece", "llama2_style", "tiktoken"])
def tok(request: pytest.FixtureRequest) -> tk.Tokenizer:
    if request.param == "byte":
        return tk.build_tokenizer(_tok_cfg())
    if request.param == "sentencepiece":
        return request.getfixturevalue("trained")
    if request.param == "llama2_style":
        return tk.build_tokenizer(_tok_cfg(name="sentencepiece", path=request.getfixturevalue("llama2_style_path")))
    return tk.build_tokenizer(_tok_cfg(name="tiktoken", path=request.getfixturevalue("tiktoken_path")))


@pytest.mark.parametrize("text", [HELD_OUT, *TRICKY], ids=["shakespeare", *(f"tricky{i}" for i in range(len(TRICKY)))])
def test_round_trip_and_byte_count(tok: tk.Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    counts = tok.token_bytes(ids)
    assert counts.dtype == np.int32 and counts.shape == (len(ids),)
    assert counts.sum() == len(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)


def test_random_unicode_round_trip(tok: tk.Tokenizer) -> None:
    rng = random.Random(0)
    pieces = [*"ab ▁\n\t\r", "  ", "the", "🤖", "漢", "e\u0301", "\x00", "\ufeff", "\u00a0"]
    code_points = [lambda: rng.randint(0, 0xD7FF), lambda: rng.randint(0xE000, 0x10FFFF)]  # no surrogates
    for _ in range(300):
        # Mostly tricky pieces, some arbitrary code points.
        chars = [
            rng.choice(pieces) if rng.random() < 0.8 else chr(rng.choice(code_points)())
            for _ in range(rng.randint(0, 30))
        ]
        text = "".join(chars)
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.token_bytes(ids).sum() == len(text.encode("utf-8")), repr(text)


def test_documents_and_specials(tok: tk.Tokenizer) -> None:
    a, b = "  First document,\nwith two lines.", "Second: ▁ 🤖"
    doc = tok.encode_document(a)
    assert doc == [tok.bos_id, *tok.encode(a), tok.eos_id]
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(specials) == 3 and max(specials) < tok.vocab_size
    assert tok.token_bytes([tok.bos_id, tok.eos_id, tok.pad_id]).tolist() == [0, 0, 0]
    # A packed row: the invariants hold document by document, and padding vanishes.
    packed = doc + tok.encode_document(b) + [tok.pad_id] * 3
    assert tok.decode(packed) == a + b
    assert tok.token_bytes(packed).sum() == len((a + b).encode("utf-8"))
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        tok.token_bytes([[tok.bos_id]])


def test_fingerprints_differ(trained: tk.Tokenizer, llama2_style_path: str, tiktoken_path: str) -> None:
    toks = [
        tk.build_tokenizer(_tok_cfg()),
        trained,
        tk.build_tokenizer(_tok_cfg(name="sentencepiece", path=llama2_style_path)),
        tk.build_tokenizer(_tok_cfg(name="tiktoken", path=tiktoken_path)),
    ]
    prints = [t.fingerprint() for t in toks]
    assert len(set(prints)) == 4 and all(len(p) < 40 for p in prints)


def test_byte_layout() -> None:
    tok = tk.build_tokenizer(_tok_cfg())
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.encode("é") == [0xC3, 0xA9]


def test_trained_sentencepiece(trained: tk.Tokenizer, spm_cache: str) -> None:
    assert trained.vocab_size == 512
    sp = trained._sp
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.encode("\n", out_type=str) == ["<0x0A>"]
    pieces = [sp.id_to_piece(i) for i in range(trained.vocab_size) if not sp.is_byte(i)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # split_digits
    assert len(trained.encode(HELD_OUT)) < len(HELD_OUT) / 1.5  # it learned merges (~1.8 chars a token)
    assert len(os.listdir(spm_cache)) == 1 and "bpe512" in os.listdir(spm_cache)[0]


def test_sentencepiece_cache_is_reused(trained: tk.Tokenizer, spm_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(**_: object) -> None:
        raise AssertionError("retrained although the model was cached")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = tk.build_tokenizer(_tok_cfg(name="sentencepiece"), cache_dir=spm_cache, training_texts=lambda: TRAIN_PLAYS)
    assert again.fingerprint() == trained.fingerprint()
    with pytest.raises(AssertionError, match="retrained"):  # different text -> a different cache entry
        tk.build_tokenizer(_tok_cfg(name="sentencepiece"), cache_dir=spm_cache, training_texts=lambda: TRAIN_PLAYS[:2])


def test_sentencepiece_training_is_deterministic(trained: tk.Tokenizer) -> None:
    fresh = tk.build_tokenizer(_tok_cfg(name="sentencepiece"), training_texts=lambda: TRAIN_PLAYS)  # in memory
    assert fresh.fingerprint() == trained.fingerprint()


def testtraining_lines_fit_sentencepiece() -> None:
    long = "word " * 1000
    lines = list(spt.training_lines(["a\n\nb", long]))
    assert lines[:2] == ["a", "b"] and "".join(lines[2:]) == long
    assert max(len(line.encode("utf-8")) for line in lines) <= spt.TRAINER_OPTIONS["max_sentence_length"]


def test_load_saved_sentencepiece_model(trained: tk.Tokenizer, spm_cache: str) -> None:
    (path,) = glob.glob(os.path.join(spm_cache, "*.model"))
    loaded = tk.build_tokenizer(_tok_cfg(name="sentencepiece", path=path, vocab_size=99999))  # vocab_size unused
    assert loaded.fingerprint() == trained.fingerprint() and loaded.vocab_size == trained.vocab_size
    assert loaded.encode(HELD_OUT) == trained.encode(HELD_OUT)


def test_llama2_style_model(llama2_style_path: str) -> None:
    tok = tk.build_tokenizer(_tok_cfg(name="sentencepiece", path=llama2_style_path))
    assert tok._dummy_prefix and tok.pad_id == 0  # no pad piece: <unk> pads
    assert tok.encode("Hello") == tok._sp.encode("Hello")  # same ids as SentencePiece itself
    assert tok.token_bytes(tok.encode("the"))[0] == 3  # "▁the" is charged 3 bytes, not 4


def test_tiktoken_layout(tiktoken_path: str) -> None:
    tok = tk.build_tokenizer(_tok_cfg(name="tiktoken", path=tiktoken_path))
    n = 256 + 14
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (n + 256, n, n + 1, n + 4)
    names = tk.llama3_special_tokens()
    assert len(set(names)) == 256 and names[9] == "<|eot_id|>" and names[-1] == "<|reserved_special_token_250|>"
    assert names[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert names[6:8] == ["<|start_header_id|>", "<|end_header_id|>"]
    assert tok.encode(" the") == [256 + 4] and tok.bos_id not in tok.encode("<|begin_of_text|>")
    long = "x" * 60_000 + " " * 30_000 + "y"  # runs past Meta's 25k-character limit
    assert tok.decode(tok.encode(long)) == long


def _error(tok_cfg: ml_collections.ConfigDict, **kw: object) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        tk.build_tokenizer(tok_cfg, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "data.tokenizer" in msg, msg
    return msg


def test_errors(tmp_path: pathlib.Path, tiktoken_path: str, llama2_style_path: str) -> None:
    texts = lambda: TRAIN_PLAYS[:1]  # noqa: E731
    assert "valid tokenizers: byte, sentencepiece, tiktoken" in _error(_tok_cfg(name="wordpiece"))
    missing = os.path.join(tmp_path, "nope.model")
    assert "nope.model" in _error(_tok_cfg(name="sentencepiece", path=missing))
    assert "nope.model" in _error(_tok_cfg(name="tiktoken", path=missing))
    assert "no training text" in _error(_tok_cfg(name="sentencepiece"))
    assert "at least 260" in _error(_tok_cfg(name="sentencepiece", vocab_size=200), training_texts=texts)
    assert "needs at least" in _error(_tok_cfg(name="sentencepiece", vocab_size=270), training_texts=texts)
    assert "at most" in _error(_tok_cfg(name="sentencepiece", vocab_size=30_000), training_texts=texts)
    assert "no text" in _error(_tok_cfg(name="sentencepiece"), training_texts=lambda: ["", "\n"])
    assert "required" in _error(_tok_cfg(name="tiktoken"))
    assert "reads no file" in _error(_tok_cfg(path=tiktoken_path))
    assert "name='tiktoken'" in _error(_tok_cfg(name="sentencepiece", path=tiktoken_path))
    assert "name='sentencepiece'" in _error(_tok_cfg(name="tiktoken", path=llama2_style_path))
    partial = tmp_path / "partial.model"
    partial.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(200)))
    assert "256 single bytes" in _error(_tok_cfg(name="tiktoken", path=str(partial)))


def test_meta_style_tokenizer_files_are_recognised(
    trained: tk.Tokenizer, llama2_style_path: str, tiktoken_path: str, tmp_path: pathlib.Path
) -> None:
    from train.inference import tokenizer_from_file

    saved = tmp_path / "tokenizer.model"
    saved.write_bytes(trained.model_file())
    text = "Wherefore art thou, Romeo? ½ — ✓"
    for path, name in ((saved, "sentencepiece"), (llama2_style_path, "sentencepiece"), (tiktoken_path, "tiktoken")):
        loaded = tokenizer_from_file(path)
        assert loaded.name == name
        assert loaded.decode(loaded.encode(text)) == text
        assert loaded.model_file() == pathlib.Path(path).read_bytes()
    assert tokenizer_from_file(saved).encode(text) == trained.encode(text)
    (tmp_path / "junk.model").write_bytes(b"not a tokenizer")
    with pytest.raises(ValueError, match="neither a SentencePiece model nor a tiktoken"):
        tokenizer_from_file(tmp_path / "junk.model")
    assert tk.ByteTokenizer().model_file() is None
