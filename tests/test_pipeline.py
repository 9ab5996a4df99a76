"""The tfds -> grain pipeline: packing with document masking, determinism, resume, process slices, bytes.

Two corpora, both prepared offline into a temporary TFDS data dir: the real
`shakespeare_works` (42 works of ~100 KB, so rows rarely hold a document
boundary) and a small `text_folder` of short documents with non-ASCII text,
where every row holds several documents.
"""

import json
import os
import random

import jax
import numpy as np
import pytest

import model
from experiments.base import get_config
from train.config import apply_overrides
from train.data import build_dataset, builders
from train.data.pipeline import TfdsDataset, record_text
from train.loop import train_and_evaluate

KEYS = {"inputs", "targets", "loss_mask", "positions", "segment_ids", "target_bytes"}
WORDS = ["to", "be", "or", "not", "café", "naïve", "日本語", "🙂", "thou", "art", "\n", "—"]


def _config(root, **overrides):
    return apply_overrides(get_config(), {
        "data.source": "tfds",
        "data.data_dir": str(root),
        "data.seq_len": 32,
        "data.shuffle_tokens": 2**12,  # 124 rows per shuffled block: tests read a few batches, not 2^21 tokens
        **overrides,
    })


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory):
    """(TFDS data dir with shakespeare_works prepared, folder of two .jsonl files of short documents)."""
    root, folder = tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name in ("a.jsonl", "b.jsonl"):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(60)]
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    builders.prepare(_config(root))
    return root, folder


def small(roots, **overrides):
    """Config of the short-document corpus: half the files are validation."""
    root, folder = roots
    return _config(root, **{"data.dataset": "text_folder", "data.text_path": str(folder),
                            "data.validation_fraction": 0.5, **overrides})


def split_texts(config, split):
    source = builders.data_source(config, split)
    return [record_text(source[i], config.data.text_key) for i in range(len(source))]


def stream(batches, pad_id):
    """The process's token stream: each row's first input, then its targets; padding dropped."""
    tokens = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1).reshape(-1) for b in batches])
    return tokens[tokens != pad_id]


