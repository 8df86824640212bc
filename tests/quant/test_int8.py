"""absmax int8: row-wise golden numbers, rounding, range, zero rows, the outlier problem, bad input."""
import numpy as np
import pytest

from minilora import backend
from minilora.quant import (
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_demo,
)


def test_rowwise_golden_numbers():
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    q, stats, cols = int8_vectorwise_quant(x)
    e = np.abs(x - int8_vectorwise_dequant(q, stats)).astype(np.float64)
    assert abs(e.mean() - 0.006784) < 1e-6 and abs((e / (np.abs(x) + 1e-8)).mean() - 0.034719) < 1e-6
    assert cols is None and stats.dtype == np.float32 and stats.shape == (1024,)


def test_round_half_to_even_and_range(xp):
    # absmax 127 makes the scale exactly 1: the codes are round(x), half to even
    x = xp.asarray([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -127.0]], dtype=xp.float32)
    q, stats, _ = int8_vectorwise_quant(x)
    assert backend.to_numpy(q).tolist() == [[127, 0, 2, 2, 0, -2, -2, -127]]
    assert q.dtype == xp.int8 and float(stats[0]) == 127.0


def test_zero_rows_are_explicit_zeros(xp):
    x = xp.zeros((3, 4), dtype=xp.float16)
    x[1] = xp.asarray([1.0, -2.0, 0.5, 0.0], dtype=xp.float16)
    q, stats, _ = int8_vectorwise_quant(x)
    assert backend.to_numpy(stats).tolist() == [0.0, 2.0, 0.0]
    assert not bool(q[0].any()) and not bool(q[2].any())
    y = int8_vectorwise_dequant(q, stats)
    assert y.dtype == xp.float32 and not bool(xp.isnan(y).any())
    qt, at = int8_tensorwise_quant(xp.zeros(5, dtype=xp.float32))
    assert float(at) == 0 and not bool(qt.any())


def test_dequant_operation_order():
    # (q * stats) * float32(1/127): bnb's order; q * (stats / 127) differs in the last bit for some values
    q = np.arange(-127, 128, dtype=np.int8)[None, :]
    stats = np.array([3.3], np.float32)
    y = int8_vectorwise_dequant(q, stats)
    np.testing.assert_array_equal(y, (q.astype(np.float32) * stats[:, None]) * np.float32(1 / 127))


def test_tensorwise_and_blockwise_roundtrip(xp):
    x = backend.default_rng(1).standard_normal(1000).astype(xp.float32)
    q, a = int8_tensorwise_quant(x)
    assert float(xp.abs(int8_tensorwise_dequant(q, a) - x).max()) <= float(a) / 254 * 1.0001
    qb, ab = int8_blockwise_quant(x, 64)
    assert ab.shape == (16,) and qb.shape == x.shape
    err = xp.abs(int8_blockwise_dequant(qb, ab, 64) - x)
    assert float(err.max()) <= float(ab.max()) / 254 * 1.0001
    qe, ae = int8_blockwise_quant(xp.zeros((0, 3), dtype=xp.float32), 64)
    assert qe.shape == (0, 3) and ae.shape == (0,)


def test_outlier_problem():
    r = outlier_demo(n=4096, outlier=100.0, blocksize=64, seed=0)
    # one 100 in N(0,1): the tensor-wise step 100/127 ~ 0.79 sends ~30% of values to 0 and the error up 25x
    assert r["tensorwise_mean_abs_err"] > 10 * r["blockwise_mean_abs_err"]
    assert r["tensorwise_zero_fraction"] > 0.25 > 0.05 > r["blockwise_zero_fraction"]


def test_threshold_outlier_columns():
    x = np.ones((4, 6), np.float32)
    x[2, 4] = 10.0
    q, stats, cols = int8_vectorwise_quant(x, threshold=6.0)
    assert cols.tolist() == [4] and not q[:, 4].any() and stats.tolist() == [1.0] * 4
    _, _, none = int8_vectorwise_quant(x, threshold=20.0)
    assert none.size == 0


def test_bad_input():
    x = np.ones((2, 3), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/Inf.*flat index 5"):
        int8_vectorwise_quant(x)
    with pytest.raises(TypeError):
        int8_vectorwise_quant(np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="non-empty last axis"):
        int8_vectorwise_quant(np.ones((2, 0), np.float32))
    with pytest.raises(ValueError, match="allowed block sizes"):
        int8_blockwise_quant(np.ones(8, np.float32), 10)
