"""Parametrizations: how initialisation, learning rates and two forward multipliers scale with width.

A parametrization maps a ModelConfig to `Multipliers`. "sp" is today's Llama:
every multiplier 1 (a constant `init_std` everywhere). "mup" is the maximal
update parametrization of Tensor Programs V (Yang et al., arXiv:2203.03466) for
Adam-family optimizers, in the form of the paper's Table 8 (an output
multiplier and a width-independent output init, which is what lets the output
head stay tied to the embedding). With the width multiplier
m = d_model / mup_base_width:

  hidden matrices (attention q, k, v, o; MLP gate, up, down)
                      init std init_std / sqrt(m)  (variance ∝ 1/fan_in)
                      Adam-family learning rate / m  (Table 3 and 8: 1/fan_in)
  embedding, norms    init and learning rate unchanged (Table 8: "input weights & all biases")
  output head         init and learning rate unchanged; logits multiplied by 1/m (Table 8)
                      (or a zero-initialised head: ModelConfig.zero_init_outputs)
  attention logits    q·k · sqrt(H0) / H instead of q·k / sqrt(H): the paper's 1/d scaling for
                      correlated q and k, with the constant sqrt(H0) (H0: head dim at base width)
                      so that it is 1/sqrt(H) at the base width (the mup package writes 8/d for H0 = 64)
  Adam epsilon        multiplied by 1/m for every parameter: under μP every gradient shrinks with
                      width (like 1/m in the infinite-width analysis: the logits' 1/m multiplier
                      reaches each gradient through the backward pass; per-coordinate RMS fell 4-8.5x
                      from width 64 to 512 after 4 AdamW steps at lr 1e-2), and an unscaled epsilon
                      would come to dominate sqrt(v), turning Adam into SGD (Everett et al.,
                      arXiv:2407.05872, on epsilon under width scaling)
  weight decay        decoupled decay keeps its per-step size lr * weight_decay at every width:
                      only Adam's direction is scaled by 1/m, not the decay term, which is what the
                      mup package's MuAdamW does (lr / m, weight_decay * m)

Every hidden width (d_ff, n_heads * head_dim) is assumed to scale with d_model,
so one ratio serves every hidden matrix. The base head dimension H0 is
`mup_base_width // n_heads` when head_dim is derived (heads keep their count
and grow wider), and `head_dim` itself when it is set (width grows by adding
heads, and attention keeps 1/sqrt(H)).

At m = 1 every multiplier is exactly 1.0, so "mup" at its base width computes
what "sp" computes, bit for bit (tests/test_knobs.py). The learning-rate,
epsilon and decay rules live in train/optimizer.py; the model applies the rest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.config import ModelConfig

# The hidden matrices by (parent module, parameter name): both of their dimensions grow with width.
HIDDEN_MATRICES = frozenset(
    {("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")}
)


def is_hidden_matrix(names: tuple[str, ...]) -> bool:
    """Whether the parameter at this path of dict keys is a hidden matrix (scanned or unrolled layout)."""
    return tuple(names[-2:]) in HIDDEN_MATRICES


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """Width multipliers of one config; 1.0 means "as in standard parametrization"."""

    hidden_init: float = 1.0  # std of hidden matrices' init, relative to init_std
    hidden_lr: float = 1.0  # size of hidden matrices' Adam-family updates, relative to the lr
    output: float = 1.0  # multiplies the logits
    query: float = 1.0  # multiplies the queries, so the attention logits' 1/sqrt(H) scale too
    adam_eps: float = 1.0  # multiplies the optimizer's epsilon

    @property
    def identity(self) -> bool:
        """True when the model and its optimizer compute exactly what standard parametrization does."""
        return all(v == 1.0 for v in dataclasses.asdict(self).values())


def standard(cfg: ModelConfig) -> Multipliers:
    """Standard parametrization: what Llama does, a constant init_std and one learning rate."""
    del cfg
    return Multipliers()


def maximal_update(cfg: ModelConfig) -> Multipliers:
    """μP for Adam-family optimizers (arXiv:2203.03466 Table 8), relative to `cfg.mup_base_width`."""
    base = cfg.mup_base_width
    if base is None:
        raise ValueError("ModelConfig.mup_base_width must be set with parametrization='mup' (the width where "
                         "μP equals standard parametrization, e.g. the width hyperparameters were tuned at)")
    if cfg.head_dim is None and base % cfg.n_heads:
        raise ValueError(f"ModelConfig.mup_base_width={base} must be a multiple of n_heads={cfg.n_heads}: "
                         "heads keep their count and the base head dimension is mup_base_width // n_heads")
    base_head = cfg.head_dim if cfg.head_dim is not None else base // cfg.n_heads
    ratio = base / cfg.d_model  # 1/m; exactly 1.0 at the base width
    return Multipliers(
        hidden_init=math.sqrt(ratio),
        hidden_lr=ratio,
        output=ratio,
        query=math.sqrt(base_head / cfg.head_size),
        adam_eps=ratio,
    )


PARAMETRIZATIONS: dict[str, Callable[[ModelConfig], Multipliers]] = {"sp": standard, "mup": maximal_update}
