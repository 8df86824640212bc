"""The QLoRA path: quantize_model -> prepare_model_for_kbit_training -> get_peft_model, counting, merging into 4-bit,
adapter files, and memory_report measured against the arrays and the 4.127-bits formula."""
import copy
import io
import math
from contextlib import redirect_stdout

import numpy as np
import pytest

from minilora.backend import default_rng
from minilora.nn import GPT, GPTConfig, Linear, LoRALinear
from minilora.nn.linear4bit import Linear4bit
from minilora.optim.adamw import AdamW
from minilora.peft import (
    LoraConfig,
    PeftModel,
    format_memory_report,
    get_peft_model,
    memory_report,
    prepare_model_for_kbit_training,
    quantize_model,
)

CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)


def gpt():
    return GPT(GPTConfig(**CFG))


def qgpt(**kw):
    return prepare_model_for_kbit_training(quantize_model(gpt(), **kw))


def batch(seed=0, B=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 32, (B, 8)), rng.integers(0, 32, (B, 8))


def printed(pm):
    out = io.StringIO()
    with redirect_stdout(out):
        pm.print_trainable_parameters()
    return out.getvalue()


def test_quantize_model_chooses_layers_by_name():
    m = quantize_model(gpt())                                        # all-linear, lm_head skipped
    four = [n for n, x in m.named_modules() if isinstance(x, Linear4bit)]
    assert len(four) == 8 and "lm_head" not in four
    assert type(m.lm_head) is Linear
    m = quantize_model(gpt(), target_modules=["c_attn"], quant_type="fp4", compress_statistics=False)
    assert [n for n, x in m.named_modules() if isinstance(x, Linear4bit)] == ["transformer.h.0.attn.c_attn",
                                                                            "transformer.h.1.attn.c_attn"]
    assert m.transformer.h[0].attn.c_attn.quant_type == "fp4"
    with pytest.raises(ValueError, match="matched no Linear"):
        quantize_model(gpt(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="before get_peft_model"):
        quantize_model(get_peft_model(gpt(), LoraConfig(target_modules=["c_attn"])))
    m = gpt()                                                        # a hand-wrapped LoRA layer: its A and B are
    m.transformer.h[0].attn.c_attn = LoRALinear(m.transformer.h[0].attn.c_attn, r=2)   # Linears, kept in float
    lora = quantize_model(m).transformer.h[0].attn.c_attn
    assert isinstance(lora.base_layer, Linear4bit) and type(lora.lora_A["default"]) is Linear


def test_prepare_freezes_everything():
    m = qgpt()
    assert not any(p.requires_grad for p in m.parameters())
    assert all(p.data.dtype == np.float32 for n, p in m.named_parameters() if "ln" in n)


def test_qlora_counts_logical_parameters_like_the_float_model():
    """PEFT counts a 4-bit weight as its out·in parameters, so QLoRA prints the same line as LoRA."""
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    q = get_peft_model(qgpt(), cfg)
    f = get_peft_model(gpt(), cfg)
    assert all(type(m).__name__ == "QLoRALinear" for _, m in q.base_model.lora_layers())
    assert len(q.base_model.lora_layers()) == 8
    assert printed(q) == printed(f)
    lora = 2 * 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert q.get_nb_trainable_parameters()[0] == lora


def test_fresh_qlora_adapter_is_a_no_op_and_trains_without_touching_nf4():
    idx, tgt = batch(1)
    base = qgpt()
    ref, _ = base(idx)
    codes = {n: (m.weight.data.copy(), m.quant_state.absmax.copy()) for n, m in base.named_modules()
             if isinstance(m, Linear4bit)}
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), rng=default_rng(0))
    assert np.array_equal(pm(idx)[0], ref)
    opt = AdamW(pm.named_parameters(), lr=1e-2)
    losses = []
    for _step in range(4):
        pm.zero_grad()
        _, loss = pm(idx, tgt)
        losses.append(loss)
        pm.backward()
        opt.step()
    assert losses[-1] < losses[0]
    for n, (c, a) in codes.items():
        m = pm.base_model.model.get_submodule(n).base_layer
        assert np.array_equal(m.weight.data, c) and np.array_equal(m.quant_state.absmax, a) and m.weight.grad is None


