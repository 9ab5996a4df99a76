"""`herd convert`: herd checkpoints <-> Hugging Face Llama folders, verified against transformers.

Every conversion is written into a temporary folder beside its target, ends by
reloading the result with `transformers` and comparing logits on fixed
prompts, and is moved into place only when they agree: a mismatch is an
error, never a success, and leaves nothing behind. The target must not exist
or be an empty folder, so nothing of the user's is ever overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model import ModelConfig, forward, hf
from train import config as config_lib
from train.checkpoint import Checkpointer
from train.inference import Loaded, load_hf_dir, load_workdir
from train.run_info import write_run_info
from train.runtime import Runtime, local_data_parallel, mesh_devices
from train.state import TrainState
from train.workdir import RunDir

# Our logits and transformers' on the same stored weights must agree this closely (parity tests see ~1e-5).
TOLERANCE = 1e-3


class ConversionMismatch(ValueError):
    """The converted checkpoint does not reproduce the source model's logits."""


def check_prompts(vocab_size: int, seq_len: int = 16) -> np.ndarray:
    """Fixed token prompts used to compare the two sides of a conversion."""
    return np.random.default_rng(0).integers(0, vocab_size, (2, min(seq_len, 32)), dtype=np.int64)


def transformers_logits(path: str | os.PathLike, tokens: np.ndarray) -> np.ndarray:
    """Logits of the Hugging Face folder at `path`, computed by transformers itself (float32, CPU)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConversionMismatch(
            f"cannot verify {path}: transformers and torch are needed (pip install -e '.[test]'): {e}"
        ) from None
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()  # its warnings would bury the one line a mismatch reports
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _our_logits(model_cfg: ModelConfig, params: Any, tokens: np.ndarray) -> np.ndarray:
    """Our logits in float32 (a run may compute in bfloat16; the check is of the weights, as transformers runs)."""
    cfg = dataclasses.replace(model_cfg, dtype="float32")
    return np.asarray(forward(cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params),
                              jnp.asarray(tokens, jnp.int32)))


def _compare(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(ours - theirs)))
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise ConversionMismatch(f"{what}: logits differ from transformers' by up to {diff:.3g} (tolerance "
                                 f"{TOLERANCE}); nothing was written")
    return diff


def check_empty_target(path: str | os.PathLike, flag: str) -> None:
    """Refuses a target that is a file or a non-empty folder: a conversion never writes into the user's files."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag}={path} exists and is not a folder; give a new or empty folder")
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{flag}={path} is not empty ({len(os.listdir(path))} entries, e.g. "
                              f"{sorted(os.listdir(path))[0]!r}); give a new or empty folder")


@contextlib.contextmanager
def staged(target: str | os.PathLike, flag: str) -> Iterator[Path]:
    """A temporary folder beside `target` (same file system); moved onto it when the block succeeds, else removed.

    Only the temporary folder herd made is ever deleted; missing parents of `target` are created at the end.
    """
    target = Path(os.path.abspath(target))
    check_empty_target(target, flag)
    anchor = target.parent
    while not anchor.exists():  # the nearest existing ancestor, so the final move is a rename
        anchor = anchor.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.herd-tmp-", dir=anchor))
    except OSError as e:
        raise ValueError(f"{flag}={target}: cannot write beside it in {anchor}: {e.strerror}") from None
    try:
        yield tmp
        check_empty_target(target, flag)  # again: something may have appeared meanwhile
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, target)  # replaces an empty folder atomically
        except OSError as e:
            raise ValueError(f"{flag}={target}: could not move the verified result into place: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32") -> dict[str, Any]:
    """Writes the run's newest verified checkpoint as a Hugging Face folder and verifies it with transformers."""
    check_empty_target(out, "--to-hf")  # before loading anything
    loaded = load_workdir(workdir)
    params = jax.device_get(loaded.params)
    extra = {}
    if loaded.tokenizer is not None:
        extra = {"bos_token_id": loaded.tokenizer.bos_id, "eos_token_id": loaded.tokenizer.eos_id}
    tokens = check_prompts(loaded.model_cfg.vocab_size)
    with staged(out, "--to-hf") as tmp:
        hf.save(loaded.model_cfg, params, tmp, dtype=dtype, extra_config=extra)
        if loaded.tokenizer is not None and loaded.tokenizer.model_file() is not None:
            (tmp / hf.TOKENIZER_FILE).write_bytes(loaded.tokenizer.model_file())
        # Our side uses the weights as stored in the export (rounded to `dtype`).
        _, exported = hf.load(tmp)
        ours = _our_logits(loaded.model_cfg, exported, tokens)
        diff = _compare(ours, transformers_logits(tmp, tokens), f"export to {out}")
    # How far storing in `dtype` moved the logits (0 for float32): reported, not judged.
    drift = float(np.max(np.abs(ours - _our_logits(loaded.model_cfg, params, tokens))))
    return {"out": os.fspath(out), "step": loaded.step, "max_abs_diff": diff, "rounding_drift": drift}


def experiment_config(model_cfg: ModelConfig, tokenizer_name: str | None) -> ml_collections.ConfigDict:
    """The schema's defaults with model overrides that reproduce `model_cfg` exactly."""
    overrides = config_lib.model_overrides(model_cfg)
    if tokenizer_name is not None:
        overrides |= {"data.source": "tfds", "data.tokenizer.name": tokenizer_name}
    return config_lib.apply_overrides(config_lib.defaults(), overrides)


def from_hf(path: str | os.PathLike, workdir: str | os.PathLike) -> dict[str, Any]:
    """Imports a Hugging Face folder as step 0 of a new herd run in `workdir` (fresh optimizer state).

    The checkpoint says it was imported (so no data position is expected) and `run.json`
    records where from.
    """
    check_empty_target(workdir, "--workdir")
    loaded: Loaded = load_hf_dir(path, "--from-hf")
    source = os.path.abspath(path)
    config = local_data_parallel(experiment_config(loaded.model_cfg, loaded.tokenizer.name if loaded.tokenizer else None))
    final = RunDir(workdir)
    if loaded.tokenizer is not None:  # recorded at its final place: the run is moved there once verified
        config = config_lib.apply_overrides(config, {"data.tokenizer.path": str(final.tokenizer)})
    runtime = Runtime(config, loaded.model_cfg, mesh_devices(config))
    tokens = check_prompts(loaded.model_cfg.vocab_size)
    with staged(workdir, "--workdir") as tmp:
        if loaded.tokenizer is not None:
            shutil.copyfile(os.path.join(path, hf.TOKENIZER_FILE), RunDir(tmp).tokenizer)
        params = jax.device_put(loaded.params, runtime.shardings.params)
        opt_state = jax.jit(runtime.tx.init, out_shardings=runtime.shardings.opt_state)(params)
        state = TrainState.fresh(params, opt_state)
        ckpt = Checkpointer(tmp, every=1, keep=config.checkpoint.keep, async_save=False)
        try:
            ckpt.save(0, state, {"train": None}, imported_from=source)
        finally:
            ckpt.close()
        write_run_info(tmp, config=config, mesh=runtime.mesh, data_fingerprint=None,
                       extra={"model": loaded.model_cfg.to_dict(), "imported_from": source})
        reloaded = load_workdir(tmp)  # through the verified restore, as herd train and sample will read it
        ours = _our_logits(reloaded.model_cfg, reloaded.params, tokens)
        diff = _compare(ours, transformers_logits(path, tokens), f"import of {path}")
    return {"workdir": os.fspath(workdir), "max_abs_diff": diff}
