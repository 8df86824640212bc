"""`minilora figures`: regenerate every figure in figures/ from code, deterministically.

    minilora figures                  # all figures into the repository's figures/ folder
    minilora figures --quick          # the fast subset (what CI runs)
    minilora figures --only nf4_codebook --out /tmp/figs
    minilora figures --list
    minilora figures --only scaling --from-run DIR   # from a `python benchmarks/bench_scaling.py --out DIR` result

Each figure is one function below that computes its data with the minilora package itself (fixed seeds) and draws
it with matplotlib's Agg backend. PNGs are written without a "Software" tag or timestamps, so the same code, the
same matplotlib and the same fonts give the same bytes; a committed PNG is exactly what this command produces.
The course notebooks draw the same plots inline and never write here.

Host-only module: it may import numpy, because matplotlib plots host arrays (see tests/test_backend.py HOST_ONLY).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minilora.apps.common import add_threads_option, apply_threads, check_out_dir
from minilora.plotting import pyplot, save_png
from minilora.quant.report import pinned_input


def default_out_dir() -> Path:
    """The repository's figures/ folder when running from a checkout, else ./figures."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "figures"
    return Path.cwd() / "figures"


# ------------------------------------------------------------------------------------------------ the figures
def fig_svd_truncation(out: Path, ctx: dict) -> list:
    """Singular values and rank-k truncation error of a low-rank-plus-noise matrix vs a Gaussian one (notebook 01)."""
    plt = pyplot()
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
    return [save_png(fig, out / "svd_truncation.png")]


def fig_double_quant_memory(out: Path, ctx: dict) -> list:
    """Bits per parameter (16, 4.5, 4.127) and the weights of LLaMA-7B / 65B stored each way (notebook 04)."""
    from minilora.memory import bits_per_param, get_shape, param_counts
    plt = pyplot()
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
    for i, ((label, b), color) in enumerate(zip(schemes, ["#999999", "#4C72B0", "#55A868"], strict=True)):
        gb = [param_counts(get_shape(m))["linear"] * b / 8 / 1e9 for m in models]
        rects = ax2.bar(x + (i - 1) * width, gb, width, label=label.replace("\n", ": "), color=color)
        ax2.bar_label(rects, labels=[f"{g:.1f}" for g in gb], fontsize=8)
        if i == 2:
            for xi, g, g_prev in zip(x, gb, prev, strict=True):
                ax2.annotate(f"DQ saves {g_prev - g:.1f} GB", (xi + width, g), xytext=(0, 14),
                             textcoords="offset points", ha="center", fontsize=8, color="#2d6a3e")
        prev = gb
    ax2.set_xticks(x, ["LLaMA-7B", "LLaMA-65B"])
    ax2.set(title="block linears' weights (embeddings excluded)", ylabel="GB (1e9 bytes)")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return [save_png(fig, out / "double_quant_memory.png")]


