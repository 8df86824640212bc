"""`minilora figures`: regenerate every figure in figures/ from code, deterministically.

    minilora figures                  # all figures into the repository's figures/ folder
    minilora figures --quick          # the fast subset (what CI runs)
    minilora figures --only nf4_codebook --out /tmp/figs
    minilora figures --list

Each figure is one function below that computes its data with the minilora package itself (fixed seeds) and draws
it with matplotlib's Agg backend. PNGs are written without a "Software" tag or timestamps, so the same code, the
same matplotlib and the same fonts give the same bytes; a committed PNG is exactly what this command produces.
The course notebooks draw the same plots inline and never write here.

Host-only module: it may import numpy, because matplotlib plots host arrays (see tests/test_backend.py HOST_ONLY).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path

import numpy as np

PNG_META = {"Software": None}          # no version string in the file: bytes depend only on the picture
DPI = 100


def default_out_dir() -> Path:
    """The repository's figures/ folder when running from a checkout, else ./figures."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "figures"
    return Path.cwd() / "figures"


def _plt():
    import matplotlib  # noqa: PLC0415 - imported on use, so `minilora --help` stays fast
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415
    matplotlib.rcdefaults()
    plt.rcParams.update({"figure.dpi": DPI, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "minilora"})
    return plt


def save(fig, path: Path) -> Path:
    """PNG bytes from the figure, written atomically (minilora.io), figure closed."""
    from minilora.io import atomic_write_bytes  # noqa: PLC0415
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_META)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------------ the figures
def fig_svd_truncation(out: Path) -> list:
    """Singular values and rank-k truncation error of a low-rank-plus-noise matrix vs a Gaussian one (notebook 01)."""
    plt = _plt()
    rng = np.random.default_rng(0)
    structured = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 128)) + 0.1 * rng.standard_normal((256, 128))
    gaussian = rng.standard_normal((256, 128))
    ks = np.arange(1, 129)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for M, label, style in ((structured, "rank-8 signal + noise", "-"), (gaussian, "Gaussian", "--")):
        S = np.linalg.svd(M, compute_uv=False)
        tail = np.sqrt(np.maximum(np.cumsum((S ** 2)[::-1])[::-1] - S ** 2, 0.0))  # sqrt(sum_{i>k} s_i^2)
        ax1.semilogy(np.arange(1, len(S) + 1), S, style, label=label)
        ax2.plot(ks, tail / np.linalg.norm(M), style, label=label)
    ax1.set(title="singular values", xlabel="i", ylabel=r"$\sigma_i$")
    ax2.set(title=r"rank-$k$ truncation error (Eckart-Young)", xlabel="k", xscale="log",
            ylabel=r"$\|W - W_k\|_F / \|W\|_F$")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    return [save(fig, out / "svd_truncation.png")]


def fig_double_quant_memory(out: Path) -> list:
    """Bits per parameter (16, 4.5, 4.127) and the weights of LLaMA-7B / 65B stored each way (notebook 04)."""
    from minilora.memory import bits_per_param, get_shape, param_counts  # noqa: PLC0415
    plt = _plt()
    schemes = [("bf16", 16.0), ("NF4\n4 + 32/64", bits_per_param(64, double_quant=False)),
               ("NF4 + DQ\n4 + 8/64 + 32/16384", bits_per_param(64, double_quant=True))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [s for s, _ in schemes]
    bits = [b for _, b in schemes]
    bars = ax1.bar(names, bits, color=["#999999", "#4C72B0", "#55A868"])
    ax1.bar_label(bars, labels=[f"{b:.3f}" if b < 16 else "16" for b in bits])
    ax1.set(title="storage per weight", ylabel="bits per parameter")
    width = 0.27
    models = ["llama-7b", "llama-65b"]
    x = np.arange(len(models))
    prev = None
    for i, ((label, b), color) in enumerate(zip(schemes, ["#999999", "#4C72B0", "#55A868"])):
        gb = [param_counts(get_shape(m))["linear"] * b / 8 / 1e9 for m in models]
        rects = ax2.bar(x + (i - 1) * width, gb, width, label=label.replace("\n", ": "), color=color)
        ax2.bar_label(rects, labels=[f"{g:.1f}" for g in gb], fontsize=8)
        if i == 2:
            for xi, g, g_prev in zip(x, gb, prev):
                ax2.annotate(f"DQ saves {g_prev - g:.1f} GB", (xi + width, g), xytext=(0, 14),
                             textcoords="offset points", ha="center", fontsize=8, color="#2d6a3e")
        prev = gb
    ax2.set_xticks(x, ["LLaMA-7B", "LLaMA-65B"])
    ax2.set(title="block linears' weights (embeddings excluded)", ylabel="GB (1e9 bytes)")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return [save(fig, out / "double_quant_memory.png")]


@dataclasses.dataclass(frozen=True)
class Figure:
    func: object
    quick: bool            # part of --quick (fast and pure: no training runs)
    files: tuple           # the PNG names it writes
    about: str


FIGURES = {
    "svd_truncation": Figure(fig_svd_truncation, True, ("svd_truncation.png",),
                             "singular values and truncation error: why low rank can work"),
    "double_quant_memory": Figure(fig_double_quant_memory, True, ("double_quant_memory.png",),
                                  "bits per parameter 16 / 4.5 / 4.127 and GB at 7B and 65B"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minilora figures", description="Regenerate every figure in figures/.")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the repository's figures/)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="make only this figure (repeatable); see --list")
    p.add_argument("--quick", action="store_true", help="only the fast figures (no training runs)")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, f in FIGURES.items():
            print(f"{name:<22} {'quick' if f.quick else 'full ':<6} {', '.join(f.files):<40} {f.about}")
        return 0
    names = list(FIGURES)
    if args.only:
        unknown = [n for n in args.only if n not in FIGURES]
        if unknown:
            print(f"minilora figures: unknown figure(s) {unknown}; known: {', '.join(FIGURES)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    elif args.quick:
        names = [n for n in names if FIGURES[n].quick]
    out = (args.out or default_out_dir()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            paths = FIGURES[name].func(out)
        except Exception as e:  # keep going: one broken figure must not hide the others
            failed.append(name)
            print(f"{name:<22} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        print(f"{name:<22} {time.perf_counter() - t0:5.1f} s  " + ", ".join(str(p_) for p_ in paths))
    if failed:
        print(f"minilora figures: {len(failed)} figure(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
