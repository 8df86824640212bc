"""Every course notebook runs top to bottom (nbclient) without error, and keeps its outputs for readers.

Each also runs to the end on the numpy-strict backend (MINILORA_BACKEND=numpy-strict), which refuses every host/device
mix that CuPy refuses: the notebooks teach code that would run on a GPU, bringing host data in with asarray and taking
results out with to_numpy.

A stale or broken notebook cannot land: CI executes each one in a fresh kernel from the notebooks/ folder, checks
that the committed .ipynb matches its source in notebooks/src/ (rebuild with `python notebooks/build_notebooks.py`),
and that running it leaves figures/ untouched (only `minilora figures` writes there)."""
import hashlib
import importlib.util
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_lora_from_scratch", "02_absmax_int8", "03_nf4", "04_double_quantization", "05_lora_backprop",
            "06_qlora_end_to_end", "07_paged_optimizers", "08_memory_at_scale", "09_gpu_switch",
            "10_misconceptions", "11_beyond_lora", "12_alpha_and_forgetting",
            "13_peft_methods", "14_real_stack", "15_precision_and_metrics"]


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _figures_snapshot():
    d = ROOT / "figures"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*"))} if d.is_dir() else {}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path.name} has no code"
    assert any(c.get("outputs") for c in code_cells), f"{path.name} was committed without its outputs"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with an error output: {errors[0].get('ename')}"
    before = _figures_snapshot()
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=_builder().kernel_env())   # one BLAS thread; raises CellExecutionError on a failing cell
    elapsed = time.perf_counter() - t0
    assert _figures_snapshot() == before, f"{path.name} wrote into figures/ (only `minilora figures` may)"
    assert elapsed < 180, f"{path.name} took {elapsed:.0f} s; a notebook must run in about a minute"


# Run first in the strict kernel: numpy.asarray / array / asanyarray of a strict array raise, as CuPy's implicit
# conversion does. The backend alone cannot see these (an ndarray subclass is an ndarray to NumPy), so without this a
# notebook could hand device arrays to matplotlib or np.asarray and still pass.
REFUSE_IMPLICIT_CONVERSION = """
import numpy as _np
from minilora.backend import StrictArray as _StrictArray

def _refusing(convert):
    def call(a, *args, **kwargs):
        if isinstance(a, _StrictArray):
            raise TypeError(f"numpy.{convert.__name__} of a device array: CuPy refuses implicit conversion; "
                            "take it out with minilora.backend.to_numpy")
        return convert(a, *args, **kwargs)
    return call

_np.asarray, _np.array, _np.asanyarray = map(_refusing, (_np.asarray, _np.array, _np.asanyarray))
"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_strict_backend(path):
    """The same notebook, executed (not saved) with MINILORA_BACKEND=numpy-strict: a host array meeting a library
    array anywhere raises TypeError, as it would on CuPy, and so does numpy.asarray(device array). Its asserts on
    stated numbers must hold there too."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(REFUSE_IMPLICIT_CONVERSION))
    env = dict(_builder().kernel_env(), MINILORA_BACKEND="numpy-strict")
    before = _figures_snapshot()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    backend = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "backend " in o.get("text", "")]
    assert backend and "backend numpy-strict" in backend[0], f"{path.name} did not report the strict backend"
    assert _figures_snapshot() == before, f"{path.name} wrote into figures/ (only `minilora figures` may)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_source(path):
    src = NB_DIR / "src" / f"{path.stem}.py"
    assert src.is_file(), f"{path.name} has no source {src.relative_to(ROOT)}"
    want = [(c.cell_type, c.source) for c in _builder().parse_percent(src.read_text(encoding="utf-8"))]
    have = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert have == want, (f"{path.name} is stale: its cells differ from {src.relative_to(ROOT)}; "
                          "run `python notebooks/build_notebooks.py " + path.stem[:2] + "`")


def test_course_is_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), f"notebooks must be numbered 01, 02, ...: {numbers}"
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def test_each_notebook_opens_with_a_title_and_a_version_cell():
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {path.stem[:2]} "), path.name
        first_code = next(c for c in cells if c.cell_type == "code")
        assert "minilora.__version__" in first_code.source, f"{path.name}: the first code cell prints versions"


def test_parse_percent_splits_cells():
    cells = _builder().parse_percent("# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %%\n\n# %%\nprint(x)\n")
    assert [(c.cell_type, c.source) for c in cells] == [("markdown", "# Title\n\ntext"), ("code", "x = 1"),
                                                         ("code", "print(x)")]
