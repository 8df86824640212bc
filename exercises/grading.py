"""Helpers the graders share: compare a student's result with minilora's and say clearly what differs.

Every check raises AssertionError with: the function, the inputs (shape, dtype, range, first values), what was
expected and what came back, and where the first difference is. Randomised inputs come from hypothesis with a fixed
derandomised search (GRADE), so two runs of a grader test the same inputs.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings

GRADE = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck), print_blob=False)


def describe(v) -> str:
    """A short description of an input or a result: arrays by dtype, shape, range and first values."""
    if isinstance(v, np.ndarray):
        if v.size == 0:
            return f"{v.dtype} array of shape {v.shape} (empty)"
        flat = v.reshape(-1)
        head = np.array2string(flat[:6], precision=5, separator=", ")
        rng = f", values in [{flat.min():.5g}, {flat.max():.5g}]" if v.dtype.kind in "fiu" else ""
        return f"{v.dtype} array of shape {v.shape}{rng}, first values {head}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"{type(v).__name__} of {len(v)}: {list(v[:8])} ..."
    return repr(v)


def _inputs(inputs: dict) -> str:
    return "\n".join(f"    {k} = {describe(v)}" for k, v in inputs.items())


def fail(what: str, inputs: dict, detail: str):
    __tracebackhide__ = True                         # pytest shows the message, not these lines
    raise AssertionError(f"{what} is not right.\n  inputs:\n{_inputs(inputs)}\n  {detail}")


def check_array(what, got, expected, inputs, *, rtol=0.0, atol=0.0, dtype=True):
    """got must be an ndarray of expected's shape (and dtype, if dtype=True) equal to it within rtol/atol."""
    __tracebackhide__ = True                         # pytest shows the message, not these lines
    if not isinstance(got, np.ndarray):
        fail(what, inputs, f"expected a NumPy array, got {type(got).__name__}: {describe(got)}")
    if got.shape != expected.shape:
        fail(what, inputs, f"expected shape {expected.shape}, got shape {got.shape}")
    if dtype and got.dtype != expected.dtype:
        fail(what, inputs, f"expected dtype {expected.dtype}, got dtype {got.dtype}")
    g, e = got.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):                 # inf - inf: equal infinities pass through g == e
        bad = ~((g == e) | (np.abs(g - e) <= atol + rtol * np.abs(e)))
    if bad.any():
        _report_mismatch(what, inputs, got, expected, bad, rtol, atol)


def check_codes(what, got, expected, inputs, *, target, value_of, slack):
    """Codes may differ from minilora's only where both are (nearly) equally good: |value_of(got) - target| must
    not exceed |value_of(expected) - target| + slack. This forgives a tie rounded the other way by a last-bit
    difference in how the scaled value was computed, and nothing else."""
    __tracebackhide__ = True                         # pytest shows the message, not these lines
    if not isinstance(got, np.ndarray):
        fail(what, inputs, f"expected a NumPy array, got {type(got).__name__}: {describe(got)}")
    if got.shape != expected.shape or got.dtype != expected.dtype:
        fail(what, inputs, f"expected {expected.dtype} array of shape {expected.shape}, "
                           f"got {got.dtype} array of shape {got.shape}")
    differ = got != expected
    if differ.any():
        worse = np.abs(value_of(got) - target) > np.abs(value_of(expected) - target) + slack
        bad = differ & worse
        if bad.any():
            t = target.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
            _report_mismatch(what, inputs, got, expected, bad, 0, 0, extra=f"(the exact scaled value there is {t:.7g})")


def _report_mismatch(what, inputs, got, expected, bad, rtol, atol, extra=""):
    __tracebackhide__ = True                         # pytest shows the message, not these lines
    i = int(np.flatnonzero(bad.reshape(-1))[0])
    idx = np.unravel_index(i, got.shape) if got.ndim else ()
    tol = "exactly" if rtol == 0 and atol == 0 else f"within rtol={rtol:g}, atol={atol:g}"
    fail(what, inputs,
         f"{int(bad.sum())} of {bad.size} values differ (they must match minilora {tol}).\n"
         f"  first difference at index {tuple(int(k) for k in idx)}: expected {expected[idx]!r}, "
         f"got {got[idx]!r} {extra}\n"
         f"  expected: {describe(expected)}\n  got:      {describe(got)}")


def check_value(what, got, expected, inputs, *, rel=0.0):
    """A scalar (int or float) equal to expected, or within a relative tolerance."""
    __tracebackhide__ = True                         # pytest shows the message, not these lines
    ok = got == expected if rel == 0 else abs(got - expected) <= rel * abs(expected)
    if isinstance(got, np.ndarray) or not ok:
        tol = "exactly" if rel == 0 else f"within a relative {rel:g}"
        fail(what, inputs, f"expected {expected!r}, got {got!r} (it must match minilora {tol})")


def seeded(seed: int, shape, scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    """Normal values of a fixed seed: the inputs of the seeded examples."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
