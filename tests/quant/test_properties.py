"""Property-based tests (hypothesis) of the blockwise quantizers, on every backend via the `xp` fixture.

Invariants, for any shape, block size, dtype and scale:
* |x - x'| <= (half the widest gap between neighbouring codes) * absmax(block) + rounding slack;
* quantize(dequantize(q)) == q (4-bit without DQ; for FP4/Int4 up to their duplicate-zero code, see below);
* dequantize(quantize(x)) keeps shape and dtype;
* the largest |x| of each block comes back exactly.

Rounding slack, and why it suffices: scaled = x * float32(1/absmax) carries <= 2 float32 roundings (relative
2^-23 of a value <= 1) and x' = code * absmax one more (2^-24 |x'|); float64 inputs are first rounded to float32
(2^-24 |x|); float16 outputs round once more (2^-11 |x'| for normal numbers, plus 2^-25 absolute for subnormals).
Scales are kept >= 1e-3 so that no block's absmax falls below bnb's 1e-38 clamp (where the bound does not hold:
a block with absmax 1e-39 is scaled by 1e38, not by 1/absmax; bnb does the same, see test_tiny_blocks).
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import backend
from minilora.quant import (
    ALLOWED_BLOCKSIZES,
    dequantize_4bit,
    dequantize_blockwise,
    get_4bit_type,
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
    quantize_blockwise,
)
from minilora.quant.codebooks import create_dynamic_map

# The xp fixture only selects the backend (the same for every example), so reusing it across examples is safe.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]
shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
blocksizes = st.sampled_from(ALLOWED_BLOCKSIZES)
dtypes = st.sampled_from(["float16", "float32", "float64"])
quant_types = st.sampled_from(["nf4", "fp4", "int4"])
log_scales = st.floats(-3, 3)
seeds = st.integers(0, 2 ** 31 - 1)
# The FP4 and Int4 tables hold 0.0 twice; the second copy is what tiny positive values get. Requantizing its 0.0
# gives the first copy, so bytes are compared after mapping the duplicate onto the canonical zero code.
CANONICAL_ZERO = {"nf4": {}, "fp4": {8: 0}, "int4": {8: 7}}


def make_input(xp, shape, dtype, log_scale, seed, zero_block):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** log_scale
    if zero_block:
        x.reshape(-1)[: x.size // 2] = 0.0
    return xp.asarray(x.astype(dtype))


def unpack(p, n):
    b = backend.to_numpy(p).ravel()
    return np.stack([b >> 4, b & 15], 1).ravel()[:n]


def half_widest_gap(code):
    return float(np.diff(np.sort(backend.to_numpy(code))).max()) / 2


def per_element_absmax(absmax, n, bs):
    return np.repeat(backend.to_numpy(absmax).astype(np.float64), bs)[:n]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(shape=shapes, bs=blocksizes, dtype=dtypes, quant_type=quant_types, log_scale=log_scales, seed=seeds,
       zero_block=st.booleans())
def test_4bit_roundtrip_properties(xp, shape, bs, dtype, quant_type, log_scale, seed, zero_block):
    x = make_input(xp, shape, dtype, log_scale, seed, zero_block)
    p, state = quantize_4bit(x, blocksize=bs, quant_type=quant_type)
    y = dequantize_4bit(p, state)
    assert y.shape == x.shape and y.dtype == x.dtype                             # shape and dtype kept
    xh = backend.to_numpy(x).astype(np.float64).ravel()
    yh = backend.to_numpy(y).astype(np.float64).ravel()
    n = xh.size
    a = per_element_absmax(state.absmax, n, bs)
    out_eps = 2.0 ** -11 if dtype == "float16" else 2.0 ** -23
    slack = a * 2.0 ** -21 + np.abs(yh) * out_eps + np.abs(xh) * 2.0 ** -24 + 2.0 ** -25
    assert np.all(np.abs(xh - yh) <= half_widest_gap(state.code) * a + slack)   # error bound

    # the largest |x| of every block is reproduced exactly (as its float32 value for float64 inputs)
    x32 = backend.to_numpy(x).astype(np.float32).astype(np.float64).ravel()
    y32 = yh if dtype != "float64" else backend.to_numpy(y).astype(np.float32).astype(np.float64).ravel()
    for b in range(0, n, bs):
        i = b + int(np.argmax(np.abs(x32[b:b + bs])))
        assert y32[i] == x32[i], (b, x32[i], y32[i])

    # idempotent: quantizing the dequantized tensor gives the same codes and absmax
    p2, state2 = quantize_4bit(y, blocksize=bs, quant_type=quant_type)
    c1, c2 = unpack(p, n), unpack(p2, n)
    for dup, canon in CANONICAL_ZERO[quant_type].items():
        c1 = np.where(c1 == dup, canon, c1)
    assert np.array_equal(c1, c2)
    assert np.array_equal(backend.to_numpy(state.absmax), backend.to_numpy(state2.absmax))


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(shape=shapes, bs=blocksizes, dtype=dtypes, quant_type=quant_types, log_scale=log_scales, seed=seeds)
def test_double_quant_error_stays_close(xp, shape, bs, dtype, quant_type, log_scale, seed):
    x = make_input(xp, shape, dtype, log_scale, seed, False)
    p, s1 = quantize_4bit(x, blocksize=bs, quant_type=quant_type)
    p2, s2 = quantize_4bit(x, blocksize=bs, quant_type=quant_type, compress_statistics=True)
    assert np.array_equal(backend.to_numpy(p), backend.to_numpy(p2))              # DQ never touches the codes
    y = backend.to_numpy(dequantize_4bit(p2, s2)).astype(np.float64).ravel()
    xh = backend.to_numpy(x).astype(np.float64).ravel()
    # absmax' differs from absmax by at most half the widest dynamic-map gap (0.0070) times absmax2
    a = per_element_absmax(s1.absmax, xh.size, bs)
    da = half_widest_gap(create_dynamic_map()) * float(backend.to_numpy(s2.state2.absmax).max()) * 1.001
    bound = half_widest_gap(s1.code) * (a + da) + da + (a + da) * 2.0 ** -10
    assert np.all(np.abs(xh - y) <= bound)
    assert y.shape[0] == xh.size


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(shape=shapes, bs=st.sampled_from([64, 256, 4096]), dtype=dtypes, log_scale=log_scales, seed=seeds,
       zero_block=st.booleans())
def test_8bit_dynamic_roundtrip(xp, shape, bs, dtype, log_scale, seed, zero_block):
    x = make_input(xp, shape, dtype, log_scale, seed, zero_block)
    q, state = quantize_blockwise(x, blocksize=bs)
    assert q.shape == x.shape and q.dtype == xp.uint8
    y = dequantize_blockwise(q, state)
    assert y.shape == x.shape and y.dtype == x.dtype
    xh = backend.to_numpy(x).astype(np.float64).ravel()
    yh = backend.to_numpy(y).astype(np.float64).ravel()
    a = per_element_absmax(state.absmax, xh.size, bs)
    out_eps = 2.0 ** -11 if dtype == "float16" else 2.0 ** -23
    slack = a * 2.0 ** -21 + np.abs(yh) * out_eps + np.abs(xh) * 2.0 ** -24 + 2.0 ** -25
    assert np.all(np.abs(xh - yh) <= half_widest_gap(state.code) * a + slack)
    # The signed dynamic map ends at +1.0 but at -0.99296875 (no -1): a block's largest |x| comes back exactly
    # when it is positive, and as 0.99296875 of itself when negative. (So re-quantizing is not idempotent here:
    # a negative block maximum shrinks, the block's absmax changes and every code moves.)
    x32 = backend.to_numpy(x).astype(np.float32).astype(np.float64).ravel()
    y32 = backend.to_numpy(y).astype(np.float32).astype(np.float64).ravel() if dtype == "float64" else yh
    for b in range(0, xh.size, bs):
        i = b + int(np.argmax(np.abs(x32[b:b + bs])))
        if x32[i] > 0:
            assert y32[i] == x32[i]
        elif x32[i] < 0 and dtype != "float16":
            assert y32[i] == np.float64(np.float32(np.float32(-0.99296875) * np.float32(-x32[i])))


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(rows=st.integers(1, 30), cols=st.integers(1, 70), dtype=dtypes, log_scale=log_scales, seed=seeds,
       zero_row=st.booleans())
def test_int8_error_bound(xp, rows, cols, dtype, log_scale, seed, zero_row):
    x = make_input(xp, (rows, cols), dtype, log_scale, seed, False)
    if zero_row:
        x[0] = 0
    xh = backend.to_numpy(x).astype(np.float64)
    slack = 2.0 ** -20
    q, stats, _ = int8_vectorwise_quant(x)
    assert q.dtype == xp.int8 and int(xp.abs(q.astype(xp.int16)).max()) <= 127               # never -128
    y = backend.to_numpy(int8_vectorwise_dequant(q, stats)).astype(np.float64)
    a = backend.to_numpy(stats).astype(np.float64)[:, None]
    assert np.all(np.abs(xh - y) <= a / 254 + a * slack + np.abs(xh) * 2.0 ** -23)
    qt, at = int8_tensorwise_quant(x)
    yt = backend.to_numpy(int8_tensorwise_dequant(qt, at)).astype(np.float64)
    assert np.all(np.abs(xh - yt) <= float(at) / 254 * (1 + slack) + np.abs(xh) * 2.0 ** -23)
    qb, ab = int8_blockwise_quant(x, 32)
    yb = backend.to_numpy(int8_blockwise_dequant(qb, ab, 32)).astype(np.float64).ravel()
    a = per_element_absmax(ab, xh.size, 32)
    assert np.all(np.abs(xh.ravel() - yb) <= a / 254 + a * slack + np.abs(xh.ravel()) * 2.0 ** -23)
    if zero_row:
        assert float(stats[0]) == 0 and not bool(q[0].any())


def test_tiny_blocks_follow_bnb_clamp():
    # absmax below 1e-38 is clamped before the reciprocal: scaled = x * 1e38, so the block is NOT rescaled to 1.
    x = np.full(64, 1e-39, np.float32)
    p, state = quantize_4bit(x, quant_type="nf4")
    assert state.absmax[0] == np.float32(1e-39)                         # stored unclamped for a full block
    assert (p.ravel() >> 4)[0] == 8                                      # 0.1 -> NF4 0.0796, not 1.0
    assert dequantize_4bit(p, state)[0] == np.float32(np.float32(0.07958029955625534) * np.float32(1e-39))


def test_codes_cover_every_table_entry():
    # a block holding every table value (times absmax 3) maps each to its own code
    for quant_type in ("nf4", "fp4", "int4"):
        code = get_4bit_type(quant_type)
        x = np.concatenate([code * np.float32(3.0), [3.0]]).astype(np.float32)
        p, state = quantize_4bit(x, quant_type=quant_type)
        np.testing.assert_array_equal(dequantize_4bit(p, state)[:16], code * np.float32(3.0))
