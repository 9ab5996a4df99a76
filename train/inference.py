"""Using trained models: load a run's latest checkpoint or a Hugging Face folder, sample, evaluate.

Shared by `herd sample`, `herd eval` and `herd convert`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import ml_collections

from model import ModelConfig, generate
from train.checkpoint import Checkpointer, CheckpointError
from train.config import apply_overrides
from train.experiment import from_record
from train.data import Dataset, build_dataset
from train.data.tokenizers import Tokenizer, build_tokenizer
from train.runtime import Runtime, local_data_parallel, mesh_devices
from train.workdir import RunDir


# train.data.builders.TEXT_SUFFIXES, named here so that loading a run does not import TFDS (seconds).
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclasses.dataclass
class Loaded:
    """A model ready to use: its config, parameters and tokenizer (None for synthetic data)."""

    model_cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    config: ml_collections.ConfigDict | None = None
    step: int | None = None
    source: str = ""
    workdir: str | None = None


def _run_record(workdir: str | os.PathLike) -> dict[str, Any]:
    """run.json, checked to hold the config and model a run records (the error names the file)."""
    path = RunDir(workdir).run_info
    if not path.is_file():
        raise FileNotFoundError(f"--workdir={workdir} has no {path.name}: not a herd run directory")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is the run's record of its config, "
                         "which herd needs to load the run") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or \
            not isinstance(record.get("extra"), dict) or not isinstance(record["extra"].get("model"), dict):
        raise ValueError(f"{path} lacks the run's config or extra.model: not a run.json written by herd train")
    return record


def config_from_run(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run recorded in its run.json, on top of the schema's declarations."""
    return from_record(_run_record(workdir)["config"], str(RunDir(workdir).run_info))


