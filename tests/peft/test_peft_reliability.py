"""PeftModel reads and writes only inside the folder it is given, refuses tampered adapter files, never loses a saved
adapter, leaves the caller's model as it was when a load fails, and keeps checkpointed gradients exact.

Adapter names become folder names (PEFT saves every adapter but "default" in a sub-folder named after it), so a
name is one plain folder name: no path separator, no '.', no NUL. Symlinks that lead out of the folder are refused.
"""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora.peft.save_and_load as sl
from minilora.nn import GPT, GPTConfig, Linear, LoRALinear
from minilora.peft import LoraConfig, PeftModel, get_peft_model, quantize_model
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME

CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)


def gpt(**kw):
    return GPT(GPTConfig(**{**CFG, **kw}))


def lora_cfg(**kw):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], **kw})


def batch(seed=0, B=2, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 32, (B, T)), rng.integers(0, 32, (B, T))


def trained(pm, seed=0):
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.lora_layers():
        for lin in m.lora_B.values():
            lin.weight.data[...] = rng.standard_normal(lin.weight.data.shape).astype(lin.weight.data.dtype) * 0.3
    return pm


def as_peft_writes_it(path: Path):
    """Re-write an adapter tensors file with PEFT's metadata only ({"format": "pt"}), as a file from PEFT would be."""
    from safetensors.numpy import load_file, save_file
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})


def files_under(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- adapter names ------------------------------------------------------------------------------------------------

BAD_NAMES = ["/abs/outside", "a/b", "a\\b", "x\x00y", "C:x", "..", "../x", "", ".", "a.b", "tab\there", 7]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter", "load_adapter", "from_pretrained",
                                   "save_pretrained"])
def test_every_entry_point_refuses_a_name_that_is_not_one_plain_folder_name(tmp_path, name, entry):
    saved = tmp_path / "saved"
    trained(get_peft_model(gpt(), lora_cfg())).save_pretrained(saved)
    work = tmp_path / "work"
    work.mkdir()
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match="adapter.name"):
        if entry == "get_peft_model":
            get_peft_model(gpt(), lora_cfg(), adapter_name=name)
        elif entry == "add_adapter":
            get_peft_model(gpt(), lora_cfg()).add_adapter(name, lora_cfg())
        elif entry == "load_adapter":
            get_peft_model(gpt(), lora_cfg()).load_adapter(saved, adapter_name=name)
        elif entry == "from_pretrained":
            PeftModel.from_pretrained(gpt(), saved, adapter_name=name)
        else:
            get_peft_model(gpt(), lora_cfg()).save_pretrained(work, selected_adapters=[name])
    assert files_under(tmp_path) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=0, max_size=12))
def test_any_accepted_name_saves_into_one_folder_inside_the_save_directory(tmp_path, name):
    """Fuzzed names: either refused with ValueError, or saved into exactly save_dir/<name> (one component)."""
    pm = get_peft_model(gpt(), lora_cfg())
    try:
        pm.add_adapter(name, lora_cfg())
    except ValueError:
        return
    assert "/" not in name and "\\" not in name and "." not in name and "\x00" not in name and name
    root = (tmp_path / f"out{abs(hash(name))}").resolve()
    pm.save_pretrained(root, selected_adapters=[name])
    target = root if name == "default" else root / name
    assert target.resolve().parent == root or target.resolve() == root
    assert (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file()


def test_adapter_name_inside_peft_s_prefix_warns_as_peft_does():
    with pytest.warns(UserWarning, match="should not be contained in the prefix lora_"):
        get_peft_model(gpt(), lora_cfg(), adapter_name="lora")


def test_save_refuses_a_symlinked_adapter_subfolder_that_leads_outside(tmp_path):
    pm = get_peft_model(gpt(), lora_cfg())
    pm.add_adapter("other", lora_cfg())
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "other")
    with pytest.raises(ValueError, match="outside"):
        pm.save_pretrained(out)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("which", [CONFIG_NAME, WEIGHTS_NAME])
