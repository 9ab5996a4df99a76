"""Metric sinks round-trip, MFU arithmetic is exact, run.json records everything and loses nothing."""

import io
import json
import math
import struct
import subprocess
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from ml_collections import config_dict

from experiments import base
from train import hardware, metrics, run_info

RUN_FIELDS = {
    "timestamp",
    "config",
    "versions",
    "git",
    "mesh",
    "devices",
    "process_count",
    "data_fingerprint",
    "extra",
}


def strict_json(line: str) -> dict:
    """json.loads that rejects NaN/Infinity, which are not JSON."""

    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def read_tfrecords(path: Path) -> list[bytes]:
    """TFRecord framing: u64 length, masked crc32c(length), data, masked crc32c(data)."""
    from tensorboardX.crc32c import crc32c

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    raw, records, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
        data = raw[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
        assert header_crc == masked(header) and data_crc == masked(data), f"bad crc in {path}"
        records.append(data)
        pos += 16 + length
    return records


def tensorboard_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    from tensorboardX.proto import event_pb2

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    scalars = {}
    for path in files:
        for record in read_tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


# --------------------------------------------------------------------------- writers


def test_jsonl_rows_are_valid_and_appended_across_writers(tmp_path):
    with metrics.MetricWriter(tmp_path, total_steps=4, enabled=True) as writer:
        writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
        writer.write(2, {"loss": jax.numpy.asarray(2.0)})
    with metrics.MetricWriter(tmp_path, total_steps=4, start_step=2, enabled=True) as writer:
        writer.write(3, {"loss": float("nan"), "grad_norm": math.inf})
        writer.write(3, {"loss": 1.5}, prefix="eval/")

    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 3]
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}
    assert rows[1] == {"step": 2, "loss": 2.0}
    assert rows[2] == {"step": 3, "loss": None, "grad_norm": None}  # non-finite -> null
    assert rows[3] == {"step": 3, "eval/loss": 1.5}
    assert all(isinstance(v, float) for row in rows for k, v in row.items() if k != "step" and v is not None)


def test_non_scalar_metric_is_a_clear_error(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True) as writer:
        with pytest.raises(TypeError, match="'loss' at step 1 is not a scalar"):
            writer.write(1, {"loss": np.ones(3)})


def test_tensorboard_events_hold_the_scalars(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True) as writer:
        writer.write(5, {"loss": 1.25})
        writer.write(7, {"loss": 0.75})
        writer.write(7, {"loss": 1.5}, prefix="eval/")
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars[("loss", 5)] == 1.25
    assert scalars[("loss", 7)] == 0.75
    assert scalars[("eval/loss", 7)] == 1.5


def test_disabled_writer_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with metrics.MetricWriter(workdir, total_steps=10, progress=True, enabled=False) as writer:
        assert writer.progress_bar is None
        writer.write(1, {"loss": 1.0})
    assert not workdir.exists()
    assert capsys.readouterr().err == ""


def test_progress_bar_only_when_asked(tmp_path):
    with metrics.MetricWriter(tmp_path / "off", total_steps=10, enabled=True) as writer:
        assert writer.progress_bar is None

    stream = io.StringIO()
    with metrics.MetricWriter(
        tmp_path / "on", total_steps=10, start_step=4, progress=True, enabled=True, progress_file=stream
    ) as writer:
        bar = writer.progress_bar
        assert (bar.total, bar.n) == (10, 4)
        writer.write(6, {"loss": 1.5, "tokens_per_sec": 12345.0})
        writer.write(6, {"loss": 9.0}, prefix="eval/")  # eval rows do not move the bar
        assert bar.n == 6
        assert "loss 1.5000" in bar.postfix and "12,345 tok/s" in bar.postfix
    assert "6/10" in stream.getvalue()


# --------------------------------------------------------------------------- throughput


def test_mfu_arithmetic():
    # 1000 tok/s * 6e9 FLOP/token = 6e12 FLOP/s over 8 devices of 1e12 peak.
    assert metrics.mfu(1000.0, 6e9, 1e12, 8) == pytest.approx(0.75)


