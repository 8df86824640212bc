"""The 4-bit quantizer in the shape of its math: read this first, then `fourbit.py` (the fast path, same bytes).

For each block of `blocksize` consecutive (C-order) values x_i, after casting to float32:
    absmax  = max_i |x_i|                                        stored per block, float32
    s_i     = x_i * (1 / max(absmax, 1e-38))                     a full block: reciprocal, then multiply
    s_i     = x_i / max(absmax, 1e-38)                           the partial last block: true division (and its
                                                                 stored absmax is the clamped one)
    code_i  = the index of the table value nearest to s_i        "nearest" = count the midpoints between sorted
                                                                 neighbours that lie strictly below s_i, so a value
                                                                 exactly on a midpoint goes to the LOWER code
    byte_j  = code_{2j} << 4 | code_{2j+1}                       two codes per byte, the even element in the high
                                                                 nibble; odd n gets one 0.0 appended after scaling
    x'_i    = table[code_i] * absmax                             float32, then cast to the input dtype
Double quantization stores absmax itself as 8-bit codes: absmax ~ dyn[qa] * absmax2 + offset (see fourbit.py).

Mirrors bitsandbytes' readable fallback, `bitsandbytes/backends/default/ops.py` (quantize_4bit / dequantize_4bit,
0.50.x): absmax, scale, pad, `torch.bucketize(scaled, midpoints)`, pack nibbles. `tests/quant/test_reference.py`
checks that these two functions give the same bytes, absmax and outputs as `quantize_4bit` / `dequantize_4bit` on
every parity case; `docs/quantization.md` explains each rule. Slow on purpose (one pass per step, a binary search
per value, full-size temporaries): the fast path does the same arithmetic in cache-sized chunks with a lookup table.
"""
from __future__ import annotations

from minilora.backend import get_array_module
from minilora.quant.codebooks import get_4bit_type
from minilora.quant.state import QuantState


def quantize_4bit_reference(A, blocksize: int = 64, quant_type: str = "nf4"):
    """A (any shape, float16/32/64) -> (packed uint8 ((n+1)//2, 1), QuantState). No input checks, no DQ."""
    xp = get_array_module(A)
    code = get_4bit_type(quant_type, xp=xp)                              # (16,) float32, index = 4-bit code
    order = xp.asarray(sorted(range(16), key=lambda i: float(code[i])))  # (16,) sorted position -> code (stable)
    mid = (code[order[:-1]] + code[order[1:]]) / 2                       # (15,) midpoints between sorted neighbours
    x = A.reshape(-1).astype(xp.float32)                                 # (n,)
    n, full = x.size, x.size - x.size % blocksize
    blocks = x[:full].reshape(-1, blocksize)                             # (n_full, blocksize)
    absmax = xp.abs(blocks).max(axis=1)                                  # (n_full,)
    scaled = (blocks * (xp.float32(1) / xp.maximum(absmax, xp.float32(1e-38)))[:, None]).reshape(-1)   # (full,)
    if full < n:                                                         # the partial last block
        tail = xp.maximum(xp.abs(x[full:]).max(), xp.float32(1e-38))    # () clamped, and stored clamped
        absmax = xp.concatenate([absmax, tail[None]])                    # (n_blocks,)
        scaled = xp.concatenate([scaled, x[full:] / tail])               # (n,)
    if n % 2:
        scaled = xp.concatenate([scaled, xp.zeros(1, dtype=xp.float32)])  # (n + 1,) pad one 0.0 after scaling
    q = order[xp.searchsorted(mid, scaled, side="left")].astype(xp.uint8)   # (2m,) nearest code, ties -> lower
    packed = (q[0::2] << 4) | q[1::2]                                    # (m,) even element in the high nibble
    return packed.reshape(-1, 1), QuantState(absmax, A.shape, code, blocksize, quant_type, dtype=A.dtype)


def dequantize_4bit_reference(packed, state: QuantState):
    """packed bytes + QuantState -> array of state.shape and state.dtype:  x' = table[code] * absmax(block)."""
    xp = get_array_module(packed)
    p = packed.reshape(-1)                                               # (m,)
    q = xp.stack([p >> 4, p & 15], axis=1).reshape(-1)[:state.numel]     # (n,) codes, high nibble first
    absmax = state.absmax                                                # (n_blocks,) float32
    if state.nested:                                                     # DQ: absmax = dyn[qa] * absmax2 + offset
        s2 = state.state2
        absmax = s2.code[absmax] * xp.repeat(s2.absmax, s2.blocksize)[:absmax.size] + state.offset
    x = state.code[q] * xp.repeat(absmax, state.blocksize)[:q.size]      # (n,) float32
    return x.astype(state.dtype).reshape(state.shape)
