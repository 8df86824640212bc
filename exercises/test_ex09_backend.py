"""Grader for ex09_backend.py (notebook 09): compared with minilora/nn/functional.py (gelu_forward,
embedding_backward, the causal mask) and minilora.backend.to_numpy.

Every grader also reads the module's source: no `import numpy` / `import cupy` at module level (only inside
to_numpy). With CuPy and a CUDA device present, the array functions are graded on the GPU as well."""
import ast
import inspect

import numpy as np
from grading import GRADE, check_array, fail
from hypothesis import example, given
from hypothesis import strategies as st

from minilora import backend
from minilora.nn import functional as F

EXERCISE = "ex09_backend"
ON_GPU = backend.gpu_available()


def check_no_numpy(ex):
    """The file may import numpy or cupy only inside to_numpy."""
    tree = ast.parse(inspect.getsource(ex))
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "to_numpy":
            allowed |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in allowed:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [m for m in mods if m.split(".")[0] in ("numpy", "cupy", "cupyx")]
            if bad:
                raise AssertionError(f"{EXERCISE}.py line {node.lineno} imports {bad[0]}: backend-agnostic code asks "
                                     "minilora.backend for the array module (xp = get_array_module(x)) instead; only "
                                     "to_numpy may import numpy, inside its body")


def on_each_backend(x_np):
    """(name, x) on NumPy, and on CuPy when a GPU is present."""
    yield "numpy", x_np
    if ON_GPU:
        import cupy
        yield "cupy", cupy.asarray(x_np)


@GRADE
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
       dtype=st.sampled_from([np.float32, np.float64]))
@example(seed=0, n=64, scale=3.0, dtype=np.float64)
@example(seed=1, n=64, scale=3.0, dtype=np.float32)
def test_gelu(ex, seed, n, scale, dtype):
    check_no_numpy(ex)
    x_np = (np.random.default_rng(seed).standard_normal((4, n)) * scale).astype(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for name, x in on_each_backend(x_np):
        expected = backend.to_numpy(F.gelu_forward(x.copy())[0])
        got = ex.gelu(x)
        if backend.get_array_module(got) is not backend.get_array_module(x):
            fail("gelu(x)", {"x": x_np}, f"a {name} input must give a {name} result, got {type(got).__name__}")
        check_array(f"gelu(x) on {name}", backend.to_numpy(got), expected, {"x": x_np}, **tol)


@GRADE
@given(T=st.integers(1, 64), dtype=st.sampled_from([np.float32, np.float64]))
@example(T=4, dtype=np.float32)
@example(T=1, dtype=np.float64)
def test_causal_mask(ex, T, dtype):
    check_no_numpy(ex)
    mods = [np] + ([__import__("cupy")] if ON_GPU else [])
    for xp in mods:
        expected = backend.to_numpy(F._causal_mask(xp, T, xp.dtype(dtype)))
        got = ex.causal_mask(T, xp.dtype(dtype), xp)
        check_array(f"causal_mask(T, dtype, xp={xp.__name__})", backend.to_numpy(got), expected,
                    {"T": T, "dtype": np.dtype(dtype).name})


@GRADE
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), vocab=st.integers(1, 30), C=st.integers(1, 16),
       dtype=st.sampled_from([np.float32, np.float64]))
@example(seed=0, n=12, vocab=5, C=3, dtype=np.float64)                          # tokens repeat: they must add up
@example(seed=1, n=8, vocab=50, C=4, dtype=np.float32)
def test_embedding_backward(ex, seed, n, vocab, C, dtype):
    check_no_numpy(ex)
    g = np.random.default_rng(seed)
    idx_np = g.integers(0, vocab, (2, n))                                        # (B, T) token ids
    dy_np = g.standard_normal((2, n, C)).astype(dtype)                           # (B, T, C)
    inputs = {"dy": dy_np, "idx": idx_np, "vocab_size": vocab}
    for name, dy in on_each_backend(dy_np):
        idx = backend.get_array_module(dy).asarray(idx_np)
        expected = backend.to_numpy(F.embedding_backward(dy, idx, (vocab, C)))
        got = ex.embedding_backward(dy, idx, vocab)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
        check_array(f"embedding_backward(dy, idx, vocab_size) on {name}", backend.to_numpy(got), expected, inputs,
                    **tol)


class FakeDeviceArray:
    """Stands in for a CuPy array on any machine: its type lives in a module named cupy..., .get() copies it."""

    def __init__(self, data):
        self.data = data

    def get(self):
        return self.data.copy()


FakeDeviceArray.__module__ = "cupy._fake"


@GRADE
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20), as_array=st.booleans())
@example(values=[1.0, 2.0, 3.0], as_array=True)
def test_to_numpy(ex, values, as_array):
    check_no_numpy(ex)
    host = np.asarray(values, np.float32)
    for x in (host if as_array else list(values), FakeDeviceArray(host)):
        expected = backend.to_numpy(x)
        got = ex.to_numpy(x)
        check_array("to_numpy(x)", got, expected, {"x": f"{type(x).__name__} of {len(values)} values"})