def test_throughput_from_wall_time():
    now = [100.0]
    meter = metrics.Throughput(
        tokens_per_step=4096, flops_per_token=1e9, peak_flops_per_device=1e12, n_devices=4, clock=lambda: now[0]
    )
    assert meter.tick(0) == {}  # the first tick starts the clock
    now[0] += 2.0
    out = meter.tick(10)
    assert out["step_time_s"] == pytest.approx(0.2)
    assert out["tokens_per_sec"] == pytest.approx(4096 * 10 / 2.0)
    assert out["tflops_per_device"] == pytest.approx(20480 * 1e9 / 4 / 1e12)
    assert out["mfu"] == pytest.approx(20480 * 1e9 / 4e12)

    now[0] += 50.0  # an eval pause, excluded by reset
    meter.reset(10)
    now[0] += 1.0
    assert meter.tick(15)["step_time_s"] == pytest.approx(0.2)
    assert meter.tick(15) == {}  # no steps since the last tick

    with pytest.raises(ValueError, match="positive"):
        metrics.Throughput(tokens_per_step=0, flops_per_token=1.0, peak_flops_per_device=1.0, n_devices=1)


# --------------------------------------------------------------------------- peak FLOP/s


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v4 lite", 138e12),
        ("NVIDIA L40S", 366e12),
        ("NVIDIA L4", 121e12),
        ("Some Future Chip", None),
    ],
)
def test_known_peaks(kind, peak):
    assert hardware.known_peak_flops(kind) == peak


def test_peak_override_and_table():
    tpu = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert hardware.peak_flops_per_device(tpu) == 275e12
    assert hardware.peak_flops_per_device(tpu, override=1.5e12) == 1.5e12
    with pytest.raises(ValueError, match="log.peak_flops must be positive"):
        hardware.peak_flops_per_device(override=0.0)


def test_cpu_peak_is_measured_once():
    cpu = jax.devices("cpu")[0]
    first = hardware.peak_flops_per_device(cpu)
    hits = hardware.measure_matmul_flops.cache_info().hits
    assert first > 0 and math.isfinite(first)
    assert hardware.peak_flops_per_device(cpu) == first
    assert hardware.measure_matmul_flops.cache_info().hits == hits + 1


# --------------------------------------------------------------------------- run.json


def tricky_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.width = 4
    c.double = c.get_ref("width") * 2  # a FieldReference
    c.shape = (2, 3)
    c.maybe = config_dict.placeholder(float)
    c.nested = ml_collections.ConfigDict(dict(name="x"))
    return c


def sim_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def test_run_info_fields_outside_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    code = tmp_path / "code"
    code.mkdir()
    info = run_info.write_run_info(
        tmp_path / "run",
        config=tricky_config(),
        mesh=sim_mesh(),
        data_fingerprint="abc123",
        extra={"note": "hi"},
        code_dir=code,
        enabled=True,
    )
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved == info
    assert RUN_FIELDS <= set(saved) and "previous" not in saved
    assert saved["config"] == {"width": 4, "double": 8, "shape": [2, 3], "maybe": None, "nested": {"name": "x"}}
    assert set(saved["versions"]) == set(run_info.TRACKED_PACKAGES) | {"python"}
    assert saved["versions"]["jax"] == jax.__version__
    assert saved["git"] == {"commit": None, "dirty": None}
    assert saved["mesh"] == {"data": 2, "fsdp": 4}
    assert saved["devices"]["count"] == jax.device_count()
    assert sum(saved["devices"]["kinds"].values()) == jax.device_count()
    assert saved["process_count"] == 1
    assert saved["data_fingerprint"] == "abc123"
    assert saved["extra"] == {"note": "hi"}


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_run_info_in_git_repo_keeps_history(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo, workdir = tmp_path / "repo", tmp_path / "run"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "init")
    head = git(repo, "rev-parse", "HEAD")

    config = base.get_config("smoke")

    def record(fingerprint: str | None) -> dict:
        return run_info.write_run_info(
            workdir, config=config, mesh=None, data_fingerprint=fingerprint, code_dir=repo, enabled=True
        )

    first = record(None)
    assert first["git"] == {"commit": head, "dirty": False}
    assert first["config"]["train"]["steps"] == 6 and first["config"]["model"]["d_model"] is None

    (repo / "b.py").write_text("y = 2\n")  # untracked code counts as dirty
    second = record("d2")
    assert second["git"] == {"commit": head, "dirty": True}
    assert second["previous"] == [first]

    (workdir / "run.json").write_text('{"truncated": ')  # a damaged record is kept verbatim
    third = record("d3")
    assert third["previous"] == [{"unparsed": '{"truncated": '}]
    assert json.loads((workdir / "run.json").read_text()) == third


def test_run_info_disabled_writes_nothing(tmp_path):
    info = run_info.write_run_info(
        tmp_path / "run", config=tricky_config(), mesh=None, data_fingerprint=None, enabled=False
    )
    assert RUN_FIELDS <= set(info)
    assert not (tmp_path / "run").exists()
