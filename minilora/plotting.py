"""Plotting for the course and for your own tensors: four plots, one deterministic matplotlib setup, a PNG writer.

    quant_error_hist(x, schemes)   histogram of the round-trip error  e = Q⁻¹(Q(x)) − x  per scheme, log counts.
                                   Blockwise absmax quantization (bitsandbytes' quantize_4bit / int8 block-wise):
                                       absmax_b = max |x_i| in block b,   c_i = nearest code to x_i / absmax_b,
                                       x̂_i = code[c_i] · absmax_b
                                   so |e_i| ≤ ½ · (widest gap of the code table) · absmax_b. The legend gives the
                                   mean |e| and the storage in bits per parameter (4 + 32/64 for NF4/64,
                                   4 + 8/64 + 32/(64·256) with double quantization, QLoRA §3).
    codebook_plot(quant_type)      the 16 levels of NF4 / FP4 / Int4 on the axis x / absmax ∈ [−1, 1], and how often
                                   each code is used on real data (default: N(0, 1) in blocks of 64). The usage
                                   entropy H = −Σ p_c log₂ p_c is at most 4 bits. NF4 puts its levels at normal
                                   quantiles, so if absmax were Φ⁻¹(0.9677083) ≈ 1.85σ every code would carry 1/16
                                   (H ≈ 3.996 bits); the absmax of 64 Gaussian values is about 2.6σ, so the outer codes
                                   are used less and the measured entropy is 3.884 bits.
    qq_plot(x, blocksize)          Q–Q plot of block-standardized values, z = (x − mean_b) / std_b within each block
                                   of `blocksize`, sorted, against the normal quantiles Φ⁻¹((i − ½)/n). A straight
                                   diagonal is QLoRA's premise (arXiv 2305.14314 §3: pretrained weights are roughly
                                   zero-centered normal), the one that makes NF4's equal-mass levels optimal; ends
                                   bending away from it mean heavier (or lighter) tails than normal.
    loss_curves(history)           loss against step for one run or several (a minilora.train TrainResult, a list,
                                   or a dict name -> either), each with its own line style and markers so curves
                                   that lie on top of each other stay distinguishable; optional EMA smoothing
                                   m_t = a·m_{t−1} + (1 − a)·loss_t; evaluation losses as markers.

Each plot returns its matplotlib Axes and draws into `ax=` when given (else a new figure). `x` may be a NumPy array,
an array of another minilora backend (CuPy, numpy-strict), a Parameter, a `Linear` (its weight), a `Linear4bit` (its
weight, dequantized: Ŵ is already on the code grid, so re-quantizing it with the layer's own scheme gives an error
near 0), or a LoRA wrapper (its base layer's weight). The quantization round trips run with minilora.quant on the
array's own backend (`minilora.quant.report.roundtrip`, the quantize-report's schemes); only the results come to the
host, through `minilora.backend.to_numpy`. A plot of your own tensor is one call:

    from minilora.plotting import quant_error_hist, save_png
    ax = quant_error_hist(my_weight)                        # int8 block-wise, NF4, FP4, NF4 + DQ, blocks of 64
    save_png(ax.figure, "my_weight_error.png")

Every figure goes through `pyplot()` (Agg backend, matplotlib's defaults plus a light grid, so a figure looks the
same on any machine) and `save_png()` (no version string in the file, so the bytes depend only on the picture;
written atomically through minilora.io). matplotlib is imported on first use, never at import time.
Host-only module: it imports numpy, because matplotlib plots host arrays (see tests/test_backend.py HOST_ONLY).
"""
from __future__ import annotations

import io
from pathlib import Path
from statistics import NormalDist

import numpy as np

from minilora.backend import get_array_module, to_numpy, xp_current

PNG_META = {"Software": None}          # no version string in the file: bytes depend only on the picture
DPI = 100

# short scheme names -> the quantize-report's names (minilora.quant.report.SCHEMES), {bs} = blocksize
SCHEMES = {
    "int8-tensor": "int8 tensor-wise", "int8-row": "int8 row-wise", "int8-block": "int8 block-wise/{bs}",
    "nf4": "NF4/{bs}", "fp4": "FP4/{bs}", "int4": "Int4/{bs}",
    "nf4+dq": "NF4/{bs} + DQ", "fp4+dq": "FP4/{bs} + DQ", "int4+dq": "Int4/{bs} + DQ",
}
DEFAULT_SCHEMES = ("int8-block", "nf4", "fp4", "nf4+dq")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("", "o", "s", "^", "v", "D", "x", "P")


