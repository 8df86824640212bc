"""Grader for ex03_nf4.py (notebook 03): compared with minilora.quant.codebooks and minilora.quant.fourbit.

4-bit codes must equal minilora's (bit for bit, as bitsandbytes'), except where x/absmax lies within 1e-6 of a
decision threshold: there a last-bit difference in the division may pick the other neighbour, and both are accepted.
"""
import numpy as np
from grading import GRADE, check_array, check_codes, seeded
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora.quant import create_normal_map, dequantize_4bit, get_4bit_type, quantize_4bit
from minilora.quant.blockwise import nearest_code
from minilora.quant.fourbit import pack_4bit

EXERCISE = "ex03_nf4"
NF4 = get_4bit_type("nf4")                                           # (16,) float32, bitsandbytes' table

floats = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


def blocks_of(blocksize, max_blocks=6):
    """float32 arrays whose size is a multiple of blocksize."""
    return st.integers(1, max_blocks).flatmap(
        lambda k: hnp.arrays(np.float32, (k, blocksize), elements=floats))


def reference_codes(x, blocksize):
    """minilora's NF4 codes (unpacked) and absmax of x."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    p = packed.reshape(-1)
    codes = np.stack([p >> 4, p & 15], axis=1).reshape(-1)                       # (n,) high nibble first
    return codes, state.absmax, packed, state


@GRADE
@given(offset=st.floats(0.9, 0.99))
@example(offset=0.9677083)
@example(offset=0.95)
def test_nf4_codebook(ex, offset):
    expected = create_normal_map(offset)
    got = ex.nf4_codebook(offset)
    check_array("nf4_codebook(offset)", got, expected, {"offset": offset}, atol=2e-6)
    if offset == 0.9677083:
        check_array("nf4_codebook() against bitsandbytes' hardcoded NF4 table", got, NF4, {"offset": offset},
                    atol=2e-6)


@GRADE
@given(scaled=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1, 1, width=32)))
@example(scaled=((NF4[:-1] + NF4[1:]) / 2).astype(np.float32))      # exactly on every threshold: ties go down
@example(scaled=NF4.copy())                                          # the table values themselves
@example(scaled=np.linspace(-1, 1, 201, dtype=np.float32))
def test_nearest_code(ex, scaled):
    expected = nearest_code(scaled, NF4)
    got = ex.nearest_code(scaled, NF4)
    inputs = {"scaled": scaled, "code": NF4}
    if np.isin(scaled, (NF4[:-1] + NF4[1:]) / 2).any():
        inputs["note"] = "some values lie exactly on a threshold (code[i] + code[i+1]) / 2: they go to the LOWER code"
    check_array("nearest_code(scaled, code=NF4)", got, expected, inputs)


@GRADE
@given(x=blocks_of(64), blocksize=st.just(64))
@example(x=seeded(0, (4, 64)), blocksize=64)
@example(x=seeded(1, (2, 128)), blocksize=128)
@example(x=np.concatenate([seeded(2, 64), np.zeros(64, np.float32)]), blocksize=64)    # an all-zero block
def test_quantize_nf4(ex, x, blocksize):
    codes_exp, absmax_exp, _, _ = reference_codes(x, blocksize)
    codes, absmax = ex.quantize_nf4(x, NF4, blocksize)
    inputs = {"x": x, "code": NF4, "blocksize": blocksize}
    check_array("quantize_nf4(x, code, blocksize)[1], the absmax of each block", np.asarray(absmax), absmax_exp,
                inputs)
    a = np.repeat(absmax_exp.astype(np.float64), blocksize)
    target = np.where(a > 0, x.reshape(-1).astype(np.float64) / np.where(a > 0, a, 1), 0.0)   # (n,) exact x/absmax
    check_codes("quantize_nf4(x, code, blocksize)[0], the 4-bit codes", codes, codes_exp, inputs, target=target,
                value_of=lambda c: NF4.astype(np.float64)[c], slack=1e-6)


@GRADE
@given(codes=hnp.arrays(np.uint8, st.integers(1, 100).map(lambda m: 2 * m), elements=st.integers(0, 15)))
@example(codes=np.array([1, 2], np.uint8))
@example(codes=np.arange(16, dtype=np.uint8))
def test_pack_4bit(ex, codes):
    expected = pack_4bit(codes)
    got = ex.pack_4bit(codes)
    check_array("pack_4bit(codes)", got, expected, {"codes": codes})


@GRADE
@given(codes=hnp.arrays(np.uint8, st.integers(1, 100).map(lambda m: 2 * m), elements=st.integers(0, 15)))
@example(codes=np.array([1, 2], np.uint8))
@example(codes=np.arange(16, dtype=np.uint8)[::-1].copy())
def test_unpack_4bit(ex, codes):
    packed = pack_4bit(codes)                                        # minilora's packing of known codes
    got = ex.unpack_4bit(packed)
    check_array("unpack_4bit(packed)", got, codes, {"packed": packed})


@GRADE
@given(x=blocks_of(64), blocksize=st.just(64))
@example(x=seeded(0, (4, 64)), blocksize=64)
@example(x=seeded(3, (2, 128), scale=5.0), blocksize=128)
def test_dequantize_nf4(ex, x, blocksize):
    _, _, packed, state = reference_codes(x, blocksize)
    expected = dequantize_4bit(packed, state).reshape(-1)
    got = ex.dequantize_nf4(packed.reshape(-1), state.absmax, NF4, blocksize)
    check_array("dequantize_nf4(packed, absmax, code, blocksize)", got, expected,
                {"packed": packed.reshape(-1), "absmax": state.absmax, "code": NF4, "blocksize": blocksize},
                rtol=1e-7)
