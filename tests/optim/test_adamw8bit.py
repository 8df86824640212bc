"""AdamW8bit: the exact fma, bnb's lookup-table requantization, and byte-for-byte parity with
`bitsandbytes.optim.AdamW8bit` on the CPU after 20 steps (states, absmax, parameters).

One upstream fault is named and counted instead of hidden (TORCH_SQRT below): torch's CPU sqrt is not correctly
rounded, so bnb's parameters drift from the IEEE computation by an ulp here and there. The parity test therefore
runs bnb twice: as shipped (states and absmax byte-equal; the parameters' differing values counted exactly), and
with torch's sqrt replaced by the IEEE one, the only change (everything byte-equal, parameters included)."""
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.nn.parameter import Parameter
from minilora.optim.adamw8bit import AdamW8bit, fma32
from minilora.optim.paged8bit import PagedAdamW8bit
from minilora.optim.paged_pool import OutOfMemoryError, PagedPool, PagedTensor
from minilora.quant.blockwise import dequantize_blocks, quantize_blocks_lut, quantize_blockwise_lut
from minilora.quant.codebooks import create_dynamic_map

TORCH_SQRT = ("torch-2.13-cpu-sqrt-not-correctly-rounded",
              "torch's CPU Tensor.sqrt (Intel MKL vector math on x86) is not the IEEE square root: 1 ulp off on "
              "19,472 of 100,003 float32 inputs on an AMD EPYC with AVX-512, on 715 on an Intel Xeon with AVX-512. "
              "bnb's update "
              "divides by sqrt(v), minilora takes the IEEE sqrt, so a few parameters differ by an ulp or two; the "
              "states never depend on sqrt(v)")


# ---------------------------------------------------------------------------------------------------- fma32
def test_fma32_rounds_once_where_the_float64_route_rounds_twice():
    # a·b = 2^-24 + 2^-60 exactly; 1 + a·b lies just above the float32 midpoint 1 + 2^-24
    a = np.array([2.0 ** -24 * (1 + 2.0 ** -12)], np.float32)
    b = np.array([1 - 2.0 ** -12 + 2.0 ** -24], np.float32)
    c = np.ones(1, np.float32)
    assert a.astype(np.float64)[0] * b.astype(np.float64)[0] == 2.0 ** -24 + 2.0 ** -60
    naive = (a.astype(np.float64) * b + c).astype(np.float32)        # float64 rounds to the midpoint, then to even
    assert naive[0] == 1.0
    assert fma32(a, b, c)[0] == np.float32(1 + 2.0 ** -23)           # the correctly rounded a·b + c


def test_fma32_equals_the_exact_sum_rounded_once():
    rng = np.random.default_rng(3)
    n = 400
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    got = fma32(a, b, c)
    for x, y, z, r in zip(a, b, c, got, strict=True):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo, hi = np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))
        err = abs(Fraction(float(r)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)


def test_fma32_matches_torch_fused_ops():
    torch = pytest.importorskip("torch")
    a = np.array([2.0 ** -24 * (1 + 2.0 ** -12)], np.float32)
    b = np.array([1 - 2.0 ** -12 + 2.0 ** -24], np.float32)
    c = np.ones(1, np.float32)
    theirs = torch.from_numpy(c.copy()).addcmul_(torch.from_numpy(a), torch.from_numpy(b), value=1.0).numpy()
    assert theirs[0] == fma32(a, b, c)[0]


# ------------------------------------------------------------------------------------------ 8-bit requantization
@pytest.mark.parametrize("signed", [True, False])
def test_the_optimizers_dynamic_maps_are_the_quantizers_and_bnbs(signed):
    ours = create_dynamic_map(signed=signed)
    assert ours.dtype == np.float32 and ours.shape == (256,)
    p = Parameter(np.zeros(4096, np.float32))
    opt = AdamW8bit([p])
    p.grad = np.ones(4096, np.float32)
    opt.step()
    assert ours.tobytes() == opt.state["0"]["qmap1" if signed else "qmap2"].tobytes()   # what the optimizer uses
    assert (ours[127] == 0) if signed else (ours[0] == 0 and ours.min() == 0)
    F = pytest.importorskip("bitsandbytes.functional")
    assert ours.tobytes() == F.create_dynamic_map(signed=signed).numpy().tobytes()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [300, 4096, 5000])