def load_workdir(workdir: str | os.PathLike, devices: list[jax.Device] | None = None) -> Loaded:
    """Parameters of the newest verified checkpoint in `workdir`, on `devices` (default: all local ones, data
    parallel). Read-only: a damaged checkpoint is skipped with a warning, never moved."""
    config = config_from_run(workdir)
    path = RunDir(workdir).run_info
    try:
        model_cfg = ModelConfig(**_run_record(workdir)["extra"]["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: extra.model is not a model config herd can build ({e})") from None
    ckpt = Checkpointer(workdir, every=1, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"--workdir={workdir} has no checkpoint yet (nothing under {ckpt.directory})")
        if devices is None:
            local = local_data_parallel(config)
            runtime = Runtime(local, model_cfg, mesh_devices(local))
        else:
            runtime = Runtime(config, model_cfg, devices)
        step, state, _ = ckpt.restore(runtime.abstract_state())
    finally:
        ckpt.close()
    return Loaded(model_cfg, state.params, run_tokenizer(config, workdir), config, step, f"{workdir} (step {step})",
                  os.fspath(workdir))


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer a run trained with: its saved tokenizer.model, the byte tokenizer, or None (synthetic)."""
    path = RunDir(workdir).tokenizer
    if path.is_file():
        return tokenizer_from_file(path)
    if config.data.source.startswith("synthetic"):
        return None
    return build_tokenizer(config.data.tokenizer)


def tokenizer_from_file(path: str | os.PathLike) -> Tokenizer:
    """A Meta-style `tokenizer.model`: Llama 2 SentencePiece or Llama 3 tiktoken, whichever it is."""
    errors = []
    for name in ("sentencepiece", "tiktoken"):
        try:
            return build_tokenizer(ml_collections.ConfigDict(dict(name=name, path=os.fspath(path), vocab_size=0)))
        except ValueError as e:
            errors.append(f"{name}: {e}")
    raise ValueError(f"{path} is neither a SentencePiece model nor a tiktoken BPE file ({'; '.join(errors)})")


def load_hf_dir(path: str | os.PathLike, flag: str = "--hf") -> Loaded:
    """A Hugging Face Llama folder, with its `tokenizer.model` when it has one (`flag` names it in errors)."""
    from model import hf

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag}={path} is not a directory")
    model_cfg, params = hf.load(path)
    tok_file = os.path.join(path, hf.TOKENIZER_FILE)
    tokenizer = tokenizer_from_file(tok_file) if os.path.isfile(tok_file) else None
    return Loaded(model_cfg, params, tokenizer, source=os.fspath(path))


def encode_prompt(loaded: Loaded, prompt: str) -> list[int]:
    """BOS + the prompt's tokens; without a tokenizer the prompt is space-separated token ids."""
    if not prompt.strip():
        raise ValueError("--prompt is empty; give some text to continue")
    if loaded.tokenizer is None:
        try:
            ids = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError(f"{loaded.source} has no tokenizer: --prompt must be token ids like '1 2 3'") from None
        bad = [i for i in ids if not 0 <= i < loaded.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"--prompt token {bad[0]} is outside the vocabulary [0, {loaded.model_cfg.vocab_size})")
        return ids
    return [loaded.tokenizer.bos_id] + loaded.tokenizer.encode(prompt)


def sample_text(
    loaded: Loaded,
    prompt: str,
    *,
    max_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[str]:
    """Streams the continuation of `prompt` as text pieces, stopping at EOS or `max_tokens`."""
    ids = encode_prompt(loaded, prompt)
    cfg = loaded.model_cfg
    if len(ids) + max_tokens > cfg.max_seq_len:
        raise ValueError(
            f"the prompt ({len(ids)} tokens) plus --max_tokens={max_tokens} exceeds the model's context of "
            f"{cfg.max_seq_len} tokens; shorten the prompt or lower --max_tokens"
        )
    tok = loaded.tokenizer
    eos = tok.eos_id if tok is not None else None
    pad = tok.pad_id if tok is not None else 0
    tokens = generate.stream(cfg, loaded.params, [ids], max_new_tokens=max_tokens, rng=jax.random.key(seed),
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos, pad_id=pad)
    generated: list[int] = []
    shown = ""
    for tokens_B, live_B in tokens:
        if not live_B[0]:
            break
        token = int(tokens_B[0])
        if token == eos:
            break
        generated.append(token)
        if tok is None:
            yield f" {token}"
            continue
        text = tok.decode(generated)
        # A multi-byte character may be split across tokens: only show what decodes cleanly.
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    if tok is not None:
        text = tok.decode(generated)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]


def evaluate_split(
    loaded: Loaded, split: str, *, batches: int = 0, dataset: str | None = None, progress: bool = True
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a run's model on `split` (all of it when `batches` is 0).

    A `split` that names text instead (a .txt / .jsonl file, a folder or a glob) is `evaluate_text`.
    """
    _check_eval(loaded, batches)
    if dataset is None and is_text_path(split):
        return evaluate_text(loaded, split, batches=batches, progress=progress)
    overrides = {"data.eval_split": split} | ({"data.dataset": dataset} if dataset else {})
    config = local_data_parallel(apply_overrides(loaded.config, overrides))
    data = build_dataset(config, split, loaded.model_cfg.vocab_size)
    try:
        return _evaluate(loaded, config, data, batches, f"eval {split}" if progress else None)
    except ValueError as e:
        raise ValueError(f"split {split!r}: {e}") from None


def is_text_path(data: str) -> bool:
    """Whether `--data` names text on disk rather than a split (TFDS split syntax like `train[:10%]` has no `/`)."""
    return os.path.exists(data) or any(c in data for c in "/*?") or data.endswith(TEXT_SUFFIXES)


def evaluate_text(loaded: Loaded, path: str, *, batches: int = 0, progress: bool = True) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a run's model on a .txt / .jsonl file, folder or glob.

    The text goes through the `text_folder` TFDS builder (one document per .txt file or .jsonl
    line) prepared in a temporary folder that is removed afterwards, and is tokenized with the
    run's own tokenizer; every document is read once, in order.
    """
    _check_eval(loaded, batches)
    if loaded.tokenizer is None:
        raise ValueError(f"--data={path}: {loaded.source} was trained on synthetic token ids and has no tokenizer "
                         "to read text with")
    from train.data.builders import find_text_files
    from train.data.pipeline import TfdsDataset

    try:
        find_text_files(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--data={path} matched no {' or '.join(TEXT_SUFFIXES)} files; give a file, a folder "
                                "or a glob of them, or a split name") from None
    # The run's own tokenizer file, so that nothing is trained on the text being evaluated.
    tokenizer = {"data.tokenizer.name": loaded.tokenizer.name}
    tok_file = RunDir(loaded.workdir).tokenizer if loaded.workdir else None
    if tok_file is not None and tok_file.is_file():
        tokenizer["data.tokenizer.path"] = str(tok_file)
    elif loaded.tokenizer.model_file() is not None and not loaded.config.data.tokenizer.path:
        raise FileNotFoundError(f"--data={path}: the run's {loaded.tokenizer.name} tokenizer file "
                                f"{RunDir(loaded.workdir or '.').tokenizer} is missing")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # preparing a few files is quick; its bars would bury the result
    with tempfile.TemporaryDirectory(prefix="herd_eval_") as tmp:
        overrides = {"data.source": "tfds", "data.dataset": "text_folder", "data.text_path": os.path.abspath(path),
                     "data.text_key": "text", "data.validation_fraction": 0.0, "data.data_dir": tmp,
                     "data.shuffle": False, "data.worker_count": 0, **tokenizer}
        config = local_data_parallel(apply_overrides(loaded.config, overrides))
        try:
            data = TfdsDataset(config, "train", train=False)  # text_folder puts every file in "train" at fraction 0
        except ValueError as e:
            raise ValueError(f"--data={path}: {e}") from None
        if data.vocab_size != loaded.model_cfg.vocab_size:
            raise ValueError(f"--data={path}: the run's tokenizer has {data.vocab_size} tokens but its model "
                             f"{loaded.model_cfg.vocab_size}")
        return _evaluate(loaded, config, data, batches, f"eval {path}" if progress else None)


def _check_eval(loaded: Loaded, batches: int) -> None:
    if loaded.config is None:
        raise ValueError("herd eval needs a run directory (--workdir): its config says which data and tokenizer")
    if batches < 0:
        raise ValueError(f"--batches={batches} must be >= 0 (0 evaluates all of the data once)")


def _evaluate(loaded: Loaded, config: ml_collections.ConfigDict, data: Dataset, batches: int,
              progress: str | None) -> dict[str, float]:
    """`Runtime.evaluate` over `batches` batches of `data`, or one whole pass when it is finite and `batches` is 0."""
    runtime = Runtime(config, loaded.model_cfg, mesh_devices(config))
    finite = hasattr(data, "pipeline")  # TFDS splits end; synthetic ones go on forever
    if batches == 0 and not finite:
        batches = config.eval.batches
    kwargs = {"epochs": 1} if batches == 0 else {}
    it = data.iterator(config.train.batch_size, jax.process_index(), jax.process_count(), **kwargs)
    params = jax.device_put(loaded.params, runtime.shardings.params)
    return runtime.evaluate(params, it, limit=batches or None, progress=progress)
