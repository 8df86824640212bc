"""DoRA (arXiv 2402.09353) in LoRALinear: W' = m ⊙ (W0 + s·B A) / n with n = ‖W0 + s·B A‖ per row held constant.

The hand-written backward is checked against float64 central finite differences of the forward *with n frozen at
its current value* (the detached graph PEFT differentiates) and against torch autograd of the same formula written
independently; merging, the 4-bit base and the adapter bookkeeping are checked here too. Equality with PEFT itself
is in tests/peft/test_dora_peft.py."""
import copy

import numpy as np
import pytest
from nn_reference import check_step_against_peft, fd_grad, rel_err, torch_gpt

from minilora.nn import GPT, GPTConfig, Linear, LoRALinear, QLoRALinear
from minilora.nn import functional as F
from minilora.peft import LoraConfig, get_peft_model

RNG = np.random.default_rng(11)


def dora_layer(d_in=7, d_out=5, r=3, bias=True, dropout=0.0, four_bit=False, seed=0):
    """A float64 DoRA layer whose B is not zero and whose m is moved off its initial value, so every term counts."""
    base = Linear(d_in, d_out, bias=bias, dtype="float64", rng=np.random.default_rng(seed))
    cls = QLoRALinear if four_bit else LoRALinear
    layer = cls(base, r=r, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False, use_dora=True,
                rng=np.random.default_rng(seed + 1))
    m = layer.lora_magnitude_vector["default"].weight
    m.data *= 1.0 + 0.3 * np.random.default_rng(seed + 2).standard_normal(m.data.shape)   # (D_out,)
    return layer


def frozen_norm(layer, monkeypatch):
    """Hold n at its current value: the forward then computes exactly the function PEFT's backward differentiates."""
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    n0 = F.dora_weight_norm(layer._base_weight(), A, B, layer.scaling["default"])             # (D_out,)
    monkeypatch.setattr(F, "dora_weight_norm", lambda *args: n0.copy())
    return n0


def test_fresh_dora_adapter_is_the_base_layer():
    base = Linear(8, 6, dtype="float64", rng=np.random.default_rng(0))
    layer = LoRALinear(base, r=2, use_dora=True)
    x = RNG.standard_normal((4, 8))
    np.testing.assert_allclose(layer(x), base(x), rtol=0, atol=1e-14)
    m = layer.lora_magnitude_vector["default"].weight
    np.testing.assert_allclose(m.data, np.linalg.norm(base.weight.data, axis=1), rtol=1e-14)   # m₀ = ‖W0‖ rows
    assert m.requires_grad and m.data.shape == (6,)
    names = [n for n, _ in layer.named_parameters()]
    assert "lora_magnitude_vector.default.weight" in names


@pytest.mark.parametrize("bias,dropout,four_bit", [(True, 0.0, False), (False, 0.0, False), (True, 0.4, False),
                                                   (True, 0.0, True), (True, 0.4, True)])
def test_dora_backward_matches_finite_differences_with_the_norm_held(monkeypatch, bias, dropout, four_bit):
    layer = dora_layer(bias=bias, dropout=dropout, four_bit=four_bit)
    frozen_norm(layer, monkeypatch)
    x = RNG.standard_normal((4, 7))                                                           # (N, D_in)
    dout = RNG.standard_normal((4, 5))                                                        # (N, D_out)

    def fwd():
        layer.rng = np.random.default_rng(3)                                                  # the same mask each time
        return layer(x)

    fwd()
    dx = layer.backward(dout)
    L = lambda: float(np.sum(fwd() * dout))                                                   # noqa: E731
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    M = layer.lora_magnitude_vector["default"].weight
    for name, arr, hand in [("x", x, dx), ("A", A.data, A.grad), ("B", B.data, B.grad), ("m", M.data, M.grad)]:
        assert rel_err(hand, fd_grad(L, arr)) < 1e-7, name


def test_the_norm_is_really_detached():
    """With n differentiated too, dA and dB change (the term the paper's §4.3 drops) while dm does not (m is not
    inside n): finite differences of the full function disagree with our dA, agree with our dm."""
    layer = dora_layer(bias=False)
    x, dout = RNG.standard_normal((4, 7)), RNG.standard_normal((4, 5))
    layer(x)
    layer.backward(dout)
    L = lambda: float(np.sum(layer(x) * dout))                                                # noqa: E731
    A, M = layer.lora_A["default"].weight, layer.lora_magnitude_vector["default"].weight
    assert rel_err(A.grad, fd_grad(L, A.data)) > 1e-3
    assert rel_err(M.grad, fd_grad(L, M.data)) < 1e-7


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dora_matches_torch_autograd(dropout):
    torch = pytest.importorskip("torch")
    layer = dora_layer(dropout=dropout)
    x, dout = RNG.standard_normal((6, 7)), RNG.standard_normal((6, 5))
    y = layer(x)
    mask = layer._cache[0][1]
    dx = layer.backward(dout)
    T = lambda a: torch.tensor(np.array(a), requires_grad=True)                               # noqa: E731
    tx, tA, tB = T(x), T(layer.lora_A["default"].weight.data), T(layer.lora_B["default"].weight.data)
    tm = T(layer.lora_magnitude_vector["default"].weight.data)
    W0, b = torch.from_numpy(layer.base_layer.weight.data), torch.from_numpy(layer.base_layer.bias.data)
    s = layer.scaling["default"]
    n = torch.linalg.norm(W0 + s * tB @ tA, dim=1).detach()                                    # (D_out,)
    c = tm / n                                                                                # (D_out,)
    xd = tx if mask is None else tx * torch.from_numpy(mask)                                  # (N, D_in)
    ty = tx @ W0.T + b + (c - 1) * (xd @ W0.T) + c * s * (xd @ tA.T @ tB.T)                   # (N, D_out)
    (ty * torch.from_numpy(dout)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) < 1e-13
    for name, ours, ref in [("x", dx, tx), ("A", layer.lora_A["default"].weight.grad, tA),
                            ("B", layer.lora_B["default"].weight.grad, tB),
                            ("m", layer.lora_magnitude_vector["default"].weight.grad, tm)]:
        assert rel_err(ours, ref.grad.numpy()) < 1e-12, name


