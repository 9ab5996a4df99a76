"""Hugging Face Llama checkpoints: `config.json` + safetensors, read and written without torch or pickle.

`load(path)` turns a `LlamaForCausalLM` checkpoint directory into `(ModelConfig,
params)`; `save(cfg, params, path)` writes one that
`transformers.LlamaForCausalLM.from_pretrained` loads. Hugging Face Linear
weights are stored [out, in]; ours are [in, out] with heads split out (q
[D, N, H], o [N, H, D]). Both sides use the "rotate_half" rotary layout, so q
and k need no permutation. Anything the decoder cannot represent (biases,
other activations, other rope types, missing or mis-shaped tensors) is
rejected with one line naming the key or tensor; so is, on export, anything
transformers' Llama cannot represent (another MLP activation, μP multipliers).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import DTYPES, ModelConfig, RopeScaling
from model.safetensors_io import HFFormatError, read_entry, read_safetensors_header, write_safetensors

Params = dict[str, Any]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # Meta's tokenizer beside the weights, when a folder has one
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Defaults of transformers' LlamaConfig for keys a config.json may omit.
_HF_DEFAULTS = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10_000.0, tie_word_embeddings=False)
# ModelConfig field -> config.json key: the integer sizes, then the rest (used to reword errors).
_INT_KEYS = dict(vocab_size="vocab_size", d_model="hidden_size", n_layers="num_hidden_layers")
_INT_KEYS |= dict(n_heads="num_attention_heads", d_ff="intermediate_size", max_seq_len="max_position_embeddings")
_ALL_KEYS = dict(
    _INT_KEYS, n_kv_heads="num_key_value_heads", norm_eps="rms_norm_eps", tie_embeddings="tie_word_embeddings"
)


# --- name and layout mapping --------------------------------------------------------------------------------


_Row = tuple[tuple[Any, ...], str, tuple[int, ...], int | None]


def _table(cfg: ModelConfig) -> list[_Row]:
    """(our param path, HF tensor name, our shape, leading "in" axes of a Linear or None) for every tensor.

    A Linear with `n_in` leading input axes is stored by transformers as
    [prod(out axes), prod(in axes)].
    """
    d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.d_ff, cfg.vocab_size
    rows: list[_Row] = [(("embedding",), "model.embed_tokens.weight", (v, d), None)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        rows += [
            ((i, "attn", "q"), p + "self_attn.q_proj.weight", (d, n, h), 1),
            ((i, "attn", "k"), p + "self_attn.k_proj.weight", (d, k, h), 1),
            ((i, "attn", "v"), p + "self_attn.v_proj.weight", (d, k, h), 1),
            ((i, "attn", "o"), p + "self_attn.o_proj.weight", (n, h, d), 2),
            ((i, "attn_norm", "scale"), p + "input_layernorm.weight", (d,), None),
            ((i, "mlp", "gate"), p + "mlp.gate_proj.weight", (d, f), 1),
            ((i, "mlp", "up"), p + "mlp.up_proj.weight", (d, f), 1),
            ((i, "mlp", "down"), p + "mlp.down_proj.weight", (f, d), 1),
            ((i, "mlp_norm", "scale"), p + "post_attention_layernorm.weight", (d,), None),
        ]
    rows.append((("final_norm", "scale"), "model.norm.weight", (d,), None))
    if not cfg.tie_embeddings:
        rows.append((("lm_head",), "lm_head.weight", (d, v), 1))
    return rows


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    return shape if n_in is None else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _ignored(name: str) -> bool:
    """Tensors a checkpoint may carry that describe nothing we need (older exports saved rotary buffers)."""
    return name.endswith("rotary_emb.inv_freq")


# --- config -------------------------------------------------------------------------------------------------


def _number(hf: dict[str, Any], key: str, source: str, kind: type = float, default: Any = None) -> Any:
    """hf[key] as a float or int (transformers' default when absent); the error names the key."""
    value = hf.get(key)
    value = value if value is not None else (default if default is not None else _HF_DEFAULTS.get(key))
    if value is None:
        raise HFFormatError(f"{source}: required key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise HFFormatError(f"{source}: {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _rope_from_hf(hf: dict[str, Any], max_len: int, source: str) -> tuple[float, RopeScaling | None]:
    """rope theta and scaling from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    # transformers 5 (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict) lets a legacy `rope_scaling`
    # replace `rope_parameters`, and reads `rope_theta` from the dict first, then from the top level.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if not isinstance(rope, dict):
        raise HFFormatError(f"{source}: {key!r} must be an object, got {rope!r}")
    theta = _number(rope, "rope_theta", f"{source} {key}", default=hf.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise HFFormatError(
            f"{source}: {key}.rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError(f"{source}: {key}.partial_rotary_factor={rope['partial_rotary_factor']!r} is not supported")
    if rope_type == "default":
        return theta, None
    where = f"{source} {key}"
    return theta, RopeScaling(
        factor=_number(rope, "factor", where),
        low_freq_factor=_number(rope, "low_freq_factor", where),
        high_freq_factor=_number(rope, "high_freq_factor", where),
        # transformers falls back to max_position_embeddings (standardize_rope_params).
        original_max_seq_len=_number(rope, "original_max_position_embeddings", where, int, default=max_len),
    )


def config_from_hf(hf: dict[str, Any], *, source: str = CONFIG_FILE, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a transformers Llama config dict; rejects what the decoder cannot compute."""
    if hf.get("model_type") != "llama":
        raise HFFormatError(f"{source}: model_type={hf.get('model_type')!r} is not supported; expected 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFFormatError(f"{source}: {key}=true is not supported (herd's Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    ints = {ours: _number(hf, theirs, source, int) for ours, theirs in _INT_KEYS.items()}
    head_dim = hf.get("head_dim")
    if head_dim == ints["d_model"] // ints["n_heads"]:
        head_dim = None  # our derived default
    theta, scaling = _rope_from_hf(hf, ints["max_seq_len"], source)
    try:
        return ModelConfig(
            **ints,
            n_kv_heads=hf.get("num_key_value_heads") or ints["n_heads"],
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=_number(hf, "rms_norm_eps", source),
            tie_embeddings=bool(hf.get("tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"])),
            init_std=float(hf.get("initializer_range", 0.02)),
            **overrides,
        )
    except ValueError as e:  # ModelConfig's checks, reworded with the config.json key names
        message = str(e).replace("ModelConfig.", "")
        for ours, theirs in _ALL_KEYS.items():
            message = re.sub(rf"\b{ours}\b", theirs, message)
        raise HFFormatError(f"{source}: {message}") from None


def check_exportable(cfg: ModelConfig) -> None:
    """Raises HFFormatError naming the field if transformers' Llama would compute a different function.

    Its MLP is SwiGLU only, and it has no μP multipliers (logits times base/width, attention
    logits times sqrt(H0)/H instead of 1/sqrt(H)); μP at its base width has none, so it exports.
    """
    if cfg.mlp_activation != "swiglu":
        raise HFFormatError(
            f"ModelConfig.mlp_activation={cfg.mlp_activation!r} cannot be exported: transformers' LlamaForCausalLM"
            " has a SwiGLU MLP only (mlp_activation='swiglu')"
        )
    if not cfg.multipliers.identity:
        raise HFFormatError(
            f"ModelConfig.parametrization={cfg.parametrization!r} at d_model={cfg.d_model} != mup_base_width="
            f"{cfg.mup_base_width} cannot be exported: transformers' LlamaForCausalLM has no output or attention"
            " logit multipliers"
        )


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The transformers `LlamaForCausalLM` config dict for `cfg` (rope written in the 5.x and legacy forms)."""
    check_exportable(cfg)
    if cfg.d_model % cfg.n_heads:
        # transformers' LlamaConfig.validate_architecture rejects this even with an explicit head_dim.
        raise HFFormatError(
            f"ModelConfig.d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads}, which transformers'"
            " LlamaConfig requires"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if (rs := cfg.rope_scaling) is not None:
        rope.update(rope_type="llama3", factor=float(rs.factor))
        rope.update(low_freq_factor=float(rs.low_freq_factor), high_freq_factor=float(rs.high_freq_factor))
        rope.update(original_max_position_embeddings=int(rs.original_max_seq_len))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{theirs: getattr(cfg, ours) for ours, theirs in _INT_KEYS.items()},
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_size,
        "rms_norm_eps": float(cfg.norm_eps),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": float(cfg.init_std),
        **dict(hidden_act="silu", attention_bias=False, attention_dropout=0.0, mlp_bias=False, use_cache=True),
        "rope_parameters": rope,
        # Legacy spelling for transformers 4.x; 5.x folds it into the same rope_parameters.
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "dtype": dtype,
        "torch_dtype": dtype,  # the pre-4.56 name
    }


# --- load ---------------------------------------------------------------------------------------------------


def _index_entries(path: Path) -> dict[str, dict[str, Any]]:
    """Every tensor entry of the checkpoint, from model.safetensors or the sharded index."""
    if (path / SINGLE_FILE).is_file():
        return read_safetensors_header(path / SINGLE_FILE)[0]
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise HFFormatError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    try:
        weight_map = dict(json.loads(index_file.read_text())["weight_map"])
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError) as e:
        raise HFFormatError(f"{index_file}: not a safetensors index with a 'weight_map' object ({e})") from None
    headers: dict[str, dict[str, dict[str, Any]]] = {}
    entries = {}
    for name, shard in weight_map.items():
        if shard not in headers:
            if not (path / shard).is_file():
                raise HFFormatError(f"{index_file}: shard {shard} (holding {name}) is missing from {path}")
            headers[shard] = read_safetensors_header(path / shard)[0]
        if name not in headers[shard]:
            raise HFFormatError(f"{index_file}: tensor {name} is listed in {shard} but that shard does not hold it")
        entries[name] = headers[shard][name]
    return entries


def load(
    path: str | os.PathLike, *, dtype: str | None = None, scan_layers: bool = True
) -> tuple[ModelConfig, Params]:
    """Reads a Hugging Face Llama checkpoint directory into `(ModelConfig, params)`.

    Params are jnp arrays in `dtype` (default float32), laid out scanned or
    unrolled per `scan_layers`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise HFFormatError(f"load: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise HFFormatError(f"{path}: no {CONFIG_FILE}")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise HFFormatError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{config_file}: expected a JSON object, got {type(hf).__name__}")
    cfg = config_from_hf(hf, source=str(config_file), scan_layers=scan_layers, param_dtype=dtype or "float32")
    entries = _index_entries(path)
    table = _table(cfg)
    expected = {name for _, name, _, _ in table}
    missing = [name for name in expected if name not in entries]
    if missing:
        raise HFFormatError(f"{path}: missing tensor(s) {', '.join(sorted(missing)[:5])}")
    unexpected = [n for n in entries if n not in expected and not _ignored(n) and n != "lm_head.weight"]
    if unexpected:
        raise HFFormatError(f"{path}: unexpected tensor(s) herd cannot represent: {', '.join(sorted(unexpected)[:5])}")
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    mmaps: dict[Path, np.memmap] = {}
    top: Params = {}
    layers: list[Params] = [{} for _ in range(cfg.n_layers)]
    for key, name, shape, n_in in table:
        got, want = list(entries[name]["shape"]), list(_hf_shape(shape, n_in))
        if got != want:
            raise HFFormatError(f"{path}: tensor {name} has shape {got}, expected {want}")
        x = read_entry(entries[name], name, mmaps)
        x = (x if n_in is None else x.T.reshape(shape)).astype(np_dtype)
        tree = layers[key[0]] if isinstance(key[0], int) else top
        for part in key[int(isinstance(key[0], int)) : -1]:
            tree = tree.setdefault(part, {})
        tree[key[-1]] = x
    if cfg.scan_layers:
        params = {**top, "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    else:
        params = {**top, **{f"layers_{i}": layer for i, layer in enumerate(layers)}}
    return cfg, jax.tree.map(jnp.asarray, params)


# --- save ---------------------------------------------------------------------------------------------------


def _hf_tensors(cfg: ModelConfig, params: Params, np_dtype: np.dtype) -> dict[str, np.ndarray]:
    """Our params (scanned or unrolled) as HF-named numpy arrays; every path and shape is checked first."""
    scanned = "layers" in params
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}
    rows = []
    for key, name, shape, n_in in _table(cfg):
        layer = key[0] if isinstance(key[0], int) else None
        if layer is None:
            ours, full = key, shape
        else:
            ours = ("layers" if scanned else f"layers_{layer}", *key[1:])
            full = (cfg.n_layers, *shape) if scanned else shape
        rows.append((ours, full, layer if scanned else None, name, shape, n_in))
    extra = sorted(".".join(p) for p in set(flat) - {r[0] for r in rows})
    if extra:
        raise HFFormatError(f"params: unexpected entries {', '.join(extra[:5])} for this ModelConfig")
    out = {}
    for ours, full, index, name, shape, n_in in rows:
        if ours not in flat:
            raise HFFormatError(f"params: {'.'.join(ours)} is missing (needed for {name})")
        x = flat[ours]
        if x.shape != full:
            raise HFFormatError(f"params: {'.'.join(ours)} has shape {list(x.shape)}, expected {list(full)}")
        x = x if index is None else x[index]
        x = x if n_in is None else x.reshape(math.prod(shape[:n_in]), -1).T
        out[name] = np.ascontiguousarray(x.astype(np_dtype))
    return out


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in order, into groups of at most `max_bytes` (a bigger tensor goes alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, x in tensors.items():
        if groups[-1] and size + x.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += x.nbytes
    return groups


def save(
    cfg: ModelConfig, params: Params, path: str | os.PathLike, *, dtype: str = "float32",
    max_shard_bytes: int | None = None, overwrite: bool = False, extra_config: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Writes a Hugging Face Llama checkpoint directory (`config.json` + safetensors) from our params.

    `max_shard_bytes` splits the weights into `model-0000i-of-0000n.safetensors`
    files plus `model.safetensors.index.json`; `extra_config` adds keys such as
    `bos_token_id` to config.json. An existing checkpoint is only replaced with
    `overwrite=True`.
    """
    if dtype not in DTYPES:
        raise HFFormatError(f"save: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise HFFormatError(f"save: max_shard_bytes must be positive, got {max_shard_bytes}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HFFormatError(f"{path}: exists and is not a directory")
    if (path / CONFIG_FILE).exists() and not overwrite:
        raise HFFormatError(f"{path}: already holds a checkpoint ({CONFIG_FILE}); pass overwrite=True to replace it")
    hf = config_to_hf(cfg, dtype=dtype)
    clash = sorted(set(extra_config or {}) & set(hf))
    if clash:
        raise HFFormatError(f"save: extra_config may not override {', '.join(clash)} (derived from the ModelConfig)")
    hf.update(extra_config or {})
    tensors = _hf_tensors(cfg, params, np.dtype(jnp.dtype(dtype)))  # every check before anything is written
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / CONFIG_FILE, path / INDEX_FILE, *path.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)  # an old shard set must not mix with the new one
    groups = _shards(tensors, max_shard_bytes) if max_shard_bytes else [list(tensors)]
    metadata = {"format": "pt"}  # older transformers refuse safetensors files without it
    if len(groups) == 1:
        write_safetensors(path / SINGLE_FILE, tensors, metadata)
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(path / shard, {name: tensors[name] for name in group}, metadata)
            weight_map.update({name: shard for name in group})
        total = sum(x.nbytes for x in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    # config.json last: a directory with one is a complete checkpoint.
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
