"""train/optimizer.py: schedule shapes, weight-decay masks (plain / boxed, scanned / unrolled), clipping, validation."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model
from experiments.base import get_config
from train import muon
from train.config import apply_overrides
from train import optimizer as opt

LR = 1e-2
TINY = model.VARIANTS["tiny"]
LAYOUTS = {"scanned": TINY, "unrolled": TINY.replace(scan_layers=False)}


def make_config(**overrides: Any) -> Any:
    """The base config with dotted-key overrides, e.g. make_config(**{"schedule.name": "wsd"})."""
    return apply_overrides(get_config(), {"optimizer.lr": LR, **overrides})


def lr_at(config: Any, *steps: int) -> np.ndarray:
    schedule = opt.build_schedule(config)
    return np.array([float(schedule(jnp.asarray(s, jnp.int32))) for s in steps])


def names_of(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def expected_decay(names: tuple[str, ...], decay_embeddings: bool, decay_norms: bool) -> bool:
    if names[-1] == "scale":
        return decay_norms
    if names == ("embedding",):
        return decay_embeddings
    return True


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(opt.SCHEDULES))
def test_warmup_is_linear_and_reaches_lr_exactly(name: str) -> None:
    c = make_config(**{"schedule.name": name, "schedule.warmup_steps": 100, "train.steps": 1000})
    start, half, peak = lr_at(c, 0, 50, 100)
    assert start == 0.0
    assert half == pytest.approx(LR / 2, rel=1e-6)
    assert peak == np.float32(LR)


def test_cosine_decays_monotonically_to_the_final_fraction() -> None:
    c = make_config(**{"schedule.name": "cosine", "schedule.warmup_steps": 100, "train.steps": 1000})
    c.schedule.final_lr_fraction = 0.1
    values = lr_at(c, *range(100, 1001, 50))
    assert np.all(np.diff(values) < 0)
    assert values[-1] == pytest.approx(0.1 * LR, rel=1e-5)
    assert lr_at(c, 550)[0] == pytest.approx(0.55 * LR, rel=1e-5)  # halfway: mean of lr and floor
    assert lr_at(c, 5000)[0] == pytest.approx(0.1 * LR, rel=1e-5)  # stays at the floor past the end


def test_no_warmup_starts_at_peak() -> None:
    c = make_config(**{"schedule.name": "cosine", "schedule.warmup_steps": 0})
    assert lr_at(c, 0)[0] == np.float32(LR)


def test_wsd_is_flat_then_decays_only_in_the_last_fraction() -> None:
    c = make_config(**{"schedule.name": "wsd", "schedule.warmup_steps": 100, "train.steps": 1000})
    c.schedule.decay_fraction, c.schedule.final_lr_fraction = 0.2, 0.0
    stable = lr_at(c, *range(100, 801, 25))
    np.testing.assert_array_equal(stable, np.float32(LR))
    decay = lr_at(c, 800, 850, 900, 1000)
    np.testing.assert_allclose(decay, [LR, 0.75 * LR, 0.5 * LR, 0.0], rtol=1e-5, atol=1e-9)


def test_wsd_final_fraction_is_the_floor() -> None:
    c = make_config(**{"schedule.name": "wsd", "train.steps": 1000, "schedule.final_lr_fraction": 0.25})
    assert lr_at(c, 1000, 2000) == pytest.approx([0.25 * LR] * 2, rel=1e-5)


def test_constant_stays_at_lr() -> None:
    c = make_config(**{"schedule.name": "constant", "schedule.warmup_steps": 10, "train.steps": 100})
    np.testing.assert_array_equal(lr_at(c, 10, 50, 100, 10_000), np.float32(LR))


def test_inverse_sqrt_halves_at_four_times_warmup() -> None:
    c = make_config(**{"schedule.name": "inverse_sqrt", "schedule.warmup_steps": 100, "train.steps": 1000})
    assert lr_at(c, 400)[0] == pytest.approx(LR / 2, rel=1e-6)
    assert lr_at(c, 900)[0] == pytest.approx(LR / 3, rel=1e-6)


@pytest.mark.parametrize("name", sorted(opt.SCHEDULES))
def test_schedules_trace_under_jit(name: str) -> None:
    c = make_config(**{"schedule.name": name, "train.steps": 200, "schedule.warmup_steps": 20})
    schedule = opt.build_schedule(c)
    steps = jnp.arange(0, 250, 7, dtype=jnp.int32)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), [schedule(s) for s in steps], rtol=1e-6)


# ----------------------------------------------------------------------------- decay mask


@functools.cache
def params_in(form: str, layout: str) -> Any:
    """The tiny model's parameter tree in one of its forms, without running (or compiling) the model's init.

    The mask reads only names and structure; numeric tests get random values
    laid out exactly as `abstract_params` / `init_params` lay them out.
    """
    cfg = LAYOUTS[layout]
    if form == "boxed_abstract":
        return model.abstract_params(cfg)
    if form == "plain_abstract":
        return jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    rng = np.random.default_rng(0)
    boxed = jax.tree.map(lambda s: jnp.asarray(rng.normal(1.0, 0.1, s.shape), s.dtype), model.abstract_params(cfg))
    return boxed if form == "boxed" else nn.meta.unbox(boxed)


def test_materialised_params_match_init_params_layout() -> None:
    for layout in LAYOUTS:
        plain, abstract = params_in("plain", layout), params_in("plain_abstract", layout)
        assert jax.tree.structure(plain) == jax.tree.structure(abstract)
        assert [x.shape for x in jax.tree.leaves(plain)] == [x.shape for x in jax.tree.leaves(abstract)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("form", ["plain", "plain_abstract", "boxed", "boxed_abstract"])
@pytest.mark.parametrize("decay_embeddings,decay_norms", [(False, False), (True, False), (False, True), (True, True)])
def test_decay_mask_by_name(layout: str, form: str, decay_embeddings: bool, decay_norms: bool) -> None:
    params = params_in(form, layout)
    mask = opt.weight_decay_mask(params, decay_embeddings=decay_embeddings, decay_norms=decay_norms)
    # Same structure, boxes included, so optax.masked can zip the two trees.
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    got = {names_of(path): value for path, value in flat}
    assert len(got) == len(flat)
    for names, value in got.items():
        assert value is expected_decay(names, decay_embeddings, decay_norms), names
    n_norms = sum(names[-1] == "scale" for names in got)
    assert n_norms == 2 * (1 if layout == "scanned" else TINY.n_layers) + 1  # attn_norm, mlp_norm per block; final_norm
    assert got[("lm_head",)] is True


def test_tied_embeddings_follow_decay_embeddings() -> None:
    params = jax.eval_shape(functools.partial(model.init_params, TINY.replace(tie_embeddings=True)), jax.random.key(0))
    assert "lm_head" not in params
    assert opt.weight_decay_mask(params, decay_embeddings=False, decay_norms=False)["embedding"] is False
    assert opt.weight_decay_mask(params, decay_embeddings=True, decay_norms=False)["embedding"] is True


# ----------------------------------------------------------------------------- optimizers


def first_update(tx: optax.GradientTransformation, grads: Any, params: Any) -> Any:
    """The updates of the first step from a fresh state, as one compiled call (eager dispatch is far slower)."""
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def optimizer_config(name: str, **overrides: Any) -> Any:
    base = {
        "optimizer.name": name,
        "optimizer.weight_decay": 0.5,
        "schedule.name": "constant",
        "schedule.warmup_steps": 0,
        "train.steps": 10,
    }
    return make_config(**{**base, **overrides})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(opt.OPTIMIZERS))
def test_weight_decay_moves_matrices_but_not_norms_or_embedding(name: str, layout: str) -> None:
    tx, _ = opt.build_optimizer(optimizer_config(name), TINY)
    params = params_in("plain", layout)  # every leaf is nonzero, so decay shows wherever it applies
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = first_update(tx, zeros, params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        names = names_of(path)
        moved = bool(jnp.any(u != 0))
        assert moved is expected_decay(names, False, False), (names, moved)
        if moved:  # decoupled decay: -lr * wd * p
            p = params
            for n in names:
                p = p[n]
            np.testing.assert_allclose(u, -LR * 0.5 * p, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(opt.OPTIMIZERS))
def test_decay_flags_reach_the_optimizer(name: str) -> None:
    c = optimizer_config(name, **{"optimizer.decay_embeddings": True, "optimizer.decay_norms": True})
    tx, _ = opt.build_optimizer(c, TINY)
    params = params_in("plain", "scanned")
    updates = first_update(tx, jax.tree.map(jnp.zeros_like, params), params)
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))


def test_clipping_bounds_the_update() -> None:
    c = optimizer_config("sgd", **{"optimizer.b1": 0.0, "optimizer.weight_decay": 0.0, "optimizer.grad_clip": 0.5})
    c.optimizer.lr = 1.0
    tx, _ = opt.build_optimizer(c, TINY)
    params = params_in("plain", "scanned")
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    updates = first_update(tx, grads, params)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)
    small = jax.tree.map(lambda g: g * 1e-6, grads)  # under the threshold: untouched
    updates = first_update(tx, small, params)
    assert float(optax.tree.norm(updates)) == pytest.approx(float(optax.tree.norm(small)), rel=1e-5)


def test_grad_clip_zero_disables_clipping() -> None:
    c = optimizer_config("sgd", **{"optimizer.b1": 0.0, "optimizer.weight_decay": 0.0, "optimizer.grad_clip": 0.0})
    c.optimizer.lr = 1.0
    tx, _ = opt.build_optimizer(c, TINY)
    params = params_in("plain", "scanned")
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    updates = first_update(tx, grads, params)
    assert float(optax.tree.norm(updates)) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(opt.OPTIMIZERS))
def test_state_shapes_from_boxed_abstract_params(name: str, layout: str) -> None:
    tx, _ = opt.build_optimizer(optimizer_config(name), TINY)
    abstract = model.abstract_params(LAYOUTS[layout])
    state = jax.eval_shape(tx.init, abstract)
    # The moments keep the parameters' logical axes, which is what shards the state.
    specs = nn.get_partition_spec(state)
    param_specs = {s for s in jax.tree.leaves(nn.get_partition_spec(abstract)) if s}
    state_specs = {s for s in jax.tree.leaves(specs) if s}
    assert param_specs <= state_specs


@pytest.mark.parametrize("name", sorted(opt.OPTIMIZERS))
def test_update_on_boxed_params_matches_plain(name: str) -> None:
    tx, _ = opt.build_optimizer(optimizer_config(name), TINY)
    boxed = params_in("boxed", "scanned")
    plain = nn.meta.unbox(boxed)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), plain)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    boxed_grads = jax.tree.map(lambda b, g: b.replace_boxed(g), boxed, grads, is_leaf=is_box)
    u_boxed = first_update(tx, boxed_grads, boxed)
    u_plain = first_update(tx, grads, plain)
    jax.tree.map(np.testing.assert_allclose, nn.meta.unbox(u_boxed), u_plain)


def as_matrices(u: np.ndarray, dims: Any) -> np.ndarray:
    """`u` as a stack of (fan_in, fan_out) matrices, per Muon's dimension numbers (other axes stacked)."""
    axes = lambda a: [a] if isinstance(a, int) else list(a)  # noqa: E731
    red, out = axes(dims.reduction_axis), axes(dims.output_axis)
    batch = [a for a in range(u.ndim) if a not in red + out]
    stacked = int(np.prod([u.shape[a] for a in batch]))  # 1 when there is no batch axis
    fan_in = int(np.prod([u.shape[a] for a in red]))
    return np.transpose(u, batch + red + out).reshape(stacked, fan_in, -1)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grouped_muon_matches_optax_muon_matrix_by_matrix(layout: str) -> None:
    # Ours batches equal-shaped matrices; optax.contrib's orthogonalises each alone. Three steps, so
    # the bias-corrected Nesterov momentum is compared too. Only the hidden matrices take part.
    only_hidden = lambda tx: optax.partition({"muon": tx, "adam": optax.set_to_zero()}, muon.muon_labels)  # noqa: E731
    ours = only_hidden(muon.scale_by_muon(momentum=0.9, ns_steps=5))
    reference = only_hidden(
        optax.contrib.scale_by_muon(beta=0.9, ns_steps=5, weight_dimension_numbers=muon.muon_dims_tree)
    )
    params = params_in("plain", layout)
    rng = np.random.default_rng(2)
    states = [ours.init(params), reference.init(params)]
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        u_ours, states[0] = jax.jit(ours.update)(grads, states[0])
        u_ref, states[1] = jax.jit(reference.update)(grads, states[1])
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(u_ours)[0], jax.tree.leaves(u_ref)):
            dims = muon.muon_dimension_numbers(names_of(path), a.ndim)
            if dims is None:
                continue
            scale = 0.2 * np.sqrt(max(as_matrices(np.asarray(a), dims).shape[1:]))  # ours is AdamW-RMS scaled
            np.testing.assert_allclose(np.asarray(a) / scale, b, rtol=1e-4, atol=1e-6, err_msg=str(names_of(path)))


