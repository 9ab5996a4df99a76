"""The experiment schema: every key an experiment may set, its default and its meaning.

An experiment is a Python file whose `get_config(arg)` starts from `defaults()`
(usually through `experiments/base.py`) and changes a few fields; the config is
locked, so a misspelt key fails at once (train/experiment.py loads such files).
`apply_overrides(config, {"optimizer.lr": 1e-3})` is the one way dotted
overrides are applied, by the CLI (`--config.optimizer.lr=1e-3`), sweeps and
tests alike; `model_config(config)` is the boundary where the model's
`ModelConfig` is built from it.

The `model.*` keys other than `variant` are derived from `ModelConfig`'s own
fields: `None` keeps the variant's value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from model import ModelConfig, RopeScaling, get_variant

ConfigDict = ml_collections.ConfigDict
SCHEMA_FILE = "train/config.py"
# ModelConfig fields that are not plain overrides: a nested group of their own.
_MODEL_GROUPS = {"rope_scaling": RopeScaling}


def _scalar_type(hint: Any) -> type:
    """`int` for `int` or `int | None`: the type a config field holds."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _model_schema() -> ConfigDict:
    """model.variant plus one placeholder per ModelConfig field (None = keep the variant's value)."""
    m = ConfigDict()
    m.variant = "tiny"  # a name of model.VARIANTS: published Llama 2 / 3 shapes, or tiny / small for CPU
    hints = typing.get_type_hints(ModelConfig)
    for field in dataclasses.fields(ModelConfig):
        if field.name in _MODEL_GROUPS:
            continue
        m[field.name] = config_dict.placeholder(_scalar_type(hints[field.name]))
    # Llama 3.1 rope scaling: setting `factor` replaces the variant's scaling with these values.
    m.rope_scaling = ConfigDict()
    rope_hints = typing.get_type_hints(RopeScaling)
    for field in dataclasses.fields(RopeScaling):
        m.rope_scaling[field.name] = field.default
    m.rope_scaling.factor = config_dict.placeholder(rope_hints["factor"])
    return m


def defaults() -> ConfigDict:
    """Every declared key with its default, locked: the baseline every experiment changes."""
    c = ConfigDict()
    c.seed = 0
    c.model = _model_schema()

    # Mesh axis sizes; one of them may be -1 (fill with the remaining devices).
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="fsdp"))  # rules: dp | fsdp | fsdp_tp

    c.data = ConfigDict()
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
    # Keep attention within each packed document (Llama 3, arXiv:2407.21783 §3.2). False is that
    # paper's ablation: a packed row is one sequence, attended causally across its documents, with
    # positions 0..T-1 along the row; which targets count (loss_mask) does not change (train/step.py).
    c.data.document_mask = True
    # tfds train rows are emitted in blocks of about this many tokens (32 MB), each block in a
    # seeded random order, so a batch samples many documents (train/data/pipeline.py); 0: in order.
    c.data.shuffle_tokens = 2**21
    c.data.worker_count = 0  # grain worker processes; 0 reads in the main process
    c.data.tokenizer = ConfigDict()
    c.data.tokenizer.name = "byte"  # byte | sentencepiece | tiktoken
    c.data.tokenizer.path = config_dict.placeholder(str)  # an existing tokenizer.model to load
    c.data.tokenizer.vocab_size = 2048  # sentencepiece: size of the BPE model trained on the train split

    c.train = ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global batch, in sequences
    c.train.microbatches = 1  # gradient accumulation: batch_size / microbatches per pass
    c.train.z_loss = 0.0  # weight of log(Z)^2 (arXiv:2204.02311 §5)
    # A step whose loss or gradients are not finite is never applied (train/guard.py); then
    # halt: stop at once | skip: go on, halting after max_skips such steps in a row.
    c.train.on_nonfinite = "halt"
    c.train.max_skips = 10
    c.train.spike_factor = 0.0  # > 1: flag a loss above this multiple of its running mean (0: off)
    c.train.on_spike = "warn"  # warn | skip (do not apply that step's update)

    c.optimizer = ConfigDict()
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

    c.schedule = ConfigDict()
    c.schedule.name = "cosine"  # cosine | wsd | constant | inverse_sqrt
    c.schedule.warmup_steps = 100
    c.schedule.final_lr_fraction = 0.1  # cosine / wsd floor, as a fraction of lr
    c.schedule.decay_fraction = 0.2  # wsd: share of steps spent decaying

    c.eval = ConfigDict(dict(every=200, batches=8))  # batches: of the eval split, from its start

    c.checkpoint = ConfigDict(dict(every=500, keep=3, async_save=True))

    c.log = ConfigDict()
    c.log.every = 1  # steps between metric rows
    c.log.progress = True  # live progress bar on the terminal
    c.log.peak_flops = config_dict.placeholder(float)  # per device; None = known table or measured matmul peak
    # Weights & Biases (pip install 'herd[track]'): online with WANDB_API_KEY set, else offline under the workdir.
    c.log.wandb = False
    c.log.wandb_project = "herd"  # herd sweep sets the experiment's name
    c.log.wandb_group = config_dict.placeholder(str)  # herd sweep sets the sweep's directory name
    c.log.wandb_name = config_dict.placeholder(str)  # None: the run directory's name (a sweep's trial slug)

    # herd sweep --executor=slurm: what each trial's job asks for (not part of a trial's hash).
    c.slurm = ConfigDict()
    c.slurm.partition = config_dict.placeholder(str)  # None: the cluster's default partition
    c.slurm.account = config_dict.placeholder(str)
    c.slurm.time_min = 60  # wall-clock limit of one trial's job, in minutes
    c.slurm.cpus_per_trial = 2
    c.slurm.gpus_per_trial = 0
    c.slurm.mem_gb = config_dict.placeholder(int)  # None: the partition's default
    c.slurm.parallelism = 0  # most trials running at once (0: no cap beyond the cluster's)
    c.lock()
    return c


