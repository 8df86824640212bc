"""The one place that decides which array module does the math: NumPy (the reference) or CuPy (CUDA GPU).

Every compute module asks this file for its array module instead of importing numpy, so the same code runs on
both:

    xp = get_array_module(x)      # the module that owns the array x (CuPy's own idiom, cupy.get_array_module)
    xp = xp_current()             # the module new arrays are created with (model init, random numbers)

Three ways to switch, in order of precedence: `use_backend("cupy")` (a context manager), `set_backend("cupy")`, and
the environment variable `MINILORA_BACKEND=cupy` read at import time. Asking for CuPy where it cannot run raises
`BackendUnavailableError` saying why (not installed, or installed but no CUDA device); nothing falls back silently.

Mirrors: CuPy's `cupy.get_array_module` / `cupy.asnumpy`, and the device switch of PyTorch's `.to(device)`.
"""
from __future__ import annotations

import contextlib
import os

import numpy  # this is the module that hands numpy out; compute modules never import it themselves

BACKENDS = ("numpy", "cupy")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


def _load_cupy():
    """Import CuPy and check that a CUDA device exists, or raise BackendUnavailableError naming which is missing."""
    try:
        import cupy  # imported here: optional dependency
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'cupy' requested, but CuPy is not installed ({e}); install it with `pip install minilora[gpu]` "
            "(or the cupy-cudaXXx wheel that matches your CUDA), or use MINILORA_BACKEND=numpy") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError when the driver or device is missing
        raise BackendUnavailableError(
            f"backend 'cupy' requested and CuPy is installed, but no CUDA device is usable ({e}); "
            "use MINILORA_BACKEND=numpy on this machine") from None
    if n < 1:
        raise BackendUnavailableError(
            "backend 'cupy' requested and CuPy is installed, but no CUDA device was found; "
            "use MINILORA_BACKEND=numpy on this machine")
    return cupy


def _module_for(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return numpy if name == "numpy" else _load_cupy()


_state = {"name": "numpy", "xp": numpy}


def set_backend(name: str) -> None:
    """Make `name` ("numpy" or "cupy") the backend new arrays are created on."""
    xp = _module_for(name)
    _state["name"], _state["xp"] = name, xp


def get_backend() -> str:
    """The name of the current backend: "numpy" or "cupy"."""
    return _state["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block on another backend, restoring the previous one afterwards (even on error)."""
    old = (_state["name"], _state["xp"])
    set_backend(name)
    try:
        yield _state["xp"]
    finally:
        _state["name"], _state["xp"] = old


def xp_current():
    """The array module of the current backend (numpy or cupy)."""
    return _state["xp"]


def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """The array module that owns these arrays: cupy if any of them is a CuPy array, else numpy."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy
            return cupy
    return numpy


def to_numpy(x):
    """A NumPy copy/view of x for plotting, printing and saving (CuPy arrays are copied to the host)."""
    if is_cupy_array(x):
        return x.get()
    return numpy.asarray(x)


def asarray(x, dtype=None):
    """x as an array of the current backend (copies host -> device when the backend is CuPy)."""
    return _state["xp"].asarray(x, dtype=dtype)


def default_rng(seed=None):
    """A seeded random Generator on the current backend (numpy.random.default_rng or cupy.random.default_rng).

    The two backends produce different streams for the same seed; within one backend a seed is reproducible."""
    return _state["xp"].random.default_rng(seed)


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device is present (used to skip GPU tests)."""
    try:
        _load_cupy()
    except BackendUnavailableError:
        return False
    return True


_env = os.environ.get("MINILORA_BACKEND", "").strip().lower()
if _env:
    set_backend(_env)
