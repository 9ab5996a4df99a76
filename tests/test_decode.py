"""KV-cache decoding: cached logits == full forward, greedy == transformers generate, sampling, stopping, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import model
import model.hf as hf
from model import axes, decode, generate, sampling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

TOL = 1e-5
PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [120, 7, 7, 64, 31, 2, 77]]
NEW = 24  # 12 + 24 positions: well past original_max_position_embeddings=16
DIFFS: dict[str, float] = {}

_forward = jax.jit(model.forward, static_argnums=0)
_prefill = jax.jit(decode.prefill, static_argnums=(0, 5))
_step = jax.jit(decode.decode_step, static_argnums=0)


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    print("\nmax abs logits diff, cached vs full forward: " + ", ".join(f"{k}={v:.2e}" for k, v in DIFFS.items()))


@pytest.fixture(scope="module")
def models(hf_llama):
    """case -> (transformers model, our config, our params imported from its save_pretrained directory)."""
    cache: dict[str, tuple] = {}

    def get(case: str) -> tuple:
        if case not in cache:
            m, path = hf_llama(case)
            cache[case] = (m, *hf.load(path))
        return cache[case]

    return get


def _layout(cfg: model.ModelConfig, params: dict, scan: bool) -> tuple:
    return (cfg, params) if scan else decode.decoding_layout(cfg, params)


@pytest.mark.parametrize(
    "case, scan, padding",
    [("gqa", True, "left"), ("mha", False, "left"), ("llama3_rope", True, "right")],
)
def test_cached_logits_equal_full_forward(models, case, scan, padding):
    _, cfg, params = models(case)
    cfg, params = _layout(cfg, params, scan)
    steps = 8
    forced = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(PROMPTS), steps))
    tokens, lengths = generate.pad_prompts(PROMPTS, pad_id=0, padding=padding)
    cache = decode.init_cache(cfg, len(PROMPTS), tokens.shape[1] + steps)
    logits, cache = _prefill(cfg, params, cache, tokens, lengths, padding)
    cached = [logits]
    for j in range(steps):
        logits, cache = _step(cfg, params, cache, jnp.asarray(forced[:, j]))
        cached.append(logits)
    # Reference: each row's prompt + forced tokens, right padded, in one causal forward pass.
    full, _ = generate.pad_prompts([p + list(f) for p, f in zip(PROMPTS, forced)], pad_id=0, padding="right")
    ref = np.asarray(_forward(cfg, params, jnp.asarray(full)))
    diff = 0.0
    for row, n in enumerate(lengths):
        for j, step_logits in enumerate(cached):
            diff = max(diff, float(np.abs(np.asarray(step_logits[row]) - ref[row, n - 1 + j]).max()))
    DIFFS[f"{case}/{'scan' if scan else 'unrolled'}/{padding}"] = diff
    assert diff <= TOL
    np.testing.assert_array_equal(np.asarray(cache.end_B), np.asarray(cache.start_B) + lengths + steps)


def _hf_greedy(m: "transformers.LlamaForCausalLM", prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch, without a stop token."""
    tokens, _ = generate.pad_prompts(prompts, pad_id=0, padding="left")
    mask = np.arange(tokens.shape[1])[None] >= (tokens.shape[1] - np.array([len(p) for p in prompts]))[:, None]
    with torch.no_grad():
        out = m.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].tolist()


@pytest.fixture(scope="module")
def greedy_gqa(models):
    """Our greedy continuations of PROMPTS under the GQA model (shared by the stopping and sampling tests)."""
    _, cfg, params = models("gqa")
    return generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0))


@pytest.mark.parametrize("case", ["gqa", "llama3_rope"])
def test_greedy_equals_transformers_generate(models, greedy_gqa, case):
    m, cfg, params = models(case)
    ours = generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0))
    assert [len(row) for row in ours] == [NEW] * len(PROMPTS)  # no EOS: exactly max_new_tokens each
    assert ours == _hf_greedy(m, PROMPTS, NEW)
    if case == "gqa":
        assert ours == greedy_gqa


