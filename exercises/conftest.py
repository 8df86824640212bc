"""Grader plumbing: which implementation the graders in this folder import.

    python3 -m pytest exercises/                  grades the skeletons you edit (exercises/exNN_*.py)
    python3 -m pytest exercises/ --solutions      grades the reference solutions (exercises/solutions/exNN_*.py)
    python3 -m pytest exercises/ --impl DIR       grades the modules found in DIR (repeatable; for teachers and CI)

Each grader module names its exercise module (`EXERCISE = "ex03_nf4"`) and receives it as the `ex` fixture. The
module is loaded from its file under a private name, so a skeleton and a solution of the same name never meet in
sys.modules, and nothing here imports exercises/solutions/ unless --solutions asks for it. With several --impl
directories every grader runs once per directory that holds its module (the test id names the directory), which is
how tests/test_exercises.py grades many planted wrong solutions in one pytest run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("exercises", "graded exercises")
    group.addoption("--solutions", action="store_true", default=False,
                    help="grade exercises/solutions/ (the reference code) instead of the skeletons")
    group.addoption("--impl", action="append", default=[], metavar="DIR",
                    help="grade the exercise modules in DIR instead (repeatable: one run per directory)")


def pytest_configure(config):
    if config.option.tbstyle == "auto":      # a student reads the message, not the grader's internals
        config.option.tbstyle = "short"


def _impl_dirs(config) -> list[Path]:
    dirs = [Path(d).resolve() for d in config.getoption("impl")]
    if config.getoption("solutions"):
        dirs.append(HERE / "solutions")
    for d in dirs:
        if not d.is_dir():
            hint = " (solutions are kept out of student copies)" if d == HERE / "solutions" else ""
            raise pytest.UsageError(f"no such directory: {d}{hint}")
    return dirs or [HERE]


def _load(directory: Path, name: str):
    """Import directory/name.py as a fresh module with a private name."""
    path = directory / f"{name}.py"
    tag = "".join(c if c.isalnum() else "_" for c in directory.name)
    spec = importlib.util.spec_from_file_location(f"_graded_{tag}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_generate_tests(metafunc):
    if "ex" not in metafunc.fixturenames:
        return
    dirs = _impl_dirs(metafunc.config)
    if len(dirs) > 1:                    # one run per directory that has this module; the id names the directory
        name = metafunc.module.EXERCISE
        dirs = [d for d in dirs if (d / f"{name}.py").is_file()]
        metafunc.parametrize("ex", dirs, ids=[d.name for d in dirs], indirect=True, scope="module")


@pytest.fixture(scope="module")
def ex(request):
    """The exercise module under grade (skeleton, solution or another implementation)."""
    directory = getattr(request, "param", None) or _impl_dirs(request.config)[0]
    return _load(directory, request.module.EXERCISE)
