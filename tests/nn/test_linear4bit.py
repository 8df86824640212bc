"""Linear4bit and QLoRA: 4-bit storage (4.127 bits/param), on-the-fly dequantization, gradients through the
dequantized W0 (finite differences, torch, a whole GPT vs torch + PEFT), merge into NF4, bitsandbytes parity."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nn_reference import check_lora_grads, check_step_against_peft, rel_err, torch_gpt

from minilora.backend import to_numpy
from minilora.nn import GPT, GPTConfig, Linear, Linear4bit, LoRALinear, Params4bit, QLoRALinear
from minilora.quant import dequantize_4bit, dequantize_absmax, quantize_4bit

RNG = np.random.default_rng(4)
NF4_MAX_HALF_GAP = (1.0 - 0.6961928009986877) / 2           # the widest gap of the NF4 table, [-1, -0.696]


def lin(d_in, d_out, dtype="float32", seed=0):
    return Linear(d_in, d_out, dtype=dtype, rng=np.random.default_rng(seed))


def test_linear4bit_stores_codes_and_matches_dequantized_linear():
    base = lin(128, 48)
    q = Linear4bit.from_linear(base)
    packed, qs = quantize_4bit(base.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(q.weight_packed, packed)
    assert q.weight_packed.dtype == np.uint8 and q.weight_packed.shape == (128 * 48 // 2, 1)
    assert isinstance(q.weight, Params4bit) and not q.weight.requires_grad and not q.bias.requires_grad
    W = q.dequantize_weight()
    np.testing.assert_array_equal(W, dequantize_4bit(packed, qs))
    assert W.dtype == np.float32 and W.shape == (48, 128)
    x = RNG.standard_normal((2, 5, 128)).astype(np.float32)
    y = q(x)
    np.testing.assert_allclose(y, x @ W.T + base.bias.data, rtol=1e-5, atol=1e-6)
    # the float weight is not kept between calls: nothing (48, 128)-shaped is held by the layer
    held = [v for v in list(vars(q).values()) + list(q._cache or []) if hasattr(v, "shape")]
    assert all(tuple(v.shape) != (48, 128) for v in held)
    dout = RNG.standard_normal(y.shape).astype(np.float32)
    with pytest.raises(ValueError, match="dout has shape"):
        q.backward(dout.reshape(5, 2, 48))                                # same size, wrong shape: not reshaped
    dx = q.backward(dout)
    np.testing.assert_allclose(dx, dout @ W, rtol=1e-5, atol=1e-6)
    assert q.weight.grad is None and q.bias.grad is None
    with pytest.raises(ValueError, match="cannot be trained"):
        q.weight.requires_grad = True


def test_memory_report_4127_bits_with_double_quant():
    q = Linear4bit.from_linear(lin(1024, 1024))
    rep = q.memory_report()
    assert rep["n_params"] == 1024 * 1024 and rep["codes_bytes"] == 1024 * 1024 // 2
    assert abs(rep["bits_per_param"] - 4.12698) < 1e-5                # QLoRA's 4.127: 4 + 8/64 + 32/(64·256)
    assert rep["weight_bytes"] * 8 == pytest.approx(rep["bits_per_param"] * rep["n_params"])
    assert q.nbytes == rep["weight_bytes"] + 1024 * 4
    no_dq = Linear4bit.from_linear(lin(256, 256), compress_statistics=False)
    assert no_dq.memory_report()["bits_per_param"] == pytest.approx(4.5)   # 4 + 32/64


def test_state_dict_keys_are_bitsandbytes_and_round_trip():
    a = QLoRALinear(lin(64, 32, seed=1), r=4, init_lora_weights=False)
    b = QLoRALinear(lin(64, 32, seed=2), r=4)
    keys = list(a.state_dict())
    assert keys == ["base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight",
                    "base_layer.weight.absmax", "base_layer.weight.quant_map", "base_layer.weight.nested_absmax",
                    "base_layer.weight.nested_quant_map", "base_layer.weight.quant_state.bitsandbytes__nf4"]
    b.load_state_dict({k: np.array(v) for k, v in a.state_dict().items()})
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if "absmax" not in k})


def test_failed_4bit_load_changes_nothing():
    """Every 4-bit layer's statistics are checked before any is replaced: one corrupt layer must not leave the
    others holding the file's statistics beside their old codes."""
    from minilora.nn.module import ModuleList
    a = ModuleList([Linear4bit.from_linear(lin(64, 32, seed=s)) for s in (1, 2)])
    b = ModuleList([Linear4bit.from_linear(lin(64, 32, seed=s)) for s in (3, 4)])
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    before = [m(x) for m in b]
    sd = {k: np.array(v) for k, v in a.state_dict().items()}
    sd["1.weight.absmax"] = sd["1.weight.absmax"][:-1]               # layer 1 corrupt, layer 0 fine
    with pytest.raises(ValueError, match="absmax must hold 32"):
        b.load_state_dict(sd)
    for m, y in zip(b, before, strict=True):
        np.testing.assert_array_equal(m(x), y)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_backward_matches_finite_differences(dropout):
    layer = QLoRALinear(lin(20, 12, dtype="float64"), r=3, lora_alpha=6, lora_dropout=dropout,
                        init_lora_weights=False, rng=np.random.default_rng(0))
    assert layer.base_layer.dequantize_weight().dtype == np.float64
    check_lora_grads(layer, RNG.standard_normal((4, 20)), RNG.standard_normal((4, 12)), seed=7)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_qlora_matches_torch_with_dequantized_w0(dtype, tol):
    torch = pytest.importorskip("torch")
    layer = QLoRALinear(lin(32, 16, dtype=dtype), r=4, lora_alpha=16, init_lora_weights=False)
    x = RNG.standard_normal((6, 32)).astype(dtype)
    y = layer(x)
    dout = RNG.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    T = lambda a: torch.tensor(np.array(a), requires_grad=True)   # noqa: E731
    tx, tA, tB = T(x), T(layer.lora_A["default"].weight.data), T(layer.lora_B["default"].weight.data)
    W0 = torch.from_numpy(layer.base_layer.dequantize_weight())
    ty = tx @ W0.T + torch.from_numpy(layer.base_layer.bias.data) + 4.0 * ((tx @ tA.T) @ tB.T)
    (ty * torch.from_numpy(dout)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) < tol
    for ours, ref in [(dx, tx), (layer.lora_A["default"].weight.grad, tA), (layer.lora_B["default"].weight.grad, tB)]:
        assert rel_err(ours, ref.grad.numpy()) < tol