def test_merge_into_4bit_warns_and_requantizes():
    """merge_and_unload on NF4: Ŵ + ΔW is re-quantized (PEFT bnb.py): outputs change by the rounding (PEFT #2321)."""
    idx, _ = batch(2)
    pm = get_peft_model(qgpt(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), rng=default_rng(0))
    rng = np.random.default_rng(0)
    for _, m in pm.base_model.lora_layers():
        B = m.lora_B["default"].weight                                              # (D_out, r)
        B.data[...] = rng.standard_normal(B.data.shape).astype(np.float32) * 0.05
    pm.eval()
    y, _ = pm(idx)
    # the reference: the same re-quantization done by hand on a copy
    ref = copy.deepcopy(pm.base_model.model)
    for name, m in [(n, x) for n, x in ref.named_modules() if hasattr(x, "lora_A")]:
        m.base_layer.set_weight(m.base_layer.dequantize_weight() + m.get_delta_weight("default"))
        ref.set_submodule(name, m.base_layer)
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear may get different generations"):
        merged = pm.merge_and_unload()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Linear4bit)
    y2, _ = merged(idx)
    assert np.array_equal(y2, ref(idx)[0])
    assert np.abs(y2 - y).max() > 0                    # the rounding is real; notebook material, not a bug


def test_qlora_adapter_file_is_a_plain_lora_file(tmp_path):
    idx, _ = batch(3)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"])
    q = get_peft_model(qgpt(), cfg, rng=default_rng(0))
    for _, m in q.base_model.lora_layers():
        m.lora_B["default"].weight.data[...] = 0.1
    q.eval()
    y, _ = q(idx)
    q.save_pretrained(tmp_path / "q")
    get_peft_model(gpt(), cfg).save_pretrained(tmp_path / "f")
    from safetensors.numpy import load_file
    kq, kf = load_file(str(tmp_path / "q" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in kq.items()} == {k: v.shape for k, v in kf.items()}
    back = PeftModel.from_pretrained(qgpt(), tmp_path / "q")            # onto a 4-bit base: identical outputs
    assert np.array_equal(back(idx)[0], y)
    onto_float = PeftModel.from_pretrained(gpt(), tmp_path / "q")       # onto the float base: the same adapter
    assert onto_float.get_nb_trainable_parameters() == (0, back.get_nb_trainable_parameters()[1])


def test_memory_report_counts_the_real_arrays():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    pm = get_peft_model(qgpt(), cfg)
    rep = memory_report(pm)
    n_lora, n_all = pm.get_nb_trainable_parameters()
    assert rep["n_trainable"] == n_lora and rep["n_params"] == n_all
    assert rep["trainable"] == 4 * n_lora and rep["gradients"] == 0 and rep["optimizer"] == 0
    layers = [m.base_layer for _, m in pm.base_model.lora_layers()]
    assert rep["frozen_4bit"] == sum(m.quant_state.nbytes for m in layers)    # codes + absmax + nested stats
    # the formula: per layer n/2 code bytes + one uint8 absmax per 64 + one float32 per 256 blocks + offset
    expect = sum(m.out_features * m.in_features // 2 + math.ceil(m.out_features * m.in_features / 64)
                 + 4 * math.ceil(m.out_features * m.in_features / 64 / 256) + 4 for m in layers)
    assert rep["frozen_4bit"] == expect
    assert rep["n_4bit_params"] == sum(m.out_features * m.in_features for m in layers)
    assert rep["trainable_percent"] == pytest.approx(100 * n_lora / n_all)
    float_bytes = 4 * (n_all - n_lora - rep["n_4bit_params"])            # embeddings, norms, biases, lm_head
    assert rep["frozen_float"] == float_bytes
    # after one backward and one AdamW step: gradients for A, B only, and two state buffers per trainable weight
    opt = AdamW(pm.named_parameters(), lr=1e-3)
    idx, tgt = batch(0)
    pm(idx, tgt)
    pm.backward()
    opt.step()
    rep = memory_report(pm, opt)
    assert rep["gradients"] == 4 * n_lora and rep["optimizer"] == 2 * 4 * n_lora
    assert rep["total"] == sum(rep[k] for k in ("frozen_float", "frozen_4bit", "trainable", "gradients",
                                                "optimizer"))
    text = format_memory_report(rep)
    assert "frozen_4bit" in text and f"{rep['bits_per_4bit_param']:.3f} bits/param" in text


def test_bits_per_parameter_is_4127_at_scale():
    """QLoRA's 4.127 bits per weight (NF4, blocksize 64, double quantization) on a layer of 256 blocks x k."""
    big = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=1, n_head=1, n_embd=256))
    rep = memory_report(quantize_model(big, target_modules=["c_fc"]))
    n = 256 * 1024
    assert rep["n_4bit_params"] == n
    assert rep["bits_per_4bit_param"] == pytest.approx(8 * (n / 2 + n / 64 + 4 * n / 64 / 256 + 4) / n)
    assert round(rep["bits_per_4bit_param"], 3) == 4.127


def test_modules_to_save_refuses_a_4bit_layer():
    m = quantize_model(gpt(), skip_modules=())
    with pytest.raises(ValueError, match="cannot train a 4-bit layer"):
        get_peft_model(m, LoraConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert not [n for n, x in m.named_modules() if hasattr(x, "lora_A")]      # checked before any change
