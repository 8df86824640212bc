"""The apps refuse nonsense before any work starts: bad values exit 2 with a message naming the option, an --out that
is a file, that cannot be created or written, or that holds an earlier run is refused before the first model trains,
and `figures --from-run` never falls back to the 5-minute demo. Also the paper notes' honesty (the --quick caveat,
the sign of the rank-sweep note) and the paged simulator naming where an OutOfMemoryError happened."""
import inspect
import json
import os
import subprocess

import pytest

from minilora.apps import demo, figures, memory_cli, paged_sim, pretrain, quantize_report


def exit_code(main, argv) -> int:
    """A command's exit status whether it returns it or argparse raises SystemExit."""
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        return int(e.code or 0)


class Sentinel(Exception):
    """Raised by a stubbed stage: reaching it proves the argument checks passed (and came first)."""


def no_work(*_a, **_k):
    raise AssertionError("the command started working before refusing its arguments")


@pytest.fixture
def read_only_dir(tmp_path):
    """An existing folder nobody can write into (chmod for a user; `chattr +i` when running as root)."""
    d = tmp_path / "locked"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    try:
        subprocess.run(["chattr", "+i", str(d)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("running as root without chattr: cannot make a read-only folder")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)


# ------------------------------------------------------------------------------------------------ memory
def test_memory_rank_above_the_layers_exits_2(capsys):
    assert exit_code(memory_cli.main, ["--r", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "100000000" in err and "min(d_in, d_out)" in err


def test_memory_d_model_not_divisible_by_n_head_exits_2(capsys):
    assert exit_code(memory_cli.main, ["--d-model", "4095", "--n-head", "32"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_memory_list_models_honours_json(capsys):
    assert memory_cli.main(["--list-models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert "llama-7b" in models and models["llama-7b"]["d_model"] == 4096


# ------------------------------------------------------------------------------------------------ quantize-report
@pytest.mark.parametrize("argv, option", [
    (["--rows", "0"], "--rows"), (["--rows", "-1"], "--rows"), (["--cols", "0"], "--cols"),
    (["--cols", "-7"], "--cols"), (["--seed", "-1"], "--seed"), (["--rows", "100000", "--cols", "100000"], "--rows"),
])
def test_quantize_report_bad_sizes_exit_2(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(quantize_report, "scheme_errors", no_work)
    assert exit_code(quantize_report.main, argv) == 2
    assert option in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ paged-sim
@pytest.mark.parametrize("argv, option", [
    (["--budget-gb", "inf"], "--budget-gb"), (["--budget-gb", "nan"], "--budget-gb"),
    (["--budget-gb", "-1"], "--budget-gb"), (["--budget-gb", "0"], "--budget-gb"), (["--seed", "-5"], "--seed"),
])
def test_paged_sim_nonsense_values_exit_2_naming_the_option(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(paged_sim, "run_scenario", no_work)
    assert exit_code(paged_sim.main, ["--model", "tiny", *argv]) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("where", ["dir", "under_file", "missing_parent"])
def test_paged_sim_bad_figure_path_exits_2_before_simulating(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    path = {"dir": tmp_path, "under_file": tmp_path / "f" / "t.png", "missing_parent": tmp_path / "no" / "t.png"}
    monkeypatch.setattr(paged_sim, "run_scenario", no_work)
    assert exit_code(paged_sim.main, ["--model", "tiny", "--figure", str(path[where])]) == 2
    assert "--figure" in capsys.readouterr().err


def test_paged_sim_names_where_the_oom_happened():
    opt = paged_sim.run_scenario("tiny", budget_gb=0.006, steps=3)["unpaged"]
    assert opt["oom_step"] == 1 and opt["oom_phase"] == "optimizer step"
    setup = paged_sim.run_scenario("tiny", budget_gb=0.004, steps=3)["unpaged"]
    assert setup["oom_phase"] == "setup"
    text = paged_sim.summary(paged_sim.run_scenario("tiny", budget_gb=0.004, steps=3))
    assert "during setup" in text and "at step 0" not in text


# ------------------------------------------------------------------------------------------------ demo
@pytest.fixture
def demo_stubbed(monkeypatch):
    """demo.main with the corpora loading stubbed: reaching it means every argument check has passed."""
    def reached(*_a, **_k):
        raise Sentinel
    monkeypatch.setattr(demo, "load_corpus", reached)
    monkeypatch.setattr(demo, "run_method", no_work)
    return demo.main


def test_demo_refuses_an_earlier_run_folder_unless_overwrite(tmp_path, demo_stubbed, capsys):
    (tmp_path / "table.json").write_text('{"methods": {}}')
    (tmp_path / "table.md").write_text("old table")
    assert exit_code(demo_stubbed, ["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "earlier run" in err and "--overwrite" in err
    assert (tmp_path / "table.md").read_text() == "old table"
    with pytest.raises(Sentinel):
        demo_stubbed(["--quick", "--out", str(tmp_path), "--overwrite"])


@pytest.mark.parametrize("where", ["file", "under_file", "read_only", "figures_dir_file"])
def test_demo_bad_out_exits_2_before_training(where, tmp_path, demo_stubbed, capsys, request):
    (tmp_path / "f").write_text("x")
    argv = {"file": ["--out", str(tmp_path / "f")],
            "under_file": ["--out", str(tmp_path / "f" / "run")],
            "figures_dir_file": ["--out", str(tmp_path / "run"), "--figures-dir", str(tmp_path / "f")]}
    if where == "read_only":
        argv[where] = ["--out", str(request.getfixturevalue("read_only_dir"))]
    assert exit_code(demo_stubbed, ["--quick", *argv[where]]) == 2
    err = capsys.readouterr().err
    assert "--out" in err or "--figures-dir" in err


def test_demo_empty_or_new_out_folder_is_accepted(tmp_path, demo_stubbed):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "run"):
        with pytest.raises(Sentinel):
            demo_stubbed(["--quick", "--out", str(out)])


def test_sample_adapter_for_another_model_exits_2(tmp_path, capsys):
    from minilora.nn import GPT, GPTConfig
    from minilora.peft import LoraConfig, get_peft_model
    small = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32))
    get_peft_model(small, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "a")
    assert exit_code(demo.sample_main, ["--adapter", str(tmp_path / "a"), "--tokens", "2"]) == 2
    assert "--adapter" in capsys.readouterr().err


def _result(mode, steps, sweep=None):
    return {"settings": {"seed": 0, "steps": steps, "batch_size": 4, "block_size": 64, "eval_windows": 8,
                         "mode": mode, "infer_repeats": 1}, "methods": {}, **({"sweep": sweep} if sweep else {})}


def test_quick_run_verdicts_carry_a_caveat():
    quick = " ".join(demo.paper_notes(_result("quick", 12)))
    assert "--quick" in quick and "too short" in quick
    assert "too short" not in " ".join(demo.paper_notes(_result("default", 100)))


def test_rank_note_says_which_way_the_loss_moved():
    sweep = [{"r": r, "trainable_params": r, "code_bits_after": v}
             for r, v in ((1, 2.10), (16, 2.000), (64, 1.990))]
    note = [n for n in demo.paper_notes(_result("default", 100, sweep)) if n.startswith("Rank")][0]
    assert "falls by 0.010 bits" in note and "+0.010" not in note
    sweep[-1]["code_bits_after"] = 2.010
    note = [n for n in demo.paper_notes(_result("default", 100, sweep)) if n.startswith("Rank")][0]
    assert "rises by 0.010 bits" in note


def test_paper_notes_is_a_list_of_named_steps_one_per_claim():
    steps = demo.NOTE_STEPS
    assert len(steps) >= 8
    for step in steps:
        assert step.__name__.startswith("note_") and step.__doc__, step
        assert len(inspect.getsource(step).splitlines()) <= 30, step.__name__
    assert len(inspect.getsource(demo.paper_notes).splitlines()) <= 12


# ------------------------------------------------------------------------------------------------ figures
@pytest.mark.parametrize("table, only", [({}, "demo"), ({"methods": {}}, "demo"),
                                         ({"methods": {"full": {}}}, "lora_rank_loss")])
def test_figures_from_run_without_the_results_fails_without_running_the_demo(table, only, tmp_path, capsys,
                                                                             monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "table.json").write_text(json.dumps(table))
    monkeypatch.setattr(figures, "_run_demo", no_work)
    assert exit_code(figures.main, ["--out", str(tmp_path / "o"), "--only", only, "--from-run", str(run)]) == 2
    assert "--from-run" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_figures_bad_out_exits_2_before_drawing(where, tmp_path, capsys, monkeypatch, request):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "figs"}
    if where == "read_only":
        out[where] = request.getfixturevalue("read_only_dir")
    monkeypatch.setitem(figures.FIGURES, "svd_truncation",
                        figures.Figure(no_work, True, ("svd_truncation.png",), "stub"))
    assert exit_code(figures.main, ["--out", str(out[where]), "--only", "svd_truncation"]) == 2
    assert "--out" in capsys.readouterr().err


def test_figures_says_where_it_writes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        figures.main(["--help"])
    assert "the only minilora command that writes" in capsys.readouterr().out
    assert figures.main(["--out", str(tmp_path), "--only", "svd_truncation"]) == 0
    assert f"writing figures into {tmp_path}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ pretrain
@pytest.mark.parametrize("argv, option", [(["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
                                          (["--block-size", "100000"], "--block-size")])
def test_pretrain_nonsense_values_exit_2(argv, option, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrain, "run", no_work)
    assert exit_code(pretrain.main, [*argv, "--out", str(tmp_path / "o")]) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under_file", "read_only", "earlier_run"])
def test_pretrain_bad_out_exits_2_before_training(where, tmp_path, capsys, monkeypatch, request):
    (tmp_path / "f").write_text("x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "base.json").write_text("{}")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "o", "earlier_run": tmp_path / "old"}
    if where == "read_only":
        out[where] = request.getfixturevalue("read_only_dir")
    monkeypatch.setattr(pretrain, "run", no_work)
    assert exit_code(pretrain.main, ["--steps", "3", "--out", str(out[where])]) == 2
    assert "--out" in capsys.readouterr().err
    if where == "earlier_run":
        assert (tmp_path / "old" / "base.json").read_text() == "{}"
        monkeypatch.setattr(pretrain, "run", lambda a: (_ for _ in ()).throw(Sentinel()))
        with pytest.raises(Sentinel):           # --resume continues the earlier run: allowed
            pretrain.main(["--steps", "3", "--out", str(out[where]), "--resume"])
