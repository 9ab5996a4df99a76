"""The ablation knobs of issue 15: MLP activations, μP, the document mask, and what export refuses."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from experiments.base import get_config
from model import decode, generate, hf
from model.config import MLP_ACTIVATIONS
from model.llama import Llama
from model.mlp import _STACKED_GATE_UP_MIN_ROWS, MLP, glu_stacked
from model.mup import HIDDEN_MATRICES
from train import optimizer as opt
from train.config import apply_overrides, model_config
from train.data.synthetic import SyntheticDataset
from train.experiment import experiment_from_cli
from train.muon import param_names
from train.runtime import Runtime, check
from train.step import loss_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = model.VARIANTS["tiny"]  # d_model 64, 4 heads of 16, d_ff 192
GATED = [a for a, spec in MLP_ACTIVATIONS.items() if spec.gated]
_forward = jax.jit(model.forward, static_argnums=0)
_init = jax.jit(model.init_params, static_argnums=0)
_prefill = jax.jit(decode.prefill, static_argnums=(0, 5))
_decode_step = jax.jit(decode.decode_step, static_argnums=0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# Written out independently of MLP_ACTIVATIONS, so a wrong registry entry shows.
REFERENCE_ACTIVATIONS = {
    "swiglu": lambda x: x * _sigmoid(x),
    "geglu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "reglu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x: np.maximum(x, 0),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
}


def make_config(**overrides):
    """The base experiment with dotted overrides (adamw, constant lr, no clipping unless asked)."""
    base = {"optimizer.lr": 1e-2, "schedule.name": "constant", "schedule.warmup_steps": 0, "optimizer.grad_clip": 0.0}
    return apply_overrides(get_config(), {**base, **overrides})


def _batch(seq_len: int = 32, rows: int = 4, vocab: int = TINY.vocab_size) -> dict[str, jax.Array]:
    """Synthetic pattern rows: one to three packed documents each."""
    rows_ = next(SyntheticDataset("pattern", "train", seq_len, vocab, 0).iterator(rows))
    return {k: jnp.asarray(v) for k, v in rows_.items()}


# ----------------------------------------------------------------------------- MLP activations


def test_registry_matches_the_reference_formulas():
    assert set(MLP_ACTIVATIONS) == set(REFERENCE_ACTIVATIONS)
    x = np.linspace(-4, 4, 101, dtype=np.float32)
    for name, spec in MLP_ACTIVATIONS.items():
        np.testing.assert_allclose(spec.fn(jnp.asarray(x)), REFERENCE_ACTIVATIONS[name](x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MLP_ACTIVATIONS))
def test_every_activation_has_the_promised_shapes_counts_and_values(name):
    cfg = TINY.replace(mlp_activation=name)
    width = 192 if MLP_ACTIVATIONS[name].gated else 288  # ungated: 3/2 d_ff
    mlp_shapes = {k: v.shape for k, v in nn.meta.unbox(model.abstract_params(cfg))["layers"]["mlp"].items()}
    gate = {"gate": (2, 64, width)} if MLP_ACTIVATIONS[name].gated else {}
    assert mlp_shapes == {**gate, "up": (2, 64, width), "down": (2, width, 64)}
    # Parameters and FLOPs equal the SwiGLU model's exactly (arXiv:2002.05202).
    assert model.count_params(cfg) == model.count_params(TINY)
    assert model.flops_per_token(cfg, 128) == model.flops_per_token(TINY, 128)
    # The block computes down(act(x gate) * (x up)) or down(act(x up)), on both gated paths.
    p = jax.tree.map(lambda x: x[0], _init(cfg, jax.random.key(1))["layers"]["mlp"])
    w = {k: np.asarray(v, np.float64) * 10 for k, v in p.items()}  # large enough to reach the nonlinear range
    act = REFERENCE_ACTIVATIONS[name]
    for shape in [(1, 8, 64), (2, _STACKED_GATE_UP_MIN_ROWS // 2, 64)]:  # separate and stacked gate/up
        x = np.asarray(jax.random.normal(jax.random.key(2), shape))
        h = act(x @ w["gate"]) * (x @ w["up"]) if "gate" in w else act(x @ w["up"])
        out = MLP(cfg).apply({"params": {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}}, jnp.asarray(x))
        np.testing.assert_allclose(out, h @ w["down"], rtol=2e-4, atol=2e-4)


def test_ungated_width_is_shazeers():
    # arXiv:2002.05202 (T5-base shapes): d_model 768, d_ff 3072 plain against 2048 gated, equal parameters.
    t5 = {"vocab_size": 32_128, "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "d_ff": 2048}
    assert model.ModelConfig(**t5, mlp_activation="relu").mlp_hidden == 3072
    assert model.ModelConfig(**t5, mlp_activation="reglu").mlp_hidden == 2048
    assert model.count_params(model.ModelConfig(**t5, mlp_activation="relu")) == model.count_params(
        model.ModelConfig(**t5, mlp_activation="reglu")
    )


@pytest.mark.parametrize("name", [a for a in GATED if a != "swiglu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_gated_kernel_has_the_gradient_of_the_plain_formula(name, dtype):
    fn = MLP_ACTIVATIONS[name].fn
    gate_up = (3 * jax.random.normal(jax.random.key(1), (2, 5, 2, 7))).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 7)).astype(dtype)
    out, vjp = jax.vjp(functools.partial(glu_stacked, fn), gate_up)
    want_out, want_vjp = jax.vjp(lambda gu: fn(gu[:, :, 0]) * gu[:, :, 1], gate_up)
    (grad,), (want,) = vjp(cotangent), want_vjp(cotangent)
    assert grad.dtype == dtype and grad.shape == gate_up.shape
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(out), np.float32(want_out), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.float32(grad), np.float32(want), rtol=tol, atol=tol)


def test_bad_activation_and_odd_ungated_width_name_the_field():
    with pytest.raises(ValueError, match=r"mlp_activation='swish' is not one of swiglu, geglu"):
        TINY.replace(mlp_activation="swish")
    with pytest.raises(ValueError, match=r"d_ff=191 must be even with the ungated mlp_activation='relu2'"):
        TINY.replace(mlp_activation="relu2", d_ff=191)


def test_knobs_are_schema_keys_that_reach_the_model():
    config = experiment_from_cli(
        os.path.join(ROOT, "experiments/base.py:smoke"),
        ["model.mlp_activation=geglu", "model.parametrization=mup", "model.mup_base_width=32",
         "data.document_mask=false"],
    )
    cfg = model_config(config)
    assert (cfg.mlp_activation, cfg.parametrization, cfg.mup_base_width) == ("geglu", "mup", 32)
    assert config.data.document_mask is False and get_config().data.document_mask is True
    with pytest.raises(ValueError, match=r"^model\.parametrization='mu' is not one of sp, mup"):
        model_config(apply_overrides(config, {"model.parametrization": "mu"}))


# ----------------------------------------------------------------------------- μP


def test_mup_multipliers():
    wide = TINY.replace(d_model=256, d_ff=768, parametrization="mup", mup_base_width=64)  # m = 4
    m = wide.multipliers
    assert (m.hidden_init, m.hidden_lr, m.output, m.query, m.adam_eps) == (0.5, 0.25, 0.25, 0.5, 0.25)
    # An explicit head_dim stays fixed as width grows (more heads), so attention keeps 1/sqrt(H).
    assert TINY.replace(d_model=256, head_dim=16, parametrization="mup", mup_base_width=64).multipliers.query == 1.0
    assert TINY.replace(parametrization="mup", mup_base_width=64).multipliers.identity
    with pytest.raises(ValueError, match=r"mup_base_width must be set with parametrization='mup'"):
        TINY.replace(parametrization="mup")
    with pytest.raises(ValueError, match=r"mup_base_width=30 must be a multiple of n_heads=4"):
        TINY.replace(parametrization="mup", mup_base_width=30)


def test_mup_init_shrinks_exactly_the_hidden_matrices():
    sp = TINY.replace(d_model=256, d_ff=768)
    mup = sp.replace(parametrization="mup", mup_base_width=64)  # hidden std 0.02 * sqrt(1/4)
    params = _init(mup, jax.random.key(0))
    hidden = opt.hidden_matrix_mask(params)
    for (path, x), (_, is_hidden) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(hidden)[0]
    ):
        names = param_names(path)
        assert is_hidden == (names[-2:] in HIDDEN_MATRICES)
        if names[-1] == "scale":
            assert bool(jnp.all(x == 1.0)), names
        else:
            assert float(jnp.std(x)) == pytest.approx(0.01 if is_hidden else 0.02, rel=0.05), names


def _train(cfg: model.ModelConfig, config, steps: int = 3) -> dict:
    tx, _ = opt.build_optimizer(config, cfg)
    batch = _batch()

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            grads, parts = jax.grad(functools.partial(loss_sums, cfg, z_loss=0.0), has_aux=True)(params, batch)
            updates, state = tx.update(jax.tree.map(lambda g: g / parts["tokens"], grads), state, params)
            return (jax.tree.map(jnp.add, params, updates), state), None

        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    return run(_init(cfg, jax.random.key(0)))


@pytest.mark.parametrize("optimizer", sorted(opt.MUP_OPTIMIZERS))
def test_mup_at_its_base_width_is_standard_parametrization_bit_for_bit(optimizer):
    config = make_config(**{"optimizer.name": optimizer, "optimizer.grad_clip": 1.0})
    mup = TINY.replace(parametrization="mup", mup_base_width=TINY.d_model)
    tokens = _batch()["inputs"]
    np.testing.assert_array_equal(_forward(mup, _init(mup, jax.random.key(0)), tokens),
                                  _forward(TINY, _init(TINY, jax.random.key(0)), tokens))
    jax.tree.map(np.testing.assert_array_equal, _train(mup, config), _train(TINY, config))


def test_mup_forward_is_sp_with_the_multipliers_folded_into_the_weights():
    # Large init so attention is far from uniform and its scale shows in the logits.
    cfg = TINY.replace(parametrization="mup", mup_base_width=32, init_std=0.3)  # m = 2, H = 16, H0 = 8
    params = _init(cfg, jax.random.key(0))
    tokens = _batch()["inputs"]
    sp = cfg.replace(parametrization="sp")
    folded = dict(params, lm_head=params["lm_head"] * 0.5)  # logits * base / width
    folded["layers"] = dict(params["layers"], attn=dict(params["layers"]["attn"]))
    folded["layers"]["attn"]["q"] = params["layers"]["attn"]["q"] * np.sqrt(8 / 16)  # q·k sqrt(H0) / H
    ours = _forward(cfg, params, tokens)
    np.testing.assert_allclose(ours, _forward(sp, folded, tokens), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(ours - _forward(sp, params, tokens)).max()) > 0.1  # the multipliers matter here


def _first_update(config, cfg: model.ModelConfig, grad: float) -> tuple[dict, dict]:
    tx, _ = opt.build_optimizer(config, cfg)
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), nn.meta.unbox(model.abstract_params(cfg)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates, opt.hidden_matrix_mask(params)


def test_mup_adamw_scales_hidden_lr_and_epsilon_but_not_weight_decay():
    wide = TINY.replace(d_model=256, d_ff=768)
    mup = wide.replace(parametrization="mup", mup_base_width=64)  # m = 4
    # Gradients as small as epsilon: Adam's first step is -lr * g / (|g| + eps).
    config = make_config(**{"optimizer.eps": 1e-8, "optimizer.weight_decay": 0.0})
    lr = 1e-2
    for cfg, hidden_step, other_step in [(wide, 0.5, 0.5), (mup, 0.25 * 0.8, 0.8)]:  # eps / 4: 1 / (1 + 0.25)
        updates, hidden = _first_update(config, cfg, 1e-8)
        for u, h in zip(jax.tree.leaves(updates), jax.tree.leaves(hidden)):
            np.testing.assert_allclose(u, -lr * (hidden_step if h else other_step), rtol=1e-5)
    # Zero gradients: only decoupled decay moves the matrices, by -lr * wd * p at every width.
    config = make_config(**{"optimizer.weight_decay": 0.5})
    for cfg in (wide, mup):
        updates, _ = _first_update(config, cfg, 0.0)
        np.testing.assert_allclose(updates["layers"]["attn"]["q"], -lr * 0.5 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(updates["lm_head"], -lr * 0.5 * 0.5, rtol=1e-6)


def test_mup_lion_scales_hidden_updates():
    mup = TINY.replace(d_model=256, d_ff=768, parametrization="mup", mup_base_width=64)
    updates, hidden = _first_update(make_config(**{"optimizer.name": "lion", "optimizer.weight_decay": 0.0}), mup, 1.0)
    for u, h in zip(jax.tree.leaves(updates), jax.tree.leaves(hidden)):
        np.testing.assert_allclose(u, -1e-2 * (0.25 if h else 1.0), rtol=1e-6)  # sign updates


@pytest.mark.parametrize("name", ["sgd", "muon"])
def test_mup_refuses_optimizers_without_a_rule(name):
    config = make_config(**{"optimizer.name": name})
    mup = TINY.replace(parametrization="mup", mup_base_width=32)
    for fn in (opt.validate, opt.build_optimizer, functools.partial(check, n_devices=1)):
        with pytest.raises(ValueError, match=rf"optimizer.name='{name}' has no rule for model.parametrization='mup'"):
            fn(config, mup)


_MEASURED = ("embed", "project_out", "__call__")  # embedding, attention out, MLP out, block out, logits


def _coordinates(width: int, parametrization: str) -> dict[str, float]:
    """Mean |x| of every layer's output on a held-out batch after 5 AdamW steps (lr 3e-3, batches of 8 x 32)."""
    cfg = model.ModelConfig(vocab_size=256, d_model=width, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=3 * width,
                            max_seq_len=32, scan_layers=False, parametrization=parametrization, mup_base_width=64)
    config = make_config(**{"optimizer.lr": 3e-3, "optimizer.b2": 0.95, "optimizer.weight_decay": 0.1})
    tx, _ = opt.build_optimizer(config, cfg)
    it = SyntheticDataset("pattern", "train", 32, 256, 0).iterator(8)
    rows = [next(it) for _ in range(6)]
    batches = {k: jnp.stack([r[k] for r in rows[:5]]) for k in rows[0]}

    @jax.jit
    def train_and_measure() -> dict[str, jax.Array]:
        def step(carry, batch):
            params, state = carry
            grads, parts = jax.grad(functools.partial(loss_sums, cfg, z_loss=0.0), has_aux=True)(params, batch)
            updates, state = tx.update(jax.tree.map(lambda g: g / parts["tokens"], grads), state, params)
            return (jax.tree.map(jnp.add, params, updates), state), None

        params = model.init_params(cfg, jax.random.key(0))
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
        _, state = Llama(cfg).apply({"params": params}, jnp.asarray(rows[5]["inputs"]), mutable=["intermediates"],
                                    capture_intermediates=lambda m, n: n in _MEASURED and type(m).__name__ != "RMSNorm")
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        return {"/".join(param_names(p)): jnp.mean(jnp.abs(x)) for p, x in flat if x.ndim == 3}

    return {k: float(v) for k, v in train_and_measure().items()}


