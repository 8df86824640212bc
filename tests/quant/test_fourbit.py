"""quantize_4bit / dequantize_4bit without a reference library: worked bytes, golden numbers, errors, edge cases.

Golden numbers (docs/quantization.md §6.2) were produced by bitsandbytes 0.50.2 on CPU for the pinned input
numpy.random.default_rng(0).standard_normal((1024, 1024)).astype(float32); these tests run without bnb installed.
"""
import hashlib

import numpy as np
import pytest
from quant_reference import errors

from minilora import backend
from minilora.io import load_safetensors, save_safetensors
from minilora.quant import (
    ALLOWED_BLOCKSIZES,
    QuantState,
    dequantize_4bit,
    dequantize_absmax,
    get_4bit_type,
    quantize_4bit,
)
from minilora.quant.codebooks import midpoints
from minilora.quant.report import pinned_input

# --- worked examples, exact bytes (docs/quantization.md §2.2) -------------------------------------------------------

def packed_hex(x, **kw):
    p, st = quantize_4bit(np.asarray(x, dtype=np.float32), blocksize=64, quant_type="nf4", **kw)
    return p.tobytes().hex().upper(), st


def test_worked_examples_bytes(xp):
    p, st = quantize_4bit(xp.asarray([1.0, -1.0, 0.3], dtype=xp.float32), blocksize=64, quant_type="nf4")
    assert backend.to_numpy(p).tobytes() == bytes([0xF0, 0xB7])           # 0.3 -> 11; the pad -> 7
    assert p.shape == (2, 1) and backend.to_numpy(st.absmax).tolist() == [1.0]
    h, _ = packed_hex([-1, 1, 0, 0.5])
    assert h == "0F7C"                                                   # even element in the HIGH nibble
    h, st = packed_hex([0.0] * 64 + [1.0] * 64)
    assert h == "77" * 32 + "FF" * 32 and st.absmax.tolist() == [0.0, 1.0]   # a full zero block stores 0
    h, st = packed_hex([0.0] * 5)
    assert h == "777777"
    assert st.absmax[0] == np.float32(1e-38) and st.absmax[0] > 0        # partial block stores the clamp (subnormal)


def test_midpoints_go_to_the_lower_code():
    mid, _ = midpoints(get_4bit_type("nf4"))
    p, _ = quantize_4bit(np.concatenate([[1.0], mid]).astype(np.float32), blocksize=64, quant_type="nf4")
    b = p.ravel()
    codes = np.stack([b >> 4, b & 15], 1).ravel()
    assert codes.tolist() == [15] + list(range(15))


def test_fp4_zero_quirk_and_sorted_order():
    mid, order = midpoints(get_4bit_type("fp4"))
    assert order.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
    x = np.array([1.0, 0.0, -0.0, 0.001, -0.001, 0.0026041667, -0.5], dtype=np.float32)   # odd: pad -> code 0
    p, _ = quantize_4bit(x, blocksize=64, quant_type="fp4")
    b = p.ravel()
    codes = np.stack([b >> 4, b & 15], 1).ravel()
    assert codes.tolist() == [3, 0, 0, 8, 0, 8, 13, 0]                    # (0, 0.0026] -> code 8, the "-0" pattern


def test_int4_rule():
    # minilora's int4: bnb's table [7..0, 0, -1..-7]/7, midpoint search, ties to the lower code.
    code = get_4bit_type("int4")
    assert np.allclose(code, np.array([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]) / 7)
    k = np.arange(-7, 8)
    mid, order = midpoints(code)
    x = np.concatenate([[1.0], k / 7, mid]).astype(np.float32)            # the levels, then every exact tie
    p, st = quantize_4bit(x, blocksize=64, quant_type="int4")
    y = dequantize_4bit(p, st)
    np.testing.assert_array_equal(y[1:16], (k / 7).astype(np.float32))
    np.testing.assert_array_equal(y[16:], np.sort(code)[:-1])             # a tie goes to the LOWER level
    b = p.ravel()
    codes = np.stack([b >> 4, b & 15], 1).ravel()
    assert codes[1 + 7] == 7 and codes[16 + 7] == 7                       # 0 and the 0-midpoint -> code 7
    z, _ = quantize_4bit(np.array([1.0, 0.05], np.float32), quant_type="int4")
    assert z.ravel().tolist() == [0x08]                                  # (0, 1/14] -> code 8, which is 0.0 too


