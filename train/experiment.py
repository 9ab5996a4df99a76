"""Where configs come from: experiment files (`path[:arg]`), the command line, a run's record.

`load_experiment("experiments/x.py:smoke")` imports the file, calls its
`get_config(arg)` and checks the result against the schema (train/config.py);
`parse_arg` parses an experiment's argument with big_vision's `key=value,flag`
convention; `experiment_from_cli` applies `--config.KEY=VALUE` arguments, typed
by the schema; `from_record` rebuilds the config a run recorded in its run.json.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

from train.config import (
    ConfigDict,
    declared_type,
    type_name,
    apply_overrides,
    defaults,
    flatten,
    unknown_key_message,
)

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_value(config: ConfigDict, key: str, text: str) -> Any:
    """A command-line string as the value of declared `key` (bool: true/false; None: 'None' or 'none')."""
    declared = declared_type(config, key) if key in flatten(config) else None
    if declared is None:
        raise ValueError(unknown_key_message(config, key))
    if text in ("None", "none"):
        return None
    try:
        if declared is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if declared is int:
            return int(text)
        if declared is float:
            return float(text)
        if declared is str:
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        valid = " (true or false)" if declared is bool else ""
        raise ValueError(f"{key}={text!r} is not {type_name(declared)}{valid}") from None


CLI_PREFIX = "--config."


def split_cli_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arguments for absl, the `KEY=VALUE` of each `--config.KEY=VALUE`): absl knows no dynamic flags."""
    rest = [a for a in argv if not a.startswith(CLI_PREFIX)]
    return rest, [a[len(CLI_PREFIX):] for a in argv if a.startswith(CLI_PREFIX)]


def parse_cli_overrides(config: ConfigDict, args: Sequence[str]) -> dict[str, Any]:
    """`["optimizer.lr=1e-3", ...]` (the text after `--config.`) as typed dotted overrides."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        try:
            if not sep:
                raise ValueError(f"{key} needs a value: {CLI_PREFIX}{key}=VALUE")
            out[key] = parse_value(config, key, text)
        except ValueError as e:
            raise ValueError(f"{CLI_PREFIX}{e}") from None
    return out


def experiment_from_cli(spec: str, override_args: Sequence[str]) -> ConfigDict:
    """The experiment `--config=spec` with its `--config.KEY=VALUE` arguments applied."""
    config = load_experiment(spec)
    return apply_overrides(config, parse_cli_overrides(config, override_args))


# ----------------------------------------------------------------------------- experiment files


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
    """An experiment's argument `name:key=value,flag` (big_vision's convention) as a ConfigDict.

    `spec` declares each key with its default, whose type the value is parsed as;
    a bare `flag` sets a bool key to True. An undeclared key fails with the valid ones:

        args = parse_arg(arg, smoke=False, width=64)   # "smoke,width=128" -> smoke=True, width=128
    """
    out = ConfigDict(spec)
    for part in filter(None, (arg or "").split(",")):
        key, sep, text = part.partition("=")
        key = key.strip()
        if key not in spec:
            valid = ", ".join(f"{k}={v!r}" if not isinstance(v, bool) else k for k, v in spec.items()) or "none"
            raise ValueError(f"unknown experiment argument {key!r} in {arg!r}; valid: {valid}")
        if not sep:
            if not isinstance(spec[key], bool):
                raise ValueError(f"experiment argument {key!r} needs a value: {key}=VALUE")
            out[key] = True
        else:
            out[key] = parse_value(out, key, text.strip())
    out.lock()
    return out


def load_module(path: str) -> types.ModuleType:
    """The experiment module at `path` (a .py file), imported under its own name."""
    if not os.path.isfile(path) or not path.endswith(".py"):
        what = "is a directory" if os.path.isdir(path) else "does not exist" if not os.path.exists(path) else \
            "is not a .py file"
        raise ValueError(f"--config={path}: the experiment file {what}; give a path like experiments/base.py[:arg]")
    name = "herd_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"--config={path} defines no get_config(arg) function")
    return module


def load_experiment(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
    """`get_config(arg)` of the experiment file `path[:arg]`, checked against the schema, with `overrides`."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    config = module.get_config(arg or None)
    check_declared(config, f"--config={spec}")
    return apply_overrides(config, overrides or {})


def check_declared(config: Any, where: str) -> None:
    """Fails unless `config` is a ConfigDict with exactly the schema's keys."""
    if not isinstance(config, ConfigDict):
        raise ValueError(f"{where}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict "
                         "derived from train.config.defaults() (see experiments/base.py)")
    schema, have = flatten(defaults()), flatten(config)
    extra = [k for k in have if k not in schema]
    if extra:
        raise ValueError(f"{where}: {unknown_key_message(defaults(), extra[0])}")
    missing = [k for k in schema if k not in have]
    if missing:
        raise ValueError(f"{where}: the config lacks {missing[0]} ({len(missing)} keys missing); "
                         "derive it from train.config.defaults() (see experiments/base.py)")
    config.lock()


def from_record(recorded: Mapping[str, Any], where: str) -> ConfigDict:
    """The schema's defaults overlaid with a recorded, nested config (a run's run.json)."""
    flat: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(recorded, "")
    try:
        return apply_overrides(defaults(), flat)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
