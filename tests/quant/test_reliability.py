"""Quantization never returns silent garbage: every entry point refuses what it cannot represent, loudly and typed.

* Input beyond the float32 range (float64 values a float32 computation would turn into inf) is refused with a
  ValueError naming how many values, the first flat index and its value, at every quantizer.
* Block sizes are accepted as any integer type equal to an allowed size (NumPy integers included), nothing else.
* Code tables, QuantStates read from dicts or files, and dequantization arguments are checked before use: a state
  no quantization could have produced (negative absmax, a rescaled code table, a nested state that does not fit) is
  refused instead of dequantizing to wrong weights.
* bitsandbytes states of bfloat16 weights load and dequantize to float32 holding bnb's bfloat16 values.
"""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.quant import (
    QuantState,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise,
    get_4bit_type,
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
    quantize_blockwise,
    quantize_blockwise_lut,
)

F32_MAX = float(np.finfo(np.float32).max)

QUANTIZERS = {
    "4bit-nf4": lambda a: quantize_4bit(a, blocksize=64, quant_type="nf4"),
    "4bit-fp4": lambda a: quantize_4bit(a, blocksize=64, quant_type="fp4"),
    "4bit-int4": lambda a: quantize_4bit(a, blocksize=64, quant_type="int4"),
    "4bit-nf4-dq": lambda a: quantize_4bit(a, blocksize=64, compress_statistics=True),
    "blockwise": lambda a: quantize_blockwise(a, blocksize=64),
    "blockwise-lut": lambda a: quantize_blockwise_lut(a, blocksize=64),
    "int8-vectorwise": lambda a: int8_vectorwise_quant(a.reshape(1, -1)),
    "int8-tensorwise": int8_tensorwise_quant,
    "int8-blockwise": lambda a: int8_blockwise_quant(a, blocksize=64),
}


MISSING = object()


def _repacked(d, **json_fields):
    """The packed dict with some fields of its JSON entry replaced (a hand-edited checkpoint); MISSING deletes one."""
    key = next(k for k in d if "bitsandbytes__" in k)
    meta = {**json.loads(bytes(d[key]).decode()), **json_fields}
    meta = {k: v for k, v in meta.items() if v is not MISSING}
    return {**d, key: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


# --- input beyond the float32 range --------------------------------------------------------------------------------

OVERFLOW_INPUTS = {
    "full block": (np.array([1e300, 1.0] * 32), 32, 0, "1e+300"),
    "partial block": (np.array([1e300] * 3), 3, 0, "1e+300"),
    "last of a full and a partial block": (np.r_[np.ones(99), -1e39], 1, 99, "-1e+39"),
}


@pytest.mark.parametrize("case", OVERFLOW_INPUTS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_float64_beyond_the_float32_range_is_refused_by_every_quantizer(quantizer, case):
    a, count, first, value = OVERFLOW_INPUTS[case]
    with pytest.raises(ValueError, match="outside the float32 range") as e:
        QUANTIZERS[quantizer](a)
    msg = str(e.value)
    assert f"{count} value" in msg and f"flat index {first}" in msg and value in msg, msg


def test_double_quantization_names_the_range_not_nan():
    with pytest.raises(ValueError, match="outside the float32 range") as e:
        quantize_4bit(np.array([1e39, 1.0] * 32), compress_statistics=True)
    assert "NaN" not in str(e.value).split(";")[0]


@settings(max_examples=40, deadline=None)
@given(big=st.floats(min_value=np.nextafter(F32_MAX, np.inf), max_value=1.7e308), negative=st.booleans(),
       where=st.integers(0, 199), quantizer=st.sampled_from(sorted(QUANTIZERS)))
def test_any_finite_float64_beyond_float32_max_anywhere_is_refused(big, negative, where, quantizer):
    a = np.random.default_rng(where).standard_normal(200)
    a[where] = -big if negative else big
    with pytest.raises(ValueError, match=f"outside the float32 range.*flat index {where}\\b"):
        QUANTIZERS[quantizer](a)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_the_float32_extremes_themselves_quantize_to_finite_values(quantizer):
    a = np.r_[np.linspace(-1, 1, 126), -F32_MAX, F32_MAX]                 # float64 holding float32 max exactly
    out = QUANTIZERS[quantizer](a)
    stats = out[1].absmax if isinstance(out[1], QuantState) else out[1]
    assert np.isfinite(stats).all()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_float16_infinity_is_refused_and_float16_max_is_fine(quantizer):
    a = np.linspace(-1, 1, 64).astype(np.float16)
    a[5] = np.inf
    with pytest.raises(ValueError, match="1 NaN/Inf value.*flat index 5"):
        QUANTIZERS[quantizer](a)
    a[5] = np.finfo(np.float16).max
    out = QUANTIZERS[quantizer](a)
    stats = out[1].absmax if isinstance(out[1], QuantState) else out[1]
    assert np.isfinite(stats).all()


@pytest.mark.parametrize("quantizer", ["int8-vectorwise", "int8-tensorwise", "int8-blockwise"])
def test_int8_rows_with_a_tiny_absmax_still_round_to_plus_minus_127(quantizer):
    a = np.zeros(64, np.float32)
    a[3], a[4] = 1e-40, -5e-41                                            # absmax 1e-40: 127 / 1e-40 overflows
    with np.errstate(all="raise"):
        q = QUANTIZERS[quantizer](a)[0].reshape(-1)
    assert q[3] == 127 and q[4] == -64 and not q[5:].any() and not q[:3].any()


# --- block sizes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bs", [np.int64(64), np.int32(128), np.uint16(256)])
def test_numpy_integer_block_sizes_equal_to_an_allowed_size_are_accepted(bs):
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    p, s = quantize_4bit(x, blocksize=bs)
    assert type(s.blocksize) is int and s.blocksize == int(bs)
    np.testing.assert_array_equal(p, quantize_4bit(x, blocksize=int(bs))[0])
    json.dumps(json.loads(bytes(s.as_dict(packed=True)["quant_state.bitsandbytes__nf4"])))
    q8, s8 = quantize_blockwise(x, blocksize=bs)
    assert type(s8.blocksize) is int
    np.testing.assert_array_equal(q8, quantize_blockwise(x, blocksize=int(bs))[0])
    np.testing.assert_array_equal(int8_blockwise_quant(x, blocksize=bs)[0], int8_blockwise_quant(x, int(bs))[0])


@pytest.mark.parametrize("bs", [np.float64(64), np.int64(63), np.bool_(True), "64", 64.0])
def test_other_block_sizes_are_refused(bs):
    x = np.ones(128, np.float32)
    for f in (quantize_4bit, quantize_blockwise, int8_blockwise_quant):
        with pytest.raises(ValueError, match="allowed block sizes"):
            f(x, blocksize=bs)


# --- code tables ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, match", [
    (np.array([np.nan, -1, 0, 1.0]), "finite"),
    (np.array([-2.0, 0, 2.0]), r"\[-1, 1\]"),
    (np.linspace(-1, 1, 256).reshape(16, 16), "1-D"),
])
@pytest.mark.parametrize("f", [quantize_blockwise, quantize_blockwise_lut])
def test_a_custom_code_table_must_be_finite_1d_and_within_plus_minus_one(f, code, match):
    with pytest.raises(ValueError, match=match):
        f(np.ones(64, np.float32), code=code, blocksize=64)