# --- golden numbers and bnb's accuracy table (docs/quantization.md §6.2, §6.1) -------------------------------------

GOLDEN = {  # (quant_type, blocksize): (mean abs err, mean rel err, sha256 prefix of the packed bytes)
    ("nf4", 64): (0.072813, 0.203431, "a02fdeea221d23ac"),
    ("nf4", 128): (0.076945, 0.215427, "940e3940fbff22b9"),
    ("nf4", 256): (0.080475, 0.226284, "abe4ed0a122c1cbb"),
    ("fp4", 64): (0.096616, 0.260123, "481c7c63277c4d9a"),
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_numbers(pinned, key):
    quant_type, bs = key
    abs_err, rel_err, sha = GOLDEN[key]
    p, st = quantize_4bit(pinned, blocksize=bs, quant_type=quant_type)
    assert hashlib.sha256(p.tobytes()).hexdigest()[:16] == sha
    a, r = errors(pinned, dequantize_4bit(p, st))
    assert abs(a - abs_err) < 1e-6 and abs(r - rel_err) < 1e-6
    if bs == 64:
        assert abs(st.absmax.astype(np.float64).sum() - 42616.051903) < 1e-6


def test_golden_double_quant(pinned):
    p, st = quantize_4bit(pinned, blocksize=64, quant_type="nf4", compress_statistics=True)
    a, r = errors(pinned, dequantize_4bit(p, st))
    assert abs(a - 0.072884) < 1e-6 and abs(r - 0.203464) < 1e-6
    # bnb's offset is 2.6010773181915283 (torch float32 mean); ours is the float64 mean rounded: 1 ulp apart.
    assert abs(float(st.offset) - 2.6010773181915283) <= np.spacing(np.float32(2.6010773)) * 1.0001
    p0, st0 = quantize_4bit(pinned, blocksize=64, quant_type="nf4")
    assert np.array_equal(p, p0)
    assert a - errors(pinned, dequantize_4bit(p0, st0))[0] < 1e-4         # DQ adds < 1e-4 (QLoRA: "no loss")


def test_pinned_input_helper_is_the_golden_input(pinned):
    np.testing.assert_array_equal(pinned_input(0), pinned)


# bnb tests/test_functional.py::test_4bit_quant: expected mean abs error on randn(1024, 1024), per block size.
BNB_TABLE = {
    "nf4": [0.067746, 0.072798, 0.076831, 0.080337, 0.083547, 0.086610, 0.089592, 0.092547],
    "fp4": [0.088925, 0.096543, 0.102969, 0.108684, 0.114115, 0.119333, 0.124556, 0.129536],
}
BNB_REL = {
    "nf4": [0.189726, 0.203339, 0.215237, 0.226105, 0.236079, 0.245370, 0.254163, 0.262473],
    "fp4": [0.242443, 0.260125, 0.275817, 0.289831, 0.302881, 0.315000, 0.326607, 0.337169],
}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_accuracy_table(quant_type):
    x = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)   # a fresh randn, not the pinned
    for bs, want_abs, want_rel in zip(ALLOWED_BLOCKSIZES, BNB_TABLE[quant_type], BNB_REL[quant_type], strict=True):
        p, st = quantize_4bit(x, blocksize=bs, quant_type=quant_type)
        a, r = errors(x, dequantize_4bit(p, st))
        assert abs(a - want_abs) < 5e-4, (bs, a, want_abs)                # bnb: mean over 200 samples
        assert abs(r - want_rel) < 2e-3, (bs, r, want_rel)


# --- QuantState: size, serialization, mismatch ----------------------------------------------------------------------

def test_bits_per_parameter(pinned):
    _, st = quantize_4bit(pinned, blocksize=64, quant_type="nf4")
    assert st.bits_per_parameter() == 4.5 and st.nbytes == 1024 * 1024 // 2 + 16384 * 4
    _, st = quantize_4bit(pinned, blocksize=64, quant_type="nf4", compress_statistics=True)
    # codes 4 + absmax codes 8/64 + absmax2 32/(64*256) + one float32 offset over 2^20 params
    assert st.nbytes == 524288 + 16384 + 64 * 4 + 4
    assert abs(st.bits_per_parameter() - (4 + 8 / 64 + 32 / 16384 + 32 / 2 ** 20)) < 1e-12
    assert round(st.bits_per_parameter(), 3) == 4.127
    assert st.bits_per_parameter(include_code=True) > st.bits_per_parameter()


