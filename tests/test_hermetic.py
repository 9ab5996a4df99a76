"""The suite is hermetic: nothing it runs writes under ~/.cache/herd, ~/tensorflow_datasets or ~/.cache/matplotlib.

tests/conftest.py points each of those caches at a temporary folder before anything is imported; here the places
herd, TFDS, JAX and matplotlib would actually write (in this process and in the `herd` subprocesses tests start,
which inherit the environment) are checked to be those folders.
"""

import os
import subprocess
import sys
import tempfile

import jax
import matplotlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _under_temp(path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(tempfile.gettempdir()) + os.sep)


def test_every_cache_is_a_temporary_folder():
    from experiments import base
    from train.data import builders

    home = os.path.realpath(os.path.expanduser("~"))
    places = {
        "TFDS datasets and herd's trained tokenizers": builders.data_dir(base.get_config()),
        "herd's XLA cache (herd subprocesses)": os.environ["HERD_XLA_CACHE"],
        "JAX's compilation cache (this process)": jax.config.jax_compilation_cache_dir,
        "matplotlib's font cache": matplotlib.get_configdir(),
    }
    for what, path in places.items():
        assert path and _under_temp(path) and not os.path.realpath(path).startswith(home + os.sep), (what, path)


def test_a_herd_subprocess_resolves_the_same_temporary_folders():
    """What a `herd` subprocess started with the suite's environment would use: its TFDS folder and XLA cache."""
    code = ("import os; from train.data import builders; from experiments import base; "
            "print(builders.data_dir(base.get_config())); print(os.environ.get('HERD_XLA_CACHE', 'unset'))")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tfds_dir, xla_cache = proc.stdout.split()
    assert _under_temp(tfds_dir) and _under_temp(xla_cache), proc.stdout
