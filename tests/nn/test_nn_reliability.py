"""Layers and the GPT refuse what would give silent garbage, and two exactness promises hold in the hard cases:

- gradient checkpointing recomputes each block with the dropout masks of its forward, also when several LoRA layers
  (or several blocks) draw from one shared generator, so gradients are bit-identical to a run without it;
- unmerging a 4-bit (QLoRA) base gives back the exact pre-merge 4-bit bytes however many merge/unmerge cycles run,
  and unmerging a float base subtracts the ΔW that was merged, even if the adapter changed in between.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.nn import GPT, GPTConfig, Linear, LoRALinear
from minilora.nn.layers import Embedding, LayerNorm
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.lora import QLoRALinear

CFG = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dtype="float64")


def batch(B=3, T=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 32, (B, T)), rng.integers(0, 32, (B, T))


# ---- gradient checkpointing with a shared dropout generator ---------------------------------------------------

def shared_rng_gpt(targets, n_layer, qlora=False, seed=5):
    """A float64 GPT whose LoRA layers (dropout 0.3, random B) all draw from ONE generator, as get_peft_model does."""
    m = GPT(GPTConfig(**{**CFG, "n_layer": n_layer}))
    shared = np.random.default_rng(seed)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, Linear) and name != "lm_head" and name.rsplit(".", 1)[-1] in targets:
            cls = QLoRALinear if qlora else LoRALinear
            m.set_submodule(name, cls(mod, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, rng=shared))
    for n, p in m.named_parameters():
        p.requires_grad = "lora_" in n
    return m, shared


def two_steps(m, rng):
    """Gradients of two consecutive steps and the generator's state after them (the next step's masks)."""
    out = []
    for seed in (0, 1):
        m.zero_grad()
        _, loss = m(*batch(seed=seed))
        m.backward()
        out.append((loss, {n: p.grad.copy() for n, p in m.named_parameters() if p.grad is not None}))
    return out, rng.bit_generator.state


@pytest.mark.parametrize("targets, n_layer, qlora", [
    (("c_attn", "c_fc"), 1, False),
    (("c_attn", "c_proj", "c_fc"), 2, False),
    (("c_attn", "c_proj", "c_fc"), 2, True),              # QLoRA: every projection of every block
], ids=["two-targets", "all-linear", "qlora-all-linear"])
def test_checkpointing_with_a_shared_generator_gives_bit_identical_gradients(targets, n_layer, qlora):
    runs = []
    for ckpt in (False, True):
        m, rng = shared_rng_gpt(targets, n_layer, qlora)
        if ckpt:
            m.gradient_checkpointing_enable()
        runs.append(two_steps(m, rng))
    (steps0, state0), (steps1, state1) = runs
    assert state0 == state1                                   # the generator ends where it would without recompute
    for (l0, g0), (l1, g1) in zip(steps0, steps1, strict=True):
        assert l0 == l1 and g0.keys() == g1.keys() and len(g0) > 0
        for n in g0:
            np.testing.assert_array_equal(g0[n], g1[n], err_msg=n)


# ---- merge / unmerge gives back the pre-merge weights ---------------------------------------------------------

def qlora_layer(d_in=64, d_out=48, seed=0, **kw):
    base = Linear(d_in, d_out, rng=np.random.default_rng(seed))
    return QLoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False, rng=np.random.default_rng(seed + 1), **kw)


def four_bit_bytes(layer):
    b = layer.base_layer
    return b.weight.data.copy(), {k: np.array(v, copy=True) for k, v in b.quant_state.as_dict(packed=True).items()}


@settings(max_examples=15, deadline=None)
@given(cycles=st.integers(1, 20), scale=st.floats(0.01, 3.0), seed=st.integers(0, 2**16))
def test_qlora_merge_unmerge_cycles_restore_the_exact_4bit_bytes(cycles, scale, seed):
    layer = qlora_layer(seed=seed).eval()
    rng = np.random.default_rng(seed)
    B = layer.lora_B["default"].weight
    B.data[...] = (rng.standard_normal(B.data.shape) * scale).astype(B.data.dtype)
    codes0, state0 = four_bit_bytes(layer)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y0 = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # merging into 4-bit warns about rounding
        for _ in range(cycles):
            layer.merge()
            layer.unmerge()
    codes, state = four_bit_bytes(layer)
    assert np.array_equal(codes, codes0) and state.keys() == state0.keys()
    for k in state0:
        assert np.array_equal(state[k], state0[k]), k
    np.testing.assert_array_equal(layer(x), y0)


def test_qlora_unmerge_after_several_adapters_and_a_changed_adapter_restores_the_bytes():
    layer = qlora_layer().eval()
    layer.update_layer("second", r=2, lora_alpha=4, init_lora_weights=False)
    codes0, state0 = four_bit_bytes(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["default", "second"])
        layer.lora_B["default"].weight.data *= 3              # changed while merged
        layer.unmerge()
    codes, state = four_bit_bytes(layer)
    assert np.array_equal(codes, codes0) and all(np.array_equal(state[k], state0[k]) for k in state0)


def test_float_unmerge_subtracts_the_merged_delta_even_if_the_adapter_changed():
    base = Linear(12, 9, dtype="float64", rng=np.random.default_rng(0))
    layer = LoRALinear(base, r=3, lora_alpha=6, init_lora_weights=False, rng=np.random.default_rng(1)).eval()
    W0 = base.weight.data.copy()
    layer.merge()
    layer.lora_B["default"].weight.data += 1.0                # an optimizer step or a load while merged
    layer.unmerge()
    np.testing.assert_allclose(base.weight.data, W0, rtol=0, atol=1e-12)


# ---- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0, "1.0", None])
def test_generate_refuses_a_temperature_that_is_not_a_finite_positive_number(temperature):
    m = GPT(GPTConfig(**CFG))
    with pytest.raises((ValueError, TypeError), match="temperature"):
        m.generate(np.zeros((1, 2), dtype=np.int64), 3, temperature=temperature, rng=np.random.default_rng(0))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: Linear(8, 4, dtype="int32"), id="linear-i32"),
    pytest.param(lambda: Linear(8, 4, dtype="bool"), id="linear-bool"),
    pytest.param(lambda: Linear(8, 4, dtype="uint8"), id="linear-u8"),
    pytest.param(lambda: Embedding(8, 4, dtype="int64"), id="embedding-i64"),
    pytest.param(lambda: LayerNorm(8, dtype="int32"), id="layernorm-i32"),
    pytest.param(lambda: Linear4bit(64, 8, dtype="int32"), id="linear4bit-i32")])
def test_layers_refuse_a_non_float_dtype(make):
    with pytest.raises(TypeError, match="float"):
        make()


@pytest.mark.parametrize("args, name", [((8.5, 4), "in_features"), (("8", 4), "in_features"),
                                        ((8, True), "out_features"), ((8, 4.0), "out_features")])
def test_linear_refuses_non_integer_sizes_naming_the_argument(args, name):
    with pytest.raises(TypeError, match=name):
        Linear(*args)


def test_layers_refuse_an_input_that_is_not_an_array():
    with pytest.raises(TypeError, match="array"):
        Linear(3, 2)([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="array"):
        GPT(GPTConfig(**CFG))([[1, 2, 3]])


@pytest.mark.parametrize("shape", [(0, 8), (2, 0), (0, 0)])
@pytest.mark.parametrize("with_targets", [False, True])
def test_gpt_refuses_an_empty_batch_or_a_zero_length_sequence(shape, with_targets):
    m = GPT(GPTConfig(**CFG))
    idx = np.zeros(shape, dtype=np.int64)
    with pytest.raises(ValueError, match="empty"):
        m(idx, idx.copy() if with_targets else None)


def test_generate_refuses_an_empty_prompt():
    m = GPT(GPTConfig(**CFG))
    with pytest.raises(ValueError, match="empty"):
        m.generate(np.zeros((1, 0), dtype=np.int64), 2, rng=np.random.default_rng(0))


@pytest.mark.parametrize("name", ["eval", "training", "keys", "items", "forward"])
def test_adapter_names_that_are_module_attributes_are_a_value_error(name):
    """A ModuleDict refuses a key that is one of its attributes (as torch's does); the name check says so first."""
    from minilora.nn.lora import check_adapter_name
    with pytest.raises(ValueError, match="ModuleDict attribute"):
        check_adapter_name(name)
