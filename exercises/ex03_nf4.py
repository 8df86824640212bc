"""Notebook 03, NF4: the NormalFloat table, blockwise 4-bit quantization and nibble packing.

NF4 (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, §3) has 16 values built from quantiles of N(0, 1), rescaled to
[-1, 1], with an exact zero. A tensor is cut into blocks of 64; each block is divided by its absmax, each value gets
the index (0..15) of the nearest table value, and two indices share one byte, the EVEN element in the HIGH nibble.
Reference: bitsandbytes/functional.py (create_normal_map, quantize_4bit), minilora.quant.codebooks and
minilora.quant.fourbit.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex03_nf4.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

from statistics import NormalDist  # noqa: F401 (used by the code you write)

import numpy as np  # noqa: F401 (used by the code you write)


def nf4_codebook(offset: float = 0.9677083):
    """The NF4 table the way bitsandbytes' create_normal_map builds it. Returns float32 (16,), ascending.

    8 positive values Φ⁻¹(p) for p in linspace(offset, 0.5, 9) without its last point (0.5),
    7 negative values -Φ⁻¹(p) for p in linspace(offset, 0.5, 8) without its last point, and one 0.
    Sort them and divide by the largest, so the table runs from -1 to exactly 1. Φ⁻¹ is the standard normal
    quantile function: statistics.NormalDist().inv_cdf (or scipy.stats.norm.ppf). offset = 0.9677083 is the mean
    of 1 - 1/(2·15) and 1 - 1/(2·16); Φ⁻¹(1) would be infinite.
    """
    raise NotImplementedError("exercise: implement nf4_codebook (see its docstring)")


def nearest_code(scaled, code):
    """Index of the nearest table value for each scaled value. Returns uint8 of scaled's shape.

    scaled float32 (any shape, values in [-1, 1]); code float32 (k,) sorted ascending. Use the decision
    thresholds mid = (code[:-1] + code[1:]) / 2 computed in float32; a value exactly on a threshold goes to the
    LOWER code (np.searchsorted(mid, v, side="left") counts the thresholds strictly below v).
    """
    raise NotImplementedError("exercise: implement nearest_code (see its docstring)")


def quantize_nf4(x, code, blocksize: int = 64):
    """Blockwise 4-bit quantization, before packing. Returns (codes uint8 (n,), absmax float32 (n_blocks,)).

    x float (any shape, x.size a multiple of blocksize), code float32 (16,) ascending (the NF4 table).
    Per block of `blocksize` consecutive values (C order): absmax = max |x|, then each value's code is
    nearest_code(x / absmax, code). An all-zero block stores absmax 0 and the code of 0.0 (divide by
    max(absmax, 1e-38) to avoid 0/0).
    """
    raise NotImplementedError("exercise: implement quantize_nf4 (see its docstring)")


def pack_4bit(codes):
    """Two 4-bit codes per byte: byte j = (codes[2j] << 4) | codes[2j+1], the EVEN element in the HIGH nibble.

    codes uint8 (2m,) with values 0..15. Returns uint8 (m,).
    """
    raise NotImplementedError("exercise: implement pack_4bit (see its docstring)")


def unpack_4bit(packed):
    """The inverse of pack_4bit: uint8 (m,) -> uint8 (2m,) codes, high nibble first."""
    raise NotImplementedError("exercise: implement unpack_4bit (see its docstring)")


def dequantize_nf4(packed, absmax, code, blocksize: int = 64):
    """x'[i] = code[c_i] · absmax[i // blocksize] in float32, c = unpack_4bit(packed). Returns float32 (2m,).

    packed uint8 (m,), absmax float32 (n_blocks,), code float32 (16,).
    """
    raise NotImplementedError("exercise: implement dequantize_nf4 (see its docstring)")
