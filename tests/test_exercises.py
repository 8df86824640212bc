"""The graders in exercises/ are proven from every side:

1. every grader FAILS on the untouched skeletons (exercises/exNN_*.py);
2. every grader FAILS on at least one planted wrong solution (tests/exercise_mutants/mutants.py: the reference
   solution with one typical mistake patched in), and each planted mistake is caught by the grader it names;
3. every grader PASSES on the reference solutions (exercises/solutions/).

All three sides are one pytest subprocess: exercises/conftest.py's --impl option, given once per folder (the
skeletons, the solutions, one folder per mutant), runs each grader once per folder, and the test id names the
folder; each mutant is run with its own grader only. Its JUnit XML report is read per test id.
Also checked here without pytest runs: the skeletons and the solutions define the same functions with the same
signatures and docstrings, and every notebook has at least 3 graded functions.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
SOLUTIONS = EXERCISES / "solutions"
MODULES = ["ex01_lora", "ex02_int8", "ex03_nf4", "ex04_double_quant", "ex05_lora_backprop", "ex06_merge",
           "ex07_paging", "ex08_memory", "ex09_backend", "ex11_beyond_lora"]


def _load_mutants():
    spec = importlib.util.spec_from_file_location("exercise_mutants", Path(__file__).parent / "exercise_mutants"
                                                  / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _load_mutants()


def graders(module: str) -> list[str]:
    """The grader functions (test_*) of exercises/test_<module>.py, read from its source."""
    tree = ast.parse((EXERCISES / f"test_{module}.py").read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def public_functions(path: Path) -> dict:
    """name -> (signature source, docstring) of the top-level functions a student writes."""
    tree = ast.parse(path.read_text())
    return {n.name: (ast.unparse(n.args), ast.unparse(n.returns) if n.returns else None, ast.get_docstring(n))
            for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def mutant_source(m) -> str:
    text = (SOLUTIONS / f"{m['module']}.py").read_text()
    for old, new in m["edits"]:
        assert text.count(old) == 1, f"{m['id']}: {old!r} occurs {text.count(old)} times in solutions/{m['module']}.py"
        text = text.replace(old, new)
    return text


def _outcomes(xml: Path) -> dict:
    """(side, module, grader) -> 'passed' | 'failed' | 'error' | 'skipped' from a JUnit XML report, where side is
    the folder named in the test id: exercises (the skeletons), solutions, or a mutant's id."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname").split(".")[-1].removeprefix("test_")
        grader, _, side = case.get("name").partition("[")
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        status = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(next(iter(kinds), ""), "passed")
        out[(side.rstrip("]"), module, grader)] = status
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One pytest run grades the skeletons, the solutions and every mutant (each mutant only with its own grader).

    Returns (outcomes, log)."""
    tmp = tmp_path_factory.mktemp("exercise_runs")
    args = ["--impl", str(EXERCISES), "--impl", str(SOLUTIONS)]
    selected = [f"exercises/test_{m}.py::{g}[{side}]" for m, g in ALL_GRADERS for side in ("exercises", "solutions")]
    for m in MUTANTS:
        folder = tmp / "mutants" / m["id"]
        folder.mkdir(parents=True)
        (folder / f"{m['module']}.py").write_text(mutant_source(m))
        args += ["--impl", str(folder)]
        selected.append(f"exercises/test_{m['module']}.py::{m['grader']}[{m['id']}]")
    xml = tmp / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}",
           *args, *selected]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert xml.exists(), f"the grading run wrote no report; its output:\n{log[-4000:]}"
    return _outcomes(xml), log


ALL_GRADERS = [(m, g) for m in MODULES for g in graders(m)]


def test_every_notebook_has_three_graders_and_all_files_exist():
    for m in MODULES:
        assert (EXERCISES / f"{m}.py").is_file() and (SOLUTIONS / f"{m}.py").is_file(), m
        assert len(graders(m)) >= 3, f"{m} has {len(graders(m))} graders"
    assert len(ALL_GRADERS) >= 27


@pytest.mark.parametrize("module", MODULES)
def test_skeleton_matches_solution(module):
    """Same functions, signatures and docstrings; every skeleton body is just `raise NotImplementedError`."""
    skel, sol = public_functions(EXERCISES / f"{module}.py"), public_functions(SOLUTIONS / f"{module}.py")
    assert skel == sol
    tree = ast.parse((EXERCISES / f"{module}.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")):
        body = fn.body[1:]                                      # after the docstring
        assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{module}.{fn.name} is not a bare skeleton"
        assert "NotImplementedError" in ast.unparse(body[0])
    graded = {g.removeprefix("test_") for g in graders(module)}
    assert graded <= set(sol), f"graders without a function to grade in {module}: {graded - set(sol)}"


def test_graders_fail_on_the_skeletons(runs):
    outcomes, log = runs
    got = {(m, g): outcomes.get(("exercises", m, g)) for m, g in ALL_GRADERS}
    not_failed = {k: v for k, v in got.items() if v != "failed"}
    assert not not_failed, f"graders that do not fail on the untouched skeletons: {not_failed}\n{log[-3000:]}"


def test_graders_pass_on_the_solutions(runs):
    outcomes, log = runs
    got = {(m, g): outcomes.get(("solutions", m, g)) for m, g in ALL_GRADERS}
    not_passed = {k: v for k, v in got.items() if v != "passed"}
    assert not not_passed, f"graders that fail on the reference solutions: {not_passed}\n{log[-6000:]}"


def test_every_grader_has_a_planted_bug():
    caught = {(m["module"], m["grader"]) for m in MUTANTS}
    missing = [k for k in ALL_GRADERS if k not in caught]
    assert not missing, f"graders no planted wrong solution is aimed at: {missing}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m["id"] for m in MUTANTS])
def test_grader_fails_on_planted_bug(runs, mutant):
    outcomes, log = runs
    status = outcomes.get((mutant["id"], mutant["module"], mutant["grader"]))
    assert status == "failed", (f"{mutant['grader']} should fail on the planted bug {mutant['id']} "
                                f"({mutant['why']}), but it {status or 'did not run'}\n{log[-3000:]}")