def test_eos_stops_each_row_and_the_stream(models, greedy_gqa):
    _, cfg, params = models("gqa")
    eos = greedy_gqa[0][4]
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in greedy_gqa]
    assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0), eos_id=eos) == expected
    # One stop token per row (several EOS ids, as Llama 3 has): the stream ends once every row has stopped.
    eos_ids = [row[i] for row, i in zip(greedy_gqa, (2, 5, 3))]
    stops = [min(row.index(e) for e in eos_ids if e in row) for row in greedy_gqa]
    steps = list(generate.stream(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0), eos_id=eos_ids))
    assert len(steps) == max(stops) + 1
    for j, (tokens, live) in enumerate(steps):
        np.testing.assert_array_equal(live, [j <= s for s in stops])
        for row, s in enumerate(stops):
            assert tokens[row] == (greedy_gqa[row][j] if j <= s else 0)  # finished rows are fed pad_id


def test_sampling_is_reproducible_and_filters_reduce_to_greedy(models, greedy_gqa):
    _, cfg, params = models("gqa")

    def run(seed: int, **kw) -> list[list[int]]:
        return generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(seed), **kw)

    hot = run(1, temperature=2.0)
    assert run(1, temperature=2.0) == hot
    assert run(2, temperature=2.0) != hot
    assert hot != greedy_gqa
    assert run(3, temperature=2.0, top_k=1) == greedy_gqa
    assert run(4, temperature=2.0, top_p=1e-6) == greedy_gqa
    assert run(5, temperature=0.7, top_k=5, top_p=0.9) == run(5, temperature=0.7, top_k=5, top_p=0.9)


