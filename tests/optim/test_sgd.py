"""SGD: the trajectory equals torch.optim.SGD's for plain, momentum, dampening, Nesterov and weight decay."""
import numpy as np
import pytest

from minilora.backend import to_numpy
from minilora.nn.parameter import Parameter
from minilora.optim import SGD

SHAPES = [(3, 4), (6,)]


@pytest.mark.parametrize("kw", [
    dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_trajectory_matches_torch(xp, kw, dtype, rtol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(20)]
    ours = [Parameter(xp.asarray(a.copy())) for a in init]
    ref = [torch.nn.Parameter(torch.tensor(a.copy())) for a in init]
    o1, o2 = SGD(ours, **kw), torch.optim.SGD(ref, foreach=False, **kw)
    for gs in grads:
        for p, q, g in zip(ours, ref, gs, strict=True):
            p.grad = xp.asarray(g)
            q.grad = torch.tensor(g)
        o1.step()
        o2.step()
    for p, q, a0 in zip(ours, ref, init, strict=True):
        a = to_numpy(p.data)
        np.testing.assert_allclose(a, q.detach().numpy(), rtol=rtol, atol=rtol * np.abs(a - a0).max())


def test_no_momentum_means_no_buffer_and_grad_untouched():
    p = Parameter(np.array([1.0, 2.0]))
    p.grad = np.array([0.5, -0.5])
    opt = SGD([p], lr=0.1, weight_decay=0.1)
    opt.step()
    assert set(opt.state["0"]) == {"step"}
    np.testing.assert_allclose(p.data, [1.0 - 0.1 * (0.5 + 0.1), 2.0 - 0.1 * (-0.5 + 0.2)], rtol=1e-15)
    np.testing.assert_array_equal(p.grad, [0.5, -0.5])     # weight decay did not write into .grad


def test_state_dict_round_trip():
    rng = np.random.default_rng(3)
    p1, p2 = Parameter(rng.standard_normal(5)), None
    o1 = SGD([("w", p1)], lr=0.1, momentum=0.9)
    gs = [rng.standard_normal(5) for _ in range(6)]
    for g in gs[:3]:
        p1.grad = g
        o1.step()
    p2 = Parameter(p1.data.copy())
    o2 = SGD([("w", p2)], lr=0.1, momentum=0.9)
    o2.load_state_dict(o1.state_dict())
    for g in gs[3:]:
        p1.grad = g.copy()
        o1.step()
        p2.grad = g.copy()
        o2.step()
    np.testing.assert_array_equal(p1.data, p2.data)


@pytest.mark.parametrize("kw, match", [(dict(lr=-0.1), "lr"), (dict(momentum=-0.5), "momentum"),
                                       (dict(weight_decay=-1.0), "weight_decay"),
                                       (dict(nesterov=True), "nesterov")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SGD([Parameter(np.zeros(2))], **kw)