def pyplot():
    """matplotlib.pyplot on the Agg backend with minilora's style (defaults + light grid, no top/right spines)."""
    import matplotlib  # imported here: imported on use, so `minilora --help` stays fast
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    matplotlib.rcdefaults()
    plt.rcParams.update({"figure.dpi": DPI, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "minilora"})
    return plt


def save_png(fig, path) -> Path:
    """PNG bytes of the figure, written atomically (minilora.io); the figure is closed. Returns the path."""
    from minilora.io import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_META)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------------------------------ inputs
def weight_array(x, who: str = "plot"):
    """The float array behind x, on its own backend: an array, a Parameter, a Linear / LoRA wrapper (its weight), a
    Linear4bit or Params4bit (dequantized). Raises TypeError for anything else, ValueError if empty or not finite."""
    if hasattr(x, "dequantize_weight"):                            # Linear4bit: W^ = dequantize_4bit(codes, state)
        x = x.dequantize_weight()
    elif hasattr(x, "base_layer"):                                 # LoRA wrapper: the frozen base layer's weight
        return weight_array(x.base_layer, who)
    elif hasattr(x, "weight") and not hasattr(x, "shape"):        # Linear (or any module with a weight)
        return weight_array(x.weight, who)
    elif hasattr(x, "quant_state") and hasattr(x, "data"):         # Params4bit: packed codes + QuantState
        from minilora.quant import dequantize_4bit
        x = dequantize_4bit(x.data, x.quant_state)
    elif hasattr(x, "data") and hasattr(x, "requires_grad"):       # Parameter
        x = x.data
    if isinstance(x, (list, tuple)):
        x = xp_current().asarray(x)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{who} expects an array, a Parameter or a layer with a weight (Linear, Linear4bit), got "
                        f"{type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{who} expects floating-point values, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{who} got an empty array")
    if not bool(get_array_module(x).isfinite(x).all()):
        raise ValueError(f"{who} got NaN or inf values; quantization needs finite numbers")
    return x


def _axes(ax, figsize):
    if ax is None:
        _, ax = pyplot().subplots(figsize=figsize)
    elif not hasattr(ax, "plot"):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
    return ax


# ------------------------------------------------------------------------------------------------ round trips
def scheme_name(scheme: str, blocksize: int = 64) -> str:
    """A short name ("nf4", "nf4+dq", "int8-block", ...) or a quantize-report name -> the report's name."""
    from minilora.quant.report import SCHEMES as REPORT
    if not isinstance(scheme, str):
        raise TypeError(f"a scheme is a name (str), got {type(scheme).__name__}")
    if scheme in SCHEMES:
        return SCHEMES[scheme].format(bs=blocksize)
    if scheme in REPORT:
        return scheme
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {tuple(SCHEMES)} or {REPORT}")


def quant_error(x, scheme: str, blocksize: int = 64):
    """(e = x̂ − x on x's backend, bits per parameter) for one scheme, via minilora.quant.report.roundtrip."""
    from minilora.quant.report import roundtrip
    a = weight_array(x, "quant_error")
    xp = get_array_module(a)
    a = a if a.dtype == xp.float32 else a.astype(xp.float32)
    name = scheme_name(scheme, blocksize)
    if name.startswith("int8 block-wise/") and blocksize != 64:     # the report's int8 block-wise is /64 only
        from minilora.quant import int8_blockwise_dequant, int8_blockwise_quant
        q, absmax = int8_blockwise_quant(a, blocksize)
        return int8_blockwise_dequant(q, absmax, blocksize) - a, 8 + 32 * absmax.size / a.size
    y, bits = roundtrip(a, name)
    return y - a, float(bits)


def block_zscores(w, blocksize: int = 64):
    """Flattened values -> each block of `blocksize` standardized to mean 0, std 1 (a partial tail block dropped)."""
    xp = get_array_module(w)
    w = w.reshape(-1)
    n = (w.size // blocksize) * blocksize
    b = w[:n].reshape(-1, blocksize).astype(xp.float64)                      # (n_blocks, blocksize)
    z = (b - b.mean(axis=1, keepdims=True)) / (b.std(axis=1, keepdims=True) + 1e-12)
    return z.reshape(-1)                                                     # (n,)


def code_usage(x, quant_type: str = "nf4", blocksize: int = 64):
    """Share of the values of x that each of the 16 codes encodes (host array (16,), sums to 1)."""
    from minilora.quant import quantize_4bit
    a = weight_array(x, "code_usage")
    packed, _ = quantize_4bit(a, blocksize=blocksize, quant_type=quant_type)
    packed = to_numpy(packed).reshape(-1)                                    # (ceil(n/2),) two codes per byte
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:a.size]   # (n,) even element: high nibble
    return np.bincount(codes, minlength=16) / codes.size                     # (16,)


