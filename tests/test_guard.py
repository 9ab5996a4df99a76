"""Divergence never passes silently: non-finite steps are not applied; halt and skip policies; the spike guard;
forensics; config values that must be finite; one-line CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train.data import SOURCES, register_source
from train.data.synthetic import SyntheticDataset
from train.guard import NonFinite
from train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
BAD_STEPS: dict[str, set[int]] = {}  # source name -> the (1-based) steps whose batch is broken


class _Broken(SyntheticDataset):
    """The learnable pattern, except that the batches of some steps are broken: a NaN in their loss mask
    (`nan`: the loss and every gradient become NaN) or rows of random tokens (`spike`: after learning the
    pattern, the loss jumps towards ln V)."""

    def __init__(self, how: str, split: str, seq_len: int, vocab: int, seed: int, steps: set[int]):
        super().__init__("pattern", split, seq_len, vocab, seed)
        self.how, self.steps = how, steps

    def row(self, step: int, row: int):
        if self.split != "train" or step + 1 not in self.steps:
            return super().row(step, row)
        if self.how == "spike":
            self.kind = "random"
            try:
                return super().row(step, row)
            finally:
                self.kind = "pattern"
        out = super().row(step, row)
        out["loss_mask"] = np.full_like(out["loss_mask"], np.nan)
        return out


def broken_source(how: str, steps: set[int]) -> str:
    name = f"test_{how}_{'_'.join(map(str, sorted(steps)))}"
    if name not in SOURCES:
        register_source(name, lambda c, split, vocab: _Broken(how, split, c.data.seq_len, vocab, c.seed, steps))
    return name


def config(tiny_config, how: str, steps: set[int], **overrides):
    return tiny_config(**{"data.source": broken_source(how, steps), "mesh.data": 1, "train.steps": 6,
                          "checkpoint.async_save": False, **overrides})


def run(cfg, workdir):
    return train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])


def test_halt_stops_at_the_step_keeps_the_last_good_checkpoint_and_writes_forensics(tiny_config, tmp_path):
    cfg = config(tiny_config, "nan", {3})
    with pytest.raises(NonFinite) as err:
        run(cfg, tmp_path)
    message = str(err.value)
    assert message.startswith("step 3: loss nan") and "\n" not in message and "nonfinite.json" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # nothing saved after the bad step
    forensics = json.loads((tmp_path / "nonfinite.json").read_text())
    assert forensics["step"] == 3 and forensics["loss"] == "nan" and forensics["policy"] == "halt"
    assert forensics["data_position"] == {"step": 2}  # the synthetic stream's position before batch 3
    layers = forensics["grad_norms"]["layers.attn.q"]  # per layer of the scanned stack (tiny: 2 layers)
    assert layers == ["nan", "nan"]
    # Resuming from the intact checkpoint replays the same bad batch and halts at the same step.
    with pytest.raises(NonFinite, match="^step 3:"):
        run(cfg, tmp_path)


def test_skip_leaves_the_state_untouched_and_training_goes_on(tiny_config, tmp_path):
    cfg = config(tiny_config, "nan", {3}, **{"train.on_nonfinite": "skip"})
    out = run(cfg, tmp_path / "skip")
    assert np.isnan(out["losses"][3]) and all(np.isfinite(out["losses"][s]) for s in (1, 2, 4, 5, 6))
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "skip" / "metrics.jsonl")) if "loss" in r}
    assert rows[3]["skipped"] == 1.0 and rows[3]["nonfinite"] == 1.0 and "skipped" not in rows[4]
    assert int(out["state"].step) == 6 and int(out["state"].guard["applied"]) == 5
    # Step 3 changed nothing: parameters and optimizer state after it are those after step 2.
    after2 = train_and_evaluate(cfg, tmp_path / "two", devices=jax.devices()[:1], stop_at=2)["state"]
    after3 = train_and_evaluate(cfg, tmp_path / "three", devices=jax.devices()[:1], stop_at=3)["state"]
    for a, b in zip(jax.tree.leaves((after2.params, after2.opt_state)), jax.tree.leaves((after3.params, after3.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_skip_halts_after_max_skips_in_a_row(tiny_config, tmp_path):
    cfg = config(tiny_config, "nan", {3, 4}, **{"train.on_nonfinite": "skip", "train.max_skips": 1})
    with pytest.raises(NonFinite, match=r"^step 4: .* non-finite for 2 steps in a row \(train.max_skips=1\)"):
        run(cfg, tmp_path)
    assert json.loads((tmp_path / "nonfinite.json").read_text())["nonfinite_in_a_row"] == 2


@pytest.mark.parametrize("action", ["warn", "skip"])
def test_spike_guard(tiny_config, tmp_path, action, caplog):
    cfg = config(tiny_config, "spike", {60}, **{"train.steps": 62, "train.spike_factor": 1.5, "train.on_spike": action,
                                                "optimizer.lr": 1e-2, "eval.every": 62, "checkpoint.every": 62})
    out = run(cfg, tmp_path)
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r}
    assert rows[60]["spike"] == 1.0 and all("spike" not in rows[s] for s in range(21, 60))
    assert ("skipped" in rows[60]) == (action == "skip")
    assert int(out["state"].guard["applied"]) == 62 - (action == "skip")
    assert "spiked above 1.5 x its running mean" in caplog.text


def test_values_that_must_be_finite_are_refused(tiny_config, tmp_path):
    from train.config import model_config
    from train.runtime import check

    for key, value, expected in [("model.init_std", float("nan"), "model.init_std must be a finite number"),
                                 ("model.rope_theta", float("nan"), "model.rope_theta must be a finite positive"),
                                 ("model.norm_eps", float("inf"), "model.norm_eps must be a finite positive"),
                                 ("optimizer.lr", float("nan"), "optimizer.lr=nan must be in"),
                                 ("train.z_loss", float("inf"), "train.z_loss=inf must be a finite"),
                                 ("train.spike_factor", 0.5, "train.spike_factor=0.5 must be 0 (off)"),
                                 ("train.on_nonfinite", "ignore", "train.on_nonfinite='ignore' is not one of")]:
        cfg = tiny_config(**{key: value})
        with pytest.raises(ValueError) as err:
            check(cfg, model_config(cfg), 1)
        assert expected in str(err.value), (key, str(err.value))


def test_cli_halts_with_one_line_and_exit_1(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HERD_XLA_CACHE": "",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    # An enormous z-loss weight: the loss stays finite, its gradients do not.
    proc = subprocess.run([sys.executable, "-m", "train.main", "train", "--config=experiments/base.py:smoke",
                           f"--workdir={tmp_path}", "--config.train.z_loss=1e38", "--config.log.peak_flops=1e12"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    # The whole of stderr is the one line.
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("herd train: error: step 1: loss "), \
        proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
