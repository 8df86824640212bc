"""absmax int8: q = round(127 / absmax(X) * X) in [-127, 127], and back: X' = q * absmax / 127.

Three granularities share the formula; only where absmax is taken differs:
    tensor-wise   one absmax for the whole tensor       (the textbook version: one outlier ruins it)
    row-wise      one absmax per row                    (LLM.int8's "vector-wise", bnb int8_vectorwise_quant)
    block-wise    one absmax per block of `blocksize`   (the idea QLoRA's 4-bit scheme builds on)
Rounding is half to even (torch.round / NumPy round); -128 is never produced. An all-zero row or block stores
absmax 0 and codes 0 (bnb computes 127/0 = inf, 0*inf = NaN and casts NaN to int8; we make the 0 explicit).
Likewise where absmax is so small (< ~3.7e-37, subnormal territory) that float32 1/absmax * 127 overflows, bnb
casts inf to int8 (undefined); there the codes are computed as round(x * (127 / absmax)) in float64.
Input is checked as for every quantizer (quant/checks.py): float16/32/64, finite, within the float32 range; the
dequantizers check that the statistics fit the codes (one per row, per block, or one for the tensor).

Row-wise mirrors `bitsandbytes/backends/default/ops.py` int8_vectorwise_quant and `functional.py`
int8_vectorwise_dequant (0.50.x) bit for bit, including the operation order:
    q = round(A * (float32(1 / row_stats) * 127))     dequant: (q * row_stats) * float32(1/127)
(torch evaluates `127.0 / t` as `t.reciprocal() * 127`: two roundings. A single float32 division differs in the
last bit for some rows, which flips exact .5 ties, e.g. 63.5 vs 63.499996.)
"""
from __future__ import annotations

import contextlib

from minilora.backend import get_array_module
from minilora.quant.checks import check_blocksize, check_quant_input, raise_if_not_finite

INV127 = 7.874015718698502e-3    # float32(1/127), multiplied last, as bnb does


def _absmax_quant(A, absmax):
    """round(A * (1/absmax * 127)) with absmax broadcastable to A (float32), zeros where absmax == 0."""
    xp = get_array_module(A)
    safe = xp.where(absmax > 0, absmax, xp.float32(1))                  # avoid 127/0; those rows are all zero
    quiet = xp.errstate(over="ignore") if hasattr(xp, "errstate") else contextlib.nullcontext()
    with quiet:
        scale = (xp.float32(1) / safe) * xp.float32(127)                # torch's 127.0 / t: reciprocal, then * 127
    q = xp.rint(A.astype(xp.float32) * xp.where(xp.isfinite(scale), scale, xp.float32(0)))   # half to even
    tiny = ~xp.isfinite(scale)                                          # 1/absmax * 127 overflowed float32
    if bool(tiny.any()):
        exact = xp.rint(A.astype(xp.float64) * (127.0 / safe.astype(xp.float64)))   # |exact| <= 127
        q = xp.where(tiny, exact.astype(xp.float32), q)
    q = xp.where(absmax > 0, q, xp.float32(0))
    return q.astype(xp.int8)


def _check(A):
    """The guard of every int8 quantizer: float16/32/64, finite, within the float32 range."""
    xp = check_quant_input(A, "A")
    if A.size and not bool(xp.isfinite(A).all()):
        raise_if_not_finite(A, "A")
    return xp


def _check_codes(q, stats, name: str, want_shape: tuple):
    """The guard of every int8 dequantizer: int8 codes, and statistics of exactly the shape they need."""
    if not hasattr(q, "dtype") or not hasattr(q, "shape"):
        raise TypeError(f"int8 codes must be an array, got {type(q).__name__}")
    xp = get_array_module(q)
    if q.dtype != xp.int8:
        raise TypeError(f"int8 codes must have dtype int8, got {q.dtype}")
    shape = tuple(getattr(stats, "shape", ()))
    if shape != tuple(want_shape):
        raise ValueError(f"{name} must have shape {tuple(want_shape)} for codes of shape {tuple(q.shape)}, got "
                         f"shape {shape}; pass the statistics the quantizer returned with these codes")
    return xp


def int8_vectorwise_quant(A, threshold: float = 0.0):
    """Row-wise (last axis) absmax int8 of A (..., K) -> (q int8 (..., K), row_stats float32 (...,), outlier_cols).

    threshold > 0 is LLM.int8's mixed decomposition: columns holding any |x| >= threshold are returned in
    outlier_cols (int64), excluded from row_stats and zeroed in q (they stay in 16-bit in the real matmul)."""
    xp = _check(A)
    if A.ndim < 1 or A.shape[-1] == 0:
        raise ValueError(f"int8_vectorwise_quant needs a non-empty last axis, got shape {tuple(A.shape)}")
    A32 = A.astype(xp.float32)                                          # (..., K)
    outlier_cols = None
    if threshold > 0.0:
        outliers = xp.abs(A32) >= threshold                             # (..., K) bool
        outlier_cols = xp.flatnonzero(outliers.reshape(-1, A.shape[-1]).any(axis=0)).astype(xp.int64)
        A32 = xp.where(outliers, xp.float32(0), A32)
    row_stats = xp.abs(A32).max(axis=-1)                                # (...,)
    q = _absmax_quant(A32, row_stats[..., None])                        # (..., K)
    if outlier_cols is not None and outlier_cols.size and A32.size // A.shape[-1] > 1:
        q[..., outlier_cols] = 0
    return q, row_stats, outlier_cols