# ------------------------------------------------------------------------------------------------ the plots
def quant_error_hist(x, schemes=DEFAULT_SCHEMES, ax=None, blocksize: int = 64, bins: int = 200, limit=None):
    """Histogram of x̂ − x for each scheme (one step line per scheme, log counts); returns the Axes.

    x: an array or a layer (see module docstring). schemes: short names (SCHEMES) or quantize-report names.
    limit: the x-axis half-width (default: the largest |error| of all schemes)."""
    if isinstance(schemes, str):
        schemes = (schemes,)
    schemes = tuple(schemes)
    if not schemes:
        raise ValueError("quant_error_hist needs at least one scheme")
    names = [scheme_name(s, blocksize) for s in schemes]                    # unknown names fail before any work
    a = weight_array(x, "quant_error_hist")
    ax = _axes(ax, (7.5, 4.2))
    errs = []
    for s in schemes:
        e, bits = quant_error(a, s, blocksize)
        errs.append((to_numpy(e).reshape(-1), bits))                        # (n,) on the host
    lim = float(limit) if limit is not None else max(float(np.abs(e).max()) for e, _ in errs) or 1.0
    edges = np.linspace(-lim, lim, bins + 1)                                # (bins + 1,)
    top = 1.0
    for i, ((e, bits), name) in enumerate(zip(errs, names, strict=True)):
        counts, _ = np.histogram(e, bins=edges)
        top = max(top, float(counts.max()))
        ax.stairs(np.maximum(counts, 0.5), edges, baseline=None, lw=1.6, ls=LINESTYLES[i % len(LINESTYLES)],
                  label=f"{name}: mean |e| {np.abs(e).mean():.3g}, {bits:.3f} bits")   # 0.5: empty bins below 1
    ax.set(yscale="log", ylim=(0.8, top * 10 ** (0.25 * np.log10(top) + 0.5)), xlim=(-lim, lim),  # legend room
           ylabel="count (log scale)",
           xlabel="round-trip error  x̂ − x  (dequantized minus original)",
           title=f"quantization error of {a.size:,} values, blocks of {blocksize}")
    ax.legend(fontsize=8.5, loc="upper center", ncol=2 if len(schemes) > 4 else 1)
    return ax


def codebook_plot(quant_type: str = "nf4", ax=None, x=None, blocksize: int = 64, seed: int = 0):
    """The code table's levels on the x / absmax axis, with the share of values each code gets; returns the Axes.

    x: the data whose code usage is measured (default: N(0, 1), 1024 x 1024, seed `seed`, the quantize-report's
    pinned input). Codes with the same value (FP4's ±0, Int4's two zeros) are drawn as one level."""
    from minilora.quant import get_4bit_type
    from minilora.quant.report import pinned_input
    if quant_type not in ("nf4", "fp4", "int4"):
        raise ValueError(f"quant_type must be 'nf4', 'fp4' or 'int4', got {quant_type!r}")
    data = pinned_input(seed) if x is None else weight_array(x, "codebook_plot")
    table = to_numpy(get_4bit_type(quant_type)).astype(np.float64)          # (16,) index = code
    usage = code_usage(data, quant_type, blocksize)                          # (16,)
    levels, inverse = np.unique(table, return_inverse=True)                  # (L,) distinct values
    share = np.bincount(inverse, weights=usage, minlength=levels.size)       # (L,)
    p = share[share > 0]
    entropy = float(-(p * np.log2(p)).sum())
    ax = _axes(ax, (6, 4))
    ax.bar(levels, share, width=0.045, color="C1", label="share of values per code (measured)", gid="usage")
    ax.vlines(levels, -0.012, 0, color="C0", lw=2.5, label=f"the {levels.size} levels", gid="levels")
    ax.axhline(1 / 16, color="k", ls="--", lw=1, label="equal use, 1/16")
    what = "N(0, 1)" if x is None else "x"
    ax.set(title=f"{quant_type.upper()}: {levels.size} levels, usage entropy {entropy:.3f} of 4 bits",
           xlabel="code value = value ÷ its block's absmax", ylabel=f"share of {what} values (blocks of {blocksize})",
           xlim=(-1.1, 1.1), ylim=(-0.015, max(0.15, float(share.max()) * 1.15)))
    ax.legend(fontsize=8, loc="upper left")
    return ax