def test_linear4bit_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    base = lin(128, 64, seed=3)
    ref = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(torch.from_numpy(base.weight.data.copy()), requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, blocksize=64)
    ref.bias = torch.nn.Parameter(torch.from_numpy(base.bias.data.copy()), requires_grad=False)
    ref = ref.to("cpu")                                               # bnb quantizes on the move to a device
    ours = Linear4bit.from_linear(base)
    x = RNG.standard_normal((3, 128)).astype(np.float32)
    y_ref = ref(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(ours.weight_packed, ref.weight.data.numpy())
    assert rel_err(ours(x), y_ref) < 1e-5
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_gpt_with_qlora_matches_torch_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=32, dtype="float64")
    m = GPT(cfg)
    targets = ["c_attn", "c_proj", "c_fc"]
    for name, mod in list(m.named_modules()):
        if name.split(".")[-1] in targets:
            m.set_submodule(name, QLoRALinear(mod, r=4, lora_alpha=8, init_lora_weights=False,
                                              rng=np.random.default_rng(len(name))))
    for name, p in m.named_parameters():
        if "lora_" not in name:
            p.requires_grad = False
    # the torch twin gets the dequantized W0 of every 4-bit layer
    t = torch_gpt(cfg, torch)
    plain = {}
    for name, p in m.named_parameters():
        if name.endswith("base_layer.weight"):
            path = name[: -len(".base_layer.weight")]
            plain[path + ".weight"] = m.get_submodule(path).base_layer.dequantize_weight()
        elif "lora_" not in name:
            plain[name.replace(".base_layer", "")] = p.data
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in plain.items()})
    pm = peft.get_peft_model(t, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tp = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                tp["base_model.model." + name].copy_(torch.from_numpy(p.data))
    assert check_step_against_peft(m, pm, torch, seed=1) == 2 * 4 * cfg.n_layer
    assert sum(isinstance(mod, Linear4bit) for mod in m.modules()) == 4 * cfg.n_layer


def nf4_error_bound(W, qs):
    """Per-entry bound on |dequant(quant(W)) − W|: codes come from the true block absmax a (|x/a − code| ≤ half the
    widest NF4 gap), dequantization uses the double-quantized a' (adds |a − a'|, large for a block whose absmax is
    small next to its 256-block group's)."""
    flat = np.abs(W.astype(np.float64)).reshape(-1)
    bs = qs.blocksize
    a = np.concatenate([flat, np.zeros(-flat.size % bs)]).reshape(-1, bs).max(axis=1)   # (n_blocks,)
    a_dq = to_numpy(dequantize_absmax(qs)).astype(np.float64)                          # (n_blocks,)
    per_block = NF4_MAX_HALF_GAP * a + np.abs(a_dq - a) + 1e-7
    return np.repeat(per_block, bs)[: flat.size].reshape(W.shape)


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 48), d_out=st.integers(1, 48), data=st.data())
def test_qlora_merge_error_is_bounded(d_in, d_out, data):
    """Merging into NF4 re-quantizes Ŵ0 + ΔW: every weight moves by at most the NF4 rounding bound of its block.
    Unmerging puts the pre-merge codes back, so Ŵ0 and the outputs come back exactly."""
    r = data.draw(st.integers(1, min(d_in, d_out)))
    seed = data.draw(st.integers(0, 2**16))
    layer = QLoRALinear(lin(d_in, d_out, seed=seed), r=r, lora_alpha=2 * r, init_lora_weights=False,
                        rng=np.random.default_rng(seed))
    layer.eval()
    delta = layer.get_delta_weight("default")
    W0 = layer.base_layer.dequantize_weight()
    exact = W0 + delta                                                       # Ŵ0 + ΔW in float
    with pytest.warns(UserWarning, match="4-bit linear may get different generations"):
        layer.merge()
    merged = layer.base_layer.dequantize_weight()
    assert np.all(np.abs(merged - exact) <= nf4_error_bound(exact, layer.base_layer.quant_state))
    x = np.random.default_rng(seed).standard_normal((3, d_in)).astype(np.float32)
    y_merged = layer(x)
    assert np.all(np.abs(y_merged - x @ exact.T - layer.base_layer.bias.data)
                  <= np.abs(x) @ nf4_error_bound(exact, layer.base_layer.quant_state).T + 1e-4)
    layer.unmerge()
    np.testing.assert_array_equal(layer.base_layer.dequantize_weight(), W0)


def test_qlora_factory_and_errors():
    layer = QLoRALinear(lin(64, 64), r=2)
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    assert layer.base_layer.quant_type == "nf4" and layer.base_layer.compress_statistics
    fp4 = QLoRALinear(lin(64, 64), r=2, quant_type="fp4", compress_statistics=False, blocksize=128)
    assert fp4.base_layer.quant_type == "fp4" and fp4.base_layer.memory_report()["bits_per_param"] == 4.25
    wrapped = LoRALinear(Linear4bit.from_linear(lin(64, 64)), r=2)        # LoRALinear around Linear4bit = QLoRA
    assert wrapped.lora_A["default"].weight.dtype == np.float32
    with pytest.raises(TypeError, match="expects a Linear"):
        Linear4bit.from_linear("x")
    with pytest.raises(ValueError, match="set_weight expects shape"):
        layer.base_layer.set_weight(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="Linear4bit expects inputs"):
        layer.base_layer(np.zeros((2, 3), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.eval()(np.zeros((2, 64), np.float32))                    # no warning in a plain forward