def test_muon_reads_inputs_as_rows_and_keeps_layers_apart() -> None:
    dims = lambda *names, ndim: tuple(muon.muon_dimension_numbers(names, ndim))  # noqa: E731
    # Scanned (layers, embed, heads, head_dim): each layer's embed -> heads x head_dim map.
    assert dims("layers", "attn", "q", ndim=4) == (1, (2, 3))
    assert dims("layers_0", "attn", "q", ndim=3) == (0, (1, 2))
    assert dims("layers", "attn", "o", ndim=4) == ((1, 2), 3)
    assert dims("layers_3", "mlp", "down", ndim=2) == ((0,), 1)
    assert dims("layers", "mlp", "gate", ndim=3) == (1, (2,))
    for names in (("embedding",), ("lm_head",), ("layers", "attn_norm", "scale"), ("final_norm", "scale")):
        assert muon.muon_dimension_numbers(names, 2) is None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_muon_orthogonalises_each_hidden_matrix_and_gives_the_rest_to_adamw(layout: str) -> None:
    overrides = {"optimizer.weight_decay": 0.0, "optimizer.grad_clip": 0.0}
    muon_tx, _ = opt.build_optimizer(optimizer_config("muon", **overrides), TINY)
    adamw_tx, _ = opt.build_optimizer(optimizer_config("adamw", **overrides), TINY)
    params = params_in("plain", layout)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    ours, reference = first_update(muon_tx, grads, params), first_update(adamw_tx, grads, params)
    orthogonalised = set()
    for (path, u), r, g in zip(
        jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(reference), jax.tree.leaves(grads)
    ):
        names = names_of(path)
        dims = muon.muon_dimension_numbers(names, u.ndim)
        if dims is None:  # embedding, lm_head, norm scales: exactly the adamw optimizer's update
            np.testing.assert_allclose(u, r, rtol=1e-6, err_msg=str(names))
            continue
        orthogonalised.add(names[-1])
        for m, gm in zip(as_matrices(np.asarray(u), dims), as_matrices(np.asarray(g), dims)):
            scale = LR * 0.2 * np.sqrt(max(m.shape))  # AdamW-like RMS 0.2 (arXiv:2502.16982)
            sv = np.linalg.svd(m / scale, compute_uv=False)
            assert 0.5 < np.median(sv) < 1.2 and sv.max() < 1.3, (names, sv.min(), np.median(sv), sv.max())
            # The direction is the polar factor of this matrix's gradient (first step: momentum = gradient),
            # descending: -U V^T.
            left, _, right = np.linalg.svd(gm, full_matrices=False)
            polar = -(left @ right)
            cosine = np.sum(m * polar) / (np.linalg.norm(m) * np.linalg.norm(polar))
            assert cosine > 0.95, (names, cosine)
    assert orthogonalised == {"q", "k", "v", "o", "gate", "up", "down"}