@pytest.mark.parametrize("dq", [False, True])
def test_as_dict_roundtrip_through_safetensors(tmp_path, dq):
    x = np.random.default_rng(2).standard_normal((96, 40)).astype(np.float16)
    p, st = quantize_4bit(x, blocksize=128, quant_type="fp4", compress_statistics=dq)
    d = {"weight": p, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    assert "weight.quant_state.bitsandbytes__fp4" in d
    save_safetensors(tmp_path / "q.safetensors", d)
    loaded, _ = load_safetensors(tmp_path / "q.safetensors")
    st2 = QuantState.from_dict({k: v for k, v in loaded.items() if k != "weight"})
    assert st2.nested == dq and st2.shape == (96, 40) and st2.dtype == np.float16 and st2.quant_type == "fp4"
    np.testing.assert_array_equal(dequantize_4bit(loaded["weight"], st2), dequantize_4bit(p, st))


def test_from_dict_errors():
    _, st = quantize_4bit(np.ones(10, np.float32))
    d = st.as_dict(packed=True)
    del d["quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="bitsandbytes__"):
        QuantState.from_dict(d)
    d = st.as_dict(packed=True)
    d["quant_state.bitsandbytes__nf4"] = np.frombuffer(b"\xff\xfe", np.uint8)
    with pytest.raises(ValueError, match="JSON"):
        QuantState.from_dict(d)


def _repacked(d, **json_fields):
    """The packed dict with some fields of its JSON entry replaced (a hand-edited or corrupt checkpoint)."""
    import json
    key = next(k for k in d if "bitsandbytes__" in k)
    meta = {**json.loads(bytes(d[key]).decode()), **json_fields}
    return {**d, key: np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()}


@pytest.mark.parametrize("nested", [False, True])
def test_from_dict_refuses_states_no_quantization_produces(nested):
    """A corrupt state used to dequantize to NaN or silently wrong weights (or crash with ZeroDivisionError)."""
    _, st = quantize_4bit(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32),
                          compress_statistics=nested)
    d = st.as_dict(packed=True)
    QuantState.from_dict(d)                                            # the untouched dict loads
    nan_map = d["quant_map"].copy()
    nan_map[3] = np.nan
    bad = {"blocksize: unsupported blocksize 0": _repacked(d, blocksize=0),
           "negative dimension": _repacked(d, shape=[-8, -64]),
           "dtype must be float16": _repacked(d, dtype="int8"),
           "quant_map must be 16 finite": {**d, "quant_map": d["quant_map"][:15]},
           "1 non-finite": {**d, "quant_map": nan_map}}
    if nested:
        bad["nested_absmax holds 1 NaN"] = {**d, "nested_absmax": np.full_like(d["nested_absmax"], np.nan)}
        bad["nested_offset holds 1 NaN"] = _repacked(d, nested_offset=float("nan"))
        bad["nested_quant_map must be 256"] = {**d, "nested_quant_map": d["nested_quant_map"][:100]}
    else:
        bad["absmax holds 8 NaN"] = {**d, "absmax": np.full_like(d["absmax"], np.inf)}
    for match, broken in bad.items():
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict(broken)


def test_mismatched_state_raises():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    p, st = quantize_4bit(x)
    _, other = quantize_4bit(x[:32])
    with pytest.raises(ValueError, match="does not match"):
        dequantize_4bit(p, other)
    with pytest.raises(TypeError, match="uint8"):                      # a wrong dtype is a TypeError (house rule)
        dequantize_4bit(p.astype(np.int16), st)
    _, st128 = quantize_4bit(x, blocksize=128)
    st128.blocksize = 64                                                 # absmax now too short for the blocks
    with pytest.raises(ValueError, match="absmax"):
        dequantize_4bit(p, st128)
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_4bit(p, {"absmax": st.absmax})


# --- bad input --------------------------------------------------------------------------------------------------------

def test_nan_inf_raise_with_count_and_position(xp):
    x = xp.ones((4, 100), dtype=xp.float32)
    x[1, 3] = xp.nan
    x[2, 7] = xp.inf
    x[3, 99] = -xp.inf
    with pytest.raises(ValueError, match=r"3 NaN/Inf.*flat index 103.*\(1, 3\)"):
        quantize_4bit(x)
    y = xp.ones(131, dtype=xp.float16)
    y[130] = xp.nan                                                      # in the trailing partial block
    with pytest.raises(ValueError, match="1 NaN/Inf.*flat index 130"):
        quantize_4bit(y, blocksize=64)


@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool", "complex64"])
def test_non_float_dtype_raises_type_error(xp, dtype):
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        quantize_4bit(xp.ones(8, dtype=dtype))


def test_not_an_array_raises_type_error():
    with pytest.raises(TypeError):
        quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("bs", [0, 16, 48, 100, 8192, 64.0, True])
def test_bad_blocksize_lists_allowed(bs):
    with pytest.raises(ValueError, match=r"allowed block sizes are \[32, 64, 128, 256, 512, 1024, 2048, 4096\]"):
        quantize_4bit(np.ones(8, np.float32), blocksize=bs)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(np.ones(8, np.float32), quant_type="nf8")


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)])
@pytest.mark.parametrize("dq", [False, True])
def test_empty_arrays(xp, shape, dq):
    x = xp.zeros(shape, dtype=xp.float16)
    p, st = quantize_4bit(x, compress_statistics=dq)
    assert p.shape == (0, 1) and p.dtype == xp.uint8 and st.absmax.size == 0
    y = dequantize_4bit(p, st)
    assert y.shape == shape and y.dtype == xp.float16
    assert st.nbytes == (4 if dq else 0) and st.bits_per_parameter() == 0.0


