"""The baseline experiment: declares every key an experiment may set.

Experiments import `get_config` from here and change a few fields; the config
is locked when loaded, so a misspelt key fails with the list of valid keys.
`None` (placeholder) model fields mean "keep the variant's value".

Run: herd train --config=experiments/base.py:smoke --workdir=/tmp/base
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# ModelConfig fields that an experiment may override, with their types.
MODEL_OVERRIDES = {
    "vocab_size": int,
    "d_model": int,
    "n_layers": int,
    "n_heads": int,
    "n_kv_heads": int,
    "d_ff": int,
    "head_dim": int,
    "max_seq_len": int,
    "rope_theta": float,
    "norm_eps": float,
    "tie_embeddings": bool,
    "init_std": float,
    "zero_init_outputs": bool,
    "scan_layers": bool,
    "remat_policy": str,
    "param_dtype": str,
    "dtype": str,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = "tiny"
    for name, typ in MODEL_OVERRIDES.items():
        c.model[name] = config_dict.placeholder(typ)
    # Llama 3.1 rope scaling; a set factor replaces the variant's scaling.
    c.model.rope_scaling = ml_collections.ConfigDict()
    c.model.rope_scaling.factor = config_dict.placeholder(float)
    c.model.rope_scaling.low_freq_factor = 1.0
    c.model.rope_scaling.high_freq_factor = 4.0
    c.model.rope_scaling.original_max_seq_len = 8192

    # Mesh axis sizes; one of them may be -1 (fill with the remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp"))

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic_pattern"  # a registered source in train/data: synthetic_*, tfds
    c.data.seq_len = 128
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # For source="tfds": a dataset name (the project's shakespeare_works and
    # text_folder builders, or any registered TFDS text dataset such as lm1b).
    c.data.dataset = "shakespeare_works"
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = TFDS default
    c.data.text_key = "text"  # feature holding the document text
    c.data.text_path = config_dict.placeholder(str)  # text_folder: a folder or glob of .txt/.jsonl files
    c.data.validation_fraction = 0.1  # text_folder: share of files held out
    c.data.on_invalid_utf8 = "error"  # error | skip (skip counts and warns)
    c.data.shuffle = True
    # tfds train rows are emitted in blocks of about this many tokens (32 MB), each block in a
    # seeded random order, so a batch samples many documents (train/data/pipeline.py); 0: in order.
    c.data.shuffle_tokens = 2**21
    c.data.worker_count = 0  # grain worker processes; 0 reads in the main process
    c.data.tokenizer = ml_collections.ConfigDict()
    c.data.tokenizer.name = "byte"  # byte | sentencepiece | tiktoken
    c.data.tokenizer.path = config_dict.placeholder(str)  # an existing tokenizer.model to load
    c.data.tokenizer.vocab_size = 2048  # sentencepiece: size of the BPE model trained on the train split

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global batch, in sequences
    c.train.microbatches = 1  # gradient accumulation: batch_size / microbatches per pass
    c.train.z_loss = 0.0  # weight of log(Z)^2 (arXiv:2204.02311 §5)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | sgd | lion | muon (Muon on hidden matrices, adamw on the rest)
    c.optimizer.lr = 3e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95  # Llama 2 (arXiv:2307.09288 §2.2)
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.decay_embeddings = False
    c.optimizer.decay_norms = False
    c.optimizer.grad_clip = 1.0  # global norm; 0 disables
    c.optimizer.muon_momentum = 0.95  # muon only: Nesterov momentum of the hidden matrices
    c.optimizer.muon_ns_steps = 5  # muon only: Newton-Schulz iterations per update
    c.optimizer.muon_ns_dtype = "float32"  # muon only: float32 | bfloat16 Newton-Schulz iterates (f32 accumulation)
    c.optimizer.muon_adam_lr_multiplier = 1.0  # muon only: lr of the AdamW part (embedding, head, norms) / lr

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # cosine | wsd | constant | inverse_sqrt
    c.schedule.warmup_steps = 100
    c.schedule.final_lr_fraction = 0.1  # cosine / wsd floor, as a fraction of lr
    c.schedule.decay_fraction = 0.2  # wsd: share of steps spent decaying

    c.eval = ml_collections.ConfigDict(dict(every=200, batches=8))

    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))

    c.log = ml_collections.ConfigDict()
    c.log.every = 1  # steps between metric rows
    c.log.progress = True  # live progress bar on the terminal
    c.log.peak_flops = config_dict.placeholder(float)  # per device; None = known table or measured matmul peak

    if arg == "smoke":
        apply_smoke(c)
    elif arg:
        raise ValueError(f"unknown argument {arg!r} for experiments/base.py; valid: smoke")
    return c


def sweep():
    """A learning-rate sweep over the baseline: dotted-key overrides, one dict per run."""
    for lr in (1e-4, 3e-4, 1e-3, 3e-3):
        yield {"optimizer.lr": lr}


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any experiment to a few CPU seconds."""
    c.model.variant = "tiny"
    c.data.seq_len = 32
    c.data.shuffle_tokens = 2**12  # a few rows per block: the first batch needs no long read-ahead
    c.train.steps = 6
    c.train.batch_size = 4
    c.schedule.warmup_steps = 2
    c.eval.every = 3
    c.eval.batches = 2
    c.checkpoint.every = 3
    c.log.progress = False
    return c