def test_muon_adam_lr_multiplier_scales_only_the_adamw_part() -> None:
    params = params_in("plain", "unrolled")
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates = {}
    for multiplier in (1.0, 3.0):
        tx, _ = opt.build_optimizer(optimizer_config("muon", **{"optimizer.muon_adam_lr_multiplier": multiplier}), TINY)
        updates[multiplier] = first_update(tx, grads, params)
    for (path, one), three in zip(jax.tree_util.tree_flatten_with_path(updates[1.0])[0], jax.tree.leaves(updates[3.0])):
        names = names_of(path)
        hidden = muon.muon_dimension_numbers(names, one.ndim) is not None
        np.testing.assert_allclose(three, one if hidden else 3.0 * one, rtol=1e-5, atol=1e-9, err_msg=str(names))


def test_bfloat16_newton_schulz_runs_bf16_dots_and_stays_close_to_float32(dot_operand_dtypes) -> None:
    x_BMN = jax.random.normal(jax.random.key(0), (3, 64, 192))
    ns = {dt: jax.jit(functools.partial(muon.newton_schulz, steps=5, dtype=dt)) for dt in (jnp.float32, jnp.bfloat16)}
    full, low = np.asarray(ns[jnp.float32](x_BMN)), np.asarray(ns[jnp.bfloat16](x_BMN))
    assert low.dtype == np.float32
    for m_low, m_full in zip(low, full):  # bf16 rounding moves each entry a little, not the direction
        assert np.sum(m_low * m_full) / (np.linalg.norm(m_low) * np.linalg.norm(m_full)) > 0.995
    sv = np.linalg.svd(low, compute_uv=False)
    assert 0.6 < sv.min() and sv.max() < 1.3, (sv.min(), sv.max())
    assert set(dot_operand_dtypes(ns[jnp.bfloat16], x_BMN)) == {("bf16", "bf16")}
    assert set(dot_operand_dtypes(ns[jnp.float32], x_BMN)) == {("f32", "f32")}


