"""8-bit dynamic blockwise quantization: golden numbers, zero blocks, the LUT emulation, errors, backends."""
import numpy as np
import pytest
from quant_reference import errors

from minilora import backend
from minilora.quant import create_dynamic_map, dequantize_blockwise, quantize_blockwise, quantize_blockwise_lut


def test_golden_exact_nearest(pinned):
    q, st = quantize_blockwise(pinned, blocksize=4096)
    assert q.shape == pinned.shape and q.dtype == np.uint8 and st.absmax.shape == (256,)
    a, r = errors(pinned, dequantize_blockwise(q, st))
    assert abs(a - 0.010053) < 1e-6 and abs(r - 0.017001) < 1e-6
    assert a < 0.011 and r < 0.018                                       # bnb's test bound for randn


def test_golden_lut_emulation(pinned):
    q, st = quantize_blockwise(pinned, blocksize=4096)
    lq, lst = quantize_blockwise_lut(pinned, blocksize=4096)
    assert int((q != lq).sum()) == 1879                                  # of 1,048,576 (docs/quantization.md §4.3)
    assert np.array_equal(st.absmax, lst.absmax)
    a, r = errors(pinned, dequantize_blockwise(lq, lst))
    assert abs(a - 0.010053) < 1e-6 and abs(r - 0.017271) < 1e-6


def test_zero_blocks_and_partial_block(xp):
    x = xp.zeros(300, dtype=xp.float32)
    x[256:] = 2.0
    q, st = quantize_blockwise(x, blocksize=128)
    qh = backend.to_numpy(q)
    assert (qh[:256] == 127).all() and (qh[256:] == 255).all()           # zero -> code 127; 1.0 -> 255
    assert backend.to_numpy(st.absmax).tolist() == [0.0, 0.0, 2.0]
    lq, _ = quantize_blockwise_lut(backend.to_numpy(x), blocksize=128)
    assert (lq[:256] == 0).all()                                         # bnb's CPU kernel writes code 0 there
    y = dequantize_blockwise(q, st)
    assert backend.to_numpy(y).tolist() == backend.to_numpy(x).tolist()


def test_custom_unsorted_code_is_sorted_first():
    code = np.array([1.0, -1.0, 0.0, 0.5], np.float32)                   # codes 0..3, unsorted on purpose
    x = np.array([1.0, -0.9, 0.1, 0.6, 0.25, -0.5], np.float32)
    q, st = quantize_blockwise(x, code=code, blocksize=64)
    assert q.tolist() == [0, 1, 2, 3, 2, 1]                              # 0.25 is a tie -> the lower value, 0
    np.testing.assert_array_equal(dequantize_blockwise(q, st), code[q])


def test_bad_input_and_mismatch():
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_blockwise(np.array([1.0, np.inf], np.float32))
    with pytest.raises(TypeError):
        quantize_blockwise(np.ones(4, np.int64))
    with pytest.raises(ValueError, match="allowed block sizes"):
        quantize_blockwise(np.ones(4, np.float32), blocksize=100)
    with pytest.raises(ValueError, match="2..256"):
        quantize_blockwise(np.ones(4, np.float32), code=np.zeros(300, np.float32))
    q, st = quantize_blockwise(np.ones(100, np.float32), blocksize=64)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blockwise(q[:50], st)
    qe, ste = quantize_blockwise(np.zeros((0, 4), np.float32))
    assert qe.shape == (0, 4) and dequantize_blockwise(qe, ste).shape == (0, 4)


def test_state_size():
    _, st = quantize_blockwise(np.ones(8192, np.float32), blocksize=4096)
    assert st.nbytes == 8192 + 2 * 4 and st.bits_per_parameter() == 8 + 32 / 4096
    assert st.code.shape == (256,) and np.array_equal(st.code, create_dynamic_map())
