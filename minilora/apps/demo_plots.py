"""Figures of `minilora demo` and of the quantization of the pretrained base's real weights.

    demo_figures(result, out)      loss curves (and each QLoRA run minus LoRA), peak-memory bars (with and without
                                   the activations), final-loss bars before/after (code and docs)
    rank_sweep_figure(result, out) final code loss against LoRA rank r (log2 axis)
    real_weight_figures(out)       round-trip error of the shipped base's linear weights (NF4 / FP4 / Int4 / int8,
                                   blocks of 64): the pooled histogram and the mean |W − Ŵ| per layer type, and a
                                   Q–Q plot of block-standardized weights against N(0, 1)

The Q–Q plot tests QLoRA's premise (arXiv 2305.14314 §3: "pretrained neural network weights usually have a
zero-centered normal distribution"), which is what makes NF4's equal-probability quantiles optimal: each block of 64
weights is standardized, z = (w − mean) / std, the pooled z are sorted and plotted against the normal quantiles
Φ⁻¹((i − ½)/n). A straight diagonal means normal; tails bending away mean heavier (or lighter) tails than normal.

The plots themselves are minilora.plotting's (quant_error_hist, qq_plot, loss_curves); the round trips are
minilora.quant.report's, reached through minilora.plotting.quant_error. Arrays come to the host with
`minilora.backend.to_numpy`; the array math uses the module that owns them (no numpy import here, see
tests/test_backend.py).
"""
from __future__ import annotations

from pathlib import Path

from minilora.backend import get_array_module, to_numpy
from minilora.plotting import (
    block_zscores,
    loss_curves,
    pyplot,
    qq_plot,
    quant_error,
    quant_error_hist,
    save_png,
    smooth_ema,
)

__all__ = ["demo_figures", "rank_sweep_figure", "real_weight_errors", "real_weight_figures", "block_zscores",
           "layer_type"]

LAYER_TYPES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
SCHEMES = ("nf4", "fp4", "int4", "int8")
PLOT_SCHEME = {"nf4": "nf4", "fp4": "fp4", "int4": "int4", "int8": "int8-block"}   # -> minilora.plotting names
COLORS = {"full": "C0", "last_layer": "C9", "lora_all": "C1", "lora_attn": "C2", "qlora_nf4": "C3",
          "qlora_fp4": "C4", "qlora_int4": "C5"}
BEFORE = "0.78"                                                 # the "before" bars; no method is drawn in grey
MIB = 2 ** 20


def _ordered(result: dict) -> dict:
    """result["methods"] in the demo's order (table.json stores keys sorted)."""
    rows = result["methods"]
    return {k: rows[k] for k in sorted(rows, key=lambda k: list(COLORS).index(k) if k in COLORS else len(COLORS))}