def qq_plot(x, blocksize: int = 64, ax=None, points: int = 400, label=None):
    """Q–Q plot of x's block-standardized values against N(0, 1) (`points` quantiles); returns the Axes.

    Several calls on one Axes overlay several tensors (give each a label); the diagonal is drawn once."""
    a = weight_array(x, "qq_plot")
    if not isinstance(blocksize, int) or blocksize < 2:
        raise ValueError(f"blocksize must be an int >= 2, got {blocksize!r}")
    if a.size < blocksize:
        raise ValueError(f"qq_plot needs at least one full block: {a.size} values < blocksize {blocksize}")
    z = np.sort(to_numpy(block_zscores(a, blocksize)))                        # (n,) on the host
    idx = np.unique(np.linspace(0, z.size - 1, min(points, z.size)).round().astype(np.int64))   # (points,)
    nd = NormalDist()
    theo = np.array([nd.inv_cdf((int(i) + 0.5) / z.size) for i in idx])     # (points,) Φ⁻¹((i + ½)/n)
    ax = _axes(ax, (5.2, 5))
    ax.plot(theo, z[idx], ".", ms=4, label=label or f"{a.size:,} values", gid="qq-points")
    if not any(line.get_gid() == "qq-reference" for line in ax.get_lines()):
        ax.plot([-4, 4], [-4, 4], "k--", lw=1, label="N(0, 1)", gid="qq-reference")
    ax.set(title="Q–Q: block-standardized values vs N(0, 1)", xlabel="N(0, 1) quantile",
           ylabel=f"value quantile (z within its block of {blocksize})")
    pairs = sorted(zip(*ax.get_legend_handles_labels(), strict=True), key=lambda hl: hl[0].get_gid() == "qq-reference")
    ax.legend(*zip(*pairs, strict=True), fontsize=9, markerscale=2)           # the diagonal's entry last
    return ax


def _series(history):
    """history -> [(name, train losses, [(step, eval loss)] or [])]."""
    def one(name, h):
        if hasattr(h, "train_loss"):                                         # minilora.train.TrainResult
            return name, [float(v) for v in h.train_loss], [(int(s), float(v)) for s, v in (h.eval_loss or [])]
        if hasattr(h, "shape"):                                              # an array of losses
            return name, [float(v) for v in to_numpy(h).reshape(-1)], []
        if isinstance(h, (list, tuple)):
            return name, [float(v) for v in h], []
        raise TypeError(f"loss_curves: {name!r} is a {type(h).__name__}; give a TrainResult or a list of losses")
    if isinstance(history, dict):
        out = [one(str(k), v) for k, v in history.items()]
    elif hasattr(history, "train_loss"):
        out = [one("train loss", history)]
    elif isinstance(history, (list, tuple)) and history and all(hasattr(h, "train_loss") for h in history):
        out = [one(f"run {i}", h) for i, h in enumerate(history)]
    elif isinstance(history, (list, tuple)) or hasattr(history, "shape"):
        out = [one("loss", history)]
    else:
        raise TypeError(f"loss_curves expects a TrainResult, a list of losses or a dict of them, got "
                        f"{type(history).__name__}")
    if not out or not any(t or ev for _, t, ev in out):
        raise ValueError("loss_curves got no losses to plot")
    return out


def smooth_ema(xs, a: float):
    """Exponential moving average m_t = a·m_{t−1} + (1 − a)·x_t, m_1 = x_1 (a list)."""
    out, m = [], None
    for v in xs:
        m = v if m is None else a * m + (1 - a) * v
        out.append(m)
    return out


def loss_curves(history, ax=None, ema: float = 0.0, colors=None, labels=None, styles=None, title=None,
                xlabel="step", ylabel="training loss"):
    """Loss against step, one line per run, each with its own line style and markers; returns the Axes.

    history: a TrainResult (train_loss per step, eval_loss as markers), a list of losses, or a dict name -> either.
    ema: smoothing factor a in [0, 1) (0: raw). colors / labels: dicts name -> matplotlib color / legend text.
    styles: dict name -> style number (line style and marker; default: the run's position), to keep a run's look
    the same across several plots."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    runs = _series(history)
    ax = _axes(ax, (7.5, 4.2))
    colors, labels, styles = colors or {}, labels or {}, styles or {}
    for i, (name, train, evals) in enumerate(runs):
        color = colors.get(name, f"C{i % 10}")
        text = labels.get(name, name)
        k = styles.get(name, i)
        if train:
            ys = smooth_ema(train, ema) if ema else train
            ax.plot(range(1, len(ys) + 1), ys, color=color, lw=1.6, ls=LINESTYLES[k % len(LINESTYLES)],
                    marker=MARKERS[k % len(MARKERS)], markevery=max(1, len(ys) // 8), ms=5, label=text)
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], ls="none", marker="o", mfc="white", color=color,
                    ms=6, label=f"{text} (eval)")
    ax.set(title=title or ("training loss" + (f" (EMA {ema:g})" if ema else "")), xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=9)
    return ax