# ----------------------------------------------------------------------------- the model boundary


def model_config(config: ConfigDict, data_vocab: int | None = None) -> ModelConfig:
    """The ModelConfig of an experiment: the variant, its overrides, and the tokenizer's vocabulary."""
    overrides = {
        f.name: config.model[f.name]
        for f in dataclasses.fields(ModelConfig)
        if f.name not in _MODEL_GROUPS and config.model[f.name] is not None
    }
    if config.model.rope_scaling.factor is not None:
        overrides["rope_scaling"] = RopeScaling(**config.model.rope_scaling.to_dict())
    if data_vocab is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = data_vocab
    try:
        cfg = get_variant(config.model.variant, **overrides)
    except ValueError as e:  # name the experiment's key, not the dataclass field
        raise ValueError(str(e).replace("ModelConfig.", "model.")) from None
    if data_vocab is not None and cfg.vocab_size < data_vocab:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {data_vocab} tokens")
    return cfg


def model_overrides(model_cfg: ModelConfig) -> dict[str, Any]:
    """Dotted overrides that make an experiment's model exactly `model_cfg` (the inverse of `model_config`)."""
    fields = model_cfg.to_dict()
    out = {f"model.{k}": v for k, v in fields.items() if k not in _MODEL_GROUPS}
    if model_cfg.rope_scaling is not None:
        out |= {f"model.rope_scaling.{k}": v for k, v in fields["rope_scaling"].items()}
    return out


# ----------------------------------------------------------------------------- dotted keys


def flatten(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key (ConfigDict orders keys by name)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _groups(config: ConfigDict, prefix: str = "") -> list[str]:
    return [g for k, v in config.items() if isinstance(v, ConfigDict) for g in (prefix + k, *_groups(v, f"{prefix}{k}."))]


def unknown_key_message(config: ConfigDict, key: str, where: str = "the experiment schema") -> str:
    """'KEY is not declared in WHERE; did you mean ...?' with the closest declared keys."""
    valid = list(flatten(config))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # a group's name typed as a key ("optimizer.adam"): suggest within its group
        head = key.rpartition(".")[0]
        close = [k for k in valid if head and k.startswith(head + ".")][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; every key is declared in {SCHEMA_FILE}"
    return f"{key} is not declared in {where}{hint}"


def declared_type(config: ConfigDict, key: str) -> type:
    node, _, leaf = key.rpartition(".")
    parent = _get_node(config, node) if node else config
    return parent.get_type(leaf)


def _get_node(config: ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def get(config: ConfigDict, key: str) -> Any:
    """The value at dotted `key`; ValueError naming the closest declared keys if there is none."""
    try:
        return _get_node(config, key)
    except KeyError:
        raise ValueError(unknown_key_message(config, key)) from None


def type_name(t: type) -> str:
    """'an int', 'a float': the type with its article, for messages."""
    name = getattr(t, "__name__", str(t))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_value(key: str, value: Any, declared: type, nullable: bool) -> Any:
    """`value` as the declared type, or a ValueError naming the key, the value and the type."""
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{key}=None: {key} takes {type_name(declared)}, not None")
    if declared is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if declared is bool:
        ok = isinstance(value, bool)
    elif declared is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif declared is float:
        ok = isinstance(value, float)
    else:
        ok = isinstance(value, declared)
    if not ok:
        raise ValueError(f"{key}={value!r} is {type_name(type(value))}, but {key} takes {type_name(declared)}")
    return value


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> ConfigDict:
    """A copy of `config` with dotted-key `overrides` set, each checked against the declared key and type.

    An int is accepted for a float key; None only where the schema's default is None.
    Raises ValueError with one line naming the key (and the closest declared ones).
    """
    out = copy.deepcopy(config)
    nullable = _nullable_keys()
    groups = set(_groups(config))
    for key, value in overrides.items():
        if key in groups:
            raise ValueError(f"{key} is a group of keys, not a key; set one of its keys, e.g. "
                             f"{next(k for k in flatten(config) if k.startswith(key + '.'))}")
        try:
            _get_node(out, key)
        except KeyError:
            raise ValueError(unknown_key_message(config, key)) from None
        value = _check_value(key, value, declared_type(out, key), key in nullable)
        node, _, leaf = key.rpartition(".")
        parent = _get_node(out, node) if node else out
        parent[leaf] = value
    return out


@functools.cache
def _nullable_keys() -> frozenset[str]:
    """Keys whose schema default is None (placeholders): the only ones that may be set to None."""
    return frozenset(k for k, v in flatten(defaults()).items() if v is None)
