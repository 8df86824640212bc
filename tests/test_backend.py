"""The backend switch: one place decides NumPy or CuPy; compute modules never import numpy themselves."""
import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import minilora
from minilora import backend

PACKAGE = pathlib.Path(minilora.__file__).parent

# Host-only modules that may import numpy: the switch itself, file I/O, plotting and host-side text handling.
# Keep this list short; everything that does array math must get its module from minilora.backend.
HOST_ONLY = {
    "backend.py",      # the switch hands numpy out
    "io.py",           # safetensors files are host memory
    "apps/figures.py", # matplotlib plots host arrays
    "plotting.py",     # matplotlib plots host arrays: every input comes over with to_numpy first
    "data.py",         # text -> token ids happens on the host before the arrays move to the device
    "hf.py",           # transformers/PEFT files are host memory: tensors come over with to_numpy first
}


def _imports_numpy(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "numpy" or a.name.startswith("numpy.") for a in node.names):
            return node.lineno
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "numpy"
                                                                  or node.module.startswith("numpy.")):
            return node.lineno
    return None


def test_compute_modules_do_not_import_numpy():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in HOST_ONLY:
            continue
        line = _imports_numpy(path)
        if line is not None:
            violations.append(f"minilora/{rel}:{line}")
    assert not violations, ("these modules import numpy directly; get the array module from minilora.backend "
                            f"(or add a host-only module to HOST_ONLY with a reason): {violations}")


def test_scanner_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom numpy import float32\n")
    assert _imports_numpy(bad) == 2
    good = tmp_path / "good.py"
    good.write_text("from minilora.backend import get_array_module\n")
    assert _imports_numpy(good) is None


def test_default_backend_is_numpy():
    assert backend.get_backend() == "numpy"
    assert backend.xp_current() is np
    assert backend.get_array_module(np.zeros(3)) is np


def test_use_backend_restores_on_error():
    with pytest.raises(ValueError, match="unknown backend"):
        backend.set_backend("jax")
    with backend.use_backend("numpy") as xp:
        assert xp is np
    assert backend.get_backend() == "numpy"


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_cupy_unavailable_error_says_why():
    with pytest.raises(backend.BackendUnavailableError, match="CuPy is not installed|no CUDA device"):
        minilora.set_backend("cupy")
    assert backend.get_backend() == "numpy"      # nothing silently changed


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_env_var_cupy_fails_loudly_at_import():
    env = dict(os.environ, MINILORA_BACKEND="cupy")
    r = subprocess.run([sys.executable, "-c", "import minilora"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "BackendUnavailableError" in r.stderr


def test_seeded_rng_is_reproducible(xp):
    a = backend.default_rng(7).standard_normal(5)
    b = backend.default_rng(7).standard_normal(5)
    assert backend.get_array_module(a) is xp
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_to_numpy_returns_host_array(xp):
    x = xp.arange(4, dtype=xp.float32)
    h = backend.to_numpy(x)
    assert isinstance(h, np.ndarray) and h.dtype == np.float32
