"""Every experiment module builds its config, its sweep only touches declared keys, its smoke variant runs."""

import glob
import importlib
import os

import jax
import pytest

from train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    if not p.endswith("__init__.py")
)


def _module(name: str):
    return importlib.import_module(f"experiments.{name}")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_and_is_documented(name):
    module = _module(name)
    assert module.__doc__ and len(module.__doc__.strip()) > 40, f"experiments/{name}.py needs a docstring"
    config = module.get_config()
    base_keys = set(importlib.import_module("experiments.base").get_config().to_dict())
    assert set(config.to_dict()) == base_keys  # derives from base, adds no top-level keys


SWEEPS = [name for name in EXPERIMENTS if hasattr(_module(name), "sweep")]


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_points_touch_only_declared_keys(name):
    module = _module(name)
    config = module.get_config()
    points = list(module.sweep())
    assert points
    for point in points:
        for key in point:
            _get(config, key)  # raises KeyError/AttributeError on an undeclared key


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_variant_runs(name, tmp_path):
    config = _module(name).get_config("smoke")
    config.log.peak_flops = 1e12
    config.mesh.data = 1
    out = train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    assert out["final_step"] == config.train.steps
    assert len(out["losses"]) == config.train.steps
