"""Readable formulas next to the fast forms the layers run: the two must compute the same function.

GELU: `gelu_tanh_*` is GPT-2's formula as written, ½ x (1 + tanh(u)); `gelu_*` is the same thing as x·σ(2u)
with one exp. Stated tolerance, relative to max(1, |y|): forwards within 1e-12 in float64 and 1e-6 in float32 (a few
float32 roundings on each side; each is within 2e-7 of the float64 value); backwards within 1e-12 and 1e-5 (the
1 − t² of the formula loses a few more bits where tanh saturates)."""
import numpy as np
import pytest
from nn_reference import fd_grad, rel_err

from minilora.nn import functional as F

TOL = {np.float64: (1e-12, 1e-12), np.float32: (1e-6, 1e-5)}   # (forward, backward)


def grid(dtype):
    """Dense on [-8, 8], where GELU bends, plus large and tiny magnitudes of both signs."""
    x = np.concatenate([np.linspace(-8, 8, 20001), [-1e4, -60.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 60.0, 1e4]])
    return x.astype(dtype).reshape(1, -1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_gelu_equals_the_tanh_formula(dtype):
    x = grid(dtype)
    y_ref, c_ref = F.gelu_tanh_forward(x)
    y, c = F.gelu_forward(x)
    assert y.dtype == y_ref.dtype == dtype
    scale = np.maximum(1.0, np.abs(y_ref.astype(np.float64)))
    assert np.max(np.abs(y.astype(np.float64) - y_ref) / scale) <= TOL[dtype][0]
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(dtype)
    dx_ref, dx = F.gelu_tanh_backward(dy, c_ref), F.gelu_backward(dy, c)
    assert np.max(np.abs(dx.astype(np.float64) - dx_ref) / np.maximum(1.0, np.abs(dx_ref))) <= TOL[dtype][1]


def test_tanh_formula_backward_matches_finite_differences():
    x = np.random.default_rng(1).standard_normal((3, 7)) * 3
    dout = np.random.default_rng(2).standard_normal((3, 7))
    _, cache = F.gelu_tanh_forward(x)
    dx = F.gelu_tanh_backward(dout, cache)
    assert rel_err(dx, fd_grad(lambda: float(np.sum(F.gelu_tanh_forward(x)[0] * dout)), x)) < 1e-8


def test_tanh_formula_equals_torch():
    torch = pytest.importorskip("torch")
    x = grid(np.float64)
    y, _ = F.gelu_tanh_forward(x)
    ty = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.max(np.abs(y - ty) / np.maximum(1.0, np.abs(ty))) <= 1e-14
