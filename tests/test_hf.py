"""minilora.hf against the real stack: transformers' GPT2LMHeadModel, PEFT's PeftModel, bitsandbytes' 4-bit layers.

Every comparison runs the exported folder in transformers (and the imported one in minilora) on the same token ids
and bounds the largest logit difference: 1e-4 in float32, 1e-10 in float64. The 4-bit comparisons run
transformers' model in train mode (dropout is 0, so it is deterministic): in eval mode bitsandbytes' CPU backend
repacks the weights with bfloat16 statistics and no longer computes code[q] * absmax in float32.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest

from minilora.hf import UnsupportedModelError, export_hf, import_adapter, import_hf, is_conv1d_weight
from minilora.io import load_safetensors, save_safetensors
from minilora.nn import GPT
from minilora.peft import LoraConfig, PeftModel, get_peft_model, quantize_model
from minilora.pretrained import load_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

DOC = Path(__file__).resolve().parent.parent / "docs" / "real_stack.md"
TOL = {"float32": 1e-4, "float64": 1e-10}
IDX = np.random.default_rng(0).integers(0, 256, (2, 48))          # (B, T) byte ids


def hf_logits(model, idx=IDX):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()        # (B, T, V) in the model's dtype


def ours(model, idx=IDX):
    return np.asarray(model(idx)[0])                               # (B, T, V)


def base(dtype="float32"):
    model, _ = load_base()
    if dtype == "float32":
        return model
    m = GPT(dataclasses.replace(model.config, dtype=dtype))
    m.load_state_dict({k: np.asarray(v, dtype=dtype) for k, v in model.state_dict().items()})
    return m


def with_random_adapter(model, folder, seed=0, **kw):
    """get_peft_model on `model` with B random (a fresh adapter is a no-op), saved to `folder`; the PeftModel."""
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **{"target_modules": ["c_attn", "c_proj", "c_fc"],
                                                                 **kw}))
    rng = np.random.default_rng(seed)
    for _, layer in pm.base_model.lora_layers():
        for lin in layer.lora_B.values():
            lin.weight.data[...] = (rng.standard_normal(lin.weight.data.shape) * 0.05).astype(lin.weight.data.dtype)
    pm.eval()
    pm.save_pretrained(folder)
    return pm


@contextlib.contextmanager
def no_fan_in_fan_out_warning():
    """Record every warning; fail if one is about fan_in_fan_out (PEFT's, or minilora's own)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    bad = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert bad == [], bad


def peft_load(hf_model, folder):
    with no_fan_in_fan_out_warning() as caught:
        model = peft.PeftModel.from_pretrained(hf_model, str(folder))
    # what remains is transformers' own deprecation notice, raised inside PEFT (not about the files)
    assert all("is_gradient_checkpointing" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return model


# ------------------------------------------------------------------------------------------------------ the base
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_export_gives_transformers_the_same_logits(tmp_path, dtype):
    model = base(dtype)
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=getattr(torch, dtype)).eval()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["tie_word_embeddings"], cfg["activation_function"], cfg["layer_norm_epsilon"]) == \
        (False, "gelu_new", 1e-5)
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0
    theirs = hf_logits(hf)
    assert theirs.dtype == np.dtype(dtype)
    assert np.abs(theirs - ours(model)).max() < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_import_of_the_export_is_the_same_model(tmp_path, dtype):
    model = base(dtype)
    export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)


