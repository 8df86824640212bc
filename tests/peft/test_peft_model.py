"""get_peft_model / PeftModel on the tiny GPT: freezing, counting, adapters, merging, saving and loading."""
import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora.io
from minilora.backend import default_rng
from minilora.io import CorruptFileError
from minilora.nn import GPT, GPTConfig, Linear
from minilora.optim.adamw import AdamW
from minilora.peft import LoraConfig, PeftModel, get_peft_model
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME

CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
C, L, V, T = 16, 2, 32, 8


def gpt(**kw):
    return GPT(GPTConfig(**{**CFG, **kw}))


def batch(seed=0, B=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def randomize_B(pm, seed=0, scale=0.3, adapter=None):
    """Give B (zero at init) random values so that the adapter changes the output."""
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.lora_layers():
        for name, lin in m.lora_B.items():
            if adapter is None or name == adapter:
                B = lin.weight                                        # (D_out, r)
                B.data[...] = rng.standard_normal(B.data.shape).astype(B.data.dtype) * scale


def n_base(V=V, C=C, L=L, T=T):
    """GPT parameter count from its shapes: embeddings, per block 2 LayerNorms + 4 Linears, final LN, lm_head."""
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * block + 2 * C + V * C


# ---- freezing and counting -----------------------------------------------------------------------------------
def test_print_trainable_parameters_exact_string():
    pm = get_peft_model(gpt(), LoraConfig(r=4, target_modules=["c_attn"]))
    lora = L * 4 * (C + 3 * C)                          # per c_attn: A (r, C) + B (3C, r)
    out = io.StringIO()
    with redirect_stdout(out):
        pm.print_trainable_parameters()
    total = n_base() + lora
    assert out.getvalue() == (f"trainable params: {lora:,d} || all params: {total:,d} || "
                              f"trainable%: {100 * lora / total:.4f}\n")
    assert out.getvalue() == "trainable params: 512 || all params: 8,256 || trainable%: 6.2016\n"   # pinned
    assert pm.get_nb_trainable_parameters() == (lora, total)


def test_only_the_adapter_is_trainable_and_names_are_peft_names():
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"base_model.model.transformer.h.{i}.{m}.lora_{ab}.default.weight"
                               for i in range(L) for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB")
    names = [n for n, _ in pm.named_parameters()]
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight" in names
    assert "base_model.model.lm_head.weight" in names


@pytest.mark.parametrize("bias, expect", [("none", 0), ("all", L * (3 * C + C + 4 * C + C) + L * 2 * C + C),
                                          ("lora_only", L * 3 * C)])
def test_bias_modes(bias, expect):
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    n_bias = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert n_bias == expect


def test_default_and_all_linear_targets():
    pm = get_peft_model(gpt(), LoraConfig())                    # gpt2's default: c_attn
    assert [n for n, _ in pm.base_model.lora_layers()] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert pm.peft_config["default"].target_modules == ["c_attn"]
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules="all-linear"))
    assert len(pm.base_model.lora_layers()) == 4 * L and "lm_head" not in dict(pm.base_model.lora_layers())
    assert pm.peft_config["default"].target_modules == ["c_attn", "c_fc", "c_proj"]


