"""The `minilora` command: dispatch, and the thread setting every command shares.

One BLAS thread is the project's default (minilora's matrices are small: extra threads only fight other processes
for the cores); `minilora --threads N <command>`, `<command> --threads N` and `minilora.set_num_threads(n)` /
`with minilora.limit_threads(n):` change it, built on threadpoolctl."""
import subprocess
import sys
from pathlib import Path

import pytest

import minilora
from minilora.apps import cli


def exit_code(argv) -> int:
    try:
        return int(cli.main(argv) or 0)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture
def restore_threads():
    yield
    if hasattr(minilora, "set_num_threads"):
        minilora.set_num_threads(None)


def test_no_command_prints_usage_and_unknown_exits_2(capsys):
    assert cli.main([]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2


def test_threadpoolctl_is_a_runtime_dependency():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]          # [project] dependencies, not extras
    assert '"threadpoolctl' in deps


def test_library_setting_and_context_manager(restore_threads):
    minilora.set_num_threads(2)
    assert minilora.get_num_threads() == 2
    with minilora.limit_threads(1):
        assert minilora.get_num_threads() == 1
    assert minilora.get_num_threads() == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError), match="threads"):
            minilora.set_num_threads(bad)


@pytest.mark.parametrize("argv, threads", [
    (["memory", "--json"], 1),                       # the project default
    (["--threads", "2", "memory", "--json"], 2),     # global, before the command
    (["--threads=3", "memory", "--json"], 3),
    (["memory", "--threads", "2", "--json"], 2),     # on the command
])
def test_cli_threads_flag(argv, threads, capsys, restore_threads):
    assert exit_code(argv) == 0
    assert minilora.get_num_threads() == threads


@pytest.mark.parametrize("argv", [["--threads", "-1", "memory"], ["--threads", "x", "memory"], ["--threads"],
                                  ["memory", "--threads", "-2"], ["--threads", "1.5", "memory"]])
def test_cli_bad_threads_exit_2(argv, capsys, restore_threads):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "unknown command" not in err and "unrecognized" not in err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_takes_threads(command, capsys):
    assert exit_code([command, "--help"]) == 0
    assert "--threads" in capsys.readouterr().out


def test_subprocess_runs_on_one_blas_thread():
    code = ("import sys, minilora; from minilora.apps import cli; cli.main(['memory', '--json']); "
            "print(minilora.get_num_threads(), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "1"
