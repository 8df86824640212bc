"""`minilora demo --extended`: the "QLoRA NF4+DQ + paged AdamW 8-bit" row, tested through its method builder and one
quick --extended run (about 10 s)."""
import json
import math

from minilora.apps import demo
from minilora.optim import AdamW, AdamW8bit, PagedAdamW8bit


def test_the_8bit_row_is_extended_only_and_last():
    assert "qlora_nf4_paged8bit" not in demo.METHODS                 # the default run keeps its seven methods
    assert list(demo.ALL_METHODS)[-1] == "qlora_nf4_paged8bit"
    assert demo.ALL_METHODS["qlora_nf4_paged8bit"] == ("QLoRA NF4+DQ + paged AdamW 8-bit", "qlora", "nf4")
    assert demo.build_parser().parse_args(["--extended"]).extended is True
    assert demo.build_parser().parse_args([]).extended is False


def test_make_optimizer_picks_paged_adamw_8bit():
    model, _ = demo.build("qlora_nf4_paged8bit")
    opt = demo.make_optimizer(model, 1e-3, demo.OPTIMIZERS["qlora_nf4_paged8bit"])
    assert isinstance(opt, PagedAdamW8bit) and isinstance(opt, AdamW8bit) and opt.weight_decay == 0.0
    assert type(demo.make_optimizer(model, 1e-3)) is AdamW


def test_quick_extended_demo_adds_the_8bit_row(tmp_path):
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