# ---- bad input ------------------------------------------------------------------------------------------------
def test_bad_targets_and_ranks():
    with pytest.raises(ValueError, match=r"Target modules \['q_proj'\] not found in the base model"):
        get_peft_model(gpt(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="r=17 is larger than min"):
        get_peft_model(gpt(), LoraConfig(r=17, target_modules=["c_attn"]))     # c_attn is 16 -> 48
    with pytest.raises(ValueError, match="is not supported"):
        get_peft_model(gpt(), LoraConfig(target_modules=r"transformer\.h\.0\.ln_1"))
    with pytest.raises(ValueError, match="already exists"):
        get_peft_model(gpt(), LoraConfig(target_modules=["c_attn"])).add_adapter("default", LoraConfig())


def saved_adapter(tmp_path, **kw):
    pm = get_peft_model(gpt(), LoraConfig(**{"r": 4, "target_modules": ["c_attn"], **kw}))
    randomize_B(pm)
    pm.save_pretrained(tmp_path)
    return pm


def test_shape_mismatch_on_load_names_the_key(tmp_path):
    saved_adapter(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["r"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"size mismatch for base_model\.model\.transformer\.h\.0\.attn\.c_attn"
                                         r"\.lora_A\.weight: copying a param with shape \(4, 16\)"):
        PeftModel.from_pretrained(gpt(), tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    saved_adapter(tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(raw[:-10])
    with pytest.raises(CorruptFileError, match="truncated"):
        PeftModel.from_pretrained(gpt(), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CorruptFileError):
        PeftModel.from_pretrained(gpt(), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        PeftModel.from_pretrained(gpt(), tmp_path)


def test_config_missing_keys_and_nonfinite_weights(tmp_path):
    saved_adapter(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    del cfg["lora_alpha"], cfg["target_modules"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['lora_alpha', 'target_modules'\]"):
        PeftModel.from_pretrained(gpt(), tmp_path)
    pm = saved_adapter(tmp_path)
    m = pm.base_model.model.get_submodule("transformer.h.1.attn.c_attn")
    m.lora_B["default"].weight.data[5, 1] = np.nan
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"1 non-finite value.*first at index \(5, 1\)"):
        PeftModel.from_pretrained(gpt(), tmp_path)


def test_missing_adapter_keys_warn_or_raise(tmp_path):
    saved_adapter(tmp_path)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    t = {k: v for k, v in t.items() if ".h.1." not in k}
    save_file(t, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="Found missing adapter keys while loading the checkpoint"):
        pm = PeftModel.from_pretrained(gpt(), tmp_path)
    assert len(pm._load_results["default"].missing_keys) == 2
    with pytest.raises(ValueError, match="missing adapter keys"):
        PeftModel.from_pretrained(gpt(), tmp_path, strict=True)


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    pm = saved_adapter(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)}
    randomize_B(pm, seed=1)

    def boom(src, dst):                                        # the data is written to the temp file, then...
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(minilora.io.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        pm.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(before)       # no temp file left behind
    PeftModel.from_pretrained(gpt(), tmp_path)                  # and it still loads


def test_refuses_to_save_an_empty_adapter(tmp_path):
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.base_model.peft_config["ghost"] = LoraConfig(target_modules=["c_fc"])
    with pytest.raises(ValueError, match="empty adapter"):
        pm.save_pretrained(tmp_path, selected_adapters=["ghost"])
    with pytest.raises(ValueError, match="selected_adapters"):
        pm.save_pretrained(tmp_path, selected_adapters=["nope"])


# ---- invariants (hypothesis) --------------------------------------------------------------------------------------
TARGETS = st.sampled_from([["c_attn"], ["c_fc", "attn.c_proj"], "all-linear", r".*\.h\.1\.mlp\.c_.*"])


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 64), rslora=st.booleans(), targets=TARGETS, seed=st.integers(0, 99))
def test_save_load_round_trip_is_exact(tmp_path_factory, r, alpha, rslora, targets, seed):
    d = tmp_path_factory.mktemp("rt")
    pm = get_peft_model(gpt(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets),
                        rng=default_rng(seed))
    randomize_B(pm, seed)
    pm.eval()
    idx, _ = batch(seed)
    logits, _ = pm(idx)
    pm.save_pretrained(d)
    back = PeftModel.from_pretrained(gpt(), d)
    for (n1, a), (n2, b) in zip(pm.base_model.lora_layers(), back.base_model.lora_layers(), strict=True):
        assert n1 == n2
        assert np.array_equal(a.lora_A["default"].weight.data, b.lora_A["default"].weight.data)
        assert np.array_equal(a.lora_B["default"].weight.data, b.lora_B["default"].weight.data)
        assert a.scaling["default"] == b.scaling["default"]
    assert np.array_equal(back(idx)[0], logits)


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 64), targets=TARGETS, init=st.sampled_from([True, "gaussian"]),
       seed=st.integers(0, 99))
def test_fresh_adapter_is_a_no_op(r, alpha, targets, init, seed):
    idx, _ = batch(seed)
    ref, _ = gpt()(idx)
    pm = get_peft_model(gpt(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=init),
                        rng=default_rng(seed))
    assert np.array_equal(pm(idx)[0], ref)                      # B = 0 -> exactly the base model


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 64), rslora=st.booleans(), targets=TARGETS,
       dropout=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 99))