# ----------------------------------------------------------------------------- validation

BAD_CONFIGS = {
    "unknown schedule": ({"schedule.name": "linear"}, ["schedule.name", "cosine", "wsd", "constant", "inverse_sqrt"]),
    "unknown optimizer": ({"optimizer.name": "adam"}, ["optimizer.name", "adamw", "sgd"]),
    "warmup too long": (
        {"schedule.warmup_steps": 2000, "train.steps": 1000},
        ["schedule.warmup_steps=2000 exceeds train.steps=1000"],
    ),
    "negative warmup": ({"schedule.warmup_steps": -1}, ["schedule.warmup_steps=-1"]),
    "zero steps": ({"train.steps": 0}, ["train.steps=0"]),
    "negative steps": ({"train.steps": -5}, ["train.steps=-5"]),
    "zero decay fraction": ({"schedule.decay_fraction": 0.0}, ["schedule.decay_fraction=0.0", "(0.0, 1.0]"]),
    "decay fraction above one": ({"schedule.decay_fraction": 1.5}, ["schedule.decay_fraction=1.5"]),
    "negative final fraction": (
        {"schedule.final_lr_fraction": -0.1},
        ["schedule.final_lr_fraction=-0.1", "[0.0, 1.0]"],
    ),
    "final fraction above one": ({"schedule.final_lr_fraction": 1.1}, ["schedule.final_lr_fraction=1.1"]),
    "negative lr": ({"optimizer.lr": -1e-3}, ["optimizer.lr=-0.001"]),
    "zero lr": ({"optimizer.lr": 0.0}, ["optimizer.lr=0.0"]),
    "negative weight decay": ({"optimizer.weight_decay": -0.1}, ["optimizer.weight_decay=-0.1"]),
    "negative grad clip": ({"optimizer.grad_clip": -1.0}, ["optimizer.grad_clip=-1.0"]),
    "b1 of one": ({"optimizer.b1": 1.0}, ["optimizer.b1=1.0"]),
    "negative b2": ({"optimizer.b2": -0.5}, ["optimizer.b2=-0.5"]),
    "negative eps": ({"optimizer.eps": -1e-8}, ["optimizer.eps=-1e-08"]),
    "muon momentum of one": (
        {"optimizer.name": "muon", "optimizer.muon_momentum": 1.0},
        ["optimizer.muon_momentum=1.0", "[0.0, 1.0)"],
    ),
    "muon without newton-schulz steps": (
        {"optimizer.name": "muon", "optimizer.muon_ns_steps": 0},
        ["optimizer.muon_ns_steps=0", "positive integer"],
    ),
    "muon newton-schulz dtype": (
        {"optimizer.name": "muon", "optimizer.muon_ns_dtype": "float16"},
        ["optimizer.muon_ns_dtype='float16'", "float32, bfloat16"],
    ),
    "muon adam lr multiplier of zero": (
        {"optimizer.name": "muon", "optimizer.muon_adam_lr_multiplier": 0.0},
        ["optimizer.muon_adam_lr_multiplier=0.0", "(0.0, inf)"],
    ),
    "wsd warmup into decay": (
        {"schedule.name": "wsd", "schedule.warmup_steps": 900, "train.steps": 1000, "schedule.decay_fraction": 0.2},
        ["schedule.warmup_steps=900", "wsd decay", "800"],
    ),
    "inverse_sqrt without warmup": (
        {"schedule.name": "inverse_sqrt", "schedule.warmup_steps": 0},
        ["schedule.warmup_steps=0", "inverse_sqrt"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_validation_errors_name_the_field(case: str) -> None:
    overrides, fragments = BAD_CONFIGS[case]
    config = make_config(**overrides)
    for check in (opt.validate, opt.build_optimizer):
        with pytest.raises(ValueError) as err:
            check(config, TINY)
        message = str(err.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_schedule_errors_also_come_from_build_schedule() -> None:
    with pytest.raises(ValueError, match=r"schedule\.warmup_steps=2000 exceeds train\.steps=1000"):
        opt.build_schedule(make_config(**{"schedule.warmup_steps": 2000, "train.steps": 1000}))


@pytest.mark.parametrize("arg", [None, "smoke"])
@pytest.mark.parametrize("schedule", sorted(opt.SCHEDULES))
def test_base_configs_are_valid(arg: str | None, schedule: str) -> None:
    config = get_config(arg)
    config.schedule.name = schedule
    opt.validate(config, TINY)
    tx, learning_rate = opt.build_optimizer(config, TINY)
    assert isinstance(tx, optax.GradientTransformation)
    state = tx.init(model.init_params(TINY, jax.random.key(0)))
    final = float(learning_rate(state, jnp.asarray(config.train.steps)))
    # The lr read from the optimizer state (the injected peak lr) follows the host-side schedule.
    np.testing.assert_allclose(final, float(opt.build_schedule(config)(config.train.steps)), rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_learning_rate_and_weight_decay_are_not_compiled_into_the_step(tiny_config, name: str) -> None:
    # They live in the optimizer state (optax.inject_hyperparams): a learning-rate or weight-decay
    # sweep compiles one step for all its trials (the persistent cache keys on this text).
    from train.runtime import Runtime

    def step_text(**overrides: Any) -> str:
        config = tiny_config(**{"optimizer.name": name, "mesh.data": 1, **overrides})
        return Runtime(config, TINY.replace(vocab_size=256), jax.devices()[:1]).lower_train_step().as_text()

    reference = step_text()
    assert step_text(**{"optimizer.lr": 7e-3, "optimizer.weight_decay": 0.0}) == reference
    assert step_text(**{"optimizer.b1": 0.8}) != reference  # other hyperparameters are compiled in
