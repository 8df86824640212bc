"""Grader for ex05_lora_backprop.py (notebook 05): compared with minilora/nn/functional.py (lora_forward,
lora_backward) and LoRALinear.backward, in float64."""
import numpy as np
from grading import GRADE, check_array
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.nn import Linear, LoRALinear
from minilora.nn import functional as F

EXERCISE = "ex05_lora_backprop"
TOL = {"rtol": 1e-10, "atol": 1e-12}

cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 24), st.integers(1, 24),
                  st.integers(1, 6), st.sampled_from([0.5, 2.0, 4.0]))
EXAMPLES = [(0, 5, 12, 7, 3, 2.0), (1, 2, 6, 10, 2, 4.0)]          # d_in != d_out: a transpose cannot hide


def make(case):
    """float64 x (N, d_in), A (r, d_in), B (d_out, r), dy (N, d_out), W (d_out, d_in) and the scaling."""
    seed, n, d_in, d_out, r, s = case
    r = min(r, d_in, d_out)
    g = np.random.default_rng(seed)
    x, A, B = g.standard_normal((n, d_in)), g.standard_normal((r, d_in)), g.standard_normal((d_out, r))
    dy, W = g.standard_normal((n, d_out)), g.standard_normal((d_out, d_in))
    return x, A, B, dy, W, s


def with_examples(f):
    for e in EXAMPLES:
        f = example(case=e)(f)
    return f


@GRADE
@given(case=cases)
@with_examples
def test_lora_forward(ex, case):
    x, A, B, _, _, s = make(case)
    y_exp, (_, hs_exp) = F.lora_forward(x, A, B, s)
    inputs = {"x": x, "A": A, "B": B, "scaling": s}
    y, cache = ex.lora_forward(x, A, B, s)
    check_array("lora_forward(x, A, B, scaling)[0], y", y, y_exp, inputs, **TOL)
    if not (isinstance(cache, tuple) and len(cache) == 2):
        raise AssertionError(f"lora_forward must return (y, cache) with cache = (x, hs); got cache = {cache!r:.200}")
    check_array("lora_forward(x, A, B, scaling)[1][0], the cached x", cache[0], x, inputs)
    check_array("lora_forward(x, A, B, scaling)[1][1], the cached hs = s·x Aᵀ", cache[1], hs_exp, inputs, **TOL)


@GRADE
@given(case=cases)
@with_examples
def test_lora_backward(ex, case):
    x, A, B, dy, _, s = make(case)
    _, cache = F.lora_forward(x, A, B, s)
    dx_exp, dA_exp, dB_exp = F.lora_backward(dy, cache, A, B, s)
    inputs = {"dy": dy, "cache": "(x, hs) from minilora's lora_forward", "x": x, "A": A, "B": B, "scaling": s}
    dx, dA, dB = ex.lora_backward(dy, (x.copy(), cache[1].copy()), A, B, s)
    check_array("lora_backward(...)[2], dB", dB, dB_exp, inputs, **TOL)
    check_array("lora_backward(...)[1], dA", dA, dA_exp, inputs, **TOL)
    check_array("lora_backward(...)[0], dx", dx, dx_exp, inputs, **TOL)


@GRADE
@given(case=cases)
@with_examples
def test_lora_linear_backward(ex, case):
    x, A, B, dy, W, s = make(case)
    r = A.shape[0]
    layer = LoRALinear(Linear.from_weight(W.copy()), r=r, lora_alpha=s * r)   # scaling = alpha / r = s
    layer.lora_A["default"].weight.data[...] = A
    layer.lora_B["default"].weight.data[...] = B
    layer(x)
    dx_exp = layer.backward(dy)
    dA_exp, dB_exp = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    inputs = {"dy": dy, "x": x, "W": W, "A": A, "B": B, "scaling": s}
    dx, dA, dB = ex.lora_linear_backward(dy, x, W, A, B, s)
    check_array("lora_linear_backward(...)[0], dx (both paths)", dx, dx_exp, inputs, **TOL)
    check_array("lora_linear_backward(...)[1], dA", dA, dA_exp, inputs, **TOL)
    check_array("lora_linear_backward(...)[2], dB", dB, dB_exp, inputs, **TOL)