def test_load_refuses_an_adapter_file_that_is_a_symlink_leading_outside(tmp_path, which):
    trained(get_peft_model(gpt(), lora_cfg())).save_pretrained(tmp_path / "real")
    d = tmp_path / "linked"
    d.mkdir()
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if f == which:
            os.symlink(tmp_path / "real" / f, d / f)
        else:
            (d / f).write_bytes((tmp_path / "real" / f).read_bytes())
    m = gpt()
    with pytest.raises(ValueError, match="outside"):
        PeftModel.from_pretrained(m, d)
    assert not any(isinstance(x, LoRALinear) for x in m.modules())


# ---- tampered and impossible adapter files ------------------------------------------------------------------------

def retype_header(path: Path, new_dtype: str):
    """Rewrite the safetensors header's dtype of every tensor (same bytes, so the bits are reinterpreted)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = new_dtype
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_an_adapter_whose_header_says_integer_is_refused(tmp_path, dtype):
    trained(get_peft_model(gpt(), lora_cfg())).save_pretrained(tmp_path)
    retype_header(tmp_path / WEIGHTS_NAME, dtype)
    with pytest.raises(ValueError, match="float"):
        PeftModel.from_pretrained(gpt(), tmp_path)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_or_bool_adapter_tensors_are_refused_not_cast(tmp_path, dtype):
    from safetensors.numpy import save_file
    pm = trained(get_peft_model(gpt(), lora_cfg()))
    pm.save_pretrained(tmp_path)
    state = {k: v.astype(dtype) for k, v in sl.get_peft_model_state_dict(pm.base_model.model, "default",
                                                                          pm.peft_config["default"]).items()}
    save_file(state, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="float"):
        PeftModel.from_pretrained(gpt(), tmp_path)


def test_save_pretrained_with_no_adapter_left_is_an_error(tmp_path):
    pm = get_peft_model(gpt(), lora_cfg())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter"):
        pm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_selected_adapters_given_as_one_string_is_a_clear_error(tmp_path):
    pm = get_peft_model(gpt(), lora_cfg())
    with pytest.raises(TypeError, match="list of adapter names"):
        pm.save_pretrained(tmp_path, selected_adapters="default")


def test_save_into_a_path_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        get_peft_model(gpt(), lora_cfg()).save_pretrained(f)


@pytest.mark.parametrize("field, bad", [("target_modules", "("), ("exclude_modules", "[a-"),
                                        ("rank_pattern", {"(": 2}), ("alpha_pattern", {"c_attn)": 2})])
def test_a_bad_regex_is_a_value_error_naming_the_pattern(field, bad):
    with pytest.raises(ValueError, match=field) as e:
        LoraConfig(**{"target_modules": ["c_attn"], field: bad})
    assert repr(next(iter(bad)) if isinstance(bad, dict) else bad) in str(e.value)


def test_quantize_model_bad_regex_is_a_value_error_naming_the_pattern():
    with pytest.raises(ValueError, match=r"target_modules.*'\('"):
        quantize_model(gpt(), target_modules="(")


# ---- nothing lost -------------------------------------------------------------------------------------------------

def outputs(model):
    model.eval()
    return model(batch()[0])[0]


def test_a_failed_resave_with_a_new_config_keeps_the_old_adapter_loadable(tmp_path, monkeypatch):
    old = trained(get_peft_model(gpt(), lora_cfg()))
    old.save_pretrained(tmp_path)
    want = outputs(PeftModel.from_pretrained(gpt(), tmp_path))
    new = trained(get_peft_model(gpt(), lora_cfg(lora_alpha=32)), seed=1)

    def disk_full(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(sl, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    np.testing.assert_array_equal(outputs(PeftModel.from_pretrained(gpt(), tmp_path)), want)
    new.save_pretrained(tmp_path)                              # and a save that succeeds replaces the pair
    assert PeftModel.from_pretrained(gpt(), tmp_path).peft_config["default"].lora_alpha == 32


def test_tensors_from_one_save_beside_the_config_of_another_are_refused(tmp_path):
    """What a crash between the two renames would leave: the scaling would be wrong with no shape to show it."""
    trained(get_peft_model(gpt(), lora_cfg())).save_pretrained(tmp_path / "a")
    trained(get_peft_model(gpt(), lora_cfg(lora_alpha=32)), seed=1).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="different save"):
        PeftModel.from_pretrained(gpt(), tmp_path / "a")


def test_saving_cleans_up_orphaned_temp_files_of_its_own_only(tmp_path):
    orphans = [f".{WEIGHTS_NAME}.k3j9x_2a.tmp", f".{CONFIG_NAME}.abcdefgh.tmp"]
    keep = ["notes.tmp", ".other.abcdefgh.tmp", f"{WEIGHTS_NAME}.bak"]
    for n in orphans + keep:
        (tmp_path / n).write_text("x")
    get_peft_model(gpt(), lora_cfg()).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, *keep])


def test_a_failed_from_pretrained_leaves_the_model_unchanged_and_a_retry_works(tmp_path):
    trained(get_peft_model(gpt(), lora_cfg(r=4))).save_pretrained(tmp_path / "r4")
    cfg = json.loads((tmp_path / "r4" / CONFIG_NAME).read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text(json.dumps({**cfg, "r": 2}))   # tensors say r=4
    (tmp_path / "bad" / WEIGHTS_NAME).write_bytes((tmp_path / "r4" / WEIGHTS_NAME).read_bytes())
    as_peft_writes_it(tmp_path / "bad" / WEIGHTS_NAME)
    m = gpt()
    m.train()
    modules = dict(m.named_modules())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="size mismatch"):
        PeftModel.from_pretrained(m, tmp_path / "bad")
    assert dict(m.named_modules()) == modules and m.training
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    pm = PeftModel.from_pretrained(m, tmp_path / "r4")          # the retry on the same model works
    np.testing.assert_array_equal(outputs(pm), outputs(PeftModel.from_pretrained(gpt(), tmp_path / "r4")))


def test_a_failed_load_adapter_on_new_targets_leaves_no_wrapper_behind(tmp_path):
    trained(get_peft_model(gpt(), lora_cfg(target_modules=["c_fc"]))).save_pretrained(tmp_path / "fc")
    cfg = json.loads((tmp_path / "fc" / CONFIG_NAME).read_text())
    (tmp_path / "fc" / CONFIG_NAME).write_text(json.dumps({**cfg, "r": 2}))
    as_peft_writes_it(tmp_path / "fc" / WEIGHTS_NAME)
    pm = get_peft_model(gpt(), lora_cfg())
    fc = pm.base_model.model.transformer.h[0].mlp.c_fc
    with pytest.raises(ValueError, match="size mismatch"):
        pm.load_adapter(tmp_path / "fc", adapter_name="fc")
    assert pm.base_model.model.transformer.h[0].mlp.c_fc is fc and type(fc) is Linear
    assert list(pm.peft_config) == ["default"]


# ---- gradient checkpointing through get_peft_model (one generator for every LoRA layer) -----------------------------

@pytest.mark.parametrize("targets, qlora", [(["c_attn", "c_fc"], False), ("all-linear", False),
                                            ("all-linear", True)], ids=["two-targets", "all-linear", "qlora"])
def test_get_peft_model_with_checkpointing_gives_bit_identical_gradients(targets, qlora):
    def run(ckpt):
        m = gpt(dtype="float64", n_embd=32, block_size=16)
        if qlora:
            m = quantize_model(m)
        pm = trained(get_peft_model(m, LoraConfig(r=4, lora_dropout=0.3, target_modules=targets)))
        if ckpt:
            pm.gradient_checkpointing_enable()
        pm.train()
        grads = []
        for seed in (0, 1):
            pm.zero_grad()
            pm(*batch(seed, B=3, T=16))
            pm.backward()
            grads.append({n: p.grad.copy() for n, p in pm.named_parameters() if p.grad is not None})
        return grads
    for g0, g1 in zip(run(False), run(True), strict=True):
        assert g0.keys() == g1.keys() and len(g0) > 0
        for n in g0:
            np.testing.assert_array_equal(g0[n], g1[n], err_msg=n)