def test_the_square_matrix_trap_is_caught(tmp_path):
    """attn.c_proj is (C, C): a copy left in minilora's (out, in) layout loads with no error in transformers. The
    export must transpose it (checked in the file), and a deliberately untransposed one must fail the tolerance."""
    model = base()
    export_hf(model, tmp_path / "hf")
    tensors, _ = load_safetensors(tmp_path / "hf" / "model.safetensors")
    W = np.asarray(model.transformer.h[0].attn.c_proj.weight.data)                     # (C, C), (out, in)
    assert W.shape[0] == W.shape[1]
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_proj.weight"], W.T)
    for k in tensors:                                                                  # untranspose only the square
        if k.endswith("attn.c_proj.weight"):
            tensors[k] = np.ascontiguousarray(tensors[k].T)
    save_safetensors(tmp_path / "hf" / "model.safetensors", tensors)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()          # loads without complaint
    assert np.abs(hf_logits(hf) - ours(model)).max() > 100 * TOL["float32"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_import_of_a_random_transformers_gpt2(tmp_path, dtype):
    """GPT2Config's own defaults: tied embeddings, dropout 0.1 (inactive in eval mode); any small shape."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=24, n_embd=48, n_layer=3, n_head=3)
    hf = transformers.GPT2LMHeadModel(cfg).to(getattr(torch, dtype)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    assert (model.config.n_embd, model.config.n_head, model.config.block_size, model.config.dtype) == \
        (48, 3, 24, dtype)
    idx = IDX[:, :24] % 50
    assert np.abs(hf_logits(hf, idx) - ours(model, idx)).max() < TOL[dtype]


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu"}, "activation_function"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"model_type": "llama"}, "model_type"),
])
def test_import_refuses_what_minilora_cannot_compute(tmp_path, change, message):
    export_hf(base(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(UnsupportedModelError, match=message):
        import_hf(tmp_path / "hf")


def test_export_refuses_a_non_empty_folder_and_a_peft_model(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(base(), tmp_path / "hf")
    export_hf(base(), tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"          # only the exported files are replaced
    pm = get_peft_model(base(), LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="PeftModel"):
        export_hf(pm, tmp_path / "other")


def test_conv1d_weights_are_chosen_by_name():
    assert all(is_conv1d_weight(f"transformer.h.3.{k}.weight") for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj"))
    assert not any(is_conv1d_weight(k) for k in ("lm_head.weight", "transformer.wte.weight",
                                                  "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"))


# ------------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adapter_exported_here_loads_in_peft_without_a_warning(tmp_path, dtype):
    pm = with_random_adapter(base(dtype), tmp_path / "runs" / "lora")
    export_hf(base(dtype), tmp_path / "hf", adapters=[tmp_path / "runs" / "lora"])
    assert json.loads((tmp_path / "hf" / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=getattr(torch, dtype))
    theirs = peft_load(hf, tmp_path / "hf" / "lora").eval()
    assert np.abs(ours(pm) - ours(base(dtype))).max() > 0.1   # B != 0 matters
    assert np.abs(hf_logits(theirs) - ours(pm)).max() < TOL[dtype]
    merged_theirs, merged_ours = theirs.merge_and_unload(), pm.merge_and_unload()
    assert np.abs(hf_logits(merged_theirs) - ours(merged_ours)).max() < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adapter_saved_by_peft_imports_here_without_a_warning(tmp_path, dtype):
    export_hf(base(dtype), tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=getattr(torch, dtype))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"],
                                                     fan_in_fan_out=True, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "hf" / "peft_lora")
    theirs.eval()
    model = import_hf(tmp_path / "hf")
    import_adapter(tmp_path / "hf" / "peft_lora", tmp_path / "mine" / "peft_lora", model=model)
    with no_fan_in_fan_out_warning():
        pm = PeftModel.from_pretrained(model, tmp_path / "mine" / "peft_lora")
    pm.eval()
    assert np.abs(hf_logits(theirs) - ours(pm)).max() < TOL[dtype]
    merged_theirs, merged_ours = theirs.merge_and_unload(), pm.merge_and_unload()
    assert np.abs(hf_logits(merged_theirs) - ours(merged_ours)).max() < TOL[dtype]


def test_adapter_on_lm_head_and_conv1d_is_refused(tmp_path):
    with_random_adapter(base(), tmp_path / "both", target_modules=["c_attn", "lm_head"])
    with pytest.raises(UnsupportedModelError, match="fan_in_fan_out"):
        export_hf(base(), tmp_path / "hf", adapters=[tmp_path / "both"])
    assert not (tmp_path / "hf" / "model.safetensors").exists()           # checked before anything is written


# ------------------------------------------------------------------------------------------------------ 4-bit
def test_qlora_both_ways(tmp_path):
    """minilora's NF4 base (double quantization) and a QLoRA adapter -> transformers + bitsandbytes + PEFT, and a
    PEFT adapter trained there -> minilora.

    The 4-bit state crosses byte for byte (asserted). bitsandbytes' dequantized weights are compared with the hand
    computation code[q] * absmax, not only with minilora: its CPU dequantize_4bit has a known AVX-512 fault on 2-D
    inputs whose rows are not whole blocks (tests/quant/bnb_oracle.py); every row of the shipped base is a whole
    number of 64-blocks, so here they must be exact. What remains in the logits is float32 matmul order: < 1e-4."""
    pytest.importorskip("bitsandbytes")
    from quant.bnb_oracle import hand_dequantize_4bit

    from minilora.quant import QuantState
    q = quantize_model(base())
    pm = with_random_adapter(q, tmp_path / "runs" / "qlora", target_modules="all-linear")
    export_hf(quantize_model(base()), tmp_path / "hf", adapters=[tmp_path / "runs" / "qlora"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert (cfg["load_in_4bit"], cfg["bnb_4bit_quant_type"], cfg["bnb_4bit_use_double_quant"]) == (True, "nf4", True)
    assert json.loads((tmp_path / "hf" / "qlora" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", device_map="cpu").train()
    layer = hf.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == "Linear4bit"
    ml = pm.base_model.model.transformer.h[0].attn.c_attn.base_layer
    np.testing.assert_array_equal(layer.weight.data.numpy(), np.asarray(ml.weight.data))      # the packed codes
    import bitsandbytes as bnb
    sd = {k: v.numpy() for k, v in layer.weight.quant_state.as_dict(packed=True).items()}
    state = QuantState.from_dict(sd)
    hand = hand_dequantize_4bit(layer.weight.data.numpy(), state)                             # (out, in)
    np.testing.assert_array_equal(np.asarray(ml.dequantize_weight()), hand)
    np.testing.assert_array_equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy(),
                                  hand)
    with torch.no_grad():
        base_theirs = hf_logits(hf)
    assert np.abs(base_theirs - ours(quantize_model(base()))).max() < TOL["float32"]
    theirs = peft_load(hf, tmp_path / "hf" / "qlora").train()
    assert np.abs(hf_logits(theirs) - ours(pm)).max() < TOL["float32"]

    # the way back: the 4-bit folder into minilora, and an adapter PEFT saved on it
    torch.manual_seed(1)
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", device_map="cpu")
    theirs2 = peft.get_peft_model(hf2, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                       init_lora_weights=False)).train()
    theirs2.save_pretrained(tmp_path / "hf" / "peft_qlora")
    model = import_hf(tmp_path / "hf")
    assert type(model.transformer.h[0].mlp.c_proj).__name__ == "Linear4bit"
    import_adapter(tmp_path / "hf" / "peft_qlora", tmp_path / "mine", model=model)
    with no_fan_in_fan_out_warning():
        back = PeftModel.from_pretrained(model, tmp_path / "mine")
    back.eval()
    assert np.abs(hf_logits(theirs2) - ours(back)).max() < TOL["float32"]


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_export_and_import(tmp_path, capsys):
    from minilora.apps.cli import main
    with_random_adapter(base(), tmp_path / "lora_all")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["export-hf", str(tmp_path / "out"), "--adapter", str(tmp_path / "lora_all")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "out"), "--adapter", str(tmp_path / "lora_all"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "lora_all" / "adapter_model.safetensors").is_file()
    assert main(["import-hf", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    model, meta = load_base(tmp_path / "back")
    assert meta["config"] == dataclasses.asdict(base().config)
    assert np.abs(ours(model) - ours(base())).max() == 0
    pm = PeftModel.from_pretrained(model, tmp_path / "back" / "lora_all")
    assert np.abs(ours(pm) - ours(PeftModel.from_pretrained(base(), tmp_path / "lora_all"))).max() == 0


# ------------------------------------------------------------------------------------------------------ the docs
def fenced(text: str, lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"docs/real_stack.md needs exactly one ```{lang} block"
    return blocks[0]


def test_the_real_stack_snippet_runs_as_written(tmp_path, monkeypatch):
    """docs/real_stack.md's shell line and its Python block (the README's "Take it to the real stack"), as written:
    export the demo's adapter, then the five lines in transformers + PEFT."""
    from minilora.apps.cli import main
    text = DOC.read_text(encoding="utf-8")
    command, code = fenced(text, "bash").strip(), fenced(text, "python")
    assert len(code.strip().splitlines()) == 5
    argv = shlex.split(command)
    assert argv[0] == "minilora"
    monkeypatch.chdir(tmp_path)
    adapter = Path(argv[argv.index("--adapter") + 1])
    pm = with_random_adapter(base(), adapter, target_modules="all-linear")       # stands in for the demo's run
    assert main(argv[1:]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out), no_fan_in_fan_out_warning():
        exec(compile(code, str(DOC), "exec"), {"__name__": "__snippet__"})
    printed = out.getvalue()
    assert printed.startswith("def main(")
    prompt = np.array([list(b"def main(")])                                   # greedy decoding here gives the same
    want = pm.generate(prompt, max_new_tokens=32, top_k=1)
    assert printed == bytes(np.asarray(want[0]).tolist()).decode("utf-8", errors="replace") + "\n"
    assert os.path.isdir("hf")