def test_merge_gives_the_same_outputs_and_unmerge_restores_w0():
    layer = dora_layer()
    layer.eval()
    x = RNG.standard_normal((3, 7))
    W0 = layer.base_layer.weight.data.copy()
    y = layer(x)
    layer.merge()
    m = layer.lora_magnitude_vector["default"].weight.data                                    # (D_out,)
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    n = F.dora_weight_norm(W0, A, B, layer.scaling["default"])                                # (D_out,)
    W_merged = (m / n)[:, None] * (W0 + layer.get_delta_weight("default"))                   # W' = m ⊙ (W0 + ΔW) / n
    np.testing.assert_allclose(layer.base_layer.weight.data, W_merged, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.data, W0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)


def test_dora_on_a_4bit_base_merges_and_restores_the_codes():
    layer = dora_layer(four_bit=True)
    layer.eval()
    x = RNG.standard_normal((3, 7))
    codes = layer.base_layer.weight.data.copy()
    y = layer(x)
    ref = copy.deepcopy(layer.base_layer)                                                     # merged by hand:
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    W0 = ref.dequantize_weight()                                                              # (D_out, D_in)  Ŵ0
    c = layer.lora_magnitude_vector["default"].weight.data / F.dora_weight_norm(W0, A, B, layer.scaling["default"])
    ref.set_weight(c[:, None] * (W0 + layer.get_delta_weight("default")))                    # NF4(c ⊙ (Ŵ0 + ΔW))
    with pytest.warns(UserWarning, match="rounding"):
        layer.merge()
    np.testing.assert_array_equal(layer.base_layer.dequantize_weight(), ref.dequantize_weight())
    assert rel_err(layer(x), y) < 0.2                                                         # NF4 re-rounding only
    layer.unmerge()
    assert np.array_equal(layer.base_layer.weight.data, codes)
    np.testing.assert_array_equal(layer(x), y)


def test_two_dora_adapters_merge_against_the_unmerged_weight():
    layer = dora_layer()
    layer.update_layer("other", 2, 4, init_lora_weights=False, use_dora=True)
    layer.eval()
    x = RNG.standard_normal((3, 7))
    W0 = layer.base_layer.weight.data.copy()
    layer.merge(adapter_names=["default", "other"])
    A, B = layer.lora_A["other"].weight.data, layer.lora_B["other"].weight.data
    c = layer.lora_magnitude_vector["other"].weight.data / F.dora_weight_norm(W0, A, B, layer.scaling["other"])
    np.testing.assert_allclose(layer._merged_factors["other"][3], c, rtol=1e-13)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.data, W0, rtol=1e-12, atol=1e-12)
    layer(x)


def test_adapter_bookkeeping():
    layer = dora_layer()
    layer.update_layer("plain", 2, 4)
    layer.update_layer("other", 2, 4, use_dora=True)
    assert layer.use_dora == {"default": True, "plain": False, "other": True}
    assert set(layer.lora_magnitude_vector) == {"default", "other"}
    layer.set_adapter("other")
    assert not layer.lora_magnitude_vector["default"].weight.requires_grad
    assert layer.lora_magnitude_vector["other"].weight.requires_grad
    layer.set_adapter(["default", "plain"])
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer(RNG.standard_normal((2, 7)))
    layer.set_adapter("default")
    layer.delete_adapter("other")
    assert set(layer.lora_magnitude_vector) == {"default"} and "other" not in layer.use_dora
    with pytest.raises(ValueError, match="use_dora"):
        layer.update_layer("bad", 2, 4, use_dora="yes")


def test_gpt_training_step_equals_peft_dora():
    """A whole float64 GPT with DoRA on every block linear: loss and every gradient (A, B, m) equal PEFT's at 1e-10."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float64")
    base = GPT(cfg)
    t = torch_gpt(cfg, torch)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in base.state_dict().items()})
    targets = ["c_attn", "c_proj", "c_fc"]
    ours = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    theirs = peft.get_peft_model(t, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    tp = dict(theirs.named_parameters())
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for name, p in ours.base_model.model.named_parameters():
            if "lora_" in name:
                if "lora_B" in name or "magnitude" in name:           # B off zero, m off its initial value
                    p.data += 0.1 * rng.standard_normal(p.data.shape)
                tp["base_model.model." + name].copy_(torch.from_numpy(p.data))
    assert check_step_against_peft(ours.base_model.model, theirs, torch, seed=1) == 3 * 4 * cfg.n_layer
