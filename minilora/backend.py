"""The one place that decides which array module does the math: NumPy (the reference), CuPy (CUDA GPU), or
"numpy-strict" (NumPy that refuses what CuPy refuses, for proving GPU-ready code on a machine without a GPU).

Every compute module asks this file for its array module instead of importing numpy, so the same code runs on
all three:

    xp = get_array_module(x)      # the module that owns the array x (CuPy's own idiom, cupy.get_array_module)
    xp = xp_current()             # the module new arrays are created with (model init, random numbers)

Three ways to switch, in order of precedence: `use_backend("cupy")` (a context manager), `set_backend("cupy")`, and
the environment variable `MINILORA_BACKEND=cupy` read at import time. Asking for CuPy where it cannot run raises
`BackendUnavailableError` saying why (not installed, or installed but no CUDA device); nothing falls back silently.

The strict backend keeps CuPy's host/device rule: its arrays (`StrictArray`, an ndarray subclass standing in for
device memory) refuse to meet a plain host ndarray in any ufunc or array function, raising TypeError as CuPy does.
`xp.asarray(host)` is the way in, `to_numpy(x)` (CuPy's `x.get()` / `cupy.asnumpy`) the one way back. Where CuPy's
NumPy-like API differs in a way code could rely on (`take` has no `mode`, ufunc methods exist for only some
ufuncs, reductions return 0-d arrays), the strict backend behaves like CuPy. docs/backends.md lists each rule.

Mirrors: CuPy's `cupy.get_array_module` / `cupy.asnumpy` and its host/device rules, and the device switch of
PyTorch's `.to(device)`.
"""
from __future__ import annotations

import contextlib
import os
import types

import numpy  # this is the module that hands numpy out; compute modules never import it themselves

BACKENDS = ("numpy", "numpy-strict", "cupy")


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


# ---- the strict backend: NumPy memory, CuPy's host/device rules ---------------------------------------------------