def documents(ds, batches):
    """Texts of the documents in the stream, in order (the byte tokenizer's BOS starts each)."""
    tok = ds.tokenizer
    tokens = stream(batches, tok.pad_id)
    cuts = np.flatnonzero(tokens == tok.bos_id)
    return [tok.decode(tokens[a:b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def test_batches_have_train_step_keys_shapes_dtypes(roots):
    for config in (_config(roots[0]), small(roots)):
        ds = build_dataset(config, "train", 256)
        assert ds.vocab_size == 259  # the byte tokenizer's, replacing the model's 256
        batch = next(ds.iterator(8))
        assert set(batch) == KEYS
        for key, value in batch.items():
            assert value.shape == (8, 32), key
            assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key


def test_segments_positions_and_loss_mask_follow_documents(roots):
    ds = build_dataset(small(roots), "train", 256)
    bos = ds.tokenizer.bos_id
    it = ds.iterator(4)
    for _ in range(5):
        b = next(it)
        starts = b["inputs"] == bos
        seg, pos = b["segment_ids"], b["positions"]
        assert (seg[:, 0] == 1).all() and seg.max() >= 2
        # A new segment begins exactly where a document begins, and positions restart there.
        assert np.array_equal(np.diff(seg, axis=1), starts[:, 1:].astype(np.int32))
        assert np.array_equal(pos[:, 1:] == 0, starts[:, 1:]) and (pos[:, 0] == 0).all()
        assert (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()
        # The loss skips exactly the targets that start another document.
        assert np.array_equal(b["loss_mask"] == 0, b["targets"] == bos)


def test_packed_documents_never_attend_to_each_other(roots):
    ds = build_dataset(small(roots, **{"data.seq_len": 64}), "train", 256)
    b = next(ds.iterator(4))
    r = int(np.argmax(b["segment_ids"].max(1)))
    inputs, seg, pos = b["inputs"][r], b["segment_ids"][r], b["positions"][r]
    assert seg.max() >= 3 and inputs[seg == 2][0] == ds.tokenizer.bos_id  # segment 2 is a whole document
    cfg = model.VARIANTS["tiny"].replace(vocab_size=ds.vocab_size)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Row 0: the packed row. Row s: document s alone, left-aligned as one segment; causal
    # attention keeps the padding after it from changing its logits. One call, one compile.
    n_docs, width = seg.max(), len(inputs)
    tokens = np.full((n_docs + 1, width), ds.tokenizer.pad_id, np.int32)
    positions = np.tile(np.arange(width, dtype=np.int32), (n_docs + 1, 1))
    segments = np.ones((n_docs + 1, width), np.int32)
    tokens[0], positions[0], segments[0] = inputs, pos, seg
    for s in range(1, n_docs + 1):
        tokens[s, : (seg == s).sum()] = inputs[seg == s]
    logits = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens, positions=positions, segment_ids=segments)
    for s in range(1, n_docs + 1):
        n = (seg == s).sum()
        np.testing.assert_allclose(logits[0][seg == s], logits[s, :n], atol=1e-5, rtol=0)


def test_same_seed_same_batches_other_seed_differs(roots):
    def first(seed):
        it = build_dataset(_config(roots[0], seed=seed), "train", 256).iterator(4)
        return [next(it) for _ in range(3)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in KEYS)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


@pytest.mark.parametrize("corpus, shuffle_tokens", [("shakespeare", 20 * 33), ("small", 0), ("small", 6 * 17)])
def test_resume_from_saved_state_gives_the_same_batches(roots, corpus, shuffle_tokens):
    overrides = {"data.shuffle_tokens": shuffle_tokens}  # blocks of 20 rows of 33 tokens, or 6 of 17: crossed
    config = _config(roots[0], **overrides) if corpus == "shakespeare" else small(roots, **{"data.seq_len": 16,
                                                                                            **overrides})
    ds = build_dataset(config, "train", 256)
    it = ds.iterator(4)
    for step in range(12):  # the small corpus crosses document and epoch boundaries here
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)] if step in (5, 11) else [next(it)]
        fresh = ds.iterator(4)
        fresh.set_state(state)
        for want in expected:
            got = next(fresh)
            assert all(np.array_equal(got[k], want[k]) for k in KEYS), step


def test_rows_are_shuffled_in_blocks(roots):
    """Each block of shuffle_tokens // (seq_len + 1) rows is the in-order stream's block, permuted."""
    in_order = build_dataset(_config(roots[0], **{"data.shuffle_tokens": 0}), "train", 256).iterator(8)
    shuffled = build_dataset(_config(roots[0], **{"data.shuffle_tokens": 32 * 33 + 5}), "train", 256).iterator(8)
    for _ in range(2):  # two blocks of 32 rows = 4 batches of 8 each
        want = np.concatenate([next(in_order)["inputs"] for _ in range(4)])
        got = np.concatenate([next(shuffled)["inputs"] for _ in range(4)])
        assert sorted(map(bytes, want)) == sorted(map(bytes, got))
        assert not np.array_equal(want, got)
    # 32 rows of 33 tokens come from one or two ~100 KB plays in order; shuffled, a batch's rows are not
    # consecutive pieces of the stream any more.
    rows = [bytes(r) for r in want]
    batch = [rows.index(bytes(r)) for r in got[:8]]
    assert sorted(batch) != list(range(min(batch), min(batch) + 8))
    with pytest.raises(ValueError, match="data.shuffle_tokens=-1 must be an integer >= 0"):
        build_dataset(_config(roots[0], **{"data.shuffle_tokens": -1}), "train", 256)


def test_train_split_is_read_from_config(roots):
    config = small(roots, **{"data.train_split": "train[:10]", "data.shuffle_tokens": 0})
    ds = build_dataset(config, "train", 256)
    assert len(ds.source) == 10 and ds.shuffle
    assert sorted(documents(ds, ds.iterator(4, epochs=1))) == sorted(split_texts(config, "train[:10]"))


def test_each_process_reads_its_own_documents(roots):
    """With P processes, process p reads documents p, p + P, ... of the (shuffled) epoch order."""
    ds = build_dataset(small(roots, **{"data.shuffle_tokens": 0}), "train", 256)
    alone = documents(ds, ds.iterator(4, 0, 1, epochs=1))
    assert sorted(alone) == sorted(split_texts(small(roots), "train"))
    halves = []
    for p in range(2):
        batches = list(ds.iterator(4, p, 2, epochs=1))
        assert all(b["inputs"].shape[0] == 2 for b in batches[:-1])
        halves.append(documents(ds, batches))
    assert halves == [alone[0::2], alone[1::2]]
    it0, it1 = ds.iterator(4, 0, 2), ds.iterator(4, 1, 2)
    b0, b1 = next(it0), next(it1)
    first = b0["segment_ids"][0] == 1  # both start with document 0; then process 0 skips document 1
    assert np.array_equal(b0["inputs"][0][first], next(ds.iterator(4))["inputs"][0][first])
    assert not (b0["inputs"][:, None] == b1["inputs"][None]).all(-1).any()  # no row read twice
    with pytest.raises(ValueError, match="process_count=2 but this run has 1"):
        ds.iterator(4).set_state(it0.get_state())


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_bytes_of_one_pass_equal_the_split_bytes(roots, tokenizer):
    """Masked target bytes + each row's first-token bytes == the split's UTF-8 bytes, exactly."""
    config = _config(roots[0], **{"data.tokenizer.name": tokenizer, "data.tokenizer.vocab_size": 512})
    ds = build_dataset(config, "validation", 256)
    assert ds.vocab_size == (259 if tokenizer == "byte" else 512)
    if tokenizer == "sentencepiece":  # trained once on the train split, kept beside the data
        assert any(f.startswith("sentencepiece-bpe512-") for f in os.listdir(roots[0] / "herd_tokenizers"))
    batches = list(ds.iterator(8, epochs=1))
    texts = split_texts(config, "validation")
    total = sum(len(t.encode("utf-8")) for t in texts)
    masked = sum(int((b["target_bytes"] * b["loss_mask"]).sum()) for b in batches)
    first = sum(int(ds.tokenizer.token_bytes(b["inputs"][:, 0]).sum()) for b in batches)
    assert masked + first == total
    assert sum(int(b["target_bytes"].sum()) for b in batches) == masked  # unmasked targets are BOS or padding
    last, pad = batches[-1], ds.tokenizer.pad_id
    assert (last["targets"][-1, -1] == pad) and not last["loss_mask"][last["targets"] == pad].any()
    assert (last["segment_ids"][last["inputs"] == pad] == 0).all()
    expected = np.concatenate([ds.tokenizer.encode_document(t) for t in texts])
    assert np.array_equal(stream(batches, ds.tokenizer.pad_id), expected)  # packing loses and adds nothing
    assert texts[0].startswith(ds.tokenizer.decode(batches[0]["inputs"][0].tolist()))


def test_clear_errors(roots):
    root, _ = roots
    with pytest.raises(ValueError, match="holds no documents"):
        TfdsDataset(_config(root), "validation[:0]", train=False)
    ds = build_dataset(_config(root), "validation", 256)
    with pytest.raises(ValueError, match="5 documents, fewer than the 8 processes"):
        ds.iterator(8, 0, 8)
    with pytest.raises(ValueError, match="not divisible"):
        ds.iterator(6, 0, 4)
    with pytest.raises(ValueError, match="data.worker_count=-1"):
        build_dataset(_config(root, **{"data.worker_count": -1}), "train", 256)
    with pytest.raises(ValueError, match="not written by the tfds pipeline"):
        ds.iterator(8).set_state({"step": 3})
    other = build_dataset(_config(root, seed=1), "train", 256).iterator(8).get_state()
    with pytest.raises(ValueError, match="stream="):
        build_dataset(_config(root), "train", 256).iterator(8).set_state(other)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_worker_processes_change_nothing(roots):
    config = _config(roots[0], **{"data.worker_count": 2})
    reference = build_dataset(_config(roots[0]), "train", 256).iterator(4)
    want = [next(reference) for _ in range(4)]
    it = build_dataset(config, "train", 256).iterator(4)
    try:
        got = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    reference.set_state(state)
    got += [next(reference) for _ in range(2)]
    for x, y in zip(want, got):
        assert all(np.array_equal(x[k], y[k]) for k in KEYS)


@pytest.mark.slow
def test_resumed_training_run_matches_uninterrupted(roots, tmp_path, tiny_config):
    config = tiny_config(_config(roots[0]), **{
        "data.seq_len": 32, "train.batch_size": 4, "checkpoint.async_save": False, "mesh.data": 1,
    })
    devices = jax.devices()[:1]
    full = train_and_evaluate(config, tmp_path / "full", devices=devices)
    train_and_evaluate(config, tmp_path / "resumed", devices=devices, stop_at=2)
    resumed = train_and_evaluate(config, tmp_path / "resumed", devices=devices)
    assert sorted(full["losses"]) == [1, 2, 3, 4] and sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert full["losses"][step] == resumed["losses"][step]
    assert full["eval"] == resumed["eval"] and np.isfinite(full["eval"]["loss"])
