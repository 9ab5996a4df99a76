"""Llama 3 pre-training at published scale, for planning: will it fit, how is it sharded, how fast is a step.

Question: before booking a cluster, does Llama 3 8B / 70B / 405B pre-training at the
paper's sequence length and batch fit on a given slice, and what does a step cost?
Shapes from arXiv:2407.21783 (Table 3); the 405B recipe from §3.4.1: sequences of 8,192
tokens, batches of 16M tokens (2,048 sequences) in the main phase, AdamW with peak lr
8e-5, 8,000 warmup steps, cosine decay to 8e-7. 8B and 70B use the same sequences with
4M-token batches (512 sequences; the paper gives no per-size batch). bfloat16 compute
with float32 parameters and moments, each block rematerialised (`full`), micro-batches of
one sequence per device.

Arguments: size=8b|70b|405b (default 405b), smoke (a tiny model that trains on CPU).
Commands (README "Planning a big run" records their output):
  herd plan --config=experiments/llama3_pretraining.py:size=405b --target=tpu:v5p:8x8x16
  herd plan --config=experiments/llama3_pretraining.py:size=405b --target=tpu:v5p:4x4x8   # does not fit
  herd plan --config=experiments/llama3_pretraining.py:size=8b --target=tpu:v5p:2x2x2
  herd plan --config=experiments/llama3_pretraining.py:size=405b --target=gpu:h100:1024
Expected runtime: a few minutes per plan on a 2-core CPU (the 405B v5p compile ~2-5 min).
Expected result: 405B fits on 1,024 v5p chips under fsdp_tp (tensor 8) and does not fit on 128.
The data is a stand-in (synthetic): a real run points data.* at a corpus tokenized with the
Llama 3 tokenizer (data.tokenizer.name=tiktoken), whose 128,256 tokens model.vocab_size fixes here.
"""

from __future__ import annotations

import ml_collections

from experiments import base
from train.experiment import parse_arg

# (variant, global batch in sequences of 8,192 tokens, micro-batches, mesh fsdp, mesh tensor) for the
# slices named in the docstring: one sequence per device per micro-batch.
SIZES = {
    "8b": ("llama3_8b", 512, 64, -1, 1),
    "70b": ("llama3_70b", 512, 8, -1, 8),
    "405b": ("llama3_1_405b", 2048, 16, -1, 8),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="405b", smoke=False)
    if args.size not in SIZES:
        raise ValueError(f"experiment argument size={args.size!r}; valid: {', '.join(SIZES)}")
    variant, batch, micro, fsdp, tensor = SIZES[args.size]
    c = base.get_config()
    c.model.variant = variant
    c.model.vocab_size = 128_256
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.seq_len = 8192
    c.train.batch_size = batch
    c.train.microbatches = micro
    c.train.steps = 1_200_000
    c.mesh.rules = "fsdp_tp" if tensor > 1 else "fsdp"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, tensor
    c.optimizer.lr = 8e-5
    c.schedule.warmup_steps = 8000
    c.schedule.final_lr_fraction = 0.01  # 8e-7 / 8e-5
    if args.smoke:
        base.apply_smoke(c)
        c.model.vocab_size = None
        c.model.remat_policy = "full"
        c.train.microbatches = 2
        c.mesh.rules, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = "fsdp", -1, 1, 1
    return c
