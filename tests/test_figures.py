"""`minilora figures`: every figure is listed, --quick writes real PNGs, and the pure figures are byte-for-byte
reproducible (fixed seeds, Agg, no Software/time metadata), so the committed PNGs are what the command produces."""
import json
import subprocess
import sys

from minilora.apps import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = [name for name, f in figures.FIGURES.items() if f.quick]
PURE = ["int8_outliers", "nf4_codebook", "svd_truncation"]   # computed from seeds alone: must be byte-stable
CHEAP = "svd_truncation"


def test_list_names_every_figure(capsys):
    assert figures.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, f in figures.FIGURES.items():
        assert name in out
        for file in f.files:
            assert file in out


def test_cli_is_wired():
    r = subprocess.run([sys.executable, "-m", "minilora", "figures", "--list"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in figures.FIGURES)


def test_quick_writes_nonempty_pngs_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert figures.main(["--out", str(a), "--quick"]) == 0
    expected = [file for name in QUICK for file in figures.FIGURES[name].files]
    assert sorted(p.name for p in a.glob("*.png")) == sorted(expected)
    for file in expected:
        data = (a / file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{file} is not a real PNG ({len(data)} bytes)"
        assert b"Software" not in data[:2000] and b"matplotlib" not in data, f"{file} carries a version tag"
    # a second run in another folder: identical bytes
    assert set(PURE) <= set(QUICK)
    assert figures.main(["--out", str(b)] + [arg for name in PURE for arg in ("--only", name)]) == 0
    for file in [file for name in PURE for file in figures.FIGURES[name].files]:
        assert (a / file).read_bytes() == (b / file).read_bytes(), f"{file} differs between two runs"


def test_only_and_unknown_names(tmp_path, capsys):
    name = CHEAP
    assert figures.main(["--out", str(tmp_path), "--only", name]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(figures.FIGURES[name].files)
    assert figures.main(["--out", str(tmp_path), "--only", "no_such_figure"]) == 2
    assert "no_such_figure" in capsys.readouterr().err


def test_default_out_dir_is_the_repository_figures_folder():
    d = figures.default_out_dir()
    assert d.name == "figures"
    assert (d.parent / "pyproject.toml").is_file() or d.parent == d.cwd()


def test_a_failing_figure_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    def boom(out, ctx):
        raise RuntimeError("deliberately broken")
    monkeypatch.setitem(figures.FIGURES, "broken", figures.Figure(boom, True, ("broken.png",), "test only"))
    assert figures.main(["--out", str(tmp_path), "--only", "broken", "--only", CHEAP]) == 1
    err = capsys.readouterr().err
    assert "broken" in err and "deliberately broken" in err
    assert (tmp_path / figures.FIGURES[CHEAP].files[0]).is_file()


def test_from_run_reuses_a_demo_table_instead_of_running_the_demo(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sweep = [{"r": r, "trainable_params": 1000 * r, "code_bits_after": 3.0 - 0.1 * i} for i, r in enumerate((1, 2, 4))]
    (run / "table.json").write_text(json.dumps({"methods": {}, "sweep": sweep}))
    out = tmp_path / "out"
    assert figures.main(["--out", str(out), "--only", "lora_rank_loss", "--from-run", str(run)]) == 0
    data = (out / "demo_rank_sweep.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_the_codebook_figure_draws_through_the_public_plotting_api(tmp_path, monkeypatch):
    from minilora import plotting
    calls, real = [], plotting.codebook_plot

    def spy(quant_type="nf4", ax=None, **kw):
        calls.append(quant_type)
        return real(quant_type, ax=ax, **kw)
    monkeypatch.setattr(plotting, "codebook_plot", spy)
    assert figures.main(["--out", str(tmp_path), "--only", "nf4_codebook"]) == 0
    assert calls == ["nf4", "fp4", "int4"]
