"""The logical axis vocabulary and the rules that map it onto a physical mesh.

Model code names axes only through these constants; which mesh axis (if any)
each one is split over is decided by a rule preset chosen in the experiment
config. Parameters and activations use separate names so that, for example,
the model dimension of a weight can be split over ``fsdp`` while the model
dimension of an activation stays whole.
"""

from __future__ import annotations

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
NORM = "norm"

# Activation axes.
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

PARAM_AXES = (VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, LAYERS, NORM)
ACTIVATION_AXES = (ACT_BATCH, ACT_SEQ, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB)

# Physical mesh axes, outermost first.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch is always split over every data-parallel mesh axis.
_BATCH_RULE = ((ACT_BATCH, (DATA, FSDP)),)

RULES: dict[str, Rules] = {
    # Pure data parallelism: every parameter is replicated.
    "dp": _BATCH_RULE,
    # ZeRO-3 style: each weight is split over `fsdp` along its model dimension
    # (or its vocabulary for the embedding) and all-gathered just in time.
    "fsdp": _BATCH_RULE + ((EMBED, FSDP),),
    # FSDP plus Megatron-style tensor parallelism (arXiv:1909.08053): heads and
    # the MLP hidden dimension are split over `tensor`.
    "fsdp_tp": _BATCH_RULE
    + (
        (EMBED, FSDP),
        (MLP, TENSOR),
        (HEADS, TENSOR),
        (KV_HEADS, TENSOR),
        (VOCAB, TENSOR),
        (ACT_HEADS, TENSOR),
        (ACT_KV_HEADS, TENSOR),
        (ACT_MLP, TENSOR),
        (ACT_VOCAB, TENSOR),
    ),
}


def get_rules(name: str) -> Rules:
    """Returns the logical -> mesh rules of preset `name`, or a clear error."""
    if name not in RULES:
        raise ValueError(f"unknown sharding preset {name!r}; valid presets: {', '.join(sorted(RULES))}")
    return RULES[name]
