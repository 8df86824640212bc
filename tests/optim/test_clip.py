"""clip_grad_norm_ equals torch.nn.utils.clip_grad_norm_: same returned norm, same clipped gradients."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.backend import to_numpy
from minilora.nn.parameter import Parameter
from minilora.optim import clip_grad_norm_


@pytest.mark.parametrize("max_norm", [0.3, 1.0, 100.0])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_matches_torch(xp, max_norm, norm_type, dtype, rtol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(4, 5), (7,), (2, 3)]]
    ours = [Parameter(xp.zeros(g.shape, dtype=dtype)) for g in grads]
    ref = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64 if dtype == np.float64 else torch.float32))
           for g in grads]
    for p, q, g in zip(ours, ref, grads, strict=True):
        p.grad = xp.asarray(g.copy())
        q.grad = torch.tensor(g.copy())
    total = clip_grad_norm_(ours, max_norm, norm_type)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type).item()
    assert isinstance(total, float)
    assert total == pytest.approx(total_ref, rel=rtol)
    for p, q in zip(ours, ref, strict=True):
        g = to_numpy(p.grad)
        np.testing.assert_allclose(g, q.grad.numpy(), rtol=rtol, atol=0)


def test_skips_missing_grads_and_accepts_named_pairs():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    a.grad = np.array([3.0, 4.0])
    total = clip_grad_norm_([("a", a), ("b", b)], 1.0)
    assert total == 5.0 and b.grad is None
    np.testing.assert_allclose(a.grad, [3.0 / (5 + 1e-6), 4.0 / (5 + 1e-6)], rtol=1e-15)
    assert clip_grad_norm_([b], 1.0) == 0.0


def test_nonfinite_gradient():
    a = Parameter(np.zeros(3))
    a.grad = np.array([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="1 of 1 gradients are non-finite, the first is '0'"):
        clip_grad_norm_([a], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([a], -1.0)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20), max_norm=st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_max_and_direction_is_kept(values, max_norm):
    g0 = np.array(values)
    p = Parameter(np.zeros_like(g0))
    p.grad = g0.copy()
    total = clip_grad_norm_([p], max_norm)
    assert total == pytest.approx(np.linalg.norm(g0), rel=1e-12, abs=1e-300)
    assert np.linalg.norm(p.grad) <= max_norm * (1 + 1e-12) or total <= max_norm
    if max_norm / (total + 1e-6) < 1.0:
        np.testing.assert_allclose(p.grad * (total + 1e-6) / max_norm, g0, rtol=1e-9, atol=1e-12)
    else:
        np.testing.assert_array_equal(p.grad, g0)
