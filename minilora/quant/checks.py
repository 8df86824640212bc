"""Checks shared by every quantization entry point: bad input gets a clear exception, never silent garbage.

Quantization computes in float32 (as bitsandbytes does), so an input is accepted when
    dtype in {float16, float32, float64}                      else TypeError naming the dtype
    every x_i finite                                          else ValueError: count, first flat index, value
    |x_i| <= float32 max = 3.4028235e38                      else ValueError (float64 only: the cast would give inf)
A block size is any integer (Python or NumPy, not bool) equal to an allowed size; a code table is 1-D, 2..256
finite values within [-1, 1] (every value x / absmax lies there, so a value outside can never be the nearest).

bitsandbytes happily quantizes NaN (`[NaN, 1.0]` -> absmax NaN, bytes FF) and raises ValueError for int dtypes.
"""
from __future__ import annotations

import numbers

from minilora.backend import get_array_module, to_numpy

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # bnb's quantize_4bit list
FLOAT32_MAX = 3.4028234663852886e38                              # finfo(float32).max, exactly


def check_blocksize(blocksize, allowed=ALLOWED_BLOCKSIZES) -> int:
    """The block size as a Python int; ValueError unless it is an integer (NumPy's too) equal to an allowed size."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or int(blocksize) not in allowed:
        raise ValueError(f"unsupported blocksize {blocksize!r}; allowed block sizes are {list(allowed)}")
    return int(blocksize)


def check_float_array(x, name: str = "input"):
    """x must be a float16/float32/float64 array (bf16 does not exist in NumPy). Returns its array module."""
    xp = get_array_module(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.dtype not in (xp.float16, xp.float32, xp.float64):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype {x.dtype}")
    return xp


def check_quant_input(x, name: str = "input"):
    """The guard every quantizer calls first: a float array whose values float32 can hold. Returns the array module.

    NaN/Inf are found cheaply later, in the float32 statistics each quantizer computes anyway (which then call
    `raise_if_not_finite`); values beyond the float32 range would turn into inf there and be misreported, so a
    float64 input is range-checked here, with two reductions and no temporary."""
    xp = check_float_array(x, name)
    if x.dtype == xp.float64 and x.size:
        hi, lo = float(x.max()), float(x.min())                      # NaN propagates: then the NaN check reports it
        if hi > FLOAT32_MAX or lo < -FLOAT32_MAX:
            raise_if_not_finite(x, name)
    return xp


def check_code(code, xp, name: str = "code"):
    """A custom 8-bit code table as a float32 array of xp: 1-D, 2..256 finite values within [-1, 1].

    The table follows the data, as bitsandbytes moves `code` to A's device: a device table given with host data is
    copied to the host (numpy.asarray of a CuPy array would raise), a host table with device data is copied in."""
    code = to_numpy(code) if xp.__name__ == "numpy" else xp.asarray(code)
    if code.ndim != 1 or not 2 <= code.size <= 256:
        raise ValueError(f"{name} must be a 1-D table of 2..256 values, got shape {tuple(code.shape)}")
    if code.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {code.dtype}")
    code = code.astype(xp.float32)
    bad = ~xp.isfinite(code)
    if bool(bad.any()):
        raise ValueError(f"{name} must hold finite values; {int(bad.sum())} are NaN/Inf, the first at index "
                         f"{int(xp.argmax(bad))}")
    if bool((xp.abs(code) > 1).any()):
        raise ValueError(f"{name} values must lie in [-1, 1] (they stand for x / absmax), got "
                         f"min {float(code.min())}, max {float(code.max())}")
    return code


def raise_if_not_finite(x, name: str = "input"):
    """ValueError naming what x holds that quantization cannot: NaN/Inf, or finite values beyond the float32 range
    (how many, the flat C-order index of the first one and its value). Returns only if x holds neither."""
    xp = get_array_module(x)
    flat = x.reshape(-1)
    bad = ~xp.isfinite(flat)                                          # (n,) bool
    what = "NaN/Inf value(s)"
    if not bool(bad.any()) and flat.dtype == xp.float64:
        bad = xp.abs(flat) > FLOAT32_MAX                              # (n,) bool: finite, but inf once in float32
        what = f"value(s) outside the float32 range (|x| > {FLOAT32_MAX:.8g})"
    count = int(bad.sum())
    if count:
        first = int(xp.argmax(bad))
        idx = tuple(int(i) for i in xp.unravel_index(first, x.shape)) if x.ndim > 1 else first
        hint = ("quantization needs finite numbers" if what.startswith("NaN") else
                "quantization computes in float32: rescale the tensor, or clip it to the float32 range first")
        raise ValueError(f"{name} contains {count} {what}; the first is at flat index {first} "
                         f"(position {idx}, value {float(flat[first])!r}); {hint}")