# --- dequantization arguments -----------------------------------------------------------------------------------------

def test_dequantize_blockwise_refuses_a_4bit_state():
    p, s = quantize_4bit(np.random.default_rng(0).standard_normal(256).astype(np.float32))
    with pytest.raises(ValueError, match="4-bit.*dequantize_4bit"):
        dequantize_blockwise(p, s)


def test_dequantizers_refuse_codes_that_are_not_an_array():
    p, s = quantize_4bit(np.ones(64, np.float32))
    with pytest.raises(TypeError, match="uint8 array"):
        dequantize_4bit(p.tolist(), s)
    q, s8 = quantize_blockwise(np.ones(64, np.float32), blocksize=64)
    with pytest.raises(TypeError, match="uint8 array"):
        dequantize_blockwise(q.tolist(), s8)


def test_int8_dequantizers_refuse_statistics_that_do_not_fit():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    q, stats, _ = int8_vectorwise_quant(x)
    for bad in (stats[:1], stats[:2], stats[:, None]):
        with pytest.raises(ValueError, match=r"row_stats .*shape \(4,\)"):
            int8_vectorwise_dequant(q, bad)
    y = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    qb, am = int8_blockwise_quant(y, 64)
    with pytest.raises(ValueError, match="16 absmax.*8"):
        int8_blockwise_dequant(qb, am, 128)
    with pytest.raises(ValueError, match="allowed block sizes"):
        int8_blockwise_dequant(qb, am, 0)


# --- QuantState.from_dict: only states a quantization could have produced --------------------------------------------

def _state(nested=False, quant_type="nf4"):
    x = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    p, s = quantize_4bit(x, quant_type=quant_type, compress_statistics=nested)
    return p, s.as_dict(packed=True)


@pytest.mark.parametrize("nested", [False, True])
def test_from_dict_refuses_tampered_statistics_and_tables(nested):
    _, d = _state(nested)
    fp4 = get_4bit_type("fp4")
    bad = {"quant_map": {**d, "quant_map": d["quant_map"] * 100},
           "fp4": {**d, "quant_map": fp4},                                    # another type's table under "nf4"
           "absmax.*1-D": {**d, "absmax": d["absmax"].reshape(-1, 1)}}
    if nested:
        bad["nested_absmax.*negative"] = {**d, "nested_absmax": -d["nested_absmax"]}
        bad["nested_quant_map"] = {**d, "nested_quant_map": d["nested_quant_map"] * np.float32(0.5)}
        bad["nested_offset.*negative"] = _repacked(d, nested_offset=-1.0)
        bad["nested_dtype.*float32"] = _repacked(d, nested_dtype="float16")
    else:
        neg = d["absmax"].copy()
        neg[7] = -neg[7]
        bad["absmax.*1 negative.*index 7"] = {**d, "absmax": neg}
    for match, broken in bad.items():
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict(broken)