class StrictArray(numpy.ndarray):
    """A "device" array of the strict backend: NumPy memory that keeps CuPy's rules.

    A ufunc or NumPy function that gets one of these and a plain host ndarray (not a 0-d one) raises TypeError
    naming the operation; so does storing a host ndarray into one. Results stay StrictArrays; reductions, scalar
    indexing and argmax-like methods give 0-d arrays, as CuPy does."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _apply_ufunc(ufunc, method, inputs, kwargs, via_xp=False)

    def __array_function__(self, func, types, args, kwargs):
        return _apply_function(func, func.__name__, args, kwargs)

    def __getitem__(self, key):
        return _wrap(super().__getitem__(key))

    def __setitem__(self, key, value):
        _refuse_host("__setitem__", (value,))      # CuPy: "non-scalar numpy.ndarray cannot be used for fill"
        super().__setitem__(key, value)

    def take(self, indices, axis=None, out=None):  # CuPy's ndarray.take has no `mode`
        return strict.take(self, indices, axis=axis, out=out)

    def dot(self, b, out=None):
        return strict.dot(self, b, out=out)

    def nonzero(self):
        return strict.nonzero(self)

    def searchsorted(self, v, side="left", sorter=None):
        return strict.searchsorted(self, v, side=side, sorter=sorter)

    def argmax(self, *args, **kwargs):
        return _wrap(super().argmax(*args, **kwargs))

    def argmin(self, *args, **kwargs):
        return _wrap(super().argmin(*args, **kwargs))


def _is_host(x) -> bool:
    """A plain NumPy array that CuPy would refuse next to a device array (0-d arrays pass, like scalars)."""
    return isinstance(x, numpy.ndarray) and not isinstance(x, StrictArray) and x.ndim > 0


def _refuse_host(op, objs):
    """TypeError if any of objs (or of the lists/tuples among them) is a host ndarray."""
    for x in objs:
        for h in (x if type(x) in (list, tuple) else (x,)):
            if _is_host(h):
                raise TypeError(f"{op}: a host numpy.ndarray {h.dtype}{list(h.shape)} met an array of the strict "
                                "backend; CuPy refuses this mix. Bring host data in with xp.asarray(...), take "
                                "device data out with minilora.backend.to_numpy(...)")


def _unwrap(x):
    """Strict arrays (also inside one list/tuple) as plain ndarray views, for NumPy to compute on."""
    if isinstance(x, StrictArray):
        return x.view(numpy.ndarray)
    if type(x) in (list, tuple):
        return type(x)(v.view(numpy.ndarray) if isinstance(v, StrictArray) else v for v in x)
    return x


def _wrap(r):
    """NumPy's result as the strict backend's: arrays become StrictArrays, numeric scalars 0-d StrictArrays."""
    if isinstance(r, StrictArray):
        return r
    if isinstance(r, numpy.ndarray):
        return r.view(StrictArray)
    if isinstance(r, (numpy.number, numpy.bool_)):
        return numpy.asarray(r).view(StrictArray)
    if type(r) in (list, tuple):
        return type(r)(_wrap(v) for v in r)
    if isinstance(r, tuple) and hasattr(r, "_fields"):   # a namedtuple (unique_all, eigh, ...)
        return type(r)(*(_wrap(v) for v in r))
    return r


# CuPy's ufunc methods (cupy/_core/_kernel.pyx) exist for only some ufuncs; the others raise NotImplementedError.
# `reduce` is checked only when called as xp.<ufunc>.reduce: NumPy's own x.max() also arrives as maximum.reduce.
_CUPY_UFUNC_METHODS = {
    "at": {"add", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor"},   # CuPy's scatter ops
    "reduceat": {"add"},
    "accumulate": {"add", "multiply"},
    "reduce": {"add", "multiply"},
}
_SCATTER_ADD_DTYPES = {"int32", "uint32", "uint64", "float16", "float32", "float64"}   # CUDA's atomicAdd


def _apply_ufunc(ufunc, method, inputs, kwargs, via_xp):
    op = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
    allowed = _CUPY_UFUNC_METHODS.get(method)
    if allowed is not None and ufunc.__name__ not in allowed and (via_xp or method != "reduce"):
        raise NotImplementedError(f"`{op}` is not supported by CuPy (the strict backend follows CuPy)")
    operands = (inputs[0], *inputs[2:]) if method == "at" else inputs      # at's indices may be host (CuPy copies)
    out = kwargs.get("out")
    out = () if out is None else out if isinstance(out, tuple) else (out,)
    _refuse_host(op, (*operands, *out, kwargs.get("where")))
    for x in operands:
        if type(x) in (list, tuple):
            raise TypeError(f"{op}: a Python {type(x).__name__} operand; CuPy's ufuncs take arrays and scalars")
    if method == "at" and ufunc.__name__ == "add" and inputs[0].dtype.name not in _SCATTER_ADD_DTYPES:
        raise TypeError(f"add.at: CuPy's scatter add supports {sorted(_SCATTER_ADD_DTYPES)}, not {inputs[0].dtype}")
    if out:
        kwargs = dict(kwargs, out=tuple(_unwrap(o) for o in out))
    if "where" in kwargs:
        kwargs["where"] = _unwrap(kwargs["where"])
    result = getattr(ufunc, method)(*(_unwrap(x) for x in inputs), **kwargs)
    if method == "at":
        return None
    if out and all(isinstance(o, StrictArray) for o in out):
        return out[0] if len(out) == 1 else out          # the caller's own arrays, as NumPy and CuPy return them
    return _wrap(result)


def _take_rule(args, kwargs):
    if "mode" in kwargs or len(args) > 4:
        raise TypeError("take() got an unexpected keyword argument 'mode': CuPy's take has no mode "
                        "(out-of-range indices wrap around)")
    return args, dict(kwargs, mode="wrap")


def _sort_rule(args, kwargs):
    if kwargs.get("kind") not in (None, "stable") or len(args) > 2:
        raise ValueError(f"CuPy's sort/argsort accept only kind=None or 'stable' (always stable), "
                         f"got {kwargs.get('kind', args[2:])!r}")
    return args, dict(kwargs, kind="stable")


# Functions where CuPy's signature or behaviour differs from NumPy's in a way code could rely on.
_CUPY_FUNCTION_RULES = {"take": _take_rule, "sort": _sort_rule, "argsort": _sort_rule}
_WAYS_IN = {"asarray", "array", "asanyarray"}   # like cupy.asarray: host data may enter here, and only here


def _apply_function(func, name, args, kwargs):
    if name not in _WAYS_IN:
        _refuse_host(name, (*args, *kwargs.values()))
    if name in _CUPY_FUNCTION_RULES:
        args, kwargs = _CUPY_FUNCTION_RULES[name](args, kwargs)
    out = kwargs.get("out")
    result = func(*(_unwrap(a) for a in args), **{k: _unwrap(v) for k, v in kwargs.items()})
    return out if isinstance(out, StrictArray) else _wrap(result)


class _StrictUfunc:
    """xp.<ufunc> on the strict backend: NumPy's ufunc with the strict checks, and CuPy's set of methods."""

    def __init__(self, ufunc):
        self._ufunc, self.__name__ = ufunc, ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs, via_xp=True)

    def at(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "at", args, kwargs, via_xp=True)

    def reduce(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduce", args, kwargs, via_xp=True)

    def reduceat(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "reduceat", args, kwargs, via_xp=True)

    def accumulate(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "accumulate", args, kwargs, via_xp=True)

    def outer(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "outer", args, kwargs, via_xp=True)

    def __getattr__(self, name):                      # nin, nout, types, identity, ...
        return getattr(self._ufunc, name)

    def __repr__(self):
        return f"<strict ufunc {self.__name__!r}>"


class StrictGenerator:
    """The strict backend's random generator: NumPy's Generator (same seed, same stream), its arrays moved in
    through asarray. bit_generator.state is NumPy's, so checkpoints save and restore it as on NumPy."""

    def __init__(self, seed=None):
        self._gen = numpy.random.default_rng(seed)

    @property
    def bit_generator(self):
        return self._gen.bit_generator

    def __getattr__(self, name):
        if name.startswith("_"):                       # copy/pickle probe before __init__ ran: no recursion
            raise AttributeError(name)
        attr = getattr(self._gen, name)
        if not callable(attr):
            return attr

        def draw(*args, **kwargs):
            return _wrap(attr(*(_unwrap(a) for a in args), **{k: _unwrap(v) for k, v in kwargs.items()}))
        return draw


