"""`minilora demo --quick` end to end (what CI runs), its files, and `minilora sample`.

One quick demo run is shared by the tests of this module (it takes most of this file's runtime)."""
import json
import math
import warnings

import pytest
from torch_twin import torch_copy_of

from minilora.apps import demo, demo_plots
from minilora.backend import get_backend
from minilora.data import load_corpus
from minilora.pretrained import load_base

ROW_KEYS = {"label", "trainable_params", "total_params", "trainable_percent", "frozen_base_bytes", "trainable_bytes",
            "gradient_bytes", "optimizer_bytes", "peak_bytes", "cpu_s_per_step", "code_bits_before", "code_bits_after",
            "docs_bits_before", "docs_bits_after", "file", "file_bytes", "s_per_step", "train_loss_bits"}
ADAPTERS = ["lora_all", "lora_attn", "qlora_nf4", "qlora_fp4", "qlora_int4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "table.json").read_text())


def test_quick_demo_writes_table_adapters_and_figures(run, capsys):
    out, res = run
    assert set(res["methods"]) == set(demo.METHODS)        # (table.json is saved with sorted keys)
    for k, row in res["methods"].items():
        assert set(row) == ROW_KEYS, k
        for key in ("code_bits_before", "code_bits_after", "docs_bits_before", "docs_bits_after", "s_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0, (k, key)
        assert row["peak_bytes"] > row["frozen_base_bytes"] + row["trainable_bytes"]
        assert len(row["train_loss_bits"]) == res["settings"]["steps"]
        assert (out / row["file"]).is_file()
    text = (out / "table.md").read_text()
    for row in res["methods"].values():
        assert row["label"] in text
    assert "Adapter swapping" in text and "Notes:" in text
    for name in ADAPTERS + ["idle"]:
        assert (out / "adapters" / name / "adapter_config.json").is_file(), name
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file(), name
    for fig in ("demo_loss_curves.png", "demo_memory_bars.png", "demo_final_loss_bars.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    assert set(res["inference"]) == {"base", "lora_unmerged", "lora_merged", "qlora_nf4_unmerged"}
    assert set(res["swap"]["rows"]) == {"none (base)", "stdlib code adapter", "IDLE HTML adapter"}
    assert res["machine"]["backend"] == get_backend()      # the array backend the numbers were computed on


def test_parameter_counts_match_the_formula(run):
    _, res = run
    m, (C, L, r) = res["methods"], (128, 4, demo.R)
    # every adapted Linear (in, out) adds r·(in + out): c_attn (C, 3C), attn.c_proj (C, C), c_fc (C, 4C), mlp (4C, C)
    assert m["lora_attn"]["trainable_params"] == L * r * (C + 3 * C)
    assert m["lora_all"]["trainable_params"] == L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert m["qlora_nf4"]["trainable_params"] == m["lora_all"]["trainable_params"]
    assert m["last_layer"]["trainable_params"] == 256 * C
    assert m["full"]["trainable_percent"] == 100.0
    # 4-bit storage: NF4 + double quant < FP4/Int4 with float32 absmax < float32 base
    frozen = {k: m[k]["frozen_base_bytes"] for k in ("qlora_nf4", "qlora_fp4", "lora_all")}
    assert frozen["qlora_nf4"] < frozen["qlora_fp4"] < frozen["lora_all"]
    assert m["lora_all"]["file_bytes"] < m["full"]["file_bytes"] / 10


def test_adapters_load_back_and_reproduce_the_table(run):
    from minilora.peft import PeftModel, prepare_model_for_kbit_training, quantize_model
    out, res = run
    s, code = res["settings"], load_corpus("stdlib")
    pm = PeftModel.from_pretrained(load_base()[0], out / "adapters" / "lora_all")
    assert pm._load_results["default"].missing_keys == []
    assert abs(demo.bits(pm, code, s) - res["methods"]["lora_all"]["code_bits_after"]) < 1e-5
    q = prepare_model_for_kbit_training(quantize_model(load_base()[0], "nf4", compress_statistics=True))
    pq = PeftModel.from_pretrained(q, out / "adapters" / "qlora_nf4")
    assert abs(demo.bits(pq, code, s) - res["methods"]["qlora_nf4"]["code_bits_after"]) < 1e-5
    # merged model == unmerged adapter (float base), as in the inference table
    assert abs(res["inference"]["lora_merged"]["code_bits"] - res["methods"]["lora_all"]["code_bits_after"]) < 1e-3


def test_full_finetune_checkpoint_loads(run):
    from minilora.io import load_safetensors
    out, res = run
    model, _ = load_base()
    tensors, meta = load_safetensors(out / "full_finetune.safetensors")
    model.load_state_dict(tensors)
    s = res["settings"]
    assert abs(demo.bits(model, load_corpus("stdlib"), s) - res["methods"]["full"]["code_bits_after"]) < 1e-5


def test_adapters_load_in_hugging_face_peft_without_missing_keys(run):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    out, _ = run
    base, _ = load_base()

    t = torch_copy_of(base, torch)                      # torch modules with our names, shapes and weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(t, str(out / "adapters" / "lora_all"))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    for name in ("lora_attn", "idle"):
        res = theirs.load_adapter(str(out / "adapters" / name), adapter_name=name)
        assert list(res.missing_keys) == [] and list(res.unexpected_keys) == [], name


def test_sample_with_a_saved_adapter(run, capsys):
    out, _ = run
    assert demo.sample_main(["--adapter", str(out / "adapters" / "lora_all"), "--tokens", "12", "--prompt",
                             "import "]) == 0
    text = capsys.readouterr().out
    assert text.count("=== ") == 2 and text.count("import ") >= 2


def test_paper_notes_report_disagreement_honestly():
    row = dict(code_bits_before=3.0, docs_bits_before=2.0, file_bytes=100, peak_bytes=None)
    res = {"settings": {"seed": 0, "steps": 10, "batch_size": 2, "block_size": 8, "eval_windows": 2},
           "methods": {"full": dict(row, code_bits_after=2.0, docs_bits_after=2.1, file_bytes=1000),
                       "lora_all": dict(row, code_bits_after=2.5, docs_bits_after=2.5)}}
    notes = " ".join(demo.paper_notes(res))
    assert "DISAGREES" in notes and "0.500 bits worse" in notes


def test_real_weight_figures(tmp_path):
    errs = demo_plots.real_weight_errors()
    paths = demo_plots.real_weight_figures(tmp_path, data=errs)
    assert [p.name for p in paths] == ["quant_real_weights_error_hist.png", "quant_real_weights_qq.png"]
    assert set(errs) == set(demo_plots.LAYER_TYPES)
    for t, d in errs.items():
        mae = d["mean_abs_error"]
        assert mae["int8"] < min(mae["nf4"], mae["fp4"], mae["int4"]), t     # 8 bits beat any 4-bit code
    z = demo_plots.block_zscores(errs["mlp.c_fc"]["weights"])
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "2"], "--steps must be > 2"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
    (["--base", "/nonexistent"], "no base.safetensors"),
    (["--rank", "8"], "unrecognized arguments"),
])
def test_demo_bad_cli_input_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--adapter", "/nonexistent"], "no adapter_config.json"),
    (["--tokens", "0"], "must be >= 1"),
])
def test_sample_bad_cli_input_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.sample_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
