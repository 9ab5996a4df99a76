"""Every experiment module builds its config, its sweep only touches declared keys, its smoke variant runs."""

import glob
import importlib
import math
import os

import jax
import pytest

from train import sweep_plan
from train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    if not os.path.basename(p).startswith("_")  # __init__, and helpers such as _repro.py
)


def _module(name: str):
    return importlib.import_module(f"experiments.{name}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_and_is_documented(name):
    module = _module(name)
    assert module.__doc__ and len(module.__doc__.strip()) > 40, f"experiments/{name}.py needs a docstring"
    config = module.get_config()
    base_keys = set(importlib.import_module("experiments.base").get_config().to_dict())
    assert set(config.to_dict()) == base_keys  # derives from base, adds no top-level keys


SWEEPS = [name for name in EXPERIMENTS if hasattr(_module(name), "sweep")]


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_points_are_valid_trials(name):
    # Every point: declared keys, declared types, accepted by herd train's checks, distinct from the others.
    trials = sweep_plan.plan(os.path.join(ROOT, "experiments", f"{name}.py"), {}, seeds=0, n_devices=1)
    assert len(trials) == len(list(_module(name).sweep())) > 0


@pytest.mark.slow
# The reproductions' smoke variants run through the sweep runner and report in test_reproductions.py.
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if not n.startswith("repro_")])
def test_smoke_variant_runs(name, tmp_path):
    config = _module(name).get_config("smoke")
    config.log.peak_flops = 1e12
    config.mesh.data = 1
    out = train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
    losses = [out["losses"][s] for s in range(1, config.train.steps + 1)]  # a KeyError if a step is missing
    assert all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(out["eval"]["loss"])