@pytest.mark.parametrize("field, value", [
    ("shape", "abc"), ("shape", None), ("shape", [True, 3072]), ("blocksize", "x"), ("blocksize", 100),
    ("dtype", 12), ("nested_offset", "abc"), ("nested_offset", MISSING), ("nested_blocksize", MISSING),
])
def test_from_dict_names_the_malformed_field(field, value):
    _, d = _state(nested=True)
    broken = _repacked(d, **{field: value})
    with pytest.raises(ValueError, match=field):
        QuantState.from_dict(broken)


def test_from_dict_refuses_what_is_not_a_state_dict():
    with pytest.raises(TypeError, match="dict"):
        QuantState.from_dict(None)
    with pytest.raises(TypeError, match="dict"):
        QuantState.from_dict([1, 2])
    _, d = _state()
    key = next(k for k in d if "bitsandbytes__" in k)
    with pytest.raises(ValueError, match="JSON object"):
        QuantState.from_dict({**d, key: np.frombuffer(b"[1, 2]", np.uint8).copy()})


def test_an_8bit_state_round_trips_through_its_dict():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    q, s = quantize_blockwise(x, blocksize=256)
    s2 = QuantState.from_dict(s.as_dict(packed=True))
    np.testing.assert_array_equal(dequantize_blockwise(q, s2), dequantize_blockwise(q, s))
    d = s.as_dict()
    d["absmax"] = -d["absmax"]
    with pytest.raises(ValueError, match="negative"):
        QuantState.from_dict(d)
    d = s.as_dict()
    d["quant_map"] = d["quant_map"] * 3
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        QuantState.from_dict(d)


def test_untampered_states_still_load_for_every_type():
    for quant_type in ("nf4", "fp4", "int4"):
        for nested in (False, True):
            p, d = _state(nested, quant_type)
            s = QuantState.from_dict(d)
            assert s.quant_type == quant_type and s.nested == nested


# --- bfloat16 states (what bitsandbytes writes for a bf16 model) -----------------------------------------------------

def _bf16_round(x32):
    """float32 -> the nearest bfloat16 (ties to even), returned as float32."""
    b = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("nested", [False, True])
def test_a_bfloat16_state_dequantizes_to_float32_holding_bfloat16_values(nested):
    p, d = _state(nested)
    s32 = QuantState.from_dict(d)
    s = QuantState.from_dict(_repacked(d, dtype="bfloat16"))
    assert s.dtype == np.float32
    w = dequantize_4bit(p, s)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, _bf16_round(dequantize_4bit(p, s32)))
    assert not (w.view(np.uint32) & 0xFFFF).any()                         # every value is a bfloat16
    meta = json.loads(bytes(s.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]))
    assert meta["dtype"] == "bfloat16"                                    # written back as it was read


@pytest.mark.parametrize("shape", [(8, 64), (64, 96)])
@pytest.mark.parametrize("nested", [False, True])
def test_a_bfloat16_state_written_by_bitsandbytes_dequantizes_to_its_values(nested, shape):
    """minilora must equal bnb's definition, code[q] * absmax in float32 rounded to bfloat16, computed by hand from
    bnb's own state. bnb's CPU kernel is compared with that hand computation separately: where it deviates (its
    AVX-512 dequantize_4bit does on some shapes, float32 too), the test ends as an xfail that counts the values."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.from_numpy(np.random.default_rng(3).standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    d = {k: v.numpy() for k, v in qs.as_dict(packed=True).items()}
    s = QuantState.from_dict(d)
    assert s.bfloat16 and s.dtype == np.float32
    ours = dequantize_4bit(packed.numpy(), s)
    p = packed.numpy().reshape(-1)
    q = np.stack([p >> 4, p & 15], axis=1).reshape(-1)                       # (n,) codes, high nibble first
    absmax = qs.absmax.numpy() if not nested else dequantize_absmax(s)      # bnb's float32 absmax per block
    hand = torch.from_numpy(s.code[q] * np.repeat(absmax, 64)).to(torch.bfloat16).float().numpy().reshape(shape)
    np.testing.assert_array_equal(ours.view(np.uint32), hand.view(np.uint32))
    theirs = F.dequantize_4bit(packed, qs).float().numpy()
    bad = int((theirs.view(np.uint32) != hand.view(np.uint32)).sum())
    if bad:
        pytest.xfail(f"bitsandbytes' CPU dequantize_4bit deviates from code[q] * absmax on {bad} of {hand.size} "
                     f"values (an upstream kernel fault; minilora equals the hand computation)")


def test_double_quantization_nested_table_is_the_dynamic_map():
    _, d = _state(nested=True)
    np.testing.assert_array_equal(d["nested_quant_map"], create_dynamic_map(signed=True))
