"""ModelConfig, the single description of a decoder, and the published variants."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from model.mup import PARAMETRIZATIONS, Multipliers

DTYPES = ("float32", "bfloat16", "float16")
# Attention kernels for the full-sequence forward (training, eval, prefill-free scoring): herd's own
# einsum kernel (model/layers.attend, float32 softmax), or jax.nn.dot_product_attention with its `xla`
# or `cudnn` (fused flash attention on NVIDIA GPUs, bfloat16/float16 only) implementation. Each
# computes the same function; the KV-cache decoder keeps its own kernel.
ATTENTION_IMPLS: dict[str, str | None] = {"herd": None, "xla": "xla", "cudnn": "cudnn"}
# Named rematerialisation policies: what each block keeps for its backward pass (model/llama.py).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def relu_squared(x: jax.Array) -> jax.Array:
    """relu(x)^2, Primer's MLP activation (arXiv:2109.08668)."""
    return jnp.square(jax.nn.relu(x))


class MLPActivation(NamedTuple):
    """An MLP nonlinearity: `fn(x W_gate) * (x W_up)` when `gated` (a GLU), else `fn(x W_up)`."""

    fn: Callable[[jax.Array], jax.Array]
    gated: bool


# The MLP activations of Shazeer, "GLU Variants Improve Transformer" (arXiv:2002.05202): the gated
# GLU variants (three matrices) and the plain MLPs they are compared with (two matrices). GELU is
# jax.nn.gelu's tanh form (arXiv:1606.08415), as in GPT-2 and T5 v1.1.
MLP_ACTIVATIONS: dict[str, MLPActivation] = {
    "swiglu": MLPActivation(jax.nn.silu, gated=True),  # Llama's
    "geglu": MLPActivation(jax.nn.gelu, gated=True),
    "reglu": MLPActivation(jax.nn.relu, gated=True),
    "gelu": MLPActivation(jax.nn.gelu, gated=False),
    "relu": MLPActivation(jax.nn.relu, gated=False),
    "relu2": MLPActivation(relu_squared, gated=False),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 rotary frequency scaling (arXiv:2407.21783, released code).

    Wavelengths longer than `original_max_seq_len / low_freq_factor` are
    stretched by `factor`, those shorter than `original_max_seq_len /
    high_freq_factor` are kept, and the band between is interpolated.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    `head_dim=None` means `d_model // n_heads`. Multi-head, grouped-query and
    multi-query attention differ only in `n_kv_heads`. `d_ff` is the hidden
    width of a gated MLP; an ungated one is `mlp_hidden` = 3/2 d_ff wide (see
    `mlp_activation`).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Start the residual branches' output projections (attention o, MLP down) and an untied
    # output head at zero, so each block begins as the identity and the first logits are
    # uniform (Fixup, arXiv:1901.09321; modded-nanogpt). The rest keeps init_std.
    zero_init_outputs: bool = False
    # The MLP's nonlinearity, a name of MLP_ACTIVATIONS. An ungated MLP (gelu, relu, relu2) has two
    # matrices 3/2 d_ff wide, so its parameters and FLOPs equal the gated one's three at d_ff
    # (arXiv:2002.05202: d_ff 3072 against 2048 at d_model 768).
    mlp_activation: str = "swiglu"
    # How initialisation, learning rates and multipliers scale with width: "sp" (standard, a constant
    # init_std) or "mup" (maximal update, arXiv:2203.03466), which equals "sp" at d_model ==
    # mup_base_width and keeps activations and the best learning rate stable as d_model grows from
    # there (model/mup.py). mup_base_width is required by "mup" and ignored by "sp".
    parametrization: str = "sp"
    mup_base_width: int | None = None
    # Implementation choices: they never change the function computed.
    attention_impl: str = "herd"
    scan_layers: bool = True
    remat_policy: str = "none"
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model} (or set head_dim explicitly)"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_size} must be even for rotary embeddings")
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison and must fail here too.
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be a finite positive number, got {value!r}")
        if not (isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"ModelConfig.init_std must be a finite number >= 0, got {self.init_std!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise ValueError("ModelConfig.attention_impl='cudnn' needs dtype bfloat16 or float16 (cuDNN's flash "
                             "attention has no float32 kernel), got dtype='float32'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r} is not one of {', '.join(MLP_ACTIVATIONS)}"
            )
        if not self.mlp_gated and self.d_ff % 2:
            raise ValueError(
                f"ModelConfig.d_ff={self.d_ff} must be even with the ungated mlp_activation={self.mlp_activation!r},"
                " whose hidden width is 3/2 d_ff (to match the gated MLP's parameters)"
            )
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"ModelConfig.parametrization={self.parametrization!r} is not one of {', '.join(PARAMETRIZATIONS)}"
            )
        base = self.mup_base_width
        if base is not None and (not isinstance(base, int) or isinstance(base, bool) or base <= 0):
            raise ValueError(f"ModelConfig.mup_base_width must be a positive integer or None, got {base!r}")
        PARAMETRIZATIONS[self.parametrization](self)  # its own checks (model/mup.py), naming the field
        rs = self.rope_scaling
        if isinstance(rs, dict):  # convenient in configs and overrides
            object.__setattr__(self, "rope_scaling", rs := RopeScaling(**rs))
        if rs is not None:
            if not all(math.isfinite(v) for v in (rs.factor, rs.low_freq_factor, rs.high_freq_factor)):
                raise ValueError(f"ModelConfig.rope_scaling needs finite factors, got {rs}")
            if rs.factor < 1 or rs.original_max_seq_len <= 0:
                raise ValueError(f"ModelConfig.rope_scaling needs factor >= 1 and original_max_seq_len > 0, got {rs}")
            if not 0 < rs.low_freq_factor < rs.high_freq_factor:
                raise ValueError(
                    f"ModelConfig.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got {rs}"
                )

    @property
    def head_size(self) -> int:
        """The per-head dimension H, derived when `head_dim` is None."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def mlp_gated(self) -> bool:
        """Whether the MLP is a GLU (gate, up and down matrices) or plain (up and down)."""
        return MLP_ACTIVATIONS[self.mlp_activation].gated

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width F: d_ff gated, 3/2 d_ff ungated (equal parameters, arXiv:2002.05202)."""
        return self.d_ff if self.mlp_gated else 3 * self.d_ff // 2

    @property
    def multipliers(self) -> Multipliers:
        """The parametrization's width multipliers (all 1 under "sp"; see model/mup.py)."""
        return PARAMETRIZATIONS[self.parametrization](self)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_LLAMA2 = dict(vocab_size=32_000, max_seq_len=4096, rope_theta=10_000.0, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128_256, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5)