@pytest.mark.slow
def test_coordinate_check():
    """Tensor Programs V's Figure 5 check: activations keep their size across widths under μP, grow under SP.

    `slope` fits log mean|x| against log width over widths 64..512 (base 64). Measured (data seeds
    0, 1, 2): under μP every layer within |slope| <= 0.31 (the logits, which start at μP's documented
    1/sqrt(width) size, mup README "Coord Check", and are still recovering after 5 steps; every block
    output <= 0.21); under SP every layer but the embedding >= 0.75 (the logits; block outputs >= 1.29:
    Adam's fixed-size updates summed over width). 0.5 lies between the two: flat means changing by less
    than sqrt(width). Dropping any one of μP's hidden-lr, hidden-init or logit multipliers raised some
    layer's slope to >= 0.67 (measured), so each is checked. The attention logits are not included: after
    5 steps they still show μP's 1/sqrt(head_dim) init transient (slope -0.53 measured); their exact
    scale is test_mup_forward_is_sp_with_the_multipliers_folded_into_the_weights.
    """
    widths = (64, 128, 256, 512)
    for parametrization in ("mup", "sp"):
        coords = [_coordinates(w, parametrization) for w in widths]
        assert len(coords[0]) == 8  # embedding, 2 x (attention, MLP, block), logits
        for layer in coords[0]:
            slope = np.polyfit(np.log(widths), np.log([c[layer] for c in coords]), 1)[0]
            if parametrization == "mup" or layer == "embed":  # the embedding is width-independent in both
                assert abs(slope) < 0.5, (parametrization, layer, slope, [c[layer] for c in coords])
            else:
                assert slope > 0.5, (parametrization, layer, slope, [c[layer] for c in coords])


