"""Grader for ex11_beyond_lora.py (notebook 11): compared with minilora.nn.LoRALinear(use_dora=True).merge (DoRA's
weight, minilora/nn/functional.py's dora_weight_norm), minilora.nn.lora.pissa_factors and the states that
minilora.optim.AdamW8bit allocates."""
import numpy as np
from grading import GRADE, check_array, check_value
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.nn import Linear, LoRALinear
from minilora.nn.lora import pissa_factors
from minilora.nn.parameter import Parameter
from minilora.optim import AdamW8bit

EXERCISE = "ex11_beyond_lora"
TOL = {"rtol": 1e-10, "atol": 1e-12}

cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 24), st.integers(2, 24), st.integers(1, 6),
                  st.sampled_from([1, 8, 16, 32]))
EXAMPLES = [(0, 12, 7, 3, 16), (1, 5, 9, 4, 8)]           # d_in != d_out: a norm over the wrong axis cannot hide


def with_examples(f):
    for e in EXAMPLES:
        f = example(case=e)(f)
    return f


@GRADE
@given(case=cases)
@with_examples
def test_dora_weight(ex, case):
    seed, d_in, d_out, r, alpha = case
    r = min(r, d_in, d_out)
    g = np.random.default_rng(seed)
    W0 = g.standard_normal((d_out, d_in))
    layer = LoRALinear(Linear.from_weight(W0.copy()), r=r, lora_alpha=alpha, use_dora=True, init_lora_weights=False,
                       rng=np.random.default_rng(seed + 1))                  # B random: the adapter counts
    A, B = layer.lora_A["default"].weight.data.copy(), layer.lora_B["default"].weight.data.copy()
    mag = layer.lora_magnitude_vector["default"].weight.data
    mag *= 1 + 0.3 * g.standard_normal(d_out)                                # m moved off its initial norms
    m, s = mag.copy(), layer.scaling["default"]
    layer.merge()                                                            # base weight := m ⊙ V / ‖V‖
    check_array("dora_weight(W0, A, B, scaling, m)", ex.dora_weight(W0.copy(), A, B, s, m),
                layer.base_layer.weight.data, {"W0": W0, "A": A, "B": B, "scaling": s, "m": m}, **TOL)


@GRADE
@given(case=cases)
@with_examples
def test_pissa_init(ex, case):
    seed, d_in, d_out, r, alpha = case
    r = min(r, d_in, d_out)
    W0 = np.random.default_rng(seed).standard_normal((d_out, d_in))
    s = alpha / r
    got = ex.pissa_init(W0.copy(), r, s)
    inputs = {"W0": W0, "r": r, "scaling": s}
    if not (isinstance(got, tuple) and len(got) == 3):
        check_value("pissa_init(W0, r, scaling) returns (A, B, W_res): its length", len(got), 3, inputs)
    for what, a, e in zip(("A", "B", "W_res"), got, pissa_factors(W0, r, s), strict=True):
        check_array(f"pissa_init(W0, r, scaling)'s {what}", a, e, inputs, rtol=1e-9, atol=1e-10)


def bytes_allocated(numel, min_8bit_size):
    """The bytes AdamW8bit's state holds for one parameter of numel values, the shared maps left out."""
    p = Parameter(np.random.default_rng(numel).standard_normal(numel).astype(np.float32))
    opt = AdamW8bit([p], lr=1e-3, min_8bit_size=min_8bit_size)
    p.grad = np.ones_like(p.data)
    opt.step()
    (state,) = opt.state.values()
    return sum(state[k].nbytes for k in ("state1", "state2", "absmax1", "absmax2") if k in state)


@GRADE
@given(numel=st.integers(1, 70_000), min_8bit_size=st.sampled_from([0, 256, 4096, 10_000]))
@example(numel=4096, min_8bit_size=4096)              # exactly 16 blocks, exactly at the threshold
@example(numel=4095, min_8bit_size=4096)              # one below it: float32 states
@example(numel=5000, min_8bit_size=4096)              # a short last block
def test_adam8bit_state_bytes(ex, numel, min_8bit_size):
    check_value("adam8bit_state_bytes(numel, min_8bit_size)", ex.adam8bit_state_bytes(numel, min_8bit_size),
                bytes_allocated(numel, min_8bit_size), {"numel": numel, "min_8bit_size": min_8bit_size})
