"""Every paper reproduction's smoke variant runs through the real sweep runner and `herd report`, including
the reproduction's own analysis (its module's `report` hook)."""

import json
from pathlib import Path

import pytest

from test_sweep import env, herd  # noqa: F401  (env is a fixture)
from train.config import apply_overrides, defaults
from train.data import builders
from train.report import write_report

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