def test_merge_and_unload_matches_peft_model(r, alpha, rslora, targets, dropout, seed):
    idx, _ = batch(seed)
    pm = get_peft_model(gpt(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                                          lora_dropout=dropout), rng=default_rng(seed))
    randomize_B(pm, seed)
    pm.eval()                                                    # dropout off: merged == unmerged only in eval
    y, _ = pm(idx)
    with pm.disable_adapter():
        y_base, _ = pm(idx)
    assert np.abs(y - y_base).max() > 1e-4                      # the adapter does something
    merged = pm.merge_and_unload()
    assert isinstance(merged, GPT)
    assert not [n for n, m in merged.named_modules() if hasattr(m, "lora_A")]
    assert all(type(m) is Linear for n, m in merged.named_modules() if n.endswith(("c_attn", "c_fc", "c_proj")))
    np.testing.assert_allclose(merged(idx)[0], y, rtol=1e-4, atol=1e-5)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 99), targets=TARGETS)
def test_frozen_weights_bit_identical_after_training(seed, targets):
    pm = get_peft_model(gpt(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias="none"),
                        rng=default_rng(seed))
    frozen = {n: p.data.copy() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = AdamW(pm.named_parameters(), lr=1e-2)
    for step in range(3):
        idx, tgt = batch(seed + step)
        pm.zero_grad()
        _, loss = pm(idx, tgt)
        pm.backward()
        opt.step()
    after = dict(pm.named_parameters())
    assert all(np.array_equal(after[n].data, v) and after[n].grad is None for n, v in frozen.items())
    assert all(np.abs(m.lora_B["default"].weight.data).max() > 0 for _, m in pm.base_model.lora_layers())   # it trained


# ---- several adapters ---------------------------------------------------------------------------------------------
def test_add_set_delete_and_load_adapter(tmp_path):
    idx, _ = batch(3)
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"]), rng=default_rng(0))
    randomize_B(pm, 0)
    pm.eval()
    y_default, _ = pm(idx)
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"]), rng=default_rng(1))
    assert pm.active_adapter == "default"
    assert np.array_equal(pm(idx)[0], y_default)                # a new adapter is inactive ...
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".other." in n)    # ... and frozen
    randomize_B(pm, 1, adapter="other")
    pm.set_adapter("other")
    assert sorted({n.split(".lora_")[1] for n, p in pm.named_parameters() if p.requires_grad}) == [
        "A.other.weight", "B.other.weight"]
    y_other, _ = pm(idx)
    pm.save_pretrained(tmp_path)
    # reload both into a fresh model: default from the top folder, "other" from its sub-folder
    back = PeftModel.from_pretrained(gpt(), tmp_path)
    res = back.load_adapter(tmp_path / "other", adapter_name="other")
    assert res.missing_keys == [] and res.unexpected_keys == []
    back.set_adapter("other")
    assert np.array_equal(back(idx)[0], y_other)
    back.set_adapter("default")
    assert np.array_equal(back(idx)[0], y_default)
    assert not np.array_equal(y_default, y_other)
    with pytest.warns(UserWarning, match="was active which is now deleted"):
        back.delete_adapter("default")
    assert back.active_adapter == "other"
    with pytest.raises(ValueError, match="does not exist"):
        back.delete_adapter("default")
    with pytest.raises(ValueError, match="not found"):
        back.set_adapter("default")


def test_unload_gives_back_the_original_model():
    idx, _ = batch(4)
    ref, _ = gpt()(idx)
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules="all-linear"))
    randomize_B(pm)
    base = pm.unload()
    assert np.array_equal(base(idx)[0], ref)


