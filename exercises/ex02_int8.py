"""Notebook 02, absmax int8: one scale per tensor, per row, or per block.

absmax quantization maps x to the int8 code q = round(127 · x / absmax), so the largest |x| lands on ±127, and
back with x' = q · absmax / 127. Only the set of values that share one absmax changes: the whole tensor, each row
(LLM.int8's vector-wise scale, Dettmers et al. 2022, arXiv 2208.07339) or each block of consecutive values (the
idea QLoRA's 4-bit format builds on). Rounding is half to even (np.rint). A group whose absmax is 0 stores codes 0.
Reference: minilora.quant.int8.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex02_int8.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import numpy as np  # noqa: F401 (used by the code you write)


def absmax_quantize_tensorwise(x):
    """One absmax for the whole tensor: absmax = max |x|, q = rint(x · 127 / absmax).

    x float array of any shape. Returns (q int8 of x's shape, absmax float32 0-d array or scalar).
    An all-zero x gives absmax 0 and q all 0.
    """
    raise NotImplementedError("exercise: implement absmax_quantize_tensorwise (see its docstring)")


def absmax_quantize_rowwise(x):
    """One absmax per row (the last axis): absmax[i] = max_k |x[i, k]|, q[i, k] = rint(x[i, k] · 127 / absmax[i]).

    x float array (..., K). Returns (q int8 (..., K), absmax float32 (...,)). A row of zeros gives absmax 0, q 0.
    """
    raise NotImplementedError("exercise: implement absmax_quantize_rowwise (see its docstring)")


def absmax_quantize_blockwise(x, blocksize: int = 64):
    """One absmax per block of `blocksize` consecutive values of x flattened in C order.

    The last block may be shorter; it gets its own absmax. Returns (q int8 of x's shape, absmax float32
    (n_blocks,)) with n_blocks = ceil(x.size / blocksize). Same formula as above within each block.
    """
    raise NotImplementedError("exercise: implement absmax_quantize_blockwise (see its docstring)")


def absmax_dequantize_blockwise(q, absmax, blocksize: int = 64):
    """The inverse map: x'[i] = q[i] · absmax[i // blocksize] / 127, float32 of q's shape.

    q int8 (any shape, blocks over its C-order flattening), absmax float32 (n_blocks,).
    """
    raise NotImplementedError("exercise: implement absmax_dequantize_blockwise (see its docstring)")
