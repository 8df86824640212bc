"""`minilora demo --extended`: the "QLoRA NF4+DQ + paged AdamW 8-bit", "QLoRA NF4+DQ + DoRA" and "QLoRA NF4 + LoftQ
init" rows, tested through their method builders and one quick --extended run (about 15 s)."""
import json
import math

import numpy as np

from minilora.apps import demo
from minilora.nn.linear4bit import Linear4bit
from minilora.optim import AdamW, AdamW8bit, PagedAdamW8bit

EXTENDED = ("qlora_nf4_paged8bit", "qlora_nf4_dora", "qlora_nf4_loftq")


def test_the_extended_rows_are_extended_only_and_last():
    assert len(demo.METHODS) == 7 and not set(EXTENDED) & set(demo.METHODS)   # the default run keeps its methods
    assert list(demo.ALL_METHODS)[-3:] == list(EXTENDED)
    assert demo.ALL_METHODS["qlora_nf4_paged8bit"] == ("QLoRA NF4+DQ + paged AdamW 8-bit", "qlora", "nf4")
    assert demo.ALL_METHODS["qlora_nf4_dora"][0] == "QLoRA NF4+DQ + DoRA, r=8"
    assert demo.ALL_METHODS["qlora_nf4_loftq"][0] == "QLoRA NF4 + LoftQ init, r=8"
    assert demo.build_parser().parse_args(["--extended"]).extended is True
    assert demo.build_parser().parse_args([]).extended is False


def test_make_optimizer_picks_paged_adamw_8bit():
    model, _ = demo.build("qlora_nf4_paged8bit")
    opt = demo.make_optimizer(model, 1e-3, demo.OPTIMIZERS["qlora_nf4_paged8bit"])
    assert isinstance(opt, PagedAdamW8bit) and isinstance(opt, AdamW8bit) and opt.weight_decay == 0.0
    assert type(demo.make_optimizer(model, 1e-3)) is AdamW


def test_dora_and_loftq_builders():
    """DoRA: QLoRA NF4+DQ with a magnitude vector per adapted layer; LoftQ: every adapted layer's base is a 4-bit
    Linear4bit (NF4, no double quantization) built from the float base, with B ≠ 0 at step 0."""
    dora, _ = demo.build("qlora_nf4_dora")
    layers = [m for _, m in dora.base_model.lora_layers()]
    assert all("default" in m.lora_magnitude_vector and m.base_layer.compress_statistics for m in layers)
    loftq, _ = demo.build("qlora_nf4_loftq")
    layers = [m for _, m in loftq.base_model.lora_layers()]
    assert layers and all(isinstance(m.base_layer, Linear4bit) and not m.base_layer.compress_statistics
                          and m.base_layer.quant_type == "nf4" for m in layers)
    assert all(np.any(m.lora_B["default"].weight.data != 0) for m in layers)
    assert loftq.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": demo.LOFTQ_ITER}


def test_quick_extended_demo_adds_the_extended_rows(tmp_path):
    assert demo.main(["--quick", "--extended", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "table.json").read_text())
    assert set(res["methods"]) == set(demo.ALL_METHODS)
    a, b = res["methods"]["qlora_nf4"], res["methods"]["qlora_nf4_paged8bit"]
    assert b["label"] == "QLoRA NF4+DQ + paged AdamW 8-bit"
    assert b["trainable_params"] == a["trainable_params"] and b["frozen_base_bytes"] == a["frozen_base_bytes"]
    assert b["code_bits_after"] < b["code_bits_before"] and math.isfinite(b["code_bits_after"])
    assert abs(b["code_bits_after"] - a["code_bits_after"]) < 0.05      # 8-bit states: about the same loss
    # per layer, c_fc's B (512x8) and mlp.c_proj's A (8x512) have 4096 elements: 8-bit codes + absmax; the other six
    # adapter tensors stay float32 (bnb's min_8bit_size); both dynamic maps are stored once
    C, L, r = 128, 4, demo.R
    n8 = L * 2 * 4 * C * r
    n32 = a["trainable_params"] - n8
    assert a["optimizer_bytes"] == 8 * a["trainable_params"]
    assert b["optimizer_bytes"] == 8 * n32 + 2 * n8 + 2 * 4 * (n8 // 256) + 2 * 256 * 4
    assert (tmp_path / "adapters" / "qlora_nf4_paged8bit" / "adapter_model.safetensors").is_file()
    assert "| QLoRA NF4+DQ + paged AdamW 8-bit |" in (tmp_path / "table.md").read_text()
    assert sum(n.startswith("8-bit AdamW") for n in res["notes"]) == 1
    # DoRA: plain QLoRA's adapters plus one magnitude per output feature of every adapted layer (attn: 3C + C,
    # mlp: 4C + C per block), on the same NF4+DQ base
    d = res["methods"]["qlora_nf4_dora"]
    assert d["trainable_params"] == a["trainable_params"] + L * (3 * C + C + 4 * C + C)
    assert d["frozen_base_bytes"] == a["frozen_base_bytes"] and math.isfinite(d["code_bits_after"])
    # LoftQ: the same trainables; an NF4 base without double quantization (a little larger); a start closer to the
    # float base (lora_all's "before") than plain QLoRA's
    q = res["methods"]["qlora_nf4_loftq"]
    f = res["methods"]["lora_all"]
    assert q["trainable_params"] == a["trainable_params"] and q["frozen_base_bytes"] > a["frozen_base_bytes"]
    assert abs(q["code_bits_before"] - f["code_bits_before"]) < abs(a["code_bits_before"] - f["code_bits_before"])
    assert q["code_bits_after"] < q["code_bits_before"]
    table = (tmp_path / "table.md").read_text()
    assert "| QLoRA NF4+DQ + DoRA, r=8 |" in table and "| QLoRA NF4 + LoftQ init, r=8 |" in table
    assert sum(n.startswith("DoRA (arXiv 2402.09353") for n in res["notes"]) == 1
    assert sum(n.startswith("LoftQ (arXiv 2310.08659") for n in res["notes"]) == 1
