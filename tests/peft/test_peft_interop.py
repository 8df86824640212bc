"""Adapter files cross over to Hugging Face PEFT and back: no missing or unexpected keys, the same layer outputs.

The torch side is a module tree with the same dotted names as minilora's GPT (nn.Linear at transformer.h.0.attn.c_attn,
...), built from our model and loaded with our base weights, so the only thing that crosses is the adapter folder.
"""
import json
import warnings

import numpy as np
import pytest

from minilora.nn import GPT, GPTConfig
from minilora.peft import LoraConfig, PeftModel, get_peft_model
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.numpy import load_file  # noqa: E402
from torch_twin import torch_copy_of  # noqa: E402

CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)


def randomize_B(pm, seed=0):
    rng = np.random.default_rng(seed)
    for _, m in pm.base_model.lora_layers():
        for _name, lin in m.lora_B.items():
            B = lin.weight                                            # (D_out, r)
            B.data[...] = rng.standard_normal(B.data.shape).astype(B.data.dtype) * 0.3


def layer_outputs_match(ours, theirs, paths, seed=0):
    """Compare each adapted layer's output on the same random input (eval mode: no dropout)."""
    rng = np.random.default_rng(seed)
    for path in paths:
        a = ours.base_model.model.get_submodule(path)
        b = theirs.base_model.model.get_submodule(path)
        x = rng.standard_normal((5, a.base_layer.in_features)).astype(np.float32)
        y_ours = np.asarray(a(x))
        with torch.no_grad():
            y_theirs = b(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5, err_msg=path)
        # and the adapter really changes the output (B != 0), so the comparison tests the LoRA branch
        assert np.abs(y_ours - np.asarray(a.base_layer(x))).max() > 1e-3


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_saved_here_loads_in_peft(tmp_path, use_rslora):
    base = GPT(GPTConfig(**CFG))
    tree = torch_copy_of(base, torch)                    # before injection: the base weights only
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "mlp.c_proj"], use_rslora=use_rslora)
    ours = get_peft_model(base, config)
    randomize_B(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tree, str(tmp_path))
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    # load once more under another name to read PEFT's load result directly
    res = theirs.load_adapter(str(tmp_path), adapter_name="again")
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    pc = theirs.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.use_rslora, set(pc.target_modules)) == (4, 12, use_rslora,
                                                                             {"c_attn", "mlp.c_proj"})
    theirs.eval()
    paths = [n for n, _ in ours.base_model.lora_layers()]
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
                     "transformer.h.1.mlp.c_proj"]
    layer_outputs_match(ours, theirs, paths)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_saved_by_peft_loads_here(tmp_path, use_rslora):
    base = GPT(GPTConfig(**CFG))
    tree = torch_copy_of(base, torch)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tree, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_fc", "c_attn"],
                                                       init_lora_weights=False, use_rslora=use_rslora))
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA"                  # PEFT 0.21 writes ~40 keys; we accept the neutral ones

    ours = PeftModel.from_pretrained(base, tmp_path)
    res = ours._load_results["default"]
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert not any(p.requires_grad for p in ours.parameters())       # is_trainable=False, as PEFT
    assert not ours.training
    paths = [n for n, _ in ours.base_model.lora_layers()]
    assert len(paths) == 4
    layer_outputs_match(ours, theirs, paths)


def test_file_layout_is_peft_layout(tmp_path):
    ours = get_peft_model(GPT(GPTConfig(**CFG)), LoraConfig(r=2, target_modules=["c_attn"]))
    ours.add_adapter("other", LoraConfig(r=3, target_modules=["c_fc"]))
    ours.save_pretrained(tmp_path)
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {k: v.shape for k, v in t.items()} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.{ab}.weight": s
        for i in range(2) for ab, s in (("lora_A", (2, 16)), ("lora_B", (48, 2)))}
    with open(tmp_path / WEIGHTS_NAME, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]             # PEFT's {"format": "pt"}, plus the digest of
    assert meta.pop("minilora_config_sha256") and meta == {"format": "pt"}   # the scaling config (PEFT ignores it)
    # a non-default adapter goes to a sub-folder named after it, keys without the adapter name
    t2 = load_file(str(tmp_path / "other" / WEIGHTS_NAME))
    assert sorted(t2) == sorted(f"base_model.model.transformer.h.{i}.mlp.c_fc.{ab}.weight"
                                for i in range(2) for ab in ("lora_A", "lora_B"))
    # PEFT reads the sub-folder adapter too
    theirs = peft.PeftModel.from_pretrained(torch_copy_of(GPT(GPTConfig(**CFG)), torch), str(tmp_path / "other"))
    assert theirs.peft_config["default"].r == 3


def test_modules_to_save_cross_over_both_ways(tmp_path):
    """A trained copy of lm_head (PEFT's modules_to_save) is saved whole as base_model.model.lm_head.weight."""
    base = GPT(GPTConfig(**CFG))
    tree = torch_copy_of(base, torch)
    ours = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    randomize_B(ours)
    head = ours.base_model.model.lm_head.modules_to_save["default"].weight
    head.data[...] += 0.5                                # a "trained" head, different from the original
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tree, str(tmp_path / "ours"))
    res = theirs.load_adapter(str(tmp_path / "ours"), adapter_name="again")
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    t_head = theirs.base_model.model.lm_head.modules_to_save["default"].weight.detach().numpy()
    assert np.array_equal(t_head, head.data)
    # and back: PEFT's save of the same model loads here with the same head and LoRA weights
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = PeftModel.from_pretrained(GPT(GPTConfig(**CFG)), tmp_path / "theirs")
    assert back._load_results["default"].missing_keys == []
    assert np.array_equal(back.base_model.model.lm_head.modules_to_save["default"].weight.data, head.data)
    back.eval()
    ours.eval()
    idx = np.random.default_rng(0).integers(0, 32, (2, 8))
    assert np.array_equal(back(idx)[0], ours(idx)[0])
