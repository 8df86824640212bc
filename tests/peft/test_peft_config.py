"""LoraConfig validation, adapter_config.json round trips and PEFT's target-module matching rules."""
import json

import pytest

from minilora.io import CorruptFileError
from minilora.peft.config import (
    CONFIG_NAME,
    SAVED_KEYS,
    LoraConfig,
    check_target_module_exists,
    find_targets,
    resolve_target_modules,
)

GPT2_NAMES = ["", "transformer", "transformer.wte", "transformer.wpe", "transformer.h", "transformer.h.0",
              "transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.0.attn.c_attn",
              "transformer.h.0.attn.c_proj", "transformer.h.0.ln_2", "transformer.h.0.mlp", "transformer.h.0.mlp.c_fc",
              "transformer.h.0.mlp.act", "transformer.h.0.mlp.c_proj", "transformer.h.1", "transformer.h.1.attn",
              "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
              "transformer.h.1.mlp.c_proj", "transformer.h.1.attn.c_attn_extra", "transformer.ln_f", "lm_head"]
LINEAR = [n for n in GPT2_NAMES if n.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc", "c_attn_extra", "lm_head")]


def targets(**kw):
    return find_targets(LoraConfig(**kw), GPT2_NAMES)


def test_defaults_are_peft_defaults():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.use_rslora, c.init_lora_weights, c.fan_in_fan_out,
            c.peft_type, c.task_type, c.inference_mode) == (8, 8, 0.0, "none", False, True, False, "LORA",
                                                           "CAUSAL_LM", False)


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "`r` should be a positive integer"),
    (dict(r=-3), "`r` should be a positive integer"),
    (dict(r=2.5), "`r` should be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_alpha=-1.0), "lora_alpha"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=float("inf")), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(bias="some"), "Requested bias"),
    (dict(init_lora_weights="eva"), "not implemented in minilora"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(task_type="CAUSAL"), "task_type"),
    (dict(target_modules=".*c_attn", layers_to_transform=[0]), "cannot be used when `target_modules` is a str"),
    (dict(target_modules=["c_attn"], layers_pattern="h"), "`layers_to_transform` must also be specified"),
    (dict(rank_pattern={"c_attn": 0}), "rank_pattern"),
    (dict(target_modules=[3]), "must be str"),
])
def test_bad_config_values_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_list_targets_match_exactly_or_by_dotted_suffix():
    assert targets(target_modules=["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # "c_attn" must not match "c_attn_extra"; a full path matches exactly
    assert targets(target_modules=["transformer.h.1.attn.c_attn"]) == ["transformer.h.1.attn.c_attn"]
    assert targets(target_modules=["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_str_targets_are_full_regex_matches():
    assert targets(target_modules=r".*\.h\.1\..*c_(fc|attn)") == ["transformer.h.1.attn.c_attn",
                                                                  "transformer.h.1.mlp.c_fc"]
    # fullmatch, not search: "c_attn" alone matches no full dotted name
    with pytest.raises(ValueError, match="not found in the base model"):
        targets(target_modules="c_attn")


def test_exclude_modules_go_first():
    assert targets(target_modules=["c_attn", "c_proj"], exclude_modules=["attn.c_proj"]) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_proj"]
    assert targets(target_modules=["c_attn"], exclude_modules=r".*h\.0.*") == ["transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="All modules were excluded"):
        targets(target_modules=["c_attn"], exclude_modules=["c_attn"])


def test_layers_to_transform_and_pattern():
    assert targets(target_modules=["c_attn"], layers_to_transform=[1]) == ["transformer.h.1.attn.c_attn"]
    assert targets(target_modules=["c_fc"], layers_to_transform=0, layers_pattern="h") == [
        "transformer.h.0.mlp.c_fc"]
    with pytest.raises(ValueError, match="layers_to_transform"):
        targets(target_modules=["c_attn"], layers_to_transform=[7])


def test_unmatched_target_list_gives_peft_message():
    with pytest.raises(ValueError) as e:
        targets(target_modules=["q_proj", "v_proj"])
    msg = str(e.value)
    assert msg.startswith("Target modules ['q_proj', 'v_proj'] not found in the base model. "
                          "Please check the target modules and try again.")
    assert "transformer.wte" in msg          # lists some real module names to help


def test_all_linear_and_default_table():
    class GPT:  # a stand-in: only the class name is used to find the model type
        pass
    c = LoraConfig(target_modules="all-linear")
    assert resolve_target_modules(c, GPT(), GPT2_NAMES, LINEAR) == ["c_attn", "c_attn_extra", "c_fc", "c_proj"]
    assert resolve_target_modules(LoraConfig(), GPT(), GPT2_NAMES, LINEAR) == ["c_attn"]     # PEFT's gpt2 default

    class Mystery:
        pass
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        resolve_target_modules(LoraConfig(), Mystery(), GPT2_NAMES, LINEAR)


def test_modules_to_save_are_never_targets():
    c = LoraConfig(target_modules=["lm_head", "c_fc"], modules_to_save=["lm_head"])
    assert not check_target_module_exists(c, "lm_head")
    assert check_target_module_exists(c, "transformer.h.0.mlp.c_fc")


def test_rank_and_alpha_pattern():
    c = LoraConfig(r=4, lora_alpha=8, rank_pattern={r"h\.1\.attn\.c_attn": 2}, alpha_pattern={"c_fc": 32})
    assert c.r_for("transformer.h.1.attn.c_attn") == 2 and c.r_for("transformer.h.0.attn.c_attn") == 4
    assert c.alpha_for("transformer.h.0.mlp.c_fc") == 32 and c.alpha_for("transformer.h.0.attn.c_attn") == 8


def test_saved_config_has_long_standing_keys_only(tmp_path):
    LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"]).save_pretrained(tmp_path)
    d = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(d) == set(SAVED_KEYS)          # no use_rslora when false (PEFT < 0.8 could not load it otherwise)
    assert d["inference_mode"] is True and d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM"
    assert (tmp_path / CONFIG_NAME).read_text() == json.dumps(d, indent=2, sort_keys=True) + "\n"
    LoraConfig(r=4, use_rslora=True, target_modules=["c_attn"]).save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["use_rslora"] is True


def test_config_round_trip(tmp_path):
    c = LoraConfig(r=3, lora_alpha=5.5, target_modules=["c_fc", "c_attn"], lora_dropout=0.1, bias="lora_only",
                   use_rslora=True, init_lora_weights="gaussian", rank_pattern={"c_fc": 2})
    c.save_pretrained(tmp_path)
    back = LoraConfig.from_pretrained(tmp_path)
    assert back.to_dict() == {**c.to_dict(), "inference_mode": True}


def test_loading_config_errors(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["c_attn"]}))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['r', 'lora_alpha'\]"):
        LoraConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "r": 8, "lora_alpha": 8, "target_modules": None}))
    with pytest.raises(ValueError, match="only LORA"):
        LoraConfig.from_pretrained(tmp_path)
    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["c_attn"]}
    path.write_text(json.dumps({**good, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True"):
        LoraConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({**good, "use_dora": True}))          # DoRA is implemented
    assert LoraConfig.from_pretrained(tmp_path).use_dora is True
    path.write_text(json.dumps({**good, "r": 0}))
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        LoraConfig.from_pretrained(tmp_path)
    path.write_text('{"peft_type": "LORA", "r": 8,')       # truncated JSON
    with pytest.raises(CorruptFileError):
        LoraConfig.from_pretrained(tmp_path)
    # a newer PEFT's extra keys at neutral values are accepted and dropped
    path.write_text(json.dumps({**good, "use_dora": False, "layer_replication": None, "peft_version": "0.21.2",
                                "auto_mapping": {"base_model_class": "GPT"}, "megatron_config": None}))
    assert LoraConfig.from_pretrained(tmp_path).r == 8
