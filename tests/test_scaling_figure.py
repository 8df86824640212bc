"""`minilora figures --only scaling`: drawn from a saved bench_scaling.py result, never by running the benchmark."""
import json

import pytest

from minilora.apps import figures

POINT = {"minilora_ms": 10.0, "torch_ms": 12.0, "ratio": 10 / 12, "minilora_peak_mib": 5.0, "torch_peak_mib": 4.0}


def result():
    axes = {axis: [dict(POINT, x=x) for x in xs]
            for axis, xs in (("width", (128, 256)), ("seq", (128, 256)), ("rank", (1, 8)))}
    return {"cpu": "test CPU", "config": {"n_layer": 2, "batch": 4, "threads": 1}, "axes": axes}


def test_scaling_is_listed_and_not_quick():
    assert "scaling" in figures.FIGURES and not figures.FIGURES["scaling"].quick
    assert figures.FIGURES["scaling"].files == ("scaling.png",)


def test_from_run_folder_with_scaling_json_draws_the_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scaling.json").write_text(json.dumps(result()))
    out = tmp_path / "figs"
    assert figures.main(["--only", "scaling", "--from-run", str(run), "--out", str(out)]) == 0
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures.main(["--only", "scaling", "--from-run", str(run), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "scaling.png").read_bytes() == png          # deterministic


def test_without_from_run_it_draws_the_saved_result(tmp_path):
    assert figures.saved_scaling_result().is_file()
    assert figures.main(["--only", "scaling", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_a_from_run_folder_with_neither_result_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        figures.main(["--only", "scaling", "--from-run", str(tmp_path), "--out", str(tmp_path / "o")])
