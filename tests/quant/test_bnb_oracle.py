"""The oracle rule of bnb_oracle.py, proven without torch or bitsandbytes: a known upstream fault becomes a named,
counted xfail; a minilora fault or an unknown upstream deviation fails."""
import numpy as np
import pytest
from bnb_oracle import KNOWN_FAULTS, BnbOracle, hand_dequantize_4bit, unpack_4bit

from minilora.quant import dequantize_4bit, get_4bit_type, quantize_4bit

FAULT = "bnb-0.50-cpu-dequantize_4bit-avx512"


def case(blocksize, dq=False, shape=(8, 64)):
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    packed, st = quantize_4bit(x, blocksize=blocksize, compress_statistics=dq)
    return packed, st, dequantize_4bit(packed, st), hand_dequantize_4bit(packed, st)


def test_hand_computation_is_code_times_absmax():
    packed, st, ours, hand = case(64)
    q = unpack_4bit(packed, 512)
    assert np.array_equal(hand.reshape(-1), get_4bit_type("nf4")[q] * np.repeat(st.absmax, 64))
    assert np.array_equal(ours, hand)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512])
def test_minilora_equals_hand_computation(blocksize, dq):
    _, _, ours, hand = case(blocksize, dq)
    assert np.array_equal(ours.view(np.uint32), hand.view(np.uint32))


def test_agreeing_oracle_passes():
    _, _, ours, hand = case(128)
    oracle = BnbOracle()
    oracle.check("dequantize_4bit", ours, hand, hand.copy(), 128, "clean")
    oracle.finish()                                         # no xfail, no failure
    assert oracle.deviations == {}


def test_known_fault_is_counted_and_named():
    _, _, ours, hand = case(128)
    broken = hand.copy()
    broken.reshape(-1)[:334] += 1.0
    oracle = BnbOracle()
    oracle.check("dequantize_4bit", ours, hand, broken, 128, "plain (8, 64) bs=128")
    assert oracle.deviations == {FAULT: [("plain (8, 64) bs=128", 334, 512)]}
    with pytest.raises(pytest.xfail.Exception, match=r"\[bnb-0.50-cpu-dequantize_4bit-avx512\].*334 of 512"):
        oracle.finish()


def test_minilora_fault_fails_even_where_bnb_is_broken():
    _, _, ours, hand = case(128)
    wrong = ours.copy()
    wrong.reshape(-1)[5] *= 1.5                            # a planted minilora fault
    broken = hand.copy()
    broken.reshape(-1)[:334] += 1.0
    with pytest.raises(AssertionError, match="minilora dequantize_4bit"):
        BnbOracle().check("dequantize_4bit", wrong, hand, broken, 128, "planted")


def test_unknown_upstream_deviation_fails():
    _, _, ours, hand = case(64)                            # (8, 64): rows are whole blocks of 64
    broken = hand.copy()
    broken.reshape(-1)[0] += 1.0
    with pytest.raises(pytest.fail.Exception, match=r"no known upstream fault explains it \(blocksize 64\)"):
        BnbOracle().check("dequantize_4bit", ours, hand, broken, 64, "bs=64")
    _, _, ours, hand = case(32, shape=(5000,))             # 1-D: no known fault covers any blocksize
    broken = hand.copy()
    broken[7] += 1.0
    with pytest.raises(pytest.fail.Exception, match="in 1 of 5000 values"):
        BnbOracle().check("dequantize_4bit", ours, hand, broken, 32, "1-D")


def test_known_faults_explain_only_their_cases():
    hand = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)
    theirs = np.array([[-0.0, 0.25], [0.25, 1.0]], np.float32)
    avx = KNOWN_FAULTS[FAULT][1]
    assert avx("dequantize_4bit", 128, hand, theirs).all() and avx("dequantize_4bit", 256, hand, theirs).all()
    assert not avx("dequantize_4bit", 32, hand, theirs).any() and not avx("quantize_4bit", 128, hand, theirs).any()
    assert not avx("dequantize_4bit", 2048, hand, theirs).any()
    assert not avx("dequantize_4bit", 128, hand.reshape(-1), theirs.reshape(-1)).any()        # 1-D: not this fault
    rows_of_whole_blocks = np.zeros((4, 256), np.float32)
    assert not avx("dequantize_4bit", 128, rows_of_whole_blocks, rows_of_whole_blocks).any()
    zero = KNOWN_FAULTS["bnb-0.50-cpu-dequantize_4bit-fp4-negative-zero"][1]
    assert zero("dequantize_4bit", 64, hand, theirs).tolist() == [[True, False], [False, False]]


def test_negative_zero_is_named_and_other_values_still_fail():
    _, _, ours, hand = case(64)
    theirs = hand.copy()
    flat = theirs.reshape(-1)
    oracle = BnbOracle()
    ours_z, hand_z = ours.copy(), hand.copy()
    ours_z.reshape(-1)[3] = hand_z.reshape(-1)[3] = 0.0
    flat[3] = -0.0
    oracle.check("dequantize_4bit", ours_z, hand_z, theirs, 64, "fp4 zero")
    assert oracle.deviations == {"bnb-0.50-cpu-dequantize_4bit-fp4-negative-zero": [("fp4 zero", 1, 512)]}
    flat[7] += 1.0
    with pytest.raises(pytest.fail.Exception, match="in 1 of 512 values"):
        oracle.check("dequantize_4bit", ours_z, hand_z, theirs, 64, "fp4 zero + one wrong")
