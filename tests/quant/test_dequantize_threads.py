"""dequantize_4bit's thread split: the same bytes at every thread count, and its spans cover the output once."""
import numpy as np
import pytest

from minilora.quant import dequantize_4bit, quantize_4bit
from minilora.quant.fourbit import PARALLEL_MIN, dequantize_threads, thread_spans


@pytest.mark.parametrize("n", [0, 1, 65, 4097, 200_001])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_every_thread_count_gives_the_same_bytes(n, dtype, dq, blocksize):
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    packed, state = quantize_4bit(x, blocksize, "nf4", dq)
    one = dequantize_4bit(packed, state, threads=1)
    for threads in (2, 3, 7):
        many = dequantize_4bit(packed, state, threads=threads)
        assert many.dtype == one.dtype and many.shape == one.shape and many.tobytes() == one.tobytes()
        out = np.empty_like(one)
        assert dequantize_4bit(packed, state, out=out, threads=threads) is out and out.tobytes() == one.tobytes()


def test_a_large_tensor_splits_and_gives_the_same_bytes():
    x = np.random.default_rng(0).standard_normal(PARALLEL_MIN + 130).astype(np.float32)
    packed, state = quantize_4bit(x, 64, "nf4", True)
    assert dequantize_4bit(packed, state).tobytes() == dequantize_4bit(packed, state, threads=1).tobytes()
    assert dequantize_4bit(packed, state, threads=2).tobytes() == dequantize_4bit(packed, state, threads=1).tobytes()


@pytest.mark.parametrize("size,chunk,pieces", [(0, 64, 4), (1, 64, 4), (640, 64, 3), (65536 * 5 + 2, 65536, 8)])
def test_spans_are_whole_chunks_covering_the_output_once(size, chunk, pieces):
    spans = thread_spans(size, chunk, pieces)
    assert len(spans) <= max(1, pieces)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(start % chunk == 0 for start, _ in spans)


def test_threads_default_to_one_for_small_tensors_and_refuse_bad_counts():
    assert dequantize_threads(None, PARALLEL_MIN - 1, np) == 1
    assert dequantize_threads(3, 10, np) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            dequantize_threads(bad, 10, np)
