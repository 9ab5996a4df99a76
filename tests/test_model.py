"""Model invariants: shapes, causality, document masking, layouts, numerics, configs, counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.config import RopeScaling
from model.layers import attention_mask, einsum, rope_tables
from model.llama import Llama, unstack_layers, with_layers

TINY = model.VARIANTS["tiny"]
GQA_31 = TINY.replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))


init = jax.jit(model.init_params, static_argnums=0)
fwd = jax.jit(model.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return init(TINY, jax.random.key(0))


def _tokens(b: int, t: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY.vocab_size)


def _from_embeddings(m: Llama, x_BTD: jax.Array, segment_ids_BT: jax.Array | None) -> jax.Array:
    b, t, _ = x_BTD.shape
    index_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_tables(m.cfg, index_BT)
    mask = attention_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    return m.logits(m.run_layers(x_BTD, cos, sin, mask))


def test_shapes_dtypes_finite(params):
    logits = fwd(TINY, params, _tokens(2, 16))
    assert logits.shape == (2, 16, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_every_parameter_has_logical_axes():
    boxed = model.abstract_params(TINY)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
        assert all(name is not None for name in leaf.names)
    assert boxed["layers"]["attn"]["q"].names[0] == model.axes.LAYERS


@pytest.mark.parametrize("segments", [False, True])
def test_causality_and_document_masking_through_gradients(params, segments):
    t = 12
    x = jax.random.normal(jax.random.key(2), (1, t, TINY.d_model))
    seg = jnp.array([[1] * 5 + [2] * 7]) if segments else None
    m = Llama(TINY)

    def out_at(x, i):
        return m.apply({"params": params}, x, seg, method=_from_embeddings)[0, i].sum()

    queries = (0, 4, 5, 11)
    grads = jax.jit(jax.vmap(jax.grad(out_at), in_axes=(None, 0)))(x, jnp.array(queries))
    for i, g in zip(queries, grads):
        influence = np.abs(np.asarray(g[0])).sum(-1)
        allowed = np.arange(t) <= i
        if segments:
            allowed &= np.asarray(seg[0]) == int(seg[0, i])
        assert np.all(influence[~allowed] == 0.0), (i, influence)
        assert np.all(influence[allowed] > 0.0), (i, influence)


def test_packed_documents_equal_separate_runs(params):
    doc_a, doc_b = _tokens(1, 7, seed=3), _tokens(1, 9, seed=4)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    logits = fwd(TINY, params, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(logits[:, :7], fwd(TINY, params, doc_a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:], fwd(TINY, params, doc_b), atol=1e-5)


def test_mlp_gives_the_same_rows_through_the_stacked_and_the_separate_weights(params):
    """Many rows run gate and up as one stacked matmul, a few rows (a decode step) as two; same values."""
    from model.mlp import _STACKED_GATE_UP_MIN_ROWS, MLP

    rows = _STACKED_GATE_UP_MIN_ROWS
    mlp = MLP(TINY)
    p = unstack_layers(TINY, params)[0]["mlp"]
    x = jax.random.normal(jax.random.key(5), (2, rows // 2, TINY.d_model))
    whole = mlp.apply({"params": p}, x)  # rows: the stacked matmul
    parts = [mlp.apply({"params": p}, x[:, i : i + 8]) for i in range(0, rows // 2, 8)]  # 16 rows each
    hlo_whole = jax.jit(mlp.apply).lower({"params": p}, x).as_text()
    hlo_part = jax.jit(mlp.apply).lower({"params": p}, x[:, :8]).as_text()
    assert hlo_whole.count("dot_general") == 2 and hlo_part.count("dot_general") == 3  # the two paths ran
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_over_stacked_gate_up_has_the_gradient_of_the_plain_formula(dtype):
    from model.mlp import swiglu_stacked

    gate_up = (3 * jax.random.normal(jax.random.key(1), (2, 5, 2, 7))).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 7)).astype(dtype)
    plain = lambda gu: jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    out, vjp = jax.vjp(swiglu_stacked, gate_up)
    want_out, want_vjp = jax.vjp(plain, gate_up)
    (grad,), (want,) = vjp(cotangent), want_vjp(cotangent)
    assert grad.dtype == dtype and grad.shape == gate_up.shape
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(out), np.float32(want_out), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.float32(grad), np.float32(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [TINY, GQA_31.replace(tie_embeddings=True)], ids=["gqa", "rope31_tied"])
def test_scan_equals_unrolled(cfg):
    p_scan = init(cfg, jax.random.key(5))
    unrolled = cfg.replace(scan_layers=False)
    p_unrolled = with_layers(unrolled, {k: v for k, v in p_scan.items() if k != "layers"}, unstack_layers(cfg, p_scan))
    assert jax.tree.structure(p_unrolled) == jax.tree.structure(jax.eval_shape(init, unrolled, jax.random.key(0)))
    toks = _tokens(2, 20)
    np.testing.assert_allclose(
        fwd(cfg, p_scan, toks), fwd(unrolled, p_unrolled, toks), atol=1e-5, rtol=1e-5
    )


@functools.cache
def _loss_and_grads(cfg: model.ModelConfig) -> tuple:
    """Loss and gradients of a fixed batch under `cfg`; cached so each layout is compiled once."""
    p = init(TINY, jax.random.key(0))
    if not cfg.scan_layers:
        p = with_layers(cfg, {k: v for k, v in p.items() if k != "layers"}, unstack_layers(TINY, p))
    toks = _tokens(2, 16)
    return jax.jit(jax.value_and_grad(lambda p: jax.nn.log_softmax(fwd(cfg, p, toks)).mean()))(p)


@pytest.mark.parametrize(
    "scan, policy", [(True, "full"), (True, "save_dots"), (True, "save_dots_no_batch"), (False, "full")]
)
def test_remat_equals_no_remat(scan, policy):
    base = TINY.replace(scan_layers=scan)
    l0, g0 = _loss_and_grads(base)
    l1, g1 = _loss_and_grads(base.replace(remat_policy=policy))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, GQA_31.replace(n_kv_heads=1)], ids=["gqa", "mqa"])
def test_dot_product_attention_equals_herd_attention(cfg):
    """model.attention_impl='xla' (jax.nn.dot_product_attention, as 'cudnn' is on a GPU) computes herd's function:
    loss and gradients of a causal batch, and logits of packed documents (the segment mask)."""
    p = init(cfg, jax.random.key(0))
    toks = _tokens(2, 16)
    # The two configs really run different kernels (jax.nn.dot_product_attention's own ops appear).
    jaxprs = [str(jax.make_jaxpr(lambda t, c=c: model.forward(c, p, t))(toks)) for c in
              (cfg, cfg.replace(attention_impl="xla"))]
    assert jaxprs[0] != jaxprs[1]
    loss_fn = lambda c: jax.jit(jax.value_and_grad(lambda p: jax.nn.log_softmax(fwd(c, p, toks)).mean()))(p)
    (l0, g0), (l1, g1) = loss_fn(cfg), loss_fn(cfg.replace(attention_impl="xla"))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    x_BTD = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
    segments_BT = jnp.array([[0] * 5 + [1] * 11, [0] * 9 + [1] * 4 + [2] * 3])
    herd, xla = (
        jax.jit(lambda x, s, c=c: Llama(c).apply({"params": p}, x, s, method=_from_embeddings))(x_BTD, segments_BT)
        for c in (cfg, cfg.replace(attention_impl="xla"))
    )
    np.testing.assert_allclose(herd, xla, atol=1e-5, rtol=1e-5)


def test_bf16_compute_close_to_float32(params):
    toks = _tokens(2, 32)
    ref = fwd(TINY, params, toks)
    low = fwd(TINY.replace(dtype="bfloat16"), params, toks)
    assert low.dtype == jnp.float32  # logits stay float32
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel
    probs_ref, probs_low = jax.nn.softmax(ref), jax.nn.softmax(low)
    assert float(jnp.abs(probs_ref - probs_low).max()) < 2e-2


def test_low_precision_einsum_accumulates_in_float32_forward_and_backward(dot_operand_dtypes):
    a = jax.random.normal(jax.random.key(0), (3, 5, 64)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (64, 2, 7)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (3, 5, 2, 7))

    def loss(a, b, f=einsum):
        return jnp.sum(f("BTD,DCF->BTCF", a, b).astype(jnp.float32) * w)

    def loss32(a, b):
        return loss(a.astype(jnp.float32), b.astype(jnp.float32), jnp.einsum)

    out = einsum("BTD,DCF->BTCF", a, b)
    assert out.dtype == jnp.bfloat16 and einsum("BTD,DCF->BTCF", a, b, jnp.float32).dtype == jnp.float32
    ref = jnp.einsum("BTD,DCF->BTCF", a.astype(jnp.float32), b.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
    grads, grads32 = jax.grad(loss, (0, 1))(a, b), jax.grad(loss32, (0, 1))(a, b)
    for g, g32, x in zip(grads, grads32, (a, b)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert float(jnp.linalg.norm(g.astype(jnp.float32) - g32) / jnp.linalg.norm(g32)) < 1e-2
    assert dot_operand_dtypes(jax.value_and_grad(loss, (0, 1)), a, b) == [("bf16", "bf16")] * 3
    with pytest.raises(ValueError, match="summed out of one operand alone"):
        einsum("BTD,DCF->CF", a, b)


def test_bf16_training_step_keeps_every_dot_in_bf16(params, dot_operand_dtypes):
    # XLA:CPU runs a dot in bf16 only when both operands are bf16; a float32
    # operand (or a bf16 -> bf16 dot, which it upcasts) runs at half the rate.
    cfg, toks = TINY.replace(dtype="bfloat16"), _tokens(2, 16)

    def loss(p):
        return jnp.mean(model.forward(cfg, p, toks))

    dtypes = dot_operand_dtypes(jax.grad(loss), params)
    assert len(dtypes) > 20 and set(dtypes) == {("bf16", "bf16")}, dtypes
    assert set(dot_operand_dtypes(jax.grad(lambda p: jnp.mean(model.forward(TINY, p, toks))), params)) == {
        ("f32", "f32")
    }


def test_bf16_parameters_are_stored_in_bf16():
    p = jax.eval_shape(init, TINY.replace(param_dtype="bfloat16", dtype="bfloat16"), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("tied", [False, True])
def test_zero_init_outputs_zeroes_only_the_output_projections(params, tied):
    cfg = TINY.replace(zero_init_outputs=True, tie_embeddings=tied)
    zeroed = init(cfg, jax.random.key(0))
    reference = params if not tied else init(TINY.replace(tie_embeddings=True), jax.random.key(0))
    outputs = {"o", "down", "lm_head"}
    for (path, z), r in zip(jax.tree_util.tree_flatten_with_path(zeroed)[0], jax.tree.leaves(reference)):
        name = path[-1].key
        if name in outputs:
            assert not np.any(np.asarray(z)), name
        else:  # the same draw as without the flag
            np.testing.assert_array_equal(z, r, err_msg=name)
    logits = fwd(cfg, zeroed, _tokens(2, 16))
    if tied:  # the embedding doubles as the head and keeps its init
        assert float(jnp.std(logits)) > 0
    else:  # every block starts as the identity, every next token is equally likely
        np.testing.assert_array_equal(logits, jnp.zeros_like(logits))


def test_rope_scaling_changes_only_low_frequencies():
    from model.layers import rope_frequencies

    plain = rope_frequencies(128, 500_000.0, None)
    scaled = rope_frequencies(128, 500_000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    wavelen = 2 * np.pi / np.asarray(plain)
    np.testing.assert_array_equal(np.asarray(scaled)[wavelen < 8192 / 4], np.asarray(plain)[wavelen < 8192 / 4])
    np.testing.assert_allclose(np.asarray(scaled)[wavelen > 8192], np.asarray(plain)[wavelen > 8192] / 8, rtol=1e-6)


PUBLISHED = {
    # Meta's model cards / released checkpoints.
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_count_params_matches_published(name):
    assert model.count_params(model.VARIANTS[name]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(model.VARIANTS))
def test_flop_accounting_is_consistent_with_param_count(name):
    from model.flops import matmul_params

    cfg = model.VARIANTS[name]
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    embedding = cfg.vocab_size * cfg.d_model
    tied_head = embedding if cfg.tie_embeddings else 0
    assert matmul_params(cfg) + embedding + norms - tied_head == model.count_params(cfg)
    per_token = model.flops_per_token(cfg, 2048)
    assert per_token > 6 * matmul_params(cfg)
    assert model.flops_per_token(cfg, 4096) > per_token


@pytest.mark.parametrize(
    "overrides, seq_len, expected",
    [
        # tiny: d=64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU d_ff=192, vocab 256.
        # Per layer: q 64*4*16 + k, v 2*64*2*16 + o 4*16*64 = 12,288; MLP 3*64*192 = 36,864; so 49,152.
        # Matmul parameters 2*49,152 + head 64*256 = 114,688; 6 * that = 688,128.
        # Attention: q.k and p.v are 2 FLOPs * 4*16 per key each = 256 per key per layer, over (16 + 1) / 2 keys
        # on average, 2 layers, x3 for forward + backward: 256 * 8.5 * 2 * 3 = 13,056.
        ({}, 16, 688_128 + 13_056),
        # MQA with head_dim 32, an ungated GELU MLP (hidden 3/2 * 192 = 288) and a tied head (counted once):
        # q 64*4*32 + k, v 2*64*1*32 + o 4*32*64 = 20,480; MLP 2*64*288 = 36,864; (2*57,344 + 64*256) * 6 = 786,432.
        # Attention: 2 * 2 * 4*32 = 512 per key per layer, (8 + 1) / 2 keys, 2 layers, x3: 13,824.
        (dict(n_kv_heads=1, head_dim=32, mlp_activation="gelu", tie_embeddings=True), 8, 786_432 + 13_824),
    ],
    ids=["tiny", "mqa_gelu_tied"],
)
def test_flops_per_token_equals_a_hand_count(overrides, seq_len, expected):
    assert model.flops_per_token(model.VARIANTS["tiny"].replace(**overrides), seq_len) == expected


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_heads=5), "n_heads"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(head_dim=15), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(attention_impl="cudnn"), "attention_impl='cudnn' needs dtype bfloat16"),
        (dict(dtype="float8"), "dtype"),
        (dict(rope_scaling=dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)), "rope_scaling"),
        (dict(d_modle=64), "d_modle"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TINY.replace(**overrides)


def test_unknown_variant_lists_choices():
    with pytest.raises(ValueError, match="llama3_8b"):
        model.get_variant("llama4")
