"""The quantization report: rows for notebooks, per-element errors, the CLI entry points."""
import subprocess
import sys

import numpy as np

from minilora.apps.quantize_report import main
from minilora.quant.report import SCHEMES, roundtrip_errors, scheme_errors


def test_scheme_errors_pinned_golden():
    rows = {r["scheme"]: r for r in scheme_errors()}
    assert list(rows) == list(SCHEMES)
    assert abs(rows["NF4/64"]["mean_abs_err"] - 0.072813) < 1e-6
    assert abs(rows["NF4/64"]["mean_rel_err"] - 0.203431) < 1e-6
    assert abs(rows["NF4/64 + DQ"]["mean_abs_err"] - 0.072884) < 1e-6
    assert abs(rows["FP4/64"]["mean_abs_err"] - 0.096616) < 1e-6
    assert abs(rows["8-bit dynamic/4096"]["mean_rel_err"] - 0.017001) < 1e-6
    assert abs(rows["int8 row-wise"]["mean_abs_err"] - 0.006784) < 1e-6
    assert rows["NF4/64"]["bits_per_param"] == 4.5 and round(rows["NF4/64 + DQ"]["bits_per_param"], 3) == 4.127
    # the ordering the course tells: NF4 beats FP4 and Int4 at 4 bits; 8-bit beats all 4-bit schemes
    assert rows["NF4/64"]["mean_abs_err"] < rows["Int4/64"]["mean_abs_err"] < rows["FP4/64"]["mean_abs_err"]
    assert rows["int8 block-wise/64"]["mean_abs_err"] < rows["int8 row-wise"]["mean_abs_err"] \
        < rows["int8 tensor-wise"]["mean_abs_err"]


def test_roundtrip_errors_for_histograms():
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    e = roundtrip_errors(x, "NF4/64")
    assert e.shape == x.shape and e.dtype == np.float32 and np.abs(e).max() < 0.2 * np.abs(x).max()


def test_main_prints_table(capsys):
    assert main(["--rows", "16", "--cols", "128", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for s in SCHEMES:
        assert s in out


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "minilora", "quantize-report", "--rows", "8", "--cols", "64"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "NF4/64 + DQ" in r.stdout