def fig_quant_error_hist(out: Path, ctx: dict) -> list:
    """Error histograms of every scheme on the pinned N(0,1) input: int8 granularities and the 4-bit formats
    (minilora.plotting.quant_error_hist, two calls)."""
    from minilora.plotting import quant_error_hist
    plt = pyplot()
    x = pinned_input()                                               # (1024, 1024) float32, docs/quantization.md §6.2
    families = [("8-bit: where the absmax is taken", ["int8-tensor", "int8-row", "int8-block"], 0.025),
                ("4-bit, block size 64", ["int4", "fp4", "nf4", "nf4+dq"], 0.5)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (title, schemes, limit) in zip(axes, families, strict=True):
        quant_error_hist(x, schemes, ax=ax, blocksize=64, limit=limit)
        ax.set_title(title)
    fig.suptitle("quantization error on randn(1024, 1024), seed 0 (NF4/64: 0.072813, bit-exact with bitsandbytes)",
                 fontsize=11)
    fig.tight_layout()
    return [save_png(fig, out / "quant_error_hist.png")]


def fig_int8_outliers(out: Path, ctx: dict) -> list:
    """The outlier problem: 8 values of ±60 in the pinned matrix, int8 tensor-wise vs row-wise vs block-wise."""
    from minilora.quant import (
        int8_blockwise_dequant,
        int8_blockwise_quant,
        int8_tensorwise_dequant,
        int8_tensorwise_quant,
        int8_vectorwise_dequant,
        int8_vectorwise_quant,
    )
    plt = pyplot()
    x = pinned_input()
    rng = np.random.default_rng(0)
    idx = rng.choice(x.size, 8, replace=False)
    x.flat[idx] = rng.choice([-60.0, 60.0], 8)
    keep = np.ones(x.size, dtype=bool)
    keep[idx] = False
    q, a = int8_tensorwise_quant(x)
    errs = {"tensor-wise (8 bits)": int8_tensorwise_dequant(q, a) - x}
    q, s_, _ = int8_vectorwise_quant(x)
    errs["row-wise (8.03 bits)"] = int8_vectorwise_dequant(q, s_) - x
    q, a = int8_blockwise_quant(x, blocksize=64)
    errs["block-wise/64 (8.5 bits)"] = int8_blockwise_dequant(q, a, blocksize=64) - x
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bins = np.linspace(-0.25, 0.25, 201)
    for (name, e), color in zip(errs.items(), ["C3", "C1", "C0"], strict=True):
        e = np.asarray(e).ravel()[keep]
        counts, _ = np.histogram(e, bins=bins)
        ax.stairs(np.maximum(counts, 0.5), bins, lw=1.5, color=color, baseline=None,
                  label=f"{name}: mean |err| {np.abs(e).mean():.4f}")
    ax.set(yscale="log", ylim=(0.8, None), xlabel=r"$\hat{x} - x$ of the 1,048,568 ordinary values", ylabel="count",
           title="absmax int8 with 8 outliers of ±60 in a 1024×1024 N(0,1) matrix")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [save_png(fig, out / "int8_outliers.png")]


def fig_nf4_codebook(out: Path, ctx: dict) -> list:
    """NF4's 16 levels and how often N(0,1) in blocks of 64 uses each, next to FP4 and Int4 (minilora.plotting)."""
    from minilora.plotting import code_usage, codebook_plot
    plt = pyplot()
    x = pinned_input(0)                                              # what codebook_plot measures usage on
    usage = code_usage(x, "nf4", 64)                                 # (16,) share of values per code
    entropy = float(-(usage[usage > 0] * np.log2(usage[usage > 0])).sum())
    absmax_sigma = float(np.abs(x.reshape(-1, 64)).max(axis=1).mean() / x.std())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, name in zip(axes, ["nf4", "fp4", "int4"], strict=True):
        codebook_plot(name, ax=ax, blocksize=64)
        if ax is not axes[0]:
            ax.set_ylabel("")
            ax.get_legend().remove()
    fig.suptitle(f"4-bit code tables on N(0, 1) in blocks of 64: the absmax is about {absmax_sigma:.1f}σ, so NF4's "
                 f"outer codes get less than 1/16 of the values (measured entropy {entropy:.3f} bits)", fontsize=11)
    fig.tight_layout()
    return [save_png(fig, out / "nf4_codebook.png")]


def fig_paged_memory_timeline(out: Path, ctx: dict) -> list:
    """Device memory of a QLoRA 65B run on 48 GB through a long-sequence spike, without and with paging
    (minilora.apps.paged_sim's own figure: same scenario, same seed as `minilora paged-sim`)."""
    from minilora.apps import paged_sim
    return [Path(paged_sim.write_figure(out / "paged_memory_timeline.png"))]


FROM_RUN = {"demo": ("methods", "a demo run", "minilora demo --out DIR"),     # figure -> what a --from-run needs
            "lora_rank_loss": ("sweep", "a rank sweep", "minilora demo --sweep-rank --out DIR")}


def _demo_result(ctx: dict, key: str):
    """A demo result dict holding `key` ("methods" or "sweep") from the --from-run folders; None when no folder was
    given (then the figure runs the demo). Given folders that lack it are an error, never a silent 5-minute run."""
    from minilora.io import load_json
    runs = ctx.get("runs", ())
    for run in runs:
        result = load_json(Path(run) / "table.json")
        if result.get(key):
            return result
    if runs:
        raise ValueError(f"no --from-run folder ({', '.join(map(str, runs))}) holds {key!r} in its table.json")
    return None


def _run_demo(out: Path, extra: list) -> None:
    """`minilora demo` itself, in a scratch run folder, with its figures refreshed into `out`."""
    from minilora.apps import demo
    from minilora.threads import get_num_threads
    threads = ["--threads", str(get_num_threads() or 0)]          # the thread setting `minilora figures` runs with
    with tempfile.TemporaryDirectory(prefix="minilora-figures-") as tmp:
        rc = demo.main(["--out", tmp, "--figures-dir", str(out), "--no-progress", *threads, *extra])
    if rc:
        raise RuntimeError(f"minilora demo {' '.join(extra)} exited with {rc}")


def fig_demo(out: Path, ctx: dict) -> list:
    """The demo's loss curves, memory bars and final-loss bars: from a --from-run table.json, else a fresh demo run
    (the default settings, about 5 minutes on 2 cores)."""
    result = _demo_result(ctx, "methods")
    if result is None:
        _run_demo(out, [])
    else:
        from minilora.apps import demo_plots
        demo_plots.demo_figures(result, out)
    return [out / f for f in FIGURES["demo"].files]


def fig_lora_rank_loss(out: Path, ctx: dict) -> list:
    """Final validation loss against LoRA rank r = 1..64 (`minilora demo --sweep-rank`, or a --from-run sweep)."""
    result = _demo_result(ctx, "sweep")
    if result is None:
        _run_demo(out, ["--sweep-rank"])
    else:
        from minilora.apps import demo_plots
        demo_plots.rank_sweep_figure(result, out)
    return [out / f for f in FIGURES["lora_rank_loss"].files]


def fig_real_weights(out: Path, ctx: dict) -> list:
    """Round-trip error histograms of the shipped base's real weights per layer type, and their Q-Q plot."""
    from minilora.apps import demo_plots
    return [Path(p) for p in demo_plots.real_weight_figures(out)]


def saved_scaling_result() -> Path:
    """The bench_scaling.py result kept in the checkout (the one figures/scaling.png was drawn from)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scaling_results.json"


def fig_scaling(out: Path, ctx: dict) -> list:
    """LoRA step time and peak memory against width, sequence length and rank, minilora beside PyTorch + PEFT, from
    a saved result: the first --from-run folder holding a scaling.json (`python benchmarks/bench_scaling.py --out
    DIR`), else the checkout's benchmarks/bench_scaling_results.json. It never runs the benchmark (that needs torch
    and PEFT, and minutes)."""
    from minilora.apps.scaling_plots import scaling_figure
    from minilora.io import load_json
    found = [Path(r) / "scaling.json" for r in ctx.get("runs", ()) if (Path(r) / "scaling.json").is_file()]
    source = found[0] if found else saved_scaling_result()
    if not source.is_file():
        raise ValueError(f"no saved scaling result ({source}); run `python benchmarks/bench_scaling.py --out DIR` "
                         "and add --from-run DIR")
    return [scaling_figure(load_json(source), out / "scaling.png")]


@dataclasses.dataclass(frozen=True)
class Figure:
    func: object
    quick: bool            # part of --quick (fast and pure: no training runs)
    files: tuple           # the PNG names it writes
    about: str


FIGURES = {
    "quant_error_hist": Figure(fig_quant_error_hist, True, ("quant_error_hist.png",),
                               "error histograms per scheme (int8 tensor/row/block, Int4, FP4, NF4, NF4+DQ)"),
    "int8_outliers": Figure(fig_int8_outliers, True, ("int8_outliers.png",),
                            "the outlier problem: tensor-wise vs row-wise vs block-wise int8"),
    "nf4_codebook": Figure(fig_nf4_codebook, True, ("nf4_codebook.png",),
                           "NF4 / FP4 / Int4 levels against the normal density"),
    "svd_truncation": Figure(fig_svd_truncation, True, ("svd_truncation.png",),
                             "singular values and truncation error: why low rank can work"),
    "paged_memory_timeline": Figure(fig_paged_memory_timeline, False, ("paged_memory_timeline.png",),
                                    "paged optimizer: a 65B QLoRA run on 48 GB surviving a long-sequence spike"),
    "double_quant_memory": Figure(fig_double_quant_memory, True, ("double_quant_memory.png",),
                                  "bits per parameter 16 / 4.5 / 4.127 and GB at 7B and 65B"),
    "real_weights": Figure(fig_real_weights, False, ("quant_real_weights_error_hist.png", "quant_real_weights_qq.png"),
                           "NF4/FP4/Int4/int8 error on the shipped base's weights; Q-Q plot against N(0, 1)"),
    "demo": Figure(fig_demo, False, ("demo_loss_curves.png", "demo_memory_bars.png", "demo_final_loss_bars.png"),
                   "minilora demo: loss curves, peak-memory bars, final-loss bars (runs the demo, ~5 min)"),
    "lora_rank_loss": Figure(fig_lora_rank_loss, False, ("demo_rank_sweep.png",),
                             "final loss vs LoRA rank r = 1..64 (runs minilora demo --sweep-rank)"),
    "scaling": Figure(fig_scaling, False, ("scaling.png",),
                      "LoRA step time and peak memory vs width, sequence length, rank; minilora beside PyTorch + PEFT "
                      "(from a saved benchmarks/bench_scaling.py result)"),
}


def _check_from_run(p, runs: list, names: list) -> None:
    """Every --from-run folder holds a demo table.json, and the runs together hold what the chosen figures need:
    checked before anything is drawn, so a --from-run never falls back to running the demo."""
    from minilora.io import load_json
    results = []
    for run in runs:
        if (Path(run) / "scaling.json").is_file() and not (Path(run) / "table.json").exists():
            continue                                  # a benchmarks/bench_scaling.py folder: the scaling figure's
        try:
            result = load_json(Path(run) / "table.json")
        except (OSError, ValueError) as e:
            p.error(f"--from-run {run}: cannot read its table.json ({e}); name a `minilora demo --out` folder")
        if not isinstance(result, dict) or not (result.get("methods") or result.get("sweep")):
            p.error(f"--from-run {run}: its table.json holds no results (neither 'methods' nor 'sweep'); name the "
                    "folder of a finished `minilora demo` run")
        results.append(result)
    for name in names:
        if name in FROM_RUN and not any(r.get(FROM_RUN[name][0]) for r in results):
            key, what, how = FROM_RUN[name]
            p.error(f"--from-run: none of {', '.join(runs)} is {what} (table.json with {key!r}), which figure "
                    f"{name!r} needs; make one with `{how}` and add --from-run DIR, or leave {name!r} out with --only")


DESCRIPTION = """Regenerate every figure in the repository's figures/ folder (or --out).

This is the only minilora command that writes the repository's figures/ folder:
a `minilora demo` run writes its figures into its own run folder."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minilora figures", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the repository's figures/)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="make only this figure (repeatable); see --list")
    p.add_argument("--quick", action="store_true", help="only the fast figures (no training runs)")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.add_argument("--from-run", action="append", default=[], metavar="DIR",
                   help="reuse a `minilora demo` run folder's table.json (demo and/or --sweep-rank) instead of "
                        "running the demo again, or a `benchmarks/bench_scaling.py --out` folder's scaling.json "
                        "(repeatable); checked before any figure is drawn")
    add_threads_option(p)
    args = p.parse_args(argv)
    if args.list:
        for name, f in FIGURES.items():
            print(f"{name:<22} {'quick' if f.quick else 'full ':<6} {f.about}\n{'':<29}-> {', '.join(f.files)}")
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
    if args.from_run:
        _check_from_run(p, args.from_run, names)
    out = check_out_dir(p, "--out", (args.out or default_out_dir()).resolve())
    apply_threads(args.threads)
    repo = " (the repository's figures/ folder)" if out == default_out_dir().resolve() else ""
    print(f"writing figures into {out}{repo}")
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            paths = FIGURES[name].func(out, {"runs": args.from_run})
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
