"""Grader for ex01_lora.py (notebook 01): compared with minilora.nn.lora.LoRALinear."""
import numpy as np
from grading import GRADE, check_array, check_value
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.nn import Linear, LoRALinear

EXERCISE = "ex01_lora"


def reference_layer(W, b, r, lora_alpha=8.0, seed=0):
    """minilora's LoRA layer on the frozen weight W (d_out, d_in), float64, adapters drawn from `seed`."""
    return LoRALinear(Linear.from_weight(W, b), r=r, lora_alpha=lora_alpha, rng=np.random.default_rng(seed))


@GRADE
@given(d_in=st.integers(1, 300), d_out=st.integers(1, 300), r=st.integers(1, 64))
@example(d_in=768, d_out=768, r=8)
@example(d_in=64, d_out=256, r=16)
def test_lora_param_count(ex, d_in, d_out, r):
    r = min(r, d_in, d_out)                         # LoRALinear allows 1 <= r <= min(d_in, d_out)
    layer = reference_layer(np.zeros((d_out, d_in)), None, r)
    expected = sum(p.data.size for p in layer.parameters() if p.requires_grad)
    check_value("lora_param_count(d_in, d_out, r)", ex.lora_param_count(d_in, d_out, r), expected,
                {"d_in": d_in, "d_out": d_out, "r": r})


@GRADE
@given(d_in=st.integers(1, 100), d_out=st.integers(1, 100), r=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
@example(d_in=32, d_out=48, r=4, seed=0)
@example(d_in=100, d_out=7, r=2, seed=1)
def test_lora_init(ex, d_in, d_out, r, seed):
    r = min(r, d_in, d_out)
    layer = reference_layer(np.zeros((d_out, d_in)), None, r, seed=seed)
    A_exp, B_exp = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    inputs = {"d_in": d_in, "d_out": d_out, "r": r, "rng": f"np.random.default_rng({seed})"}
    A, B = ex.lora_init(d_in, d_out, r, np.random.default_rng(seed))
    check_array("lora_init(...)[0], the matrix A", A, A_exp, inputs)
    check_array("lora_init(...)[1], the matrix B", B, B_exp, inputs)


@GRADE
@given(n=st.integers(1, 16), d_in=st.integers(1, 40), d_out=st.integers(1, 40), r=st.integers(1, 8),
       lora_alpha=st.sampled_from([1.0, 8.0, 16.0, 32.0]), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(n=4, d_in=16, d_out=24, r=4, lora_alpha=16.0, bias=True, seed=0)
@example(n=3, d_in=8, d_out=5, r=2, lora_alpha=8.0, bias=False, seed=1)
def test_lora_linear_forward(ex, n, d_in, d_out, r, lora_alpha, bias, seed):
    r = min(r, d_in, d_out)
    rng = np.random.default_rng(seed)
    x, W = rng.standard_normal((n, d_in)), rng.standard_normal((d_out, d_in))       # (N, d_in), (d_out, d_in)
    b = rng.standard_normal(d_out) if bias else None                                 # (d_out,)
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))          # trained adapters, B != 0
    layer = reference_layer(W.copy(), None if b is None else b.copy(), r, lora_alpha)
    layer.lora_A["default"].weight.data[...] = A
    layer.lora_B["default"].weight.data[...] = B
    s = layer.scaling["default"]
    expected = layer(x)
    got = ex.lora_linear_forward(x, W, b, A, B, s)
    check_array("lora_linear_forward(x, W, b, A, B, scaling)", got, expected,
                {"x": x, "W": W, "b": b, "A": A, "B": B, "scaling": s}, rtol=1e-10, atol=1e-12)
