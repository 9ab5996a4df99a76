"""Hugging Face interop: logits parity with transformers' LlamaForCausalLM, import, export, safetensors, errors."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import model
import model.hf as hf
import model.safetensors_io as safetensors_io
from conftest import HF_BASE, HF_CASES, HF_LLAMA3_ROPE, hf_random_llama
from model.llama import unstack_layers, with_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
torch.set_num_threads(2)

TOL = 1e-4
SEQ = {"llama3_rope": 48}  # longer than original_max_position_embeddings=16, so the scaled band matters
# One compiled forward per (config, shapes): tests reuse the same token shapes so they share compilations.
_FORWARD = jax.jit(model.forward, static_argnums=0)
DIFFS: dict[str, float] = {}  # max abs logits difference per case, printed at the end of the module


def _hf_logits(m: "transformers.LlamaForCausalLM", tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(tokens)).logits.float().numpy()


def _ours(cfg: model.ModelConfig, params: dict, tokens: np.ndarray, **kw) -> np.ndarray:
    return np.asarray(_FORWARD(cfg, params, jnp.asarray(tokens), **kw))


def _tokens(case: str, b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, HF_BASE["vocab_size"], (b, SEQ.get(case, 24)))


def _check(label: str, a: np.ndarray, b: np.ndarray) -> None:
    diff = float(np.abs(a - b).max())
    DIFFS[label] = max(diff, DIFFS.get(label, 0.0))
    assert diff <= TOL, f"{label}: max abs logits diff {diff:.3g} > {TOL}"


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(hf.HFFormatError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    print("\nmax abs logits diff per case: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(DIFFS.items())))


@pytest.fixture
def hf_ckpt(hf_llama):
    """case -> (transformers model, its save_pretrained directory), shared with test_decode."""
    return hf_llama


# --- import: transformers save_pretrained -> model.hf.load -> our forward == transformers --------------------


@pytest.mark.parametrize("case", list(HF_CASES))
def test_import_logits_parity(hf_ckpt, case):
    m, path = hf_ckpt(case)
    cfg, params = hf.load(path)
    assert cfg.n_kv_heads == HF_CASES[case]["num_key_value_heads"]
    assert cfg.head_size == HF_CASES[case].get("head_dim", 16)
    assert cfg.tie_embeddings == ("lm_head" not in params) == (case == "tied")
    tokens = _tokens(case)
    ours = _ours(cfg, params, tokens)
    _check(f"import/{case}", ours, _hf_logits(m, tokens))
    if case == "llama3_rope":  # the comparison has teeth: without the scaling transformers' logits move a lot
        unscaled = copy.deepcopy(m)
        h = cfg.head_size
        unscaled.model.rotary_emb.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, h, 2).float() / h)
        assert np.abs(_hf_logits(unscaled, tokens) - ours).max() > 1e-2


def test_import_unrolled_layout_equals_scanned(hf_ckpt):
    _, path = hf_ckpt("gqa")
    cfg_s, scanned = hf.load(path)
    cfg_u, unrolled = hf.load(path, scan_layers=False)
    assert "layers" in scanned and "layers_1" in unrolled and not cfg_u.scan_layers
    for a, b in zip(unstack_layers(cfg_s, scanned), unstack_layers(cfg_u, unrolled)):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_packed_documents_match_each_document_alone(hf_ckpt):
    m, path = hf_ckpt("gqa")
    cfg, params = hf.load(path)
    a, b = _tokens("gqa", 1, seed=1)[:, :15], _tokens("gqa", 1, seed=2)[:, :21]
    segments = np.array([[1] * 15 + [2] * 21])
    positions = np.array([list(range(15)) + list(range(21))])
    packed = _ours(
        cfg, params, np.concatenate([a, b], 1), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)
    )
    _check("packed/doc1", packed[:, :15], _hf_logits(m, a))
    _check("packed/doc2", packed[:, 15:], _hf_logits(m, b))


def test_bf16_checkpoint_loads_without_torch(tmp_path):
    m = hf_random_llama("gqa", seed=1)
    with torch.no_grad():  # the float32 reference holds exactly the bfloat16 values
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    m16.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert params["embedding"].dtype == jnp.float32
    tokens = _tokens("gqa")
    _check("import/bf16", _ours(cfg, params, tokens), _hf_logits(m, tokens))
    _, params16 = hf.load(tmp_path, dtype="bfloat16")
    assert params16["layers"]["attn"]["q"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params16["embedding"]), m16.model.embed_tokens.weight.detach().view(
        torch.int16).numpy().view(ml_dtypes.bfloat16))  # fmt: skip
    # In a fresh interpreter where importing torch (or transformers) fails, loading still works.
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; import model.hf as hf; "
        f"cfg, p = hf.load({str(tmp_path)!r}); assert p['embedding'].shape == (128, 64); print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_sharded_transformers_checkpoint(hf_ckpt, tmp_path):
    m, _ = hf_ckpt("gqa")
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / hf.INDEX_FILE).exists() and not (tmp_path / hf.SINGLE_FILE).exists()
    cfg, params = hf.load(tmp_path)
    tokens = _tokens("gqa")
    _check("import/sharded", _ours(cfg, params, tokens), _hf_logits(m, tokens))


# --- export: our params -> model.hf.save -> transformers from_pretrained == our forward ----------------------


def _our_params(cfg: model.ModelConfig, seed: int = 3) -> dict:
    """Fresh random params in our layout (not from transformers), spread like conftest.hf_random_llama's.

    Drawn with numpy over the abstract parameter tree: flax's eager init is slow on small CPUs.
    """
    rng = np.random.default_rng(seed)

    def draw(path, x) -> jax.Array:
        noise = rng.normal(size=x.shape).astype(np.float32)
        return jnp.asarray(1 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.15 * noise)

    abstract = jax.tree.map(lambda x: x.value, model.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))
    return jax.tree.map_with_path(draw, abstract)


def _from_pretrained(path: Path) -> "transformers.LlamaForCausalLM":
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("case", ["mha", "mqa", "tied", "head_dim", "llama3_rope"])
def test_export_logits_parity(hf_ckpt, case, tmp_path):
    cfg, _ = hf.load(hf_ckpt(case)[1])
    params = _our_params(cfg)
    hf.save(cfg, params, tmp_path)
    m = _from_pretrained(tmp_path)
    assert m.config.num_key_value_heads == cfg.n_kv_heads
    assert m.config.tie_word_embeddings == cfg.tie_embeddings
    assert m.config.rope_parameters["rope_type"] == ("llama3" if cfg.rope_scaling else "default")
    tokens = _tokens(case)
    _check(f"export/{case}", _hf_logits(m, tokens), _ours(cfg, params, tokens))
    cfg2, params2 = hf.load(tmp_path)  # and back again, exactly
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_either_layout(hf_ckpt, scan_layers, tmp_path):
    cfg, _ = hf.load(hf_ckpt("gqa")[1], scan_layers=True)
    params = _our_params(cfg)
    if not scan_layers:
        cfg = cfg.replace(scan_layers=False)
        params = with_layers(cfg, params, unstack_layers(cfg.replace(scan_layers=True), params))
        assert "layers_0" in params
    hf.save(cfg, params, tmp_path)
    tokens = _tokens("gqa")
    _check(f"export/scan={scan_layers}", _hf_logits(_from_pretrained(tmp_path), tokens), _ours(cfg, params, tokens))


def test_export_sharded(hf_ckpt, tmp_path):
    cfg, _ = hf.load(hf_ckpt("gqa")[1])
    params = _our_params(cfg)
    hf.save(cfg, params, tmp_path, max_shard_bytes=30_000, extra_config={"bos_token_id": 0, "eos_token_id": 1})
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / hf.SINGLE_FILE).exists()
    assert all((tmp_path / s).stat().st_size <= 30_000 + 4096 for s in shards)
    tokens = _tokens("gqa")
    m = _from_pretrained(tmp_path)
    assert (m.config.bos_token_id, m.config.eos_token_id) == (0, 1)
    _check("export/sharded", _hf_logits(m, tokens), _ours(cfg, params, tokens))
    cfg2, params2 = hf.load(tmp_path)
    _check("export/sharded->load", _ours(cfg2, params2, tokens), _ours(cfg, params, tokens))


def test_export_bf16(hf_ckpt, tmp_path):
    cfg, params = hf.load(hf_ckpt("gqa")[1])
    hf.save(cfg, params, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / hf.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    _, params16 = hf.load(tmp_path, dtype="bfloat16")
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    jax.tree.map(np.testing.assert_array_equal, params16, rounded)
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    np.testing.assert_array_equal(
        m.lm_head.weight.detach().float().numpy(), np.asarray(rounded["lm_head"].astype(jnp.float32)).T
    )


def test_save_refuses_to_overwrite_and_checks_params(hf_ckpt, tmp_path):
    cfg, params = hf.load(hf_ckpt("gqa")[1])
    hf.save(cfg, params, tmp_path, max_shard_bytes=30_000)
    assert "overwrite=True" in _one_line_error(hf.save, cfg, params, tmp_path)
    hf.save(cfg, params, tmp_path, overwrite=True)  # single file now; the old shards are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf.CONFIG_FILE, hf.SINGLE_FILE]
    mlp = params["layers"]["mlp"]
    bad = {**params, "layers": {**params["layers"], "mlp": {**mlp, "up": mlp["gate"][:, :, :8]}}}
    message = _one_line_error(hf.save, cfg, bad, tmp_path / "bad")
    assert "layers.mlp.up" in message and "[2, 64, 8]" in message and "[2, 64, 96]" in message
    assert not (tmp_path / "bad").exists()  # nothing written before the checks pass
    no_norm = {k: v for k, v in params.items() if k != "final_norm"}
    assert "final_norm.scale" in _one_line_error(hf.save, cfg, no_norm, tmp_path / "bad")
    odd = model.ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=3, n_kv_heads=1, d_ff=96, head_dim=16)
    message = _one_line_error(hf.save, odd, {}, tmp_path / "bad")  # transformers needs n_heads | d_model
    assert "d_model=64" in message and "n_heads=3" in message


# --- safetensors reader/writer cross-checked against the reference package -----------------------------------


def test_safetensors_matches_reference_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b.c": rng.normal(size=(7,)).astype(np.float16)}
    safetensors_io.write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = safetensors_numpy.load_file(tmp_path / "ours.safetensors")
    assert theirs.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(theirs[k], tensors[k])
    safetensors_numpy.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = safetensors_io.read_safetensors(tmp_path / "theirs.safetensors")
    for k in tensors:
        assert ours[k].dtype == tensors[k].dtype
        np.testing.assert_array_equal(ours[k], tensors[k])
    # bfloat16 round trip through torch's reader.
    from safetensors.torch import load_file

    x16 = rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16)
    safetensors_io.write_safetensors(tmp_path / "bf16.safetensors", {"x": x16})
    t = load_file(tmp_path / "bf16.safetensors")["x"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.view(torch.int16).numpy(), x16.view(np.int16))
    np.testing.assert_array_equal(safetensors_io.read_safetensors(tmp_path / "bf16.safetensors")["x"], x16)


# --- config handling and errors -------------------------------------------------------------------------------


def test_legacy_and_v5_rope_spellings_agree():
    v5 = {"model_type": "llama", **HF_BASE, "num_key_value_heads": 2, "rope_parameters": HF_LLAMA3_ROPE}
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 500_000.0, "rope_scaling": {k: v for k, v in HF_LLAMA3_ROPE.items() if k != "rope_theta"}}
    cfg = hf.config_from_hf(v5)
    assert cfg == hf.config_from_hf(legacy)
    assert cfg.rope_theta == 500_000.0 and cfg.rope_scaling.original_max_seq_len == 16
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    # And transformers reads what we write as the same rope parameters.
    written = transformers.LlamaConfig(**{k: v for k, v in hf.config_to_hf(cfg).items() if k != "model_type"})
    assert written.rope_parameters == HF_LLAMA3_ROPE
    llama2 = hf.config_from_hf({"model_type": "llama", **HF_BASE, "rope_theta": 10_000.0, "rope_scaling": None})
    assert llama2.rope_scaling is None and llama2.rope_theta == 10_000.0 and llama2.n_kv_heads == 4
    old_style = {**legacy, "rope_scaling": {**legacy["rope_scaling"], "type": "llama3"}}
    del old_style["rope_scaling"]["rope_type"]
    assert hf.config_from_hf(old_style) == cfg


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / hf.CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / hf.CONFIG_FILE).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(model_type="mistral"), ["model_type", "mistral"]),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ["rope_type", "yarn"]),
        (dict(attention_bias=True), ["attention_bias"]),
        (dict(mlp_bias=True), ["mlp_bias"]),
        (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
        (dict(hidden_size=None), ["hidden_size"]),
        (dict(num_key_value_heads=3), ["num_attention_heads=4", "num_key_value_heads=3"]),
    ],
)
def test_load_rejects_unsupported_config(hf_ckpt, tmp_path, changes, expected):
    path = _edit_config(hf_ckpt("gqa")[1], tmp_path / "ckpt", **changes)
    message = _one_line_error(hf.load, path)
    assert hf.CONFIG_FILE in message and all(e in message for e in expected), message


def _rewrite_weights(path: Path, edit) -> None:
    tensors = dict(safetensors_io.read_safetensors(path / hf.SINGLE_FILE))
    edit(tensors)
    safetensors_io.write_safetensors(path / hf.SINGLE_FILE, tensors, {"format": "pt"})


def test_load_rejects_missing_tensor(hf_ckpt, tmp_path):
    path = shutil.copytree(hf_ckpt("gqa")[1], tmp_path / "ckpt")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "model.layers.1.mlp.up_proj.weight" in _one_line_error(hf.load, path)


def test_load_rejects_missing_lm_head_when_untied(hf_ckpt, tmp_path):
    path = shutil.copytree(hf_ckpt("gqa")[1], tmp_path / "ckpt")
    _rewrite_weights(path, lambda t: t.pop("lm_head.weight"))
    assert "lm_head.weight" in _one_line_error(hf.load, path)


def test_load_rejects_shape_mismatch(hf_ckpt, tmp_path):
    path = shutil.copytree(hf_ckpt("gqa")[1], tmp_path / "ckpt")
    wrong = {"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}
    _rewrite_weights(path, lambda t: t.update(wrong))
    message = _one_line_error(hf.load, path)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "[16, 64]" in message and "[32, 64]" in message


def test_load_rejects_unexpected_tensor_and_ignores_rotary_buffers(hf_ckpt, tmp_path):
    path = shutil.copytree(hf_ckpt("gqa")[1], tmp_path / "ckpt")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    hf.load(path)
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}))
    assert "model.layers.0.self_attn.q_proj.bias" in _one_line_error(hf.load, path)


def test_load_rejects_missing_shard(hf_ckpt, tmp_path):
    m, _ = hf_ckpt("gqa")
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = _one_line_error(hf.load, tmp_path)
    assert shard.name in message and hf.INDEX_FILE in message


def test_load_rejects_truncated_file(hf_ckpt, tmp_path):
    path = shutil.copytree(hf_ckpt("gqa")[1], tmp_path / "ckpt")
    data = (path / hf.SINGLE_FILE).read_bytes()
    (path / hf.SINGLE_FILE).write_bytes(data[: len(data) // 2])
    assert hf.SINGLE_FILE in _one_line_error(hf.load, path)
