"""Running the apps changes no file of the repository and writes nothing outside the --out folder it was given.

`minilora demo --quick` and the rank sweep's code path (a tiny `--sweep-rank --steps 3`) run as subprocesses from an
empty temporary working directory, importing minilora from a copy of the checkout (every file `git ls-files` lists,
plus untracked files that are not ignored), so that edits made to the checkout meanwhile cannot disturb the check.
Every file of the copy is hashed before and after, and the copy and the working directory are listed before and
after: nothing may change, and everything the runs wrote must lie under their --out folders."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def git_files() -> list:
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, text=True, check=True)
    return sorted({f for f in r.stdout.splitlines() if (REPO / f).is_file()})


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_demo_and_sweep_change_no_tracked_file_and_write_only_under_out(tmp_path):
    repo, cwd, outs = tmp_path / "repo", tmp_path / "cwd", tmp_path / "outs"
    for f in git_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, repo / f)
    cwd.mkdir()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    where = subprocess.run([sys.executable, "-c", "import minilora; print(minilora.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(repo), f"the runs would import minilora from {where}, not from the copy"
    before = hashes(repo)
    runs = {"demo": ["demo", "--quick"], "sweep": ["demo", "--quick", "--sweep-rank", "--steps", "3"]}
    for name, argv in runs.items():
        r = subprocess.run([sys.executable, "-m", "minilora", *argv, "--out", str(outs / name), "--no-progress"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        assert (outs / name / "table.json").is_file()
    assert list(cwd.iterdir()) == [], "a run wrote into its working directory"
    after = hashes(repo)
    assert sorted(k for k in before if before[k] != after.get(k)) == [], "a run changed files of the repository"
    assert sorted(set(after) - set(before)) == [], "a run wrote new files into the repository"
