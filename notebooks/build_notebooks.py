"""Build the course notebooks from their sources and execute them, so the committed .ipynb files keep their outputs.

Each notebook is written as a plain Python file in notebooks/src/NN_name.py, in the "percent" format that jupytext
and VS Code understand: a line `# %%` starts a code cell, `# %% [markdown]` starts a markdown cell whose lines are
comments (`# ` is stripped). Plain files diff and review well, and parse as Python (an IPython magic is written
commented out, `# %matplotlib inline`, as jupytext writes it); the .ipynb files are generated from them.

    python notebooks/build_notebooks.py              # build and execute all notebooks
    python notebooks/build_notebooks.py 03 05        # only these (by number or name)
    python notebooks/build_notebooks.py --no-exec    # write the .ipynb files without running them

Execution uses nbclient in a fresh kernel with notebooks/ as the working directory (as tests/test_notebooks.py does),
and prints each notebook's wall time. Volatile metadata (timings, kernel ids) is not stored, so a rebuild of an
unchanged source only changes outputs that really changed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"


MAGIC = re.compile(r"^# %(?!%)[A-Za-z]")         # `# %matplotlib inline`, not a `# %%` cell marker
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def kernel_env() -> dict:
    """The environment of the executing kernel: this one, with one BLAS thread unless the caller chose otherwise.

    The course's matrices are small, and on a shared or busy machine several BLAS threads per kernel fight for the
    cores: notebook 06 took minutes instead of seconds that way. One thread keeps every notebook well under a minute
    and its printed timings stable. Set OPENBLAS_NUM_THREADS (or OMP_/MKL_) yourself to override."""
    env = dict(os.environ)
    for var in BLAS_THREADS:
        env.setdefault(var, "1")
    return env


def parse_percent(text: str) -> list:
    """Split a percent-format source into nbformat cells."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if not body.strip():
            return
        if kind == "markdown":
            md = [ln[2:] if ln.startswith("# ") else ln[1:] if ln.startswith("#") else ln for ln in body.split("\n")]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(md)))
        else:   # jupytext's convention: a magic is written commented out (`# %matplotlib inline`), so the source
            code = [ln[2:] if MAGIC.match(ln) else ln for ln in body.split("\n")]   # parses as Python
            cells.append(nbformat.v4.new_code_cell("\n".join(code)))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks into one output. How the kernel splits a cell's prints into chunks
    depends on timing, so without this a rebuild of an unchanged notebook would reshuffle its stored outputs."""
    merged = []
    for out in outputs:
        if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1]["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def build(src: pathlib.Path, execute: bool = True) -> float:
    """Write notebooks/<src.stem>.ipynb from src, executed unless execute=False; returns the execution time (s)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_percent(src.read_text(encoding="utf-8"))
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    elapsed = 0.0
    if execute:
        import nbclient  # imported here: only needed when executing
        t0 = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(HERE)}}).execute(env=kernel_env())
        elapsed = time.perf_counter() - t0
        nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):           # stable ids keep diffs small between rebuilds
        cell["id"] = f"c{i:03d}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    out = HERE / f"{src.stem}.ipynb"
    nbformat.write(nb, out)
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("only", nargs="*", help="notebook numbers or names to build (default: all)")
    p.add_argument("--no-exec", action="store_true", help="write the notebooks without executing them")
    args = p.parse_args(argv)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # inline PNGs, even under CI's Agg
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if args.only:
        sources = [s for s in sources if any(s.stem.startswith(o) or o in s.stem for o in args.only)]
    if not sources:
        print("nothing to build", file=sys.stderr)
        return 2
    for s in sources:
        t = build(s, execute=not args.no_exec)
        print(f"{s.stem + '.ipynb':<32} {t:6.1f} s" if not args.no_exec else f"{s.stem}.ipynb written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