def test_quantize_states_is_bnbs_cpu_lookup_table_kernel(signed, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    if not signed:
        x = x * x
    x[:256] = 0                                                       # an all-zero block: code 0, absmax 0
    code = create_dynamic_map(signed=signed)
    codes, absmax = np.empty(n, np.uint8), np.empty(-(-n // 256), np.float32)
    quantize_blocks_lut(x, code, 256, codes, absmax)
    ref, st = quantize_blockwise_lut(x, code, 256)
    assert np.array_equal(codes, ref) and np.array_equal(absmax, st.absmax)
    assert (codes[:256] == 0).all() and absmax[0] == 0
    back = dequantize_blocks(codes, absmax, code, 256)
    assert np.abs(back - x).max() <= 0.05 * np.abs(x).max()


def test_quantize_states_refuses_non_finite_states():
    code = create_dynamic_map(signed=True)
    x = np.ones(300, np.float32)
    x[7] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_blocks_lut(x, code, 256, np.empty(300, np.uint8), np.empty(2, np.float32))


# ------------------------------------------------------------------------------------------- the optimizer itself
def test_state_names_kinds_and_shapes():
    big, small = Parameter(np.zeros((64, 80), np.float32)), Parameter(np.zeros(100, np.float32))
    opt = AdamW8bit([("big", big), ("small", small)])
    big.grad, small.grad = np.ones((64, 80), np.float32), np.ones(100, np.float32)
    opt.step()
    st = opt.state["big"]
    assert set(st) == {"step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
    assert st["state1"].dtype == np.uint8 and st["state1"].shape == (64, 80)
    assert st["absmax1"].shape == (20,) and st["absmax1"].dtype == np.float32
    assert st["qmap1"].min() < 0 and st["qmap2"].min() == 0           # signed map for m, unsigned for v
    assert set(opt.state["small"]) == {"step", "state1", "state2"}
    assert opt.state["small"]["state1"].dtype == np.float32


def test_state_dict_round_trip_and_clear_errors():
    rng = np.random.default_rng(0)
    p = Parameter(rng.standard_normal(5000).astype(np.float32))
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = rng.standard_normal(5000).astype(np.float32)
    opt.step()
    sd = opt.state_dict()
    q = Parameter(p.data.copy())
    opt2 = AdamW8bit([q], lr=1e-2)
    opt2.load_state_dict(sd)
    q.grad = p.grad.copy()
    opt.step()
    opt2.step()
    assert np.array_equal(p.data, q.data)
    assert np.array_equal(opt.state["0"]["state1"], opt2.state["0"]["state1"])
    sd["state"]["0"]["absmax1"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"0\.absmax1"):
        AdamW8bit([Parameter(p.data.copy())]).load_state_dict(sd)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW8bit([p], min_8bit_size=-1)


# ------------------------------------------------------------------------------------- parity with bitsandbytes
LR, BETAS, EPS, STEPS = 1e-3, (0.9, 0.999), 1e-8, 20
SIZES = {"exact-blocks-4096": 4096, "partial-block-5000": 5000, "257-blocks-65636": 65636,
         "below-min_8bit_size-4095": 4095, "small-1000": 1000}
def _data(n):
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * (0.1 + t)).astype(np.float32) for t in range(STEPS)]
    for g in grads[:3]:
        g[256:512] = 0                                                # a block whose states stay all-zero at first
    return p0, grads


def _bnb(p0, grads, wd, ieee_sqrt: bool):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bnb.optim.AdamW8bit([tp], lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
    original = torch.Tensor.sqrt
    if ieee_sqrt:
        torch.Tensor.sqrt = lambda self: torch.from_numpy(np.sqrt(self.detach().numpy()))
    try:
        for g in grads:
            tp.grad = torch.from_numpy(g.copy())
            opt.step()
    finally:
        torch.Tensor.sqrt = original
    return tp.detach().numpy(), {k: v.numpy() for k, v in opt.state[tp].items() if hasattr(v, "numpy")}


def _ours(p0, grads, wd):
    p = Parameter(p0.copy())
    opt = AdamW8bit([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=wd)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    return p.data, opt.state["0"]


def _assert_states_equal(ours, theirs, n):
    keys = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2") if n >= 4096 else ("state1", "state2")
    for k in keys:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].tobytes() == theirs[k].tobytes(), f"{k}: {(ours[k] != theirs[k]).sum()} values differ"


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("size", list(SIZES))
def test_byte_exact_with_bnb_adamw8bit_given_an_ieee_sqrt(size, wd):
    n = SIZES[size]
    p0, grads = _data(n)
    p_bnb, st_bnb = _bnb(p0, grads, wd, ieee_sqrt=True)
    p, st = _ours(p0, grads, wd)
    _assert_states_equal(st, st_bnb, n)
    assert p.tobytes() == p_bnb.tobytes(), f"{(p != p_bnb).sum()} parameters differ"


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("size", list(SIZES))
def test_against_bnb_as_shipped_states_exact_parameters_differ_only_by_torch_sqrt(size, wd):
    n = SIZES[size]
    p0, grads = _data(n)
    p_bnb, st_bnb = _bnb(p0, grads, wd, ieee_sqrt=False)
    p, st = _ours(p0, grads, wd)
    _assert_states_equal(st, st_bnb, n)                               # the states: byte for byte, always
    scale_ulp = np.spacing(np.abs(p_bnb).max())                       # one ulp at the parameters' scale
    worst = np.abs(p - p_bnb).max()
    assert worst <= 2 * scale_ulp, f"{TORCH_SQRT[0]} explains ulp-sized differences only, got {worst / scale_ulp} ulp"
    # Which parameters differ, and how many, depends on the CPU's vector-math library (30 of 4096 on an AMD EPYC with
    # AVX-512, 2 on an Intel Xeon with AVX-512): so compare with bnb given an IEEE sqrt, not with a fixed count.
    # Every difference must be one that bnb's own sqrt makes: the same positions, the same values.
    p_ieee, _ = _bnb(p0, grads, wd, ieee_sqrt=True)                   # == ours byte for byte (test above)
    differ, by_sqrt = p != p_bnb, p_ieee != p_bnb                     # (n,) bool each
    assert np.array_equal(differ, by_sqrt), (f"{int((differ != by_sqrt).sum())} parameters differ from bnb for a "
                                             f"reason other than {TORCH_SQRT[0]}: {TORCH_SQRT[1]}")



def test_torch_sqrt_is_the_named_fault():
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(1).random(100_003) * 1e-3).astype(np.float32)
    off = int((torch.from_numpy(x).sqrt().numpy() != np.sqrt(x)).sum())
    if off == 0:
        pytest.skip(f"this CPU's torch.sqrt is correctly rounded: {TORCH_SQRT[0]} does not occur here")
    assert off <= 0.25 * x.size, TORCH_SQRT[1]


def test_bnb_defaults_match():
    bnb = pytest.importorskip("bitsandbytes")
    import inspect
    sig = inspect.signature(bnb.optim.AdamW8bit.__init__).parameters
    ours = inspect.signature(AdamW8bit.__init__).parameters
    for k in ("lr", "betas", "eps", "weight_decay", "min_8bit_size"):
        assert sig[k].default == ours[k].default, k
    assert math.isclose(ours["lr"].default, 1e-3)


# ------------------------------------------------------------------------ PagedAdamW8bit == AdamW8bit, bit for bit
def _twin_8bit(shapes, steps, pool, seed, between=None, **kw):
    rng = np.random.default_rng(seed)
    a = [Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    b = [Parameter(p.data.copy()) for p in a]
    ref, paged = AdamW8bit(a, lr=1e-2, weight_decay=0.1, **kw), PagedAdamW8bit(b, lr=1e-2, weight_decay=0.1,
                                                                                pool=pool, **kw)
    for t in range(steps):
        for p, q in zip(a, b, strict=True):
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
            q.grad = p.grad.copy()
        ref.step()
        paged.step()
        if between is not None:
            between(pool, t)
    return a, b, ref, paged


def _assert_twins_equal(a, b, ref, paged):
    for p, q in zip(a, b, strict=True):
        assert p.data.tobytes() == q.data.tobytes()
    sd, ref_sd = paged.state_dict(), ref.state_dict()
    for name, entry in ref_sd["state"].items():
        for k, v in entry.items():
            if k != "step":
                assert sd["state"][name][k].tobytes() == v.tobytes(), (name, k)


@settings(max_examples=20, deadline=None)
@given(pages=st.integers(1, 12), prefetch=st.booleans(), steps=st.integers(1, 4), seed=st.integers(0, 999),
       spike=st.integers(0, 40_000))
def test_paged_adamw8bit_matches_adamw8bit_bit_for_bit_under_evictions(pages, prefetch, steps, seed, spike):
    shapes = [(40, 130), (7,), (3, 1500)]            # 8-bit with a partial block, 32-bit, 8-bit
    pool = PagedPool(budget_bytes=30_000, page_size=256 * pages, paged_threshold=100, prefetch=prefetch)

    def spike_then_free(pool, t):
        try:
            pool.allocate("act", spike, "activations")
            pool.free("act")
        except OutOfMemoryError:
            pool.evict_all()
        pool.check()

    a, b, ref, paged = _twin_8bit(shapes, steps, pool, seed, spike_then_free, min_8bit_size=4096)
    _assert_twins_equal(a, b, ref, paged)
    assert isinstance(paged.state["0"]["state1"], PagedTensor)
    assert pool.peak_device_bytes <= 30_000


def test_paged_adamw8bit_with_every_page_evicted_every_step_and_state_dict_round_trip():
    pool = PagedPool(budget_bytes=None, page_size=4096)
    shapes = [(300, 400), (512,), (100_000,)]
    a, b, ref, paged = _twin_8bit(shapes, 4, pool, 0, lambda pool, t: pool.evict_all(), min_8bit_size=1000)
    assert pool.stats.bytes_evicted == 4 * 2 * (120_000 + 100_000)  # uint8 codes: one byte per element and state
    _assert_twins_equal(a, b, ref, paged)
    sd = paged.state_dict()
    paged.load_state_dict(sd)
    assert isinstance(paged.state["0"]["state1"], PagedTensor)
    pool.check()
    _assert_twins_equal(a, b, ref, paged)


def test_paged_adamw8bit_refuses_pages_that_split_a_block():
    with pytest.raises(ValueError, match="straddle"):
        PagedAdamW8bit([Parameter(np.zeros(200_000, np.float32))], pool=PagedPool(budget_bytes=None, page_size=1000))
