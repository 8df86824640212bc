"""AdamW: the 20-step trajectory equals torch.optim.AdamW's; frozen parameters get no state; state_dict round trips."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.backend import to_numpy
from minilora.nn.parameter import Parameter
from minilora.optim import AdamW, adamw_update

SHAPES = [(4, 3), (5,), (2, 3, 2)]


def grad_sequence(rng, shapes, steps, dtype):
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]


def run_minilora(init, grads, xp, **kw):
    params = [Parameter(xp.asarray(a.copy())) for a in init]
    opt = AdamW(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = xp.asarray(g)
        opt.step()
    return [to_numpy(p.data) for p in params]


def run_torch(torch, init, grads, **kw):
    params = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    opt = torch.optim.AdamW(params, foreach=False, **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_trajectory_matches_torch(xp, dtype, rtol, weight_decay):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = grad_sequence(rng, SHAPES, 20, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    ours = run_minilora(init, grads, xp, **kw)
    ref = run_torch(torch, init, grads, **kw)
    for a, b, a0 in zip(ours, ref, init, strict=True):
        assert a.dtype == dtype
        assert not np.array_equal(a, a0)                      # it moved
        # relative to the distance travelled, so a parameter near zero does not hide an error
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(a - a0).max())


def test_first_step_by_hand():
    # t=1: m = (1-b1) g, v = (1-b2) g², so the bias-corrected step is lr·g/(|g| + eps) = lr·sign(g) for large |g|
    p = np.array([1.0, -2.0])
    g = np.array([3.0, -4.0])
    m, v = np.zeros(2), np.zeros(2)
    adamw_update(p, g, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.5)
    expect = np.array([1.0, -2.0]) * (1 - 0.1 * 0.5) - 0.1 * np.array([3.0, -4.0]) / (np.array([3.0, 4.0]) + 1e-8)
    np.testing.assert_allclose(p, expect, rtol=1e-14)
    np.testing.assert_allclose(m, [0.3, -0.4], rtol=1e-14)
    np.testing.assert_allclose(v, [0.009, 0.016], rtol=1e-12)


def test_frozen_and_gradless_params_get_no_state():
    frozen = Parameter(np.ones(3), requires_grad=False)
    unused = Parameter(np.ones(2))
    used = Parameter(np.ones(4))
    opt = AdamW([("frozen", frozen), ("unused", unused), ("used", used)], lr=0.1)
    assert [n for n, _ in opt.named_params] == ["unused", "used"]
    frozen.grad = np.ones(3)          # even a stray gradient on a frozen parameter is ignored
    used.grad = np.ones(4)
    opt.step()
    assert set(opt.state) == {"used"}
    assert opt.state["used"]["step"] == 1
    np.testing.assert_array_equal(frozen.data, np.ones(3))
    np.testing.assert_array_equal(unused.data, np.ones(2))
    assert not np.array_equal(used.data, np.ones(4))


def test_per_parameter_step_counts_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(3), rng.standard_normal(3)]
    ours = [Parameter(a.copy()) for a in init]
    ref = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    o1, o2 = AdamW(ours, lr=0.05), torch.optim.AdamW(ref, lr=0.05, foreach=False)
    for t in range(6):
        g = [rng.standard_normal(3), rng.standard_normal(3)]
        for i in range(2):
            skip = i == 1 and t < 3            # the second parameter gets its first gradient at t = 3
            ours[i].grad = None if skip else g[i].copy()
            ref[i].grad = None if skip else torch.tensor(g[i])
        o1.step()
        o2.step()
    assert o1.state["1"]["step"] == 3 and o1.step_count == 6
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.data, b.detach().numpy(), rtol=1e-12)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    init = {"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()} for _ in range(8)]

    def make():
        params = {k: Parameter(v.copy()) for k, v in init.items()}
        return params, AdamW(list(params.items()), lr=3e-2, weight_decay=0.1)

    def steps(params, opt, gs):
        for g in gs:
            for k in params:
                params[k].grad = g[k].copy()
            opt.step()

    p1, o1 = make()
    steps(p1, o1, grads)
    p2, o2 = make()
    steps(p2, o2, grads[:5])
    sd = o2.state_dict()
    p3, o3 = make()
    for k in p3:
        p3[k].data[...] = p2[k].data
    o3.load_state_dict(sd)
    assert o3.state["a"]["exp_avg"] is not sd["state"]["a"]["exp_avg"]    # copied, not aliased
    steps(p3, o3, grads[5:])
    for k in p1:
        np.testing.assert_array_equal(p1[k].data, p3[k].data)              # bit-identical
    assert o3.step_count == 8


def test_load_state_dict_mismatch_errors():
    opt = AdamW([("w", Parameter(np.zeros((2, 2))))])
    opt.state = {"w": {"step": 1, "exp_avg": np.zeros((2, 2)), "exp_avg_sq": np.zeros((2, 2))}}
    sd = opt.state_dict()
    other = AdamW([("v", Parameter(np.zeros((2, 2))))])
    with pytest.raises(ValueError, match="does not train.*'w'"):
        other.load_state_dict(sd)
    wrong = AdamW([("w", Parameter(np.zeros((3, 2))))])
    with pytest.raises(ValueError, match="has shape"):
        wrong.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing 'state'"):
        opt.load_state_dict({"hyperparams": {}, "step_count": 0})


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW([Parameter(np.zeros(2))], **kw)


def test_not_a_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="expected a Parameter"):
        AdamW([np.zeros(3)])


@settings(max_examples=40, deadline=None)
@given(lr=st.floats(1e-4, 1.0), b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999),
       g=st.floats(-1e3, 1e3).filter(lambda x: abs(x) > 1e-3), step=st.integers(1, 50))
def test_update_is_bounded_by_lr(lr, b1, b2, g, step):
    # with zero initial moments and no weight decay, one Adam step never moves a parameter by more than
    # lr·(1−β1)/√(1−β2)/(1−β1ᵗ)·√(1−β2ᵗ), which is lr on the first step: the step size is set by lr, not by |g|
    p = np.zeros(1)
    m = np.zeros(1)
    v = np.zeros(1)
    adamw_update(p, np.array([g]), m, v, step, lr, b1, b2, 1e-8, 0.0)
    bound = lr * (1 - b1) / np.sqrt(1 - b2) / (1 - b1 ** step) * np.sqrt(1 - b2 ** step)
    assert abs(p[0]) <= bound * (1 + 1e-12)
    assert np.sign(p[0]) == -np.sign(g)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-5, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-3),
       wd=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_any_hyperparameters_match_torch(lr, b1, b2, eps, wd, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal((3, 2))]
    grads = grad_sequence(rng, [(3, 2)], 5, np.float64)
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    (a,), (b,) = run_minilora(init, grads, np, **kw), run_torch(torch, init, grads, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(a - init[0]).max()))


# ------------------------------------------------------------------------------ float32, bit for bit with torch
def cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read().replace("\n", " ")
    except OSError:
        return False


BIT_SHAPES = [(64, 32), (32,), (1001,), (7,),                # vector bodies and scalar tails of torch's kernels
              (300, 257)]                                      # > adamw.CHUNK: updated chunk by chunk, partial last
BIT_CASES = [dict(lr=1e-3), dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1),
             dict(lr=3e-3, betas=(0.3, 0.999), weight_decay=0.0)]      # β1 < 0.5: lerp from the other end


def run_both32(torch, kw, sqrt=None, monkeypatch=None):
    """20 steps on each side with default torch.optim.AdamW (no foreach/fused argument: what a learner gets)."""
    if sqrt is not None:
        import minilora.optim.adamw as adamw_module
        monkeypatch.setattr(adamw_module, "_sqrt", sqrt)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in BIT_SHAPES]
    grads = grad_sequence(rng, BIT_SHAPES, 20, np.float32)
    ours = [Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    o, t = AdamW(ours, **kw), torch.optim.AdamW(theirs, **kw)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs, strict=True):
            p.grad, q.grad = g.copy(), torch.tensor(g)
        o.step()
        t.step()
    return ours, theirs, o, t


@pytest.mark.skipif(not cpu_has_fma(), reason="torch fuses multiply-adds only on CPUs with FMA; without it the "
                                               "float32 trajectory is bounded by test_trajectory_matches_torch")
@pytest.mark.parametrize("kw", BIT_CASES)
def test_float32_is_bit_identical_to_torch_given_the_same_square_roots(kw, monkeypatch):
    """Every rounding of torch's CPU AdamW except its square root, reproduced: with torch's √ swapped in, 20 steps
    give the same float32 bits in p, m and v."""
    torch = pytest.importorskip("torch")

    def torch_sqrt(x, out):
        out[...] = torch.from_numpy(np.ascontiguousarray(x)).sqrt().numpy()
        return out
    ours, theirs, o, t = run_both32(torch, kw, torch_sqrt, monkeypatch)
    for (name, p), q in zip(o.named_params, theirs, strict=True):
        np.testing.assert_array_equal(p.data, q.detach().numpy())
        np.testing.assert_array_equal(o.state[name]["exp_avg"], t.state[q]["exp_avg"].numpy())
        np.testing.assert_array_equal(o.state[name]["exp_avg_sq"], t.state[q]["exp_avg_sq"].numpy())


@pytest.mark.skipif(not cpu_has_fma(), reason="torch fuses multiply-adds only on CPUs with FMA")
@pytest.mark.parametrize("kw", BIT_CASES)
def test_float32_states_bit_identical_and_parameters_within_an_ulp(kw):
    """With the IEEE square root: m and v equal torch's bit for bit (they never see √v). The parameters differ only
    through torch's CPU sqrt (MKL's, not correctly rounded: up to ~19% of float32 results one ulp off, by CPU):
    measured, at most half an ulp of each tensor's largest |value|, with 94% or more of the elements bit-equal
    (asserted: 1 ulp, 90%)."""
    torch = pytest.importorskip("torch")
    ours, theirs, o, t = run_both32(torch, kw)
    for (name, p), q in zip(o.named_params, theirs, strict=True):
        np.testing.assert_array_equal(o.state[name]["exp_avg"], t.state[q]["exp_avg"].numpy())
        np.testing.assert_array_equal(o.state[name]["exp_avg_sq"], t.state[q]["exp_avg_sq"].numpy())
        a, b = p.data, q.detach().numpy()
        assert np.abs(a - b).max() <= np.spacing(np.abs(b).max()), name
        assert np.mean(a == b) >= 0.9, name


def test_fma32_fast_path_equals_round_to_odd():
    """fma32 rounds the float64 sum directly except on float32 midpoints and subnormals; inputs built to land on
    midpoints (a tiny c under an exactly representable a·b) and wide-range ones agree with the exact path, bit for
    bit."""
    from minilora.optim.adamw8bit import _fma32_exact, fma32
    rng = np.random.default_rng(1)
    n = 200_000
    b = (rng.integers(1, 2 ** 12, n) * 2.0 ** -12 + 1).astype(np.float32)
    tiny = (rng.standard_normal(n) * 2.0 ** -60).astype(np.float32)
    wide = lambda: (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38, n)).astype(np.float32)  # noqa: E731
    naive = (np.multiply(np.float32(1 + 2 ** -12), b, dtype=np.float64) + tiny).astype(np.float32)
    assert (naive != _fma32_exact(np.float32(1 + 2 ** -12), b, tiny)).sum() > 1000      # double rounding happens
    for a, bb, c in [(np.float32(1 + 2 ** -12), b, tiny), (rng.standard_normal(n).astype(np.float32), b, tiny),
                     (np.float32(0.1), wide(), wide())]:
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(fma32(a, bb, c).view(np.uint32), _fma32_exact(a, bb, c).view(np.uint32))


def test_chunked_update_equals_one_call_and_non_contiguous_parameters_take_one_call(monkeypatch):
    """AdamW.update walks large NumPy parameters in CHUNK-sized flat pieces (fma32's float64 temporaries then fit in
    L2); the update is elementwise, so the bits equal one adamw_update over the whole arrays. A parameter whose flat
    view would be a copy (not C-contiguous) must not be chunked: its update would be lost."""
    import minilora.optim.adamw as adamw_module
    rng = np.random.default_rng(3)
    shape = (adamw_module.CHUNK + 1000,)
    p0, grads = rng.standard_normal(shape).astype(np.float32), [rng.standard_normal(shape).astype(np.float32)
                                                                 for _ in range(3)]
    ours = Parameter(p0.copy())
    opt = AdamW([ours], lr=1e-2, weight_decay=0.1)
    calls = []
    real = adamw_module.adamw_update
    monkeypatch.setattr(adamw_module, "adamw_update", lambda p, *a: (calls.append(p.size), real(p, *a))[1])
    m, v, ref = np.zeros(shape, np.float32), np.zeros(shape, np.float32), p0.copy()
    for t, g in enumerate(grads, start=1):
        ours.grad = g.copy()
        opt.step()
        real(ref, g, m, v, t, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    assert calls[:2] == [adamw_module.CHUNK, 1000]                     # chunked: a full chunk, then the rest
    np.testing.assert_array_equal(ours.data.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(opt.state["0"]["exp_avg_sq"].view(np.uint32), v.view(np.uint32))

    calls.clear()
    big = np.zeros((2, 2 * adamw_module.CHUNK), np.float32)[:, ::2]    # a strided view: reshape(-1) would copy
    q = Parameter(big)
    q.grad = np.ones(big.shape, np.float32)
    AdamW([q], lr=0.1, weight_decay=0.0).step()
    assert calls == [big.size]                                          # one call, on the view itself
    np.testing.assert_allclose(big, -0.1, rtol=1e-6)                    # first step: -lr · g/|g|, written through
