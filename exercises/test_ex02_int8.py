"""Grader for ex02_int8.py (notebook 02): compared with minilora.quant.int8.

Codes must equal minilora's, except where the exact value 127·x/absmax sits on a rounding tie (x.5) and a last-bit
difference in how the scale was computed rounds it the other way; both answers are then accepted.
"""
import numpy as np
from grading import GRADE, check_array, check_codes, seeded
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora.quant.int8 import (
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_quant,
    int8_vectorwise_quant,
)

EXERCISE = "ex02_int8"

floats = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
arrays_2d = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=40), elements=floats)
arrays_any = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=24), elements=floats)
SEEDED = seeded(0, (8, 64))
SEEDED[3, 5] = 40.0                                  # an outlier
SEEDED[6] = 0.0                                      # an all-zero row
SKEWED = np.abs(seeded(1, (4, 32))) * -1             # all negative: the absmax is -min, not max
SKEWED[0, 0] = 0.5


def codes_target(x, absmax):
    """127·x/absmax in float64 (0 where absmax is 0): the value each code rounds."""
    a = np.asarray(absmax, np.float64)
    return np.where(a > 0, 127 * x.astype(np.float64) / np.where(a > 0, a, 1), 0.0)


def check_q(what, q, q_exp, x, absmax, inputs):
    check_codes(what, q, q_exp, inputs, target=codes_target(x, absmax), value_of=lambda c: c.astype(np.float64),
                slack=1e-3)


@GRADE
@given(x=arrays_any)
@example(x=SEEDED)
@example(x=SKEWED)
def test_absmax_quantize_tensorwise(ex, x):
    q_exp, a_exp = int8_tensorwise_quant(x)
    q, a = ex.absmax_quantize_tensorwise(x)
    inputs = {"x": x}
    check_array("absmax_quantize_tensorwise(x)[1], the absmax", np.asarray(a), a_exp, inputs)
    check_q("absmax_quantize_tensorwise(x)[0], the int8 codes", q, q_exp, x, a_exp, inputs)


@GRADE
@given(x=arrays_2d)
@example(x=SEEDED)
@example(x=SKEWED)
@example(x=seeded(2, (16, 16)))
def test_absmax_quantize_rowwise(ex, x):
    q_exp, a_exp, _ = int8_vectorwise_quant(x)
    q, a = ex.absmax_quantize_rowwise(x)
    inputs = {"x": x}
    check_array("absmax_quantize_rowwise(x)[1], the absmax of each row", np.asarray(a), a_exp, inputs)
    check_q("absmax_quantize_rowwise(x)[0], the int8 codes", q, q_exp, x, a_exp[..., None], inputs)


@GRADE
@given(x=arrays_any, blocksize=st.sampled_from([64, 128, 256]))
@example(x=SEEDED, blocksize=64)
@example(x=seeded(3, (5, 50)), blocksize=64)        # 250 values: the last block holds 58
@example(x=SKEWED, blocksize=64)
def test_absmax_quantize_blockwise(ex, x, blocksize):
    q_exp, a_exp = int8_blockwise_quant(x, blocksize)
    q, a = ex.absmax_quantize_blockwise(x, blocksize)
    inputs = {"x": x, "blocksize": blocksize}
    check_array("absmax_quantize_blockwise(x, blocksize)[1], the absmax of each block", np.asarray(a), a_exp, inputs)
    per_value = np.repeat(a_exp, blocksize)[:x.size].reshape(x.shape)
    check_q("absmax_quantize_blockwise(x, blocksize)[0], the int8 codes", q, q_exp, x, per_value, inputs)


@GRADE
@given(x=arrays_any, blocksize=st.sampled_from([64, 128, 256]))
@example(x=SEEDED, blocksize=64)
@example(x=seeded(4, (3, 100)), blocksize=128)
def test_absmax_dequantize_blockwise(ex, x, blocksize):
    q, a = int8_blockwise_quant(x, blocksize)
    expected = int8_blockwise_dequant(q, a, blocksize)
    got = ex.absmax_dequantize_blockwise(q, a, blocksize)
    check_array("absmax_dequantize_blockwise(q, absmax, blocksize)", got, expected,
                {"q": q, "absmax": a, "blocksize": blocksize}, rtol=1e-6)