# ----------------------------------------------------------------------------- decoding and export


@pytest.mark.parametrize("name", ["geglu", "relu2"])
def test_cached_decoding_equals_full_forward_for_mup_and_other_mlps(name):
    cfg = TINY.replace(mlp_activation=name, parametrization="mup", mup_base_width=32, init_std=0.3)
    params = _init(cfg, jax.random.key(3))
    prompts, steps = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2]], 6
    forced = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(prompts), steps))
    tokens, lengths = generate.pad_prompts(prompts, pad_id=0, padding="left")
    cache = decode.init_cache(cfg, len(prompts), tokens.shape[1] + steps)
    logits, cache = _prefill(cfg, params, cache, tokens, lengths, "left")
    cached = [logits]
    for j in range(steps):
        logits, cache = _decode_step(cfg, params, cache, jnp.asarray(forced[:, j]))
        cached.append(logits)
    full, _ = generate.pad_prompts([p + list(f) for p, f in zip(prompts, forced)], pad_id=0, padding="right")
    ref = np.asarray(_forward(cfg, params, jnp.asarray(full)))
    sp_ref = np.asarray(_forward(cfg.replace(parametrization="sp"), params, jnp.asarray(full)))
    for row, n in enumerate(lengths):
        want = ref[row, n - 1 : n + steps]
        np.testing.assert_allclose(np.stack([c[row] for c in cached]), want, atol=1e-5, rtol=1e-5)
        assert np.abs(sp_ref[row, n - 1 : n + steps] - want).max() > 1e-2  # the multipliers took part


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mlp_activation": "geglu"}, "mlp_activation='geglu'"),
        ({"mlp_activation": "relu"}, "mlp_activation='relu'"),
        ({"parametrization": "mup", "mup_base_width": 32}, "parametrization='mup' at d_model=64 != mup_base_width=32"),
    ],
)
def test_export_refuses_what_transformers_llama_cannot_compute(tmp_path, overrides, field):
    cfg = TINY.replace(**overrides)
    with pytest.raises(hf.HFFormatError) as info:
        hf.save(cfg, _init(cfg, jax.random.key(0)), tmp_path / "out")
    assert field in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mup_at_its_base_width_exports(tmp_path):
    cfg = TINY.replace(parametrization="mup", mup_base_width=64)
    params = _init(cfg, jax.random.key(0))
    hf.save(cfg, params, tmp_path / "out")
    loaded_cfg, loaded = hf.load(tmp_path / "out")
    assert loaded_cfg.parametrization == "sp"  # the same function
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ----------------------------------------------------------------------------- the document mask


def test_without_the_document_mask_rows_are_attended_as_one_sequence(tiny_config):
    batch = _batch()
    assert int(batch["segment_ids"].max()) > 1  # some row packs several documents
    params = _init(TINY, jax.random.key(0))
    masked = loss_sums(TINY, params, batch, 0.0)[1]
    unmasked = loss_sums(TINY, params, batch, 0.0, document_mask=False)[1]
    logits = _forward(TINY, params, batch["inputs"])  # positions 0..T-1, causal over the whole row
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(unmasked["ce_sum"], jnp.sum(ce * batch["loss_mask"]), rtol=1e-6)
    assert unmasked["tokens"] == masked["tokens"]  # the same targets count
    assert abs(float(unmasked["ce_sum"] - masked["ce_sum"])) > 1e-3
    # The runtime passes data.document_mask to its steps.
    config = tiny_config(**{"data.document_mask": False, "data.seq_len": 32, "train.batch_size": 4})
    runtime = Runtime(config, TINY, jax.devices()[:1])
    got = runtime.eval_step(params, runtime.to_global({k: np.asarray(v) for k, v in batch.items()}))
    np.testing.assert_allclose(got["ce_sum"], unmasked["ce_sum"], rtol=1e-6)