_LLAMA3_1 = dict(_LLAMA3, max_seq_len=131_072, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
_LLAMA3_2 = dict(_LLAMA3, max_seq_len=131_072, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True)

# Published shapes. Llama 2: arXiv:2307.09288 (Table 1) and Meta's released
# params.json; the FFN widths come from the released weights. Llama 3 / 3.1:
# arXiv:2407.21783 (Table 3) and the released config.json files. Llama 3.2 1B
# and 3B: Meta's Llama 3.2 model card and released config.json files.
VARIANTS: dict[str, ModelConfig] = {
    "llama2_7b": ModelConfig(**_LLAMA2, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11_008),
    "llama2_13b": ModelConfig(**_LLAMA2, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13_824),
    "llama2_70b": ModelConfig(**_LLAMA2, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28_672),
    "llama3_8b": ModelConfig(**_LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336),
    "llama3_70b": ModelConfig(**_LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28_672),
    "llama3_1_8b": ModelConfig(**_LLAMA3_1, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336),
    "llama3_1_70b": ModelConfig(**_LLAMA3_1, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28_672),
    "llama3_1_405b": ModelConfig(
        **_LLAMA3_1, d_model=16_384, n_layers=126, n_heads=128, n_kv_heads=8, d_ff=53_248
    ),
    "llama3_2_1b": ModelConfig(**_LLAMA3_2, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192),
    "llama3_2_3b": ModelConfig(**_LLAMA3_2, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192),
    # Tiny sizes for CPU work: Llama 3 architecture (GQA, SwiGLU, RoPE, RMSNorm);
    # the vocabulary is normally replaced by the tokenizer's.
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256
    ),
    "small": ModelConfig(
        vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512
    ),
}


def get_variant(name: str, **overrides: Any) -> ModelConfig:
    """The published (or tiny) variant `name`, with optional field overrides."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name].replace(**overrides) if overrides else VARIANTS[name]