# --- behaviour on every backend ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_roundtrip_shape_dtype_and_backend(xp, dtype, quant_type):
    x = backend.default_rng(0).standard_normal((3, 50, 7)).astype(dtype)
    p, st = quantize_4bit(x, blocksize=32, quant_type=quant_type, compress_statistics=True)
    assert backend.get_array_module(p) is xp and p.shape == ((x.size + 1) // 2, 1)
    y = dequantize_4bit(p, st)
    assert y.shape == x.shape and y.dtype == x.dtype and backend.get_array_module(y) is xp
    assert float(xp.abs(y.astype(xp.float32) - x.astype(xp.float32)).max()) < 0.2 * float(xp.abs(x).max())
    assert dequantize_absmax(st).dtype == xp.float32


def test_cupy_matches_numpy_bytes(xp):
    x = np.random.default_rng(3).standard_normal(5001).astype(np.float32)
    ref, ref_st = quantize_4bit(x, blocksize=64, quant_type="fp4", compress_statistics=True)
    p, st = quantize_4bit(xp.asarray(x), blocksize=64, quant_type="fp4", compress_statistics=True)
    assert np.array_equal(backend.to_numpy(p), ref)
    assert np.array_equal(backend.to_numpy(st.absmax), ref_st.absmax)
    assert np.array_equal(backend.to_numpy(dequantize_4bit(p, st)), dequantize_4bit(ref, ref_st))


def test_chunking_does_not_change_bytes(monkeypatch):
    x = np.random.default_rng(4).standard_normal(200_003).astype(np.float32)
    p1, s1 = quantize_4bit(x, blocksize=64)
    import minilora.quant.blockwise as bw
    monkeypatch.setattr(bw, "CHUNK", 64 * 3)
    p2, s2 = quantize_4bit(x, blocksize=64)
    assert np.array_equal(p1, p2) and np.array_equal(s1.absmax, s2.absmax)
    np.testing.assert_array_equal(dequantize_4bit(p1, s1), dequantize_4bit(p2, s2))


def test_non_contiguous_input():
    x = np.random.default_rng(5).standard_normal((64, 130)).astype(np.float32)
    v = x[:, ::2]                                                        # a strided view: C-order flattening
    p, st = quantize_4bit(v)
    p2, _ = quantize_4bit(np.ascontiguousarray(v))
    assert np.array_equal(p, p2)


@pytest.mark.parametrize("n", [4096, 4097])
def test_dequantize_into_out(xp, n):
    x = backend.default_rng(6).standard_normal(n).astype(xp.float16)
    p, st = quantize_4bit(x, compress_statistics=True)
    out = xp.empty(n, dtype=xp.float16)
    r = dequantize_4bit(p, st, out=out)
    assert r is out and bool((out == dequantize_4bit(p, st)).all())
    with pytest.raises(ValueError, match="out must be"):
        dequantize_4bit(p, st, out=xp.empty(n, dtype=xp.float32))
