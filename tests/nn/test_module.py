"""Module tree behaviour: names, submodule replacement (used in forward and backward), modes, state_dict."""
import numpy as np
import pytest

from minilora.nn import GPT, GPTConfig, Linear, Module, ModuleList

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


class Recorder(Module):
    """Wraps a layer and counts how often the parent calls it in each direction."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, x):
        self.calls["forward"] += 1
        return self.inner(x)

    def backward(self, dout):
        self.calls["backward"] += 1
        return self.inner.backward(dout)


def test_named_modules_and_parameters_follow_hf_gpt2_paths():
    m = GPT(CFG)
    names = dict(m.named_modules())
    assert next(iter(m.named_modules())) == ("", m)
    for p in ["transformer", "transformer.wte", "transformer.wpe", "transformer.h", "transformer.h.0",
              "transformer.h.1.ln_1", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
              "transformer.h.0.ln_2", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.ln_f",
              "lm_head"]:
        assert p in names, p
    keys = set(m.state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(CFG.n_layer):
        for mod in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]:
            expected |= {f"transformer.h.{i}.{mod}.weight", f"transformer.h.{i}.{mod}.bias"}
    assert keys == expected
    assert [n for n, _ in m.named_parameters()] == list(m.state_dict())
    n_expected = (13 * 8 + 8 * 8 + 2 * 8 + 8 * 13
                  + CFG.n_layer * (2 * 2 * 8 + 8 * 24 + 24 + 8 * 8 + 8 + 8 * 32 + 32 + 32 * 8 + 8))
    assert m.get_num_params() == n_expected


def test_module_list_children_are_numbered():
    ml = ModuleList([Linear(2, 2), Linear(2, 3)])
    assert [n for n, _ in ml.named_children()] == ["0", "1"]
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert len(ml) == 2 and ml[1].out_features == 3
    with pytest.raises(TypeError):
        ml.append("not a module")


def test_set_submodule_replacement_is_used_in_forward_and_backward():
    m = GPT(CFG)
    idx = np.random.default_rng(0).integers(0, 13, (2, 8))
    _, loss_before = m(idx, idx)
    rec = Recorder(m.get_submodule("transformer.h.1.attn.c_attn"))
    m.set_submodule("transformer.h.1.attn.c_attn", rec)
    rec2 = Recorder(m.get_submodule("transformer.h.0"))
    m.set_submodule("transformer.h.0", rec2)                  # a ModuleList slot
    assert m.get_submodule("transformer.h.1.attn.c_attn") is rec
    assert m.transformer.h[0] is rec2
    _, loss_after = m(idx, idx)
    m.backward()
    assert loss_after == loss_before
    assert rec.calls == {"forward": 1, "backward": 1} and rec2.calls == {"forward": 1, "backward": 1}
    assert "transformer.h.1.attn.c_attn.inner.weight" in dict(m.named_parameters())


def test_get_and_set_submodule_errors():
    m = GPT(CFG)
    with pytest.raises(AttributeError, match="no submodule 'c_atn'"):
        m.get_submodule("transformer.h.0.attn.c_atn")
    with pytest.raises(AttributeError):
        m.set_submodule("transformer.h.0.attn.nothing", Linear(2, 2))
    with pytest.raises(TypeError):
        m.set_submodule("lm_head", "nope")


def test_train_eval_and_zero_grad():
    m = GPT(CFG)
    assert all(mod.training for mod in m.modules())
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    idx = np.random.default_rng(0).integers(0, 13, (2, 8))
    m(idx, idx)
    m.backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_state_dict_round_trip_and_errors():
    a, b = GPT(CFG), GPT(GPTConfig(**{**CFG.__dict__, "seed": 1}))
    idx = np.random.default_rng(0).integers(0, 13, (2, 8))
    assert a(idx)[0].tolist() != b(idx)[0].tolist()
    w_before = b.lm_head.weight.data
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    assert b.lm_head.weight.data is w_before                  # loaded in place
    np.testing.assert_array_equal(a(idx)[0], b(idx)[0])

    sd = dict(a.state_dict())
    sd.pop("lm_head.weight")
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\].*unexpected keys \['extra.weight'\]"):
        b.load_state_dict(sd)
    res = b.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["lm_head.weight"] and res.unexpected_keys == ["extra.weight"]
    bad = dict(a.state_dict())
    bad["transformer.wte.weight"] = np.zeros((3, 8))
    before = b.transformer.ln_f.weight.data.copy()
    b.transformer.ln_f.weight.data += 1
    with pytest.raises(ValueError, match=r"size mismatch for transformer.wte.weight.*\(3, 8\).*\(13, 8\)"):
        b.load_state_dict(bad)
    np.testing.assert_array_equal(b.transformer.ln_f.weight.data, before + 1)   # nothing written on failure
