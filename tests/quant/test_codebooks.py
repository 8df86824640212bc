"""Code tables: the hardcoded NF4/FP4/Int4 values, their re-derivations, the dynamic 8-bit map, the midpoints."""
import numpy as np
import pytest

from minilora.quant import (
    create_dynamic_map,
    create_fp8_map,
    create_normal_float_map,
    create_normal_map,
    get_4bit_type,
    linspace_f32,
)
from minilora.quant.codebooks import NF4_CODE, midpoints

# the 15 float32 decision thresholds of NF4 (docs/quantization.md §1.3)
NF4_MID = [-0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
           -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
           0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683, 0.5016634464263916,
           0.6427869200706482, 0.8614784479141235]


def test_nf4_table_shape_and_values(xp):
    code = get_4bit_type("nf4", xp=np)                                   # the golden values: NumPy
    assert code.dtype == np.float32 and code.shape == (16,)
    assert np.all(np.diff(code) > 0) and code[0] == -1 and code[15] == 1 and code[7] == 0
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8              # asymmetric: 7 / 0 / 8
    assert np.array_equal(code, np.array(NF4_CODE, np.float32))
    assert np.array_equal(code.astype(np.float64), np.array(NF4_CODE))  # every value exactly a float32
    assert get_4bit_type("nf4", xp=xp).dtype == xp.float32


def test_create_normal_map_reproduces_nf4():
    # within the ~1.2e-7 of a float64 re-derivation, and in fact exactly thanks to the torch-style linspace
    nm = create_normal_map()
    assert np.abs(nm - get_4bit_type("nf4")).max() <= 1.2e-7
    assert np.array_equal(nm, get_4bit_type("nf4"))
    # a plain float64 linspace misses by up to 1 float32 ulp: that is why the library hardcodes the table
    from statistics import NormalDist
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(0.9677083, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(0.9677083, 0.5, 8)[:-1]]
    naive = np.sort(np.array(pos + [0.0] + neg)) / max(pos)
    assert 0 < np.abs(naive - nm).max() < 2e-7


def test_linspace_f32_matches_torch_rule():
    # torch.linspace(0.9677083, 0.5, 9) values (float32), computed half forwards, half backwards
    v = np.array(linspace_f32(0.9677083, 0.5, 9), np.float32)
    assert v[0] == np.float32(0.9677083) and v[-1] == np.float32(0.5) and np.all(np.diff(v) < 0)
    assert linspace_f32(0.1, 1.0, 1) == [np.float32(0.1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_normal_float_k_bits(bits):
    t = create_normal_float_map(bits)
    assert t.shape == (2 ** bits,) and np.all(np.diff(t) > 0)
    assert t[0] == -1 and t[-1] == 1 and (t == 0).sum() == 1
    assert (t > 0).sum() == 2 ** (bits - 1) and (t < 0).sum() == 2 ** (bits - 1) - 1
    if bits == 4:   # our default offset mean(1 - 1/30, 1 - 1/32) = 0.96770833.. is bnb's 0.9677083 to 7 digits
        assert np.abs(t - get_4bit_type("nf4")).max() < 1e-6
        assert np.array_equal(create_normal_float_map(4, offset=0.9677083), get_4bit_type("nf4"))


def test_nf_tables_beat_uniform_on_gaussian():
    # the point of NormalFloat: on N(0,1) blocks it has lower error than a uniform grid with the same bits.
    # (Not at 2 bits: NF2 = [-1, 0, 0.44, 1] spends a level on exact zero, and [-1, -1/3, 1/3, 1] wins.)
    x = np.random.default_rng(0).standard_normal((2048, 64)).astype(np.float32)
    s = x / np.abs(x).max(1, keepdims=True)
    for bits in (3, 4, 5):
        nf = create_normal_float_map(bits)
        uni = np.linspace(-1, 1, 2 ** bits).astype(np.float32)
        err = [np.abs(s[..., None] - t).min(-1).mean() for t in (nf, uni)]
        assert err[0] < err[1], bits


def test_fp4_table():
    code = get_4bit_type("fp4")
    raw = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert np.array_equal(code, raw.astype(np.float32))
    assert not np.signbit(code[8])                                       # bnb's "-0" is the integer -0 == +0.0
    mid, order = midpoints(code)
    assert order.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
    np.testing.assert_allclose(mid[8:], [0.0026041667, 0.0859375, 0.2083333, 0.2916667, 0.4166667, 0.5833334,
                                         0.8333334], rtol=1e-6)
    assert mid[7] == 0.0 and np.array_equal(mid[:7], -mid[8:][::-1])


def test_create_fp8_map_fp4_vs_hardcoded():
    fp4 = create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4)
    table = np.sort(get_4bit_type("fp4"))
    same = np.isclose(fp4, table, rtol=0, atol=0)
    assert same.sum() == 14                                              # all but the two subnormals agree
    assert np.isclose(np.abs(fp4[~same]), 1 / 48).all() and np.isclose(np.abs(table[~same]), 1 / 192).all()
    e4m3 = create_fp8_map(signed=True, exponent_bits=4, precision_bits=3, total_bits=8)
    assert e4m3.shape == (256,) and e4m3.max() == 1.0
    with pytest.raises(ValueError):
        create_fp8_map(signed=True, exponent_bits=4, precision_bits=4, total_bits=8)


def test_int4_table_and_unknown_type():
    code = get_4bit_type("int4")
    assert np.allclose(code * 7, [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7])
    with pytest.raises(ValueError, match="unknown 4-bit type"):
        get_4bit_type("af4")


def test_nf4_midpoints_table():
    mid, order = midpoints(get_4bit_type("nf4"))
    assert mid.dtype == np.float32 and np.array_equal(mid, np.array(NF4_MID, np.float32))
    assert order.tolist() == list(range(16))


def test_dynamic_map_properties(xp):
    d = create_dynamic_map(signed=True)
    assert d.shape == (256,) and d.dtype == np.float32 and np.all(np.diff(d) > 0)
    assert d[127] == 0 and d[-1] == 1.0 and d[0] == np.float32(-0.99296875)
    assert (d < 0).sum() == 127 and (d > 0).sum() == 128
    assert abs(np.abs(d[d != 0]).min() - 5.5e-7) < 1e-12
    u = create_dynamic_map(signed=False)
    assert u[0] == 0 and u[-1] == 1 and (u > 0).sum() == 255 and abs(u[1] - 3.25e-7) < 1e-12
    assert create_dynamic_map(xp=xp).dtype == xp.float32