def int8_vectorwise_dequant(A, stats):
    """(q * row_stats) * float32(1/127), float32 (bnb's exact order of operations). row_stats: one per row."""
    xp = _check_codes(A, stats, "row_stats", A.shape[:-1])
    return (A.astype(xp.float32) * stats[..., None].astype(xp.float32)) * xp.float32(INV127)


def int8_tensorwise_quant(A):
    """One absmax for the whole tensor -> (q int8, absmax float32 scalar)."""
    xp = _check(A)
    absmax = xp.abs(A.astype(xp.float32)).max() if A.size else xp.float32(0)
    return _absmax_quant(A, xp.asarray(absmax, dtype=xp.float32)), xp.asarray(absmax, dtype=xp.float32)


def int8_tensorwise_dequant(q, absmax):
    """(q * absmax) * float32(1/127), float32; absmax is the one scalar int8_tensorwise_quant returned."""
    xp = _check_codes(q, get_array_module(q).asarray(absmax), "absmax", ())
    return (q.astype(xp.float32) * xp.asarray(absmax, dtype=xp.float32)) * xp.float32(INV127)


def int8_blockwise_quant(A, blocksize: int = 64):
    """One absmax per block of `blocksize` consecutive (flattened) elements -> (q int8 (A.shape), absmax (n_blocks,)).

    The last block may be partial; it gets its own absmax."""
    xp = _check(A)
    blocksize = check_blocksize(blocksize)
    flat = A.reshape(-1).astype(xp.float32)                             # (n,)
    n = flat.size
    n_blocks = -(-n // blocksize)
    padded = xp.zeros(n_blocks * blocksize, dtype=xp.float32)           # (n_blocks*bs,) zeros do not change absmax
    padded[:n] = flat
    blocks = padded.reshape(n_blocks, blocksize)                        # (n_blocks, bs)
    absmax = xp.abs(blocks).max(axis=1) if n else xp.zeros(0, dtype=xp.float32)   # (n_blocks,)
    q = _absmax_quant(blocks, absmax[:, None]).reshape(-1)[:n]          # (n,)
    return q.reshape(A.shape), absmax


def int8_blockwise_dequant(q, absmax, blocksize: int = 64):
    """(q * absmax[block]) * float32(1/127), float32; absmax and blocksize as int8_blockwise_quant returned/took."""
    blocksize = check_blocksize(blocksize)
    n_blocks = -(-int(getattr(q, "size", 0)) // blocksize)
    if getattr(absmax, "ndim", None) == 1 and absmax.size != n_blocks:
        raise ValueError(f"{absmax.size} absmax entries given, but {q.size} codes in blocks of {blocksize} need "
                         f"{n_blocks}: pass the blocksize the codes were quantized with")
    xp = _check_codes(q, absmax, "absmax", (n_blocks,))
    flat = q.reshape(-1).astype(xp.float32)                             # (n,)
    scale = xp.repeat(absmax.astype(xp.float32), blocksize)[:flat.size]  # (n,)
    return ((flat * scale) * xp.float32(INV127)).reshape(q.shape)


def outlier_demo(n: int = 4096, outlier: float = 100.0, blocksize: int = 64, seed: int = 0, xp=None):
    """The outlier problem in numbers: randn(n) with one element set to `outlier`, quantized to int8 tensor-wise and
    block-wise. Returns a dict: mean abs error of both, and the fraction of (non-outlier) values that round to 0.

    With one 100 among N(0,1) values the tensor-wise step is 100/127 = 0.79, so most values round to 0; blocks
    confine the damage to the one block that holds the outlier."""
    from minilora.backend import default_rng, xp_current
    xp = xp or xp_current()
    x = default_rng(seed).standard_normal(n).astype(xp.float32)        # (n,)
    x[n // 2] = outlier
    qt, at = int8_tensorwise_quant(x)
    qb, ab = int8_blockwise_quant(x, blocksize)
    keep = xp.arange(n) != n // 2
    err_t = xp.abs(int8_tensorwise_dequant(qt, at) - x)[keep]
    err_b = xp.abs(int8_blockwise_dequant(qb, ab, blocksize) - x)[keep]
    return {"n": n, "outlier": float(outlier), "blocksize": blocksize,
            "tensorwise_mean_abs_err": float(err_t.mean()), "blockwise_mean_abs_err": float(err_b.mean()),
            "tensorwise_zero_fraction": float((qt[keep] == 0).mean()),
            "blockwise_zero_fraction": float((qb[keep] == 0).mean())}
