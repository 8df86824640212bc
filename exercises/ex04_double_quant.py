"""Notebook 04, double quantization: storing the absmax of 4-bit blocks in 8 bits.

At blocksize 64 each float32 absmax costs 32/64 = 0.5 bits per parameter. QLoRA's double quantization (Dettmers et
al. 2023, arXiv 2305.14314, §3) subtracts their mean (one float32 offset per tensor) and quantizes the centred
values with the 8-bit dynamic map in blocks of 256, each with its own float32 absmax2: 8/64 + 32/(64·256) bits.
Reference: bitsandbytes/functional.py quantize_4bit(compress_statistics=True), minilora.quant.fourbit.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex04_double_quant.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)

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
    raise NotImplementedError("exercise: implement double_quantize (see its docstring)")


def dequantize_absmax(qa, absmax2, offset, code, blocksize: int = 256):
    """Rebuild the block scales: absmax[i] ≈ code[qa[i]] · absmax2[i // blocksize] + offset. Returns float32 (n,)."""
    raise NotImplementedError("exercise: implement dequantize_absmax (see its docstring)")


def bits_per_param(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """Storage of blockwise 4-bit weights in bits per parameter, for a large tensor (ignore rounding up).

    Without double quantization: 4 + 32/blocksize (4.5 at 64). With it: 4 + 8/blocksize + 32/(blocksize ·
    nested_blocksize) (4.127 at 64 and 256).
    """
    raise NotImplementedError("exercise: implement bits_per_param (see its docstring)")


def stats_nbytes(n: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Exact bytes of the scaling statistics of one 4-bit tensor of n values (the codes not included).

    n_blocks = ceil(n / blocksize). Without DQ: a float32 absmax per block. With DQ: a uint8 code per block, a
    float32 absmax2 per ceil(n_blocks / nested_blocksize) nested block, and the float32 offset.
    """
    raise NotImplementedError("exercise: implement stats_nbytes (see its docstring)")
