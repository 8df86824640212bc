"""Blockwise absmax scaling and 8-bit dynamic blockwise quantization (the "double" in double quantization).

Per block of `blocksize` consecutive (C-order) elements:
    absmax_b = max_i |x_i|
    scaled_i = x_i * float32(1 / max(absmax_b, 1e-38))     full blocks: reciprocal, then multiply; stores absmax_b
    scaled_i = x_i / max(absmax_tail, 1e-38)                a trailing partial block: true division; stores the clamped
    code_i   = #{midpoints m of the sorted table : m < scaled_i}   (nearest code, exact ties go to the LOWER code)
    x'_i     = table[code_i] * absmax_b                     (float32, then cast to the input dtype)

Mirrors the "default" (pure PyTorch) kernels of `bitsandbytes/backends/default/ops.py` (quantize_blockwise,
quantize_4bit, 0.50.x) bit for bit. bnb's CPU C++ `quantize_blockwise` is a 65,536-bin lookup-table approximation
that moves ~0.15% of the codes; `quantize_blockwise_lut` below reproduces it (for byte comparisons with bnb on CPU):
    lut[i]   = code of #{midpoints < -1 + 2i/65535},  i = 0 .. 65535         (`bnb_cpu_lut`)
    code_i   = lut[trunc((clip(x_i * float32(1 / absmax_b), -1, 1) + 1) * 0.5 * 65535 + 0.5)]
Its vectorized kernel `quantize_blocks_lut` (writing into given arrays) and `dequantize_blocks` are also the
requantization of bitsandbytes' 8-bit optimizer states (minilora.optim.adamw8bit).
bnb's CUDA kernel (`kQuantizeBlockwise` / `dQuantize` in csrc/kernels.cu) searches instead; `quantize_blockwise_cuda`
follows it (emulated here, not run against a GPU):
    scaled_i = x_i * float32(1 / absmax_b)                  every block, the partial last one too
    code_i   = 7-step binary search over the sorted 256-entry map, then one float32 midpoint test; a value exactly
               on that midpoint keeps the entry the search landed on (`cuda_search_code`)

Work is done in cache-sized chunks, so the only full-size arrays ever allocated are the outputs.
"""
from __future__ import annotations

from minilora.backend import get_array_module, to_numpy
from minilora.quant.checks import (
    ALLOWED_BLOCKSIZES,
    check_blocksize,
    check_code,
    check_quant_input,
    raise_if_not_finite,
)
from minilora.quant.codebooks import create_dynamic_map, midpoints
from minilora.quant.state import QuantState, check_dequantize_args, round_to_bfloat16

CHUNK = 1 << 16          # elements per chunk on NumPy (256 KiB of float32: stays in L2 cache)
TINY = 1e-38             # bnb clamps absmax to this before dividing (float32 1e-38 is a subnormal: keep it)
_BINS = 1 << 14          # nearest-code lookup: bins per unit of scaled value (bin width 2^-14)
_MAGIC = 513.0           # float32(scaled + 513) has ulp 2^-14: its low 16 bits are round((scaled + 1) * 2^14)
LUT_BINS = 65536         # bnb's CPU quantize kernel: bins over [-1, 1]
_lut_cache: dict = {}
_cpu_lut_cache: dict = {}


def chunk_size(xp, blocksize: int) -> int:
    """Elements per chunk: a multiple of blocksize. CuPy gains nothing from chunking, so it takes one big chunk."""
    if xp.__name__ != "numpy":
        return 1 << 26
    return max(CHUNK, blocksize)


def rows_absmax(blocks, xp):
    """max |x| of each row of (n_blocks, blocksize) float32, via the sign-cleared bit pattern.

    For non-negative floats the uint32 order is the float order, so one integer max does it; it also turns -0.0
    into +0.0 (as torch's abs does) and maps NaN/Inf above every finite value (checked by the caller)."""
    bits = xp.bitwise_and(blocks.view(xp.uint32), xp.uint32(0x7FFFFFFF))  # (n_blocks, blocksize)
    if xp.__name__ == "numpy":   # reduceat is ~1.5x faster than max(axis=1) on short rows
        flat = bits.reshape(-1)
        m = xp.maximum.reduceat(flat, xp.arange(0, flat.size, blocks.shape[1]))
    else:
        m = bits.max(axis=1)
    return m.view(xp.float32)                                            # (n_blocks,)


