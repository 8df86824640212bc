"""Grader for ex04_double_quant.py (notebook 04): compared with minilora.quant.fourbit.double_quantize and
minilora.quant.state.QuantState, as bitsandbytes' quantize_4bit(compress_statistics=True) stores them."""
import numpy as np
from grading import GRADE, check_array, check_codes, check_value
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.memory import bits_per_param
from minilora.quant import quantize_4bit
from minilora.quant.codebooks import create_dynamic_map, get_4bit_type
from minilora.quant.fourbit import dequantize_absmax, double_quantize
from minilora.quant.state import QuantState

EXERCISE = "ex04_double_quant"
DYN = create_dynamic_map(signed=True)                                # (256,) float32, ascending


def absmax_of(seed, n_blocks, scale=1.0):
    """The float32 absmax of n_blocks NF4 blocks of 64 normal weights (what double quantization compresses)."""
    w = np.random.default_rng(seed).standard_normal((n_blocks, 64)) * scale
    return np.abs(w).max(axis=1).astype(np.float32)                  # (n_blocks,)


def reference(absmax):
    state = QuantState(absmax=absmax.copy(), shape=(absmax.size * 64,), code=get_4bit_type("nf4"), blocksize=64,
                       quant_type="nf4", dtype=np.float32)
    return double_quantize(state)


cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 1200), st.sampled_from([1e-3, 0.02, 1.0, 50.0]))


@GRADE
@given(case=cases)
@example(case=(0, 1024, 0.02))
@example(case=(1, 300, 1.0))                                         # 300 blocks: a short last nested block
@example(case=(2, 1, 1.0))
def test_double_quantize(ex, case):
    absmax = absmax_of(*case)
    st2 = reference(absmax)
    inputs = {"absmax": absmax, "code": "the dynamic map (256,)", "blocksize": 256}
    qa, absmax2, offset = ex.double_quantize(absmax.copy(), DYN, 256)
    check_value("double_quantize(...)[2], the offset", float(offset), float(st2.offset), inputs, rel=1e-6)
    # (an all-zero nested block may store 0 or bitsandbytes' 1e-38 clamp: both are accepted)
    check_array("double_quantize(...)[1], absmax2", np.asarray(absmax2), st2.state2.absmax, inputs, rtol=1e-6,
                atol=1e-37)
    a2 = np.repeat(st2.state2.absmax.astype(np.float64), 256)[:absmax.size]
    target = (absmax.astype(np.float64) - float(st2.offset)) / np.maximum(a2, 1e-38)
    check_codes("double_quantize(...)[0], the 8-bit codes", qa, st2.absmax, inputs, target=target,
                value_of=lambda c: DYN.astype(np.float64)[c], slack=1e-5)


@GRADE
@given(case=cases)
@example(case=(0, 1024, 0.02))
@example(case=(1, 300, 1.0))
def test_dequantize_absmax(ex, case):
    absmax = absmax_of(*case)
    st2 = reference(absmax)
    expected = dequantize_absmax(st2)
    got = ex.dequantize_absmax(st2.absmax, st2.state2.absmax, st2.offset, DYN, 256)
    check_array("dequantize_absmax(qa, absmax2, offset, code, blocksize)", got, expected,
                {"qa": st2.absmax, "absmax2": st2.state2.absmax, "offset": float(st2.offset), "blocksize": 256},
                rtol=1e-6, atol=1e-7)


@GRADE
@given(blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 4096]), double_quant=st.booleans(),
       nested_blocksize=st.sampled_from([64, 128, 256, 512]))
@example(blocksize=64, double_quant=True, nested_blocksize=256)
@example(blocksize=64, double_quant=False, nested_blocksize=256)
def test_bits_per_param(ex, blocksize, double_quant, nested_blocksize):
    expected = bits_per_param(blocksize, double_quant, nested_blocksize)
    check_value("bits_per_param(blocksize, double_quant, nested_blocksize)",
                ex.bits_per_param(blocksize, double_quant, nested_blocksize), expected,
                {"blocksize": blocksize, "double_quant": double_quant, "nested_blocksize": nested_blocksize},
                rel=1e-12)


@GRADE
@given(n=st.integers(1, 70_000), blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans())
@example(n=1024 * 1024 // 16, blocksize=64, double_quant=True)
@example(n=64 * 257, blocksize=64, double_quant=True)               # 257 blocks: two nested blocks
@example(n=100, blocksize=64, double_quant=False)
def test_stats_nbytes(ex, n, blocksize, double_quant):
    _, state = quantize_4bit(np.ones(n, np.float32), blocksize=blocksize, compress_statistics=double_quant)
    check_value("stats_nbytes(n, blocksize, double_quant)", ex.stats_nbytes(n, blocksize, double_quant),
                state.stats_nbytes, {"n": n, "blocksize": blocksize, "double_quant": double_quant})