def test_sample_support_and_frequencies():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.asarray(np.log(probs))[None]
    keys = jax.random.split(jax.random.key(0), 4000)

    @jax.jit  # the settings are traced: one compilation for every call below
    def draws_jit(temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
        return jax.vmap(lambda k: sampling.sample(logits, k, temperature, top_k, top_p)[0])(keys)

    def draws(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
        return np.asarray(draws_jit(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))

    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draws(top_p=0.85)) == {0, 1, 2}
    assert set(draws(top_k=3, top_p=0.99)) == {0, 1, 2}
    assert set(draws(top_p=1e-6)) == set(draws(top_k=1)) == {0}
    np.testing.assert_allclose(np.bincount(draws(), minlength=4) / len(keys), probs, atol=0.03)
    hot = probs**0.5 / (probs**0.5).sum()  # temperature 2
    np.testing.assert_allclose(np.bincount(draws(temperature=2.0), minlength=4) / len(keys), hot, atol=0.03)
    assert int(sampling.sample(logits, keys[0], temperature=0)[0]) == 0


def test_filters_renormalise_the_tempered_distribution():
    """Temperature scales the logits first; top-k / top-p then keep tokens of that tempered distribution, and the
    kept tokens are drawn in proportion to their tempered probabilities (renormalised to sum to 1)."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs), jnp.float32)[None]
    keys = jax.random.split(jax.random.key(7), 40_000)

    @jax.jit
    def draws_jit(temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
        return jax.vmap(lambda k: sampling.sample(logits, k, temperature, top_k, top_p)[0])(keys)

    def frequencies(temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
        drawn = np.asarray(draws_jit(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
        return np.bincount(drawn, minlength=4) / len(keys)

    def kept(temperature: float, n: int) -> np.ndarray:
        """The tempered distribution cut to its n most likely tokens and renormalised."""
        q = probs ** (1 / temperature)
        q = np.where(np.arange(4) < n, q, 0.0)
        return q / q.sum()

    # Cumulative mass: plain 0.5, 0.8, 0.95; at temperature 2: 0.38, 0.67, 0.88; at 0.5: 0.68, 0.93, 0.99.
    cases = [
        (dict(temperature=1.0, top_k=2), kept(1.0, 2), None),  # 0.625, 0.375
        (dict(temperature=1.0, top_p=0.85), kept(1.0, 3), None),
        (dict(temperature=2.0, top_k=2), kept(2.0, 2), kept(1.0, 2)),
        # Filtering before the temperature would keep 2 tokens here, and 3 in the next case.
        (dict(temperature=2.0, top_p=0.75), kept(2.0, 3), kept(2.0, 2)),
        (dict(temperature=0.5, top_p=0.9), kept(0.5, 2), kept(0.5, 3)),
    ]
    for settings, expected, wrong in cases:
        got = frequencies(**settings)
        np.testing.assert_allclose(got, expected, atol=0.012, err_msg=str(settings))
        if wrong is not None:  # the other order (or no renormalisation) is far from what is drawn
            assert np.abs(got - wrong).max() > 0.05, settings


def _chain_model(chain: dict[int, int]) -> tuple[model.ModelConfig, dict]:
    """A byte-vocabulary Llama whose greedy next token after t is chain[t]: attention and MLP add nothing, each
    chained token's embedding is its own unit vector, and the head maps that vector to its successor."""
    from train.data.tokenizers import ByteTokenizer

    cfg = model.VARIANTS["tiny"].replace(vocab_size=ByteTokenizer.vocab_size)
    params = jax.tree.map(np.array, model.init_params(cfg, jax.random.key(0)))
    params["layers"]["attn"]["o"][:] = 0
    params["layers"]["mlp"]["down"][:] = 0
    params["embedding"][:] = 0
    params["lm_head"][:] = 0
    for slot, (token, after) in enumerate(chain.items()):
        params["embedding"][token, slot] = 1.0
        params["lm_head"][slot, after] = 1.0
    return cfg, jax.tree.map(jnp.asarray, params)


def test_sample_streams_whole_characters_and_stops_at_eos():
    """herd sample's stream (train/inference.py) with the byte tokenizer: a character split over several tokens
    shows once complete, and nothing follows EOS although --max_tokens allows more."""
    from train import inference
    from train.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    text = "é b€"  # two-byte é, three-byte €
    ids = list(text.encode("utf-8"))
    assert len(ids) == 7
    # "a" (the prompt's last token) -> the text's bytes -> EOS -> "c" for ever (what ignoring EOS would show).
    sequence = [ord("a"), *ids, tok.eos_id]
    chain = dict(zip(sequence, sequence[1:])) | {tok.eos_id: ord("c"), ord("c"): ord("c")}
    cfg, params = _chain_model(chain)
    loaded = inference.Loaded(cfg, params, tok, source="chain")
    pieces = list(inference.sample_text(loaded, "a", max_tokens=20, temperature=0))
    assert pieces == ["é", " ", "b", "€"]
    # Cut inside a character by --max_tokens: the complete text, then the incomplete bytes as U+FFFD.
    assert list(inference.sample_text(loaded, "a", max_tokens=6, temperature=0)) == ["é", " ", "b", "\ufffd"]


def test_cache_is_sharded_like_attention(models):
    """Under a mesh and the fsdp_tp rules the cache splits batch and kv heads, and logits do not change."""
    _, cfg, params = models("gqa")
    mesh = jax.make_mesh((2, 2, 2), axes.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    prompts = PROMPTS + [[11, 12]]
    tokens, lengths = generate.pad_prompts(prompts, pad_id=0)

    def run(cache_len: int) -> tuple:
        logits0, cache = decode.prefill(cfg, params, decode.init_cache(cfg, 4, cache_len), tokens, lengths)
        logits1, cache = decode.decode_step(cfg, params, cache, jnp.argmax(logits0, -1))
        return logits0, logits1, cache

    plain = jax.jit(run, static_argnums=0)(tokens.shape[1] + 1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(axes.get_rules("fsdp_tp")):
        sharded = jax.jit(run, static_argnums=0)(tokens.shape[1] + 1)
    assert len(sharded[2].k_BKSH) == cfg.n_layers
    for layer in sharded[2].k_BKSH + sharded[2].v_BKSH:
        spec = tuple(layer.sharding.spec)
        assert spec + (None,) * (4 - len(spec)) == ((axes.DATA, axes.FSDP), axes.TENSOR, None, None)
    for a, b in zip(plain[:2], sharded[:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 128]]), "prompt 0 has token 128"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(prompts=[[1] * 40], max_new_tokens=25), "(40 tokens) + max_new_tokens (25) = 65 exceeds the model's"),
        (dict(prompts=[[1] * 40], max_new_tokens=25), "max_seq_len=64"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(eos_id=[1, 500]), "eos_id=500"),
        (dict(pad_id=-1), "pad_id=-1"),
        (dict(padding="middle"), "padding='middle'"),
    ],
)
def test_bad_requests_raise_one_line_errors(models, kw, expected):
    _, cfg, params = models("gqa")
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4, rng=jax.random.key(0)) | kw
    with pytest.raises(ValueError) as info:
        generate.stream(cfg, params, **args)  # checked at the call, before any compilation
    assert expected in str(info.value) and "\n" not in str(info.value)
