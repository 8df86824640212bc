"""Grader for ex06_merge.py (notebook 06): compared with minilora.nn.lora.LoRALinear (scaling, get_delta_weight,
merge, unmerge), as PEFT's."""
import numpy as np
from grading import GRADE, check_array, check_value
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.nn import Linear, LoRALinear

EXERCISE = "ex06_merge"
TOL = {"rtol": 1e-12, "atol": 1e-12}

cases = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 30), st.integers(1, 8),
                  st.sampled_from([1, 8, 16, 32]), st.booleans())


def layer_for(case):
    """A LoRALinear with a random W0 and trained-looking (random, B != 0) adapters, float64."""
    seed, d_in, d_out, r, alpha, rs = case
    r = min(r, d_in, d_out)
    g = np.random.default_rng(seed)
    W = g.standard_normal((d_out, d_in))
    layer = LoRALinear(Linear.from_weight(W.copy()), r=r, lora_alpha=alpha, use_rslora=rs)
    A, B = g.standard_normal((r, d_in)), g.standard_normal((d_out, r))
    layer.lora_A["default"].weight.data[...] = A
    layer.lora_B["default"].weight.data[...] = B
    return layer, W, A, B, layer.scaling["default"]


@GRADE
@given(lora_alpha=st.sampled_from([1, 8, 16, 32, 64]), r=st.integers(1, 256), use_rslora=st.booleans())
@example(lora_alpha=16, r=4, use_rslora=True)
@example(lora_alpha=16, r=4, use_rslora=False)
def test_lora_scaling(ex, lora_alpha, r, use_rslora):
    layer = LoRALinear(Linear(r, r, bias=False), r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    check_value("lora_scaling(lora_alpha, r, use_rslora)", ex.lora_scaling(lora_alpha, r, use_rslora),
                layer.scaling["default"], {"lora_alpha": lora_alpha, "r": r, "use_rslora": use_rslora}, rel=1e-15)


EXAMPLES = [(0, 12, 7, 3, 16, False), (1, 5, 9, 4, 8, True)]        # d_in != d_out: a transpose cannot hide


def with_examples(f):
    for e in EXAMPLES:
        f = example(case=e)(f)
    return f


@GRADE
@given(case=cases)
@with_examples
def test_delta_weight(ex, case):
    layer, W, A, B, s = layer_for(case)
    check_array("delta_weight(A, B, scaling)", ex.delta_weight(A, B, s), layer.get_delta_weight("default"),
                {"A": A, "B": B, "scaling": s}, **TOL)


@GRADE
@given(case=cases)
@with_examples
def test_merge(ex, case):
    layer, W, A, B, s = layer_for(case)
    layer.merge()
    got = ex.merge(W.copy(), A, B, s)
    check_array("merge(W, A, B, scaling)", got, layer.base_layer.weight.data, {"W": W, "A": A, "B": B, "scaling": s},
                **TOL)


@GRADE
@given(case=cases)
@with_examples
def test_unmerge(ex, case):
    layer, W, A, B, s = layer_for(case)
    layer.merge()
    merged = layer.base_layer.weight.data.copy()                     # (d_out, d_in) W0 + ΔW
    layer.unmerge()
    got = ex.unmerge(merged.copy(), A, B, s)
    check_array("unmerge(W_merged, A, B, scaling)", got, layer.base_layer.weight.data,
                {"W_merged": merged, "A": A, "B": B, "scaling": s}, **TOL)
