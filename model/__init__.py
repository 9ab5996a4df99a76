"""herd's model package: a pure-functional Llama 2 / Llama 3 family decoder in flax.linen."""

from model.config import VARIANTS, ModelConfig, RopeScaling, get_variant
from model.flops import count_params, flops_per_token
from model.llama import Llama, abstract_params, forward, init_params, param_logical_axes

__all__ = [
    "VARIANTS",
    "Llama",
    "ModelConfig",
    "RopeScaling",
    "abstract_params",
    "count_params",
    "flops_per_token",
    "forward",
    "get_variant",
    "init_params",
    "param_logical_axes",
]
