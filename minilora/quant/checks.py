"""Input checks shared by every quantizer: bad input gets a clear exception, never silent garbage.

bitsandbytes happily quantizes NaN (`[NaN, 1.0]` -> absmax NaN, bytes FF) and raises ValueError for int dtypes;
minilora raises ValueError for NaN/Inf (how many, and the first flat index) and TypeError for non-float dtypes.
"""
from __future__ import annotations

from minilora.backend import get_array_module

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # bnb's quantize_4bit list


def check_blocksize(blocksize, allowed=ALLOWED_BLOCKSIZES) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"unsupported blocksize {blocksize!r}; allowed block sizes are {list(allowed)}")
    return blocksize


def check_float_array(x, name: str = "input"):
    """x must be a float16/float32/float64 array (bf16 does not exist in NumPy)."""
    xp = get_array_module(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.dtype not in (xp.float16, xp.float32, xp.float64):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype {x.dtype}")
    return xp


def raise_if_not_finite(x, name: str = "input"):
    """ValueError naming how many NaN/Inf values x holds and the flat (C-order) index of the first one."""
    xp = get_array_module(x)
    bad = ~xp.isfinite(x.reshape(-1))                                 # (n,) bool
    count = int(bad.sum())
    if count:
        first = int(xp.argmax(bad))
        idx = tuple(int(i) for i in xp.unravel_index(first, x.shape)) if x.ndim > 1 else first
        raise ValueError(f"{name} contains {count} NaN/Inf value(s); the first is at flat index {first} "
                         f"(position {idx}, value {x.reshape(-1)[first]}); quantization needs finite numbers")
