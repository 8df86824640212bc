"""Ruff is part of the test suite: `python3 -m pytest` fails on a lint error, with ruff's own report.

The rules and the line length are configured in pyproject.toml ([tool.ruff]); the package, the tests, the
benchmarks and the notebook sources are checked.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff_command():
    try:
        import ruff  # noqa: F401 - the wheel ships the binary; find_ruff_bin locates it
        from ruff.__main__ import find_ruff_bin
        return [find_ruff_bin()]
    except ImportError:
        exe = shutil.which("ruff")
        if exe is None:
            pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
        return [exe]


def test_ruff_is_clean():
    r = subprocess.run(ruff_command() + ["check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"ruff found problems (run `ruff check --fix .`):\n{r.stdout}{r.stderr}"


def test_ruff_is_configured():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "[tool.ruff.lint]" in text
    for rule in ("E", "F", "W", "I", "B", "UP", "SIM"):
        assert f'"{rule}"' in text.split("[tool.ruff.lint]")[1].split("\n[")[0], rule
    assert sys.version_info >= (3, 10)