class _StrictNumpy(types.ModuleType):
    """The `xp` of the strict backend: NumPy's namespace with every function and ufunc checked and its array
    results made StrictArrays. Dtypes, classes and constants (float32, iinfo, pi) are NumPy's own, as in CuPy."""

    ndarray = StrictArray
    random = types.SimpleNamespace(default_rng=StrictGenerator)

    def __getattr__(self, name):
        attr = getattr(numpy, name)
        if isinstance(attr, numpy.ufunc):
            attr = _StrictUfunc(attr)
        elif callable(attr) and not isinstance(attr, type):
            attr = _strict_function(attr, name)
        elif name == "linalg":                         # cupy.linalg: the same functions, on device arrays
            attr = types.SimpleNamespace(**{f: _strict_function(getattr(numpy.linalg, f), f"linalg.{f}")
                                            for f in numpy.linalg.__all__ if f[0].islower()})
        elif isinstance(attr, types.ModuleType):
            raise AttributeError(f"numpy.{name} is not wrapped by the strict backend; add it to minilora.backend")
        setattr(self, name, attr)                      # looked up once
        return attr


def _strict_function(func, name):
    def call(*args, **kwargs):
        return _apply_function(func, name, args, kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = func.__doc__
    return call


strict = _StrictNumpy("numpy_strict", "NumPy arrays that refuse what CuPy refuses (see StrictArray).")


def _module_for(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "numpy-strict":
        return strict
    return numpy if name == "numpy" else _load_cupy()


_state = {"name": "numpy", "xp": numpy}


def set_backend(name: str) -> None:
    """Make `name` ("numpy", "numpy-strict" or "cupy") the backend new arrays are created on."""
    xp = _module_for(name)
    _state["name"], _state["xp"] = name, xp


def get_backend() -> str:
    """The name of the current backend: "numpy", "numpy-strict" or "cupy"."""
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
    """The array module of the current backend (numpy, the strict module, or cupy)."""
    return _state["xp"]


def is_cupy_array(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """The array module that owns these arrays: cupy (or the strict module) if any of them is its array, else numpy."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy
            return cupy
        if isinstance(a, StrictArray):
            return strict
    return numpy


def to_numpy(x):
    """A NumPy copy/view of x for plotting, printing and saving (CuPy and strict arrays are copied to the host)."""
    if is_cupy_array(x):
        return x.get()
    if isinstance(x, StrictArray):
        return numpy.array(x.view(numpy.ndarray))   # a copy, as x.get() is: writing to it never changes x
    return numpy.asarray(x)


def flat_chunks(size: int, *arrays):
    """Pieces of the flat views of same-shaped C-contiguous arrays, `size` values at a time on NumPy, so that a run of
    elementwise passes stays in the CPU cache; one piece (the whole arrays) on other backends, where each pass is one
    kernel. Elementwise work gives the same bits either way. Used by GELU and AdamW."""
    flat = [a.reshape(-1) for a in arrays]                       # (n,) views
    n = flat[0].size
    step = size if get_array_module(*arrays) is numpy else max(n, 1)
    for i in range(0, n, step):
        yield [f[i:i + step] for f in flat]                     # (≤ size,) each


def asarray(x, dtype=None):
    """x as an array of the current backend (copies host -> device when the backend is CuPy)."""
    return _state["xp"].asarray(x, dtype=dtype)


def default_rng(seed=None):
    """A seeded random Generator on the current backend (numpy.random.default_rng or cupy.random.default_rng).

    NumPy and CuPy produce different streams for the same seed; within one backend a seed is reproducible. The
    strict backend draws NumPy's stream (StrictGenerator), so its seeds reproduce NumPy's numbers exactly."""
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