def _loss_figure(rows: dict):
    """Top: every method's training loss (EMA 0.9), one line style each. Bottom: each QLoRA run minus LoRA's."""
    plt = pyplot()
    ref = "lora_all" if "lora_all" in rows else None
    diffs = {k: r for k, r in rows.items() if ref and k.startswith("qlora")}
    if diffs:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 6.4), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    else:
        fig, ax = plt.subplots(figsize=(12, 4.6))
    colors = {k: COLORS.get(k, f"C{i}") for i, k in enumerate(rows)}
    labels = {k: r["label"] for k, r in rows.items()}
    styles = {k: i for i, k in enumerate(rows)}                      # a method looks the same in both panels
    loss_curves({k: r["train_loss_bits"] for k, r in rows.items()}, ax=ax, ema=0.9, colors=colors, labels=labels,
                styles=styles, title="fine-tuning on stdlib code: training loss (EMA 0.9)", xlabel="",
                ylabel="bits / byte")
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # outside: no curve hidden
    if diffs:
        base = smooth_ema(rows[ref]["train_loss_bits"], 0.9)
        gaps = {k: [a - b for a, b in zip(smooth_ema(r["train_loss_bits"], 0.9), base, strict=False)]
                for k, r in diffs.items()}
        loss_curves(gaps, ax=ax2, colors=colors, labels=labels, styles=styles,
                    title=f"QLoRA minus {rows[ref]['label']} (same curves, EMA 0.9)", ylabel="Δ bits / byte")
        ax2.axhline(0, color=COLORS.get(ref, "k"), lw=1.2)
        ax2.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _memory_figure(rows: dict):
    """Left: the peak split into activations and the rest. Right: the rest alone, split into its four parts."""
    plt = pyplot()
    names = list(rows)
    y = list(range(len(names)))[::-1]                               # first method on top
    parts = (("frozen base", "frozen_base_bytes", "#4c72b0"), ("trainable weights", "trainable_bytes", "#dd8452"),
             ("gradients", "gradient_bytes", "#55a868"), ("AdamW state", "optimizer_bytes", "#c44e52"))
    static = [sum(rows[n][k] for _, k, _ in parts) / MIB for n in names]
    peak = [(rows[n].get("peak_bytes") or 0) / MIB for n in names]
    act = [max(0.0, p - s) for p, s in zip(peak, static, strict=True)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, gridspec_kw={"width_ratios": [1, 1.15]})
    a1.barh(y, static, color="#8c8c8c", label="weights + gradients + optimizer (right panel)")
    a1.barh(y, act, left=static, color="#8172b2", label="activations + temporaries (peak − the rest)")
    for yi, p, a in zip(y, peak, act, strict=True):
        if p:
            a1.text(p, yi, f" {p:.0f} MiB, {100 * a / p:.0f} % activations", va="center", fontsize=9)
    a1.set(title="peak training memory (tracemalloc)", xlabel="MiB", xlim=(0, max(peak + static) * 1.75 or 1))
    a1.set_yticks(y, [rows[n]["label"] for n in names], fontsize=10)
    left = [0.0] * len(names)
    for label, key, color in parts:
        vals = [rows[n][key] / MIB for n in names]
        a2.barh(y, vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for yi, s in zip(y, static, strict=True):
        a2.text(s, yi, f" {s:.1f} MiB", va="center", fontsize=9)
    a2.set(title="without activations: what the method changes", xlabel="MiB",
           xlim=(0, max(static) * 1.2 or 1))
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def _final_loss_figure(rows: dict):
    """Validation loss before (grey) and after (the method's colour) on both domains; axes from 0, Δ written."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch
    plt = pyplot()
    names = list(rows)
    y = list(range(len(names)))[::-1]
    colors = [COLORS.get(n, f"C{i}") for i, n in enumerate(names)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, title in ((axes[0], "code", "stdlib code (fine-tuning domain): lower is better"),
                           (axes[1], "docs", "CPython docs (pretraining text): higher = forgetting")):
        before = [rows[n][f"{key}_bits_before"] for n in names]
        after = [rows[n][f"{key}_bits_after"] for n in names]
        ax.barh([v + 0.2 for v in y], before, height=0.4, color=BEFORE)
        ax.barh([v - 0.2 for v in y], after, height=0.4, color=colors)
        for yi, b, a in zip(y, before, after, strict=True):
            ax.text(a, yi - 0.2, f" {a:.2f} ({a - b:+.2f})", va="center", fontsize=9)
        ax.set(title=title, xlabel="validation bits / byte (axis starts at 0)", xlim=(0, max(before + after) * 1.3))
        ax.title.set_fontsize(11)
    axes[0].set_yticks(y, [rows[n]["label"] for n in names], fontsize=10)
    handles = [Patch(color=BEFORE), tuple(Patch(color=c) for c in colors)]
    fig.legend(handles, ["before fine-tuning (the base model)", "after fine-tuning (each method's colour)"],
               handler_map={tuple: HandlerTuple(ndivide=None, pad=0)}, loc="lower center", ncol=2, fontsize=10,
               frameon=False, handlelength=len(colors) * 1.2)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def demo_figures(result: dict, out) -> list:
    """The three figures of a demo run, with fixed names, into folder `out`."""
    out = Path(out)
    rows = _ordered(result)
    return [save_png(_loss_figure(rows), out / "demo_loss_curves.png"),
            save_png(_memory_figure(rows), out / "demo_memory_bars.png"),
            save_png(_final_loss_figure(rows), out / "demo_final_loss_bars.png")]


def rank_sweep_figure(result: dict, out) -> list:
    plt = pyplot()
    rows = result["sweep"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rs, bits = [r["r"] for r in rows], [r["code_bits_after"] for r in rows]
    ax.plot(rs, bits, "o-", color=COLORS["lora_all"])
    for r, b in zip(rs, bits, strict=True):
        ax.annotate(f"{b:.3f}", (r, b), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.margins(y=0.15)
    ax.set(title="LoRA all-linear: final loss vs rank (lora_alpha = 16)", xlabel="rank r",
           ylabel="stdlib code val bits / byte (zoomed)")
    fig.tight_layout()
    return [save_png(fig, Path(out) / "demo_rank_sweep.png")]


# ------------------------------------------------------------------------------------ real weights, quantized
def layer_type(name: str):
    for t in LAYER_TYPES:
        if name == f"{t}.weight" or name.endswith(f".{t}.weight"):
            return t
    return None


def _linear_weights(base_dir=None) -> dict:
    """{layer type: [W (D_out, D_in), ...]} of the shipped base (or base_dir)."""
    from minilora.pretrained import load_base
    model, _ = load_base(base_dir)
    out = {}
    for name, p in model.named_parameters():
        t = layer_type(name)
        if t is not None:
            out.setdefault(t, []).append(p.data)
    return out


def real_weight_errors(base_dir=None) -> dict:
    """{layer type: {"weights": all its weights flattened, "errors": {scheme: |W − Ŵ|}, "mean_abs_error": {...}}}
    (host arrays; blocks of 64 within each weight matrix)."""
    out = {}
    for t, Ws in _linear_weights(base_dir).items():
        xp = get_array_module(Ws[0])
        errs = {sc: to_numpy(xp.concatenate([xp.abs(quant_error(W, PLOT_SCHEME[sc], 64)[0]).reshape(-1)
                                             for W in Ws])) for sc in SCHEMES}
        out[t] = {"weights": to_numpy(xp.concatenate([W.reshape(-1) for W in Ws])), "errors": errs,
                  "mean_abs_error": {sc: float(e.mean()) for sc, e in errs.items()}}
    return out


def real_weight_figures(out, base_dir=None, data=None) -> list:
    """The error figure (pooled histogram + mean |W − Ŵ| per layer type) and the Q–Q plot; returns the paths.

    data: the output of real_weight_errors(base_dir), if already computed."""
    plt = pyplot()
    out = Path(out)
    data = real_weight_errors(base_dir) if data is None else data
    types = [t for t in LAYER_TYPES if t in data]
    xp = get_array_module(data[types[0]]["weights"])
    pooled = xp.concatenate([data[t]["weights"] for t in types])   # every linear weight; all sizes are 64-multiples
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.25, 1]})
    quant_error_hist(pooled, schemes=[PLOT_SCHEME[sc] for sc in SCHEMES], ax=a1, blocksize=64)
    a1.set_title(f"all {pooled.size:,} linear weights, blocks of 64")
    width = 0.8 / len(SCHEMES)
    ys = list(range(len(types)))[::-1]
    for i, sc in enumerate(SCHEMES):
        vals = [data[t]["mean_abs_error"][sc] for t in types]
        a2.barh([y + 0.4 - width * (i + 0.5) for y in ys], vals, height=width, color=f"C{i}", label=sc)
    a2.set_yticks(ys, types, fontsize=10)
    means = [v for t in types for v in data[t]["mean_abs_error"].values()]
    a2.set(xscale="log", title="mean |W − Ŵ| per layer type (log scale)", xlabel="mean |W − Ŵ|",
           xlim=(min(means) / 2, max(means) * 8))                       # room on the right for the legend
    a2.legend(fontsize=10, loc="center right")
    fig.suptitle("round-trip error of the pretrained base's weights: int8 block-wise vs the 4-bit codes", fontsize=12)
    fig.tight_layout()
    paths = [save_png(fig, out / "quant_real_weights_error_hist.png")]

    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    for t in types:
        qq_plot(data[t]["weights"], blocksize=64, ax=ax, label=t)
    ax.set_title("Q–Q: block-standardized weights vs N(0, 1)")
    fig.tight_layout()
    paths.append(save_png(fig, out / "quant_real_weights_qq.png"))
    return paths
