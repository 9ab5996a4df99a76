"""Using trained models: load a run's latest checkpoint or a Hugging Face folder, sample, evaluate.

Shared by `herd sample`, `herd eval` and `herd convert`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from experiments import base
from model import ModelConfig, decode
from train.checkpoint import Checkpointer, CheckpointError
from train.data.tokenizers import Tokenizer, build_tokenizer

RUN_INFO = "run.json"


@dataclasses.dataclass
class Loaded:
    """A model ready to use: its config, parameters and tokenizer (None for synthetic data)."""

    model_cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    config: ml_collections.ConfigDict | None = None
    step: int | None = None
    source: str = ""


def _overlay(config: ml_collections.ConfigDict, values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if key not in config:
            raise ValueError(f"{RUN_INFO}: key {prefix}{key} is not declared in experiments/base.py")
        if isinstance(value, dict):
            _overlay(config[key], value, f"{prefix}{key}.")
        else:
            config[key] = value


def config_from_run(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run recorded in its run.json, on top of the base declarations."""
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir} has no {RUN_INFO}: not a herd run directory")
    with open(path) as f:
        recorded = json.load(f)["config"]
    config = base.get_config()
    _overlay(config, recorded)
    config.lock()
    return config


def load_workdir(workdir: str | os.PathLike, devices: list[jax.Device] | None = None) -> Loaded:
    """Parameters of the latest checkpoint in `workdir`, sharded as the run's config says."""
    from train.loop import Trainer

    config = config_from_run(workdir)
    with open(os.path.join(workdir, RUN_INFO)) as f:
        model_cfg = ModelConfig(**json.load(f)["extra"]["model"])
    ckpt = Checkpointer(workdir, every=1, keep=config.checkpoint.keep, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"--workdir={workdir} has no checkpoint yet (nothing under {ckpt.directory})")
        if devices is None:  # all local devices, parameters split the way the run split them
            config.unlock()
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
            config.lock()
        trainer = Trainer(config, devices, model_cfg=model_cfg)
        step, state, _ = ckpt.restore(trainer.abstract_state())
    finally:
        ckpt.close()
    return Loaded(model_cfg, state.params, run_tokenizer(config, workdir), config, step, f"{workdir} (step {step})")


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer a run trained with: its saved tokenizer.model, the byte tokenizer, or None (synthetic)."""
    from train.loop import TOKENIZER_FILE

    path = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.isfile(path):
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


def load_hf_dir(path: str | os.PathLike) -> Loaded:
    """A Hugging Face Llama folder, with its `tokenizer.model` when it has one."""
    from model import hf

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--hf={path} is not a directory")
    model_cfg, params = hf.load(path)
    tok_file = os.path.join(path, "tokenizer.model")
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
    tokens = decode.stream(cfg, loaded.params, [ids], max_new_tokens=max_tokens, rng=jax.random.key(seed),
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
    """Loss, perplexity and bits per byte of a run's model on `split` (all of it when `batches` is 0)."""
    import tqdm

    from train.data import build_dataset
    from train.loop import Trainer, to_global
    from train.step import finish_eval

    if loaded.config is None:
        raise ValueError("herd eval needs a run directory (--workdir): its config says which data and tokenizer")
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    config.data.eval_split = split
    if dataset:
        config.data.dataset = dataset
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    trainer = Trainer(config)
    data = build_dataset(config, split, trainer.model_cfg.vocab_size)
    finite = hasattr(data, "pipeline")  # TFDS splits end; synthetic ones go on forever
    if batches == 0 and not finite:
        batches = config.eval.batches
    kwargs = {"epochs": 1} if batches == 0 else {}
    it = data.iterator(config.train.batch_size, jax.process_index(), jax.process_count(), **kwargs)
    total = batches or None
    sums: dict[str, float] = {}
    params = jax.device_put(loaded.params, trainer.shardings.params)
    with tqdm.tqdm(total=total, desc=f"eval {split}", unit="batch", disable=not progress) as bar:
        n = 0
        for local in it:
            if batches and n >= batches:
                break
            local = _pad_rows(local, config.train.batch_size // jax.process_count())
            out = jax.device_get(trainer.eval_step(params, to_global(local, trainer.batch_shardings)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            bar.update(1)
            if "tokens" in sums and sums["tokens"]:
                bar.set_postfix(loss=f"{sums['ce_sum'] / sums['tokens']:.4f}")
    if not sums:
        raise ValueError(f"split {split!r} gave no batches to evaluate")
    return finish_eval(sums) | {"batches": float(n)}


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Fills a short last batch with masked rows so the compiled step's shape holds."""
    have = len(batch["inputs"])
    if have == rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