def scale_blocks(A, blocksize: int, absmax_out, chunk: int):
    """Yield (start, end, scaled) over the flattened float input; writes each block's absmax into absmax_out.

    `scaled` is a float32 buffer reused between chunks (copy it if you keep it). Raises ValueError on NaN/Inf (the
    caller has already refused float64 values beyond the float32 range, which would turn into inf here)."""
    xp = get_array_module(A)
    flat = A.reshape(-1)
    n = flat.size
    full = n - n % blocksize
    chunk = max(blocksize, chunk - chunk % blocksize)
    size = min(chunk, max(full, 1))
    buf = xp.empty(size, dtype=xp.float32)                               # (chunk,) the scaled values
    xbuf = None if flat.dtype == xp.float32 else xp.empty(size, dtype=xp.float32)
    for s in range(0, full, chunk):
        e = min(s + chunk, full)
        x = flat[s:e]
        if xbuf is not None:                                             # fp16 upcasts exactly; fp64 rounds once
            x = xbuf[:e - s]
            x[...] = flat[s:e]
        blocks = x.reshape(-1, blocksize)                                # (nb, blocksize)
        a = rows_absmax(blocks, xp)                                      # (nb,)
        if not bool(xp.isfinite(a).all()):
            _refuse(A)
        absmax_out[s // blocksize:e // blocksize] = a
        inv = xp.float32(1) / xp.maximum(a, xp.float32(TINY))            # (nb,) reciprocal, then multiply
        sc = buf[:e - s]
        xp.multiply(blocks, inv[:, None], out=sc.reshape(-1, blocksize))
        yield s, e, sc
    if full < n:                                                         # trailing partial block: true division
        x = flat[full:].astype(xp.float32)                               # (rem,)
        a = xp.abs(x).max()
        if not bool(xp.isfinite(a)):
            _refuse(A)
        a = xp.maximum(a, xp.float32(TINY))                              # stored clamped, as bnb does
        absmax_out[-1] = a
        yield full, n, x / a
    # No clip to [-1, 1]: bnb clamps, but every midpoint lies strictly inside (-1, 1), so a value at 1 + 1 ulp
    # gets the same code as 1.0. Skipping it saves a pass.


def _refuse(A):
    """A block statistic came out NaN/Inf: raise, naming the offending input values."""
    raise_if_not_finite(A)
    raise ValueError("input gave a non-finite block absmax although every value is finite and within float32")


def code_lut(code):
    """(lut, mid, order) for nearest-code search in a sorted-or-not table of up to 256 values.

    Bin j of the lut holds the scaled values v with round((v + 1) * 2^14) == j, i.e. [c_j - h, c_j + h] with
    c_j = j / 2^14 - 1 and h = 2^-15. If no midpoint lies within [c_j - 2h, c_j + 2h] (a margin of one extra
    half-bin), every value of the bin has the same code and lut[j] is that code; otherwise lut[j] is a sentinel
    (the dtype's max) and the caller does an exact searchsorted for those few values."""
    xp = get_array_module(code)
    key = (xp.__name__, to_numpy(code).tobytes())
    if key not in _lut_cache:
        if len(_lut_cache) > 32:                                         # many custom tables: start over
            _lut_cache.clear()
        mid, order = midpoints(code)                                     # (k-1,), (k,)
        centre = xp.arange(2 * _BINS + 1, dtype=xp.float64) / _BINS - 1  # (32769,)
        h = 1.0 / _BINS                                                  # = 2 half-widths
        mid64 = mid.astype(xp.float64)
        n_lo = xp.searchsorted(mid64, centre - h, side="left")           # midpoints below the widened bin
        n_hi = xp.searchsorted(mid64, centre + h, side="right")          # midpoints up to its top
        dtype = xp.uint8 if code.size < 256 else xp.uint16               # leave room for the sentinel
        lut = order.astype(dtype)[n_lo]                                  # (32769,)
        lut[n_hi != n_lo] = xp.iinfo(dtype).max
        _lut_cache[key] = (lut, mid, order.astype(xp.uint8))
    return _lut_cache[key]


def nearest_code(scaled, code, out=None, work=None):
    """Codes (uint8) of the table entries nearest to float32 `scaled` (|scaled| <= 1), written into `out`.

    Exactly searchsorted(midpoints, scaled, side="left") mapped through the sort order (ties -> lower code), but
    several times faster than a binary search: one add, one bit-mask and one table lookup per value. `work` is an
    optional dict in which the scratch buffers are kept between calls (chunked callers pass the same one)."""
    xp = get_array_module(scaled)
    lut, mid, order = code_lut(code)
    m = scaled.size
    out = xp.empty(m, dtype=xp.uint8) if out is None else out
    work = {} if work is None else work
    if work.get("size", 0) < m:
        work.update(size=m, t=xp.empty(m, dtype=xp.float32), idx=xp.empty(m, dtype=xp.intp))
    t, idx = work["t"][:m], work["idx"][:m]
    xp.add(scaled, xp.float32(_MAGIC), out=t)                            # (m,) in [512, 514]
    xp.bitwise_and(t.view(xp.int32), 0xFFFF, out=idx, casting="unsafe")  # (m,) the bin
    if xp.__name__ == "numpy" and lut.dtype == xp.uint8:
        xp.take(lut, idx, out=out, mode="wrap")                          # wrap: no bounds check (idx <= 32768)
        fix = xp.flatnonzero(out == 255)
    else:
        q = lut[idx]                                                     # (m,)
        fix = xp.flatnonzero(q == xp.iinfo(q.dtype).max)
        out[...] = q
    if fix.size:                                                         # rare: ~0.1% of values
        out[fix] = order[xp.searchsorted(mid, scaled[fix], side="left")]
    return out


def quantize_blockwise(A, code=None, blocksize: int = 4096):
    """8-bit blockwise quantization: uint8 codes of A's shape, QuantState with float32 absmax per block.

    code=None means the signed dynamic map (bnb's default). Ties go to the lower code; an all-zero block stores
    absmax 0 and code 127 (the map's 0.0). A custom code need not be sorted: we sort it (stable) and map back."""
    xp = check_quant_input(A)
    blocksize = check_blocksize(blocksize, ALLOWED_BLOCKSIZES)
    code = create_dynamic_map(signed=True, xp=xp) if code is None else check_code(code, xp)
    n = A.size
    out = xp.empty(n, dtype=xp.uint8)                                    # (n,)
    absmax = xp.empty(-(-n // blocksize), dtype=xp.float32)              # (n_blocks,)
    work = {}
    for s, e, sc in scale_blocks(A, blocksize, absmax, chunk_size(xp, blocksize)):
        nearest_code(sc, code, out=out[s:e], work=work)
    state = QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=None,
                       dtype=A.dtype)
    return out.reshape(A.shape), state


def dequantize_blockwise(A, quant_state: QuantState):
    """x' = code[q] * absmax[block] in float32, cast to quant_state.dtype, shaped as quant_state.shape.

    TypeError unless A is a uint8 array and quant_state an 8-bit QuantState (a 4-bit one goes to dequantize_4bit);
    ValueError unless the two describe the same tensor."""
    check_dequantize_args(A, quant_state, four_bit=False)
    qs = quant_state
    absmax = qs.absmax
    if qs.nested:                                                        # an 8-bit state can itself be nested
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    vals = dequantize_blocks(A, absmax, qs.code, qs.blocksize)           # (n,) float32
    if qs.bfloat16:                                                      # a bnb state of a bfloat16 tensor
        round_to_bfloat16(vals)
    return vals.astype(qs.dtype, copy=False).reshape(qs.shape)


def dequantize_blocks(codes, absmax, code, blocksize: int):
    """float32 values code[q] * absmax[block] of uint8 `codes` (any shape), flat (n,): blocks of `blocksize` from
    element 0, the last may be shorter. No argument checks (dequantize_blockwise makes them)."""
    xp = get_array_module(codes)
    vals = code.astype(xp.float32, copy=False)[codes.reshape(-1)]       # (n,) a new array
    n = vals.size
    full = n - n % blocksize
    head = vals[:full].reshape(-1, blocksize)                            # (n_full_blocks, blocksize) view
    head *= absmax[:full // blocksize, None]
    if full < n:
        vals[full:] *= absmax[-1]
    return vals


def bnb_cpu_lut(code):
    """bnb's CPU quantize table for `code` (65,536 uint8 codes, cached): bin i stands for v_i = -1 + 2i/65535 in
    float32 and holds the code of #{midpoints < v_i}, as `csrc/cpu_ops.cpp` builds it."""
    xp = get_array_module(code)
    key = (xp.__name__, to_numpy(code).tobytes())
    if key not in _cpu_lut_cache:
        if len(_cpu_lut_cache) > 32:                                     # many custom tables: start over
            _cpu_lut_cache.clear()
        mid, order = midpoints(code)                                     # (k-1,), (k,)
        v = xp.float32(-1) + xp.float32(2) * xp.arange(LUT_BINS, dtype=xp.float32) / xp.float32(LUT_BINS - 1)
        _cpu_lut_cache[key] = order.astype(xp.uint8)[xp.searchsorted(mid, v, side="left")]   # (65536,)
    return _cpu_lut_cache[key]


def quantize_blocks_lut(x, code, blocksize: int, out, absmax_out, name: str = "input"):
    """The kernel of `quantize_blockwise_lut`, vectorized over blocks: float32 `x` (any shape) into uint8 `out` and
    float32 `absmax_out` (n_blocks,), in place. No argument checks beyond the NaN/Inf one (callers make them).

    Per block b (the last may be shorter): absmax_b = max |x| (not clamped), inv = float32(1 / absmax_b),
    code = lut[trunc((clip(x*inv, -1, 1) + 1) * 0.5 * 65535 + 0.5)]; an all-zero block stores absmax 0, code 0.
    A subnormal absmax makes inv inf, where bnb's index is undefined (0 * inf): such zeros get the code of 0.
    ValueError (naming `name`) on NaN/Inf; nothing is written then."""
    xp = get_array_module(x)
    f32 = xp.float32
    flat = x.reshape(-1)
    n = flat.size
    full = n - n % blocksize
    a = xp.empty(-(-n // blocksize), dtype=f32)                          # (n_blocks,)
    a[:full // blocksize] = xp.abs(flat[:full].reshape(-1, blocksize)).max(axis=1)
    if full < n:
        a[-1] = xp.abs(flat[full:]).max()
    if not bool(xp.isfinite(a).all()):
        raise_if_not_finite(x, name)
        raise ValueError(f"{name} gave a non-finite block absmax although every value is finite")
    zero = a == 0                                                        # (n_blocks,)
    inv = f32(1) / xp.where(zero, f32(1), a)                             # (n_blocks,)
    sc = xp.clip(flat * xp.repeat(inv, blocksize)[:n], f32(-1), f32(1))  # (n,)
    if not bool(xp.isfinite(inv).all()):
        sc = xp.nan_to_num(sc, nan=0.0)
    idx = ((sc + f32(1)) * f32(0.5) * f32(LUT_BINS - 1) + f32(0.5)).astype(xp.int32)   # (n,) trunc, in [0, 65535]
    q = bnb_cpu_lut(code)[idx]                                           # (n,) uint8
    if bool(zero.any()):
        q[xp.repeat(zero, blocksize)[:n]] = 0
    out[...] = q.reshape(out.shape)                                      # out's shape (a view: no copy)
    absmax_out[...] = a


def quantize_blockwise_lut(A, code=None, blocksize: int = 4096):
    """bitsandbytes 0.50's CPU C++ quantize_blockwise (`csrc/cpu_ops.cpp`) reproduced: NOT nearest-code rounding.

    A 65,536-bin table over [-1, 1]: bin i stands for v_i = -1 + 2i/65535 and holds #{midpoints < v_i}; each value
    goes to bin trunc((x*inv + 1) * 0.5 * 65535 + 0.5). About 0.15% of codes differ from `quantize_blockwise` (the
    exact nearest code). An all-zero block writes code 0 here (which dequantizes to -0.0), not 127.

    bnb on CPU stores these as the nested codes of double quantization, so this is the kernel for a
    `nested_rounding="bnb-cpu"` option of double quantization (nested codes byte-equal with bnb on CPU). Its kernel
    `quantize_blocks_lut` requantizes the 8-bit optimizer states. To quantize, use `quantize_blockwise`. Same input
    checks as it."""
    xp = check_quant_input(A)
    blocksize = check_blocksize(blocksize, ALLOWED_BLOCKSIZES)
    code = create_dynamic_map(signed=True, xp=xp) if code is None else check_code(code, xp)
    out = xp.empty(A.shape, dtype=xp.uint8)                              # A's shape
    absmax = xp.empty(-(-A.size // blocksize), dtype=xp.float32)         # (n_blocks,)
    quantize_blocks_lut(A.astype(xp.float32, copy=False), code, blocksize, out, absmax)
    return out, QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize,
                                            dtype=A.dtype)


def cuda_search_code(scaled, code):
    """uint8 codes of float32 `scaled` by bnb's CUDA search (`dQuantize`, not stochastic), for a sorted 256-entry
    `code` such as the dynamic map.

    The search keeps a probe index p (start 127) and the last entries it passed on each side: below (lo, start index
    0 with value -1) and above (hi, start index 255 with value 1). For step = 64, 32, ..., 1: if x > code[p], the
    probe becomes the new `lo` and moves up by step, else it becomes the new `hi` and moves down. Where a side was
    never passed, its value is the map's end (code[0] or code[255]) instead of -1 / 1. Then with v = code[p]:
        x > v:  hi if x > float32(hi_value + v) * 0.5 else p
        x <= v: lo if x < float32(lo_value + v) * 0.5 else p
    so a value exactly on the float32 midpoint goes to p, whichever side p is on (the exact nearest rule of
    `nearest_code` sends it to the lower entry). Everything else is the nearest entry."""
    xp = get_array_module(scaled)
    f32 = xp.float32
    c = code.astype(f32, copy=False)                                     # (256,) sorted
    x = scaled.astype(f32, copy=False)                                   # (m,)
    p = xp.full(x.shape, 127, dtype=xp.int32)                            # (m,) the probe
    lo = xp.zeros(x.shape, dtype=xp.int32)                               # (m,) last entry passed below
    hi = xp.full(x.shape, 255, dtype=xp.int32)                           # (m,) last entry passed above
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > c[p]                                                    # (m,) bool
        lo = xp.where(up, p, lo)
        hi = xp.where(up, hi, p)
        p = xp.where(up, p + step, p - step)
    v = c[p]                                                             # (m,)
    mid_hi = (c[hi] + v) * f32(0.5)                                      # (m,) float32 midpoints
    mid_lo = (c[lo] + v) * f32(0.5)
    q = xp.where(x > v, xp.where(x > mid_hi, hi, p), xp.where(x < mid_lo, lo, p))
    return q.astype(xp.uint8)


def quantize_blockwise_cuda(A, code=None, blocksize: int = 4096):
    """bitsandbytes' CUDA quantize_blockwise emulated on the host (kQuantizeBlockwise + dQuantize): every block is
    scaled by float32(1 / absmax) (the partial last block too) and coded by `cuda_search_code`. An all-zero block
    stores absmax 0 and code 0 (CUDA's 0 * inf is NaN, which the search sends to the bottom entry).

    Needs a sorted 256-entry code (bnb's kernel assumes one); code=None means the signed dynamic map. Same input
    checks as `quantize_blockwise`. Not measured against a GPU here: it is the kernel's rule, written out."""
    xp = check_quant_input(A)
    blocksize = check_blocksize(blocksize, ALLOWED_BLOCKSIZES)
    code = create_dynamic_map(signed=True, xp=xp) if code is None else check_code(code, xp)
    if code.size != 256 or bool((code[1:] < code[:-1]).any()):
        raise ValueError("the CUDA search needs a sorted 256-entry code")
    flat = A.reshape(-1).astype(xp.float32, copy=False)                  # (n,)
    n = flat.size
    full = n - n % blocksize
    absmax = xp.empty(-(-n // blocksize), dtype=xp.float32)              # (n_blocks,)
    absmax[:full // blocksize] = xp.abs(flat[:full].reshape(-1, blocksize)).max(axis=1)
    if full < n:
        absmax[-1] = xp.abs(flat[full:]).max()
    if not bool(xp.isfinite(absmax).all()):
        _refuse(A)
    zero = absmax == 0                                                   # (n_blocks,)
    inv = xp.float32(1) / xp.where(zero, xp.float32(1), absmax)          # (n_blocks,)
    q = cuda_search_code(flat * xp.repeat(inv, blocksize)[:n], code)     # (n,)
    q[xp.repeat(zero, blocksize)[:n]] = 0
    return q.reshape(A.shape), QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize,
                                          dtype=A.dtype)
