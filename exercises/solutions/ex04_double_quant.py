"""Notebook 04, double quantization: storing the absmax of 4-bit blocks in 8 bits.

At blocksize 64 each float32 absmax costs 32/64 = 0.5 bits per parameter. QLoRA's double quantization (Dettmers et
al. 2023, arXiv 2305.14314, §3) subtracts their mean (one float32 offset per tensor) and quantizes the centred
values with the 8-bit dynamic map in blocks of 256, each with its own float32 absmax2: 8/64 + 32/(64·256) bits.
Reference: bitsandbytes/functional.py quantize_4bit(compress_statistics=True), minilora.quant.fourbit.
"""
from __future__ import annotations

import math

import numpy as np


def _nearest(scaled, code):
    """Given: the index (uint8) of the nearest value of an ascending float32 table, ties to the lower code."""
    mid = (code[:-1] + code[1:]) / 2                                     # (k-1,)
    return np.searchsorted(mid, scaled, side="left").astype(np.uint8)


def double_quantize(absmax, code, blocksize: int = 256):
    """Quantize the float32 block scales `absmax` (n,). Returns (qa uint8 (n,), absmax2 float32 (n2,), offset).

    offset = mean(absmax) (computed in float64, returned as np.float32); c = absmax - offset (float32); in blocks of
    `blocksize` consecutive values of c (the last one may be shorter) absmax2 = max |c| and qa = the index of the
    nearest value of `code` (the 256-entry dynamic map, ascending) to c / absmax2. n2 = ceil(n / blocksize).
    You may use the given _nearest(scaled, code).
    """
    offset = np.float32(absmax.mean(dtype=np.float64))                   # ()
    c = absmax - offset                                                  # (n,) centred around 0
    n, n2 = c.size, -(-c.size // blocksize)
    padded = np.zeros(n2 * blocksize, np.float32)                        # (n2·bs,)
    padded[:n] = c
    blocks = padded.reshape(n2, blocksize)                               # (n2, bs)
    absmax2 = np.abs(blocks).max(axis=1)                                 # (n2,)
    scaled = blocks / np.maximum(absmax2, np.float32(1e-38))[:, None]    # (n2, bs)
    qa = _nearest(scaled.reshape(-1)[:n], code)                          # (n,)
    return qa, absmax2, offset


def dequantize_absmax(qa, absmax2, offset, code, blocksize: int = 256):
    """Rebuild the block scales: absmax[i] ≈ code[qa[i]] · absmax2[i // blocksize] + offset. Returns float32 (n,)."""
    scale = np.repeat(absmax2, blocksize)[:qa.size]                      # (n,)
    return code[qa] * scale + np.float32(offset)                         # (n,)


def bits_per_param(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage of blockwise 4-bit weights in bits per parameter, for a large tensor (ignore rounding up).

    Without double quantization: 4 + 32/blocksize (4.5 at 64). With it: 4 + 8/blocksize + 32/(blocksize ·
    nested_blocksize) (4.127 at 64 and 256).
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def stats_nbytes(n: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Exact bytes of the scaling statistics of one 4-bit tensor of n values (the codes not included).

    n_blocks = ceil(n / blocksize). Without DQ: a float32 absmax per block. With DQ: a uint8 code per block, a
    float32 absmax2 per ceil(n_blocks / nested_blocksize) nested block, and the float32 offset.
    """
    n_blocks = math.ceil(n / blocksize)
    if not double_quant:
        return 4 * n_blocks
    return n_blocks + 4 * math.ceil(n_blocks / nested_blocksize) + 4
