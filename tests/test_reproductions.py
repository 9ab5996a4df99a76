"""Every paper reproduction's smoke variant runs through the real sweep runner and `herd report`, including
the reproduction's own analysis (its module's `report` hook); the μP and Chinchilla analyses recover optima planted
in synthetic results."""

import json
import math
import re
from pathlib import Path

import pytest
from test_sweep import env, herd  # noqa: F401  (env is a fixture)

from train.config import apply_overrides, defaults
from train.data import builders
from train.report import Run, write_report

ROOT = Path(__file__).resolve().parents[1]
REPRODUCTIONS = {
    "repro_mup": "## μP transfer",
    "repro_glu": "## Gated against ungated",
    "repro_gqa": "## Quality and decoding speed",
    "repro_chinchilla": "## IsoFLOP profiles",
}


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    """A TFDS data dir holding the prepared shakespeare_works corpus (the reproductions' data)."""
    root = tmp_path_factory.mktemp("tfds")
    builders.prepare(apply_overrides(defaults(), {"data.source": "tfds", "data.data_dir": str(root)}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPRODUCTIONS))
def test_smoke_reproduction_sweeps_and_reports(name, env, shakespeare_dir, tmp_path):  # noqa: F811
    out = tmp_path / name
    proc = herd(env, "sweep", f"--config=experiments/{name}.py:smoke", f"--workdir={out}", "--parallel=2",
                f"--config.data.data_dir={shakespeare_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads((out / "sweep.json").read_text())["trials"]
    assert len(names) == 2 and all(json.loads((out / n / "trial.json").read_text())["status"] == "done" for n in names)
    paths = write_report([out])
    text = Path(paths[0]).read_text()
    assert REPRODUCTIONS[name] in text, text
    assert all(Path(p).exists() for p in paths[1:])


def _run(point: dict, seed: int, final: float, step: int = 100, tokens_per_step=None, flops_per_token=None) -> Run:
    return Run(name=str(point), path=Path("."), point=point, seed=seed, status="done", error=None,
               curve=[(step, final)], tokens_per_step=tokens_per_step, flops_per_token=flops_per_token)


def test_mup_report_recovers_planted_optima(tmp_path: Path):
    """Losses exactly quadratic in log2(lr): the interpolated best lr is the planted one, between grid points too."""
    from experiments import repro_mup

    runs = []
    for param, centre in (("sp", lambda w: -7 - 0.5 * math.log2(w / 32)), ("mup", lambda w: -7.3)):
        for width in (32, 64, 128, 256):
            for k in range(-12, -4):
                loss = 3 + 0.1 * (k - centre(width)) ** 2 - 0.01 * math.log2(width)
                point = {"model.parametrization": param, "model.d_model": width, "optimizer.lr": 2.0**k}
                runs += [_run(point, seed, loss + (0.001 if seed else -0.001)) for seed in (0, 1)]
    lines, paths = repro_mup.report(runs, tmp_path)
    text = "\n".join(lines)
    assert "interpolated: -7.00, -7.50, -8.00, -8.50 (spread 1.50)" in text, text
    assert "interpolated: -7.30, -7.30, -7.30, -7.30 (spread 0.00)" in text, text
    assert "at 8 of 8 learning rates" in text
    assert [p.name for p in paths] == ["mup_transfer.png"] and paths[0].stat().st_size > 10_000


@pytest.mark.parametrize("drop_small_at_1e13", [False, True])
def test_chinchilla_report_recovers_planted_exponent(tmp_path: Path, drop_small_at_1e13: bool):
    """IsoFLOP losses exactly parabolic in log N around N_opt = k C^0.5: the fit returns a = 0.5 and predicts the
    held-out budget's optimum exactly; a budget trained only at sizes above its optimum is named and left out."""
    from experiments import repro_chinchilla as rc
    from model import count_params, flops_per_token

    k = 0.9 * count_params(rc.model_cfg(48)) / math.sqrt(1e12)
    runs = []
    for budget, widths in rc.BUDGETS.items():
        for width in widths:
            n = count_params(rc.model_cfg(width))
            if drop_small_at_1e13 and budget == 1e13 and n < k * math.sqrt(budget):
                continue
            loss = 2 + 0.4 * (math.log10(n) - math.log10(k * math.sqrt(budget))) ** 2
            runs.append(_run(rc._shape(width), 0, loss, step=rc.steps_for(budget, width),
                             tokens_per_step=rc.BATCH * rc.SEQ, flops_per_token=flops_per_token(rc.model_cfg(width),
                                                                                                 rc.SEQ)))
    lines, paths = rc.report(runs, tmp_path)
    text = "\n".join(lines)
    fitted = len(rc.BUDGETS) - 1 - drop_small_at_1e13
    assert f"Power law over {fitted} budgets: N_opt ∝ C^0.500 (95 % interval 0.500 .. 0.500" in text, text
    assert re.search(r"measured [\d,]+ \([+-]0 %\)", text), text
    assert ("Left out of the power law (valley not sampled): 1e+13" in text) == drop_small_at_1e13, text
    assert text.count("| yes |") == len(rc.BUDGETS) - drop_small_at_1e13, text
    assert [p.name for p in paths] == ["isoflop.png"]
