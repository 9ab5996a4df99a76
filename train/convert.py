"""`herd convert`: herd checkpoints <-> Hugging Face Llama folders, verified against transformers.

Every conversion ends by reloading the result with `transformers` and
comparing logits on fixed prompts; a mismatch is an error, never a success.
"""

from __future__ import annotations

import os
import shutil
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
from train.runtime import Runtime, local_data_parallel
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
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _compare(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(ours - theirs)))
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise ConversionMismatch(f"{what}: logits differ from transformers' by up to {diff:.3g} (tolerance {TOLERANCE})")
    return diff


def to_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32") -> dict[str, Any]:
    """Writes the run's latest checkpoint as a Hugging Face folder and verifies it with transformers."""
    loaded = load_workdir(workdir)
    if os.path.exists(os.path.join(out, hf.CONFIG_FILE)):
        raise FileExistsError(f"--to-hf={out} already holds a checkpoint (config.json); choose an empty directory")
    params = jax.device_get(loaded.params)
    extra = {}
    if loaded.tokenizer is not None:
        extra = {"bos_token_id": loaded.tokenizer.bos_id, "eos_token_id": loaded.tokenizer.eos_id}
    hf.save(loaded.model_cfg, params, out, dtype=dtype, extra_config=extra)
    if loaded.tokenizer is not None and loaded.tokenizer.model_file() is not None:
        with open(os.path.join(out, hf.TOKENIZER_FILE), "wb") as f:
            f.write(loaded.tokenizer.model_file())
    tokens = check_prompts(loaded.model_cfg.vocab_size)
    # Our side uses the weights as stored in the export (rounded to `dtype`).
    _, exported = hf.load(out)
    ours = np.asarray(forward(loaded.model_cfg, exported, jnp.asarray(tokens, jnp.int32)))
    diff = _compare(ours, transformers_logits(out, tokens), f"export {out}")
    # How far storing in `dtype` moved the logits (0 for float32): reported, not judged.
    drift = float(np.max(np.abs(ours - np.asarray(forward(loaded.model_cfg, params, jnp.asarray(tokens, jnp.int32))))))
    return {"out": os.fspath(out), "step": loaded.step, "max_abs_diff": diff, "rounding_drift": drift}


def experiment_config(model_cfg: ModelConfig, tokenizer_name: str | None) -> ml_collections.ConfigDict:
    """The schema's defaults with model overrides that reproduce `model_cfg` exactly."""
    overrides = config_lib.model_overrides(model_cfg)
    if tokenizer_name is not None:
        overrides |= {"data.source": "tfds", "data.tokenizer.name": tokenizer_name}
    return config_lib.apply_overrides(config_lib.defaults(), overrides)


def from_hf(path: str | os.PathLike, workdir: str | os.PathLike) -> dict[str, Any]:
    """Imports a Hugging Face folder as step 0 of a herd run in `workdir` (fresh optimizer state)."""
    run = RunDir(workdir)
    if run.checkpoints.is_dir() and os.listdir(run.checkpoints):
        raise FileExistsError(f"--workdir={workdir} already has checkpoints; import into a new directory")
    loaded: Loaded = load_hf_dir(path)
    config = local_data_parallel(experiment_config(loaded.model_cfg, loaded.tokenizer.name if loaded.tokenizer else None))
    os.makedirs(workdir, exist_ok=True)
    if loaded.tokenizer is not None:
        shutil.copyfile(os.path.join(path, hf.TOKENIZER_FILE), run.tokenizer)
        config = config_lib.apply_overrides(config, {"data.tokenizer.path": str(run.tokenizer)})
    runtime = Runtime(config, loaded.model_cfg)
    params = jax.device_put(loaded.params, runtime.shardings.params)
    opt_state = jax.jit(runtime.tx.init, out_shardings=runtime.shardings.opt_state)(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    ckpt = Checkpointer(workdir, every=1, keep=config.checkpoint.keep, async_save=False)
    ckpt.save(0, state, {"train": None})
    ckpt.close()
    write_run_info(workdir, config=config, mesh=runtime.mesh, data_fingerprint=None,
                   extra={"model": loaded.model_cfg.to_dict(), "imported_from": os.path.abspath(path)})
    reloaded = load_workdir(workdir)
    tokens = check_prompts(loaded.model_cfg.vocab_size)
    ours = np.asarray(forward(reloaded.model_cfg, reloaded.params, jnp.asarray(tokens, jnp.int32)))
    diff = _compare(ours, transformers_logits(path, tokens), f"import of {path}")
    return {"workdir": os.fspath(workdir), "max_abs_diff": diff}
