"""Every course notebook runs top to bottom (nbclient) without error, and keeps its outputs for readers.

A stale or broken notebook cannot land: CI executes each one in a fresh kernel from the notebooks/ folder."""
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path.name} has no code"
    assert all(c.get("outputs") for c in code_cells if c.source.strip() and not c.source.lstrip().startswith("#")
               ) or any(c.get("outputs") for c in code_cells), f"{path.name} was committed without its outputs"
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()                       # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - t0
    assert elapsed < 180, f"{path.name} took {elapsed:.0f} s; a notebook must run in about a minute"


def test_course_is_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), f"notebooks must be numbered 01, 02, ...: {numbers}"