def test_modules_to_save_trains_a_copy_and_saves_it_whole(tmp_path):
    from minilora.peft import ModulesToSaveWrapper
    idx, tgt = batch(5)
    ref, _ = gpt()(idx)
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert isinstance(pm.base_model.model.lm_head, ModulesToSaveWrapper)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trainable
    assert "base_model.model.lm_head.original_module.weight" not in trainable
    lora = L * 2 * (C + 3 * C)
    assert pm.get_nb_trainable_parameters() == (lora + V * C, n_base() + lora + V * C)   # PEFT counts both copies
    original = pm.base_model.model.lm_head.original_module.weight.data.copy()
    opt = AdamW(pm.named_parameters(), lr=1e-2)
    for _ in range(2):
        pm.zero_grad()
        pm(idx, tgt)
        pm.backward()
        opt.step()
    head = pm.base_model.model.lm_head
    assert np.array_equal(head.original_module.weight.data, original)
    assert not np.array_equal(head.modules_to_save["default"].weight.data, original)
    with pm.disable_adapter():                                  # no LoRA, original head: the base model exactly
        assert np.array_equal(pm(idx)[0], ref)
    y, _ = pm(idx)
    pm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 4 * L // 2 + 1
    back = PeftModel.from_pretrained(gpt(), tmp_path)
    assert np.array_equal(back(idx)[0], y)
    merged = pm.merge_and_unload()
    assert type(merged.lm_head) is Linear
    np.testing.assert_allclose(merged(idx)[0], y, rtol=1e-5, atol=1e-6)


def test_round_trip_on_every_backend(xp, tmp_path):
    """Build, save and reload on the current backend (NumPy; CuPy when a GPU is present): same logits."""
    idx = xp.asarray(batch(6)[0])
    pm = get_peft_model(gpt(), LoraConfig(r=3, lora_alpha=6, target_modules="all-linear"), rng=default_rng(1))
    for _, m in pm.base_model.lora_layers():
        m.lora_B["default"].weight.data[...] = 0.05
    pm.eval()
    y, _ = pm(idx)
    pm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(gpt(), tmp_path)
    assert type(back.base_model.model.lm_head.weight.data) is type(y)
    assert bool((back(idx)[0] == y).all())


def test_a_failed_injection_leaves_the_model_unchanged():
    m = gpt()
    with pytest.raises(ValueError, match=r"r=17 is larger than min.*'transformer.h.0.mlp.c_fc'"):
        get_peft_model(m, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 17}))
    assert not [n for n, x in m.named_modules() if hasattr(x, "lora_A")]
    assert all(p.requires_grad for p in m.parameters())


def test_second_adapter_never_targets_inside_wrappers():
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    pm.add_adapter("b", LoraConfig(r=2, target_modules="all-linear"))
    assert pm.peft_config["b"].target_modules == ["c_attn", "c_fc", "c_proj"]
    assert not [n for n, _ in pm.base_model.lora_layers() if "base_layer" in n or "lm_head" in n]
    with pytest.raises(ValueError, match="not found"):
        pm.add_adapter("c", LoraConfig(r=2, target_modules=["base_layer"]))


def test_fan_in_fan_out_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert pm.peft_config["default"].fan_in_fan_out is False


def test_peft_model_forwards_like_the_base_model():
    pm = get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert pm.config.n_embd == C                              # attributes fall through to the wrapped GPT
    assert pm.get_base_model() is pm.base_model.model
    out = pm.generate(np.zeros((1, 1), dtype=np.int64), 3, rng=default_rng(0))
    assert out.shape == (1, 4)
    pm.eval()
    assert not any(m.training for m in pm.modules())
    pm.train()
    assert all(m.training for m in pm.modules())
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(pm, LoraConfig(target_modules=["c_fc"]))


def test_readme_line():
    """The line printed in minilora.peft's docstring and the README (GPT 4 x 256, r=8 on c_attn)."""
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
    pm = get_peft_model(GPT(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    out = io.StringIO()
    with redirect_stdout(out):
        pm.print_trainable_parameters()
    assert out.getvalue() == "trainable params: 32,768 || all params: 3,356,160 || trainable%: 0.9764\n"
    assert 32_768 == 4 * 8 * (256 + 3 * 256)           # layers x r x (in + out) of c_attn
