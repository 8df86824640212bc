"""Figures of `minilora demo` and of the quantization of the pretrained base's real weights.

    demo_figures(result, out)      loss curves, memory bars (what fills the peak), final-loss bars (code and docs)
    rank_sweep_figure(result, out) final code loss against LoRA rank r (log2 axis)
    real_weight_figures(out)       NF4 / FP4 / Int4 / int8 round-trip error histograms of the shipped base's weights,
                                   per layer type, and a Q–Q plot of block-normalized weights against N(0, 1)

The Q–Q plot tests QLoRA's premise (arXiv 2305.14314 §3: "pretrained neural network weights usually have a
zero-centered normal distribution"), which is what makes NF4's equal-probability quantiles optimal: each block of 64
weights is standardized, z = (w − mean) / std, the pooled z are sorted and plotted against the normal quantiles
Φ⁻¹((i − ½)/n). A straight diagonal means normal; tails bending away mean heavier (or lighter) tails than normal.

Arrays come to the host with `minilora.backend.to_numpy`; the array math uses the module that owns them (no
numpy import here, see tests/test_backend.py). Drawing and PNG writing go through `minilora.plotting`
(deterministic PNGs).
"""
from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

from minilora.backend import get_array_module, to_numpy
from minilora.plotting import pyplot, save_png

LAYER_TYPES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
SCHEMES = ("nf4", "fp4", "int4", "int8")
COLORS = {"full": "C0", "last_layer": "C7", "lora_all": "C1", "lora_attn": "C2", "qlora_nf4": "C3",
          "qlora_fp4": "C4", "qlora_int4": "C5"}


def _ema(xs, a=0.9):
    out, m = [], None
    for x in xs:
        m = x if m is None else a * m + (1 - a) * x
        out.append(m)
    return out


def demo_figures(result: dict, out) -> list:
    """The three figures of a demo run, with fixed names, into folder `out`."""
    plt = pyplot()
    out = Path(out)
    rows = result["methods"]                     # table.json stores keys sorted: restore the demo's order
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: list(COLORS).index(k) if k in COLORS else len(COLORS))}
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for k, r in rows.items():
        ax.plot(range(1, len(r["train_loss_bits"]) + 1), _ema(r["train_loss_bits"]), label=r["label"],
                color=COLORS.get(k))
    ax.set(title="fine-tuning on stdlib code: training loss (EMA 0.9)", xlabel="step", ylabel="bits / byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_png(fig, out / "demo_loss_curves.png"))

    names = list(rows)
    parts = (("frozen base", lambda r: r["frozen_base_bytes"]), ("trainable weights", lambda r: r["trainable_bytes"]),
             ("gradients", lambda r: r["gradient_bytes"]), ("AdamW state", lambda r: r["optimizer_bytes"]),
             ("activations + temporaries", lambda r: max(0, (r["peak_bytes"] or 0) - r["frozen_base_bytes"]
                                                         - r["trainable_bytes"] - r["gradient_bytes"]
                                                         - r["optimizer_bytes"])))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    bottom = [0.0] * len(names)
    for label, f in parts:
        vals = [f(rows[n]) / 2**20 for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(names)), [rows[n]["label"] for n in names], rotation=25, ha="right", fontsize=8)
    ax.set(title="peak training memory (tracemalloc) and what fills it", ylabel="MiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_png(fig, out / "demo_memory_bars.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(names))
    for ax, key, title in ((a1, "code", "stdlib code (fine-tuning domain)"),
                           (a2, "docs", "CPython docs (pretraining text: forgetting)")):
        before = [rows[n][f"{key}_bits_before"] for n in names]
        after = [rows[n][f"{key}_bits_after"] for n in names]
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="before", color="0.7")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after", color=[COLORS.get(n, "C0") for n in names])
        lo = min(before + after)
        ax.set_ylim(max(0.0, lo - 0.3), max(before + after) + 0.1)
        ax.set_xticks(list(x), [rows[n]["label"] for n in names], rotation=25, ha="right", fontsize=8)
        ax.set(title=title, ylabel="val bits / byte")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_png(fig, out / "demo_final_loss_bars.png"))
    return paths


def rank_sweep_figure(result: dict, out) -> list:
    plt = pyplot()
    rows = result["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["r"] for r in rows], [r["code_bits_after"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set(title="LoRA all-linear: final loss vs rank (lora_alpha = 16)", xlabel="r",
           ylabel="stdlib code val bits / byte")
    fig.tight_layout()
    return [save_png(fig, Path(out) / "demo_rank_sweep.png")]


# ------------------------------------------------------------------------------------ real weights, quantized
def layer_type(name: str):
    for t in LAYER_TYPES:
        if name == f"{t}.weight" or name.endswith(f".{t}.weight"):
            return t
    return None


def roundtrip(W, scheme: str):
    """W (D_out, D_in) -> its reconstruction after blockwise (64) quantization with `scheme`."""
    from minilora.quant import dequantize_4bit, int8_blockwise_dequant, int8_blockwise_quant, quantize_4bit
    if scheme == "int8":
        q, absmax = int8_blockwise_quant(W, blocksize=64)
        return int8_blockwise_dequant(q, absmax, blocksize=64)
    packed, st = quantize_4bit(W, blocksize=64, quant_type=scheme)
    return dequantize_4bit(packed, st)


def real_weight_errors(base_dir=None) -> dict:
    """{layer type: {scheme: |W − Ŵ| of every weight of that type (host array)}} and mean abs errors."""
    from minilora.pretrained import load_base
    model, _ = load_base(base_dir)
    errs, weights = {}, {}
    for name, p in model.named_parameters():
        t = layer_type(name)
        if t is None:
            continue
        xp = get_array_module(p.data)
        weights.setdefault(t, []).append(p.data.reshape(-1))
        for sc in SCHEMES:
            errs.setdefault(t, {}).setdefault(sc, []).append(xp.abs(roundtrip(p.data, sc) - p.data).reshape(-1))
    out = {}
    for t in errs:
        xp = get_array_module(weights[t][0])
        out[t] = {"weights": to_numpy(xp.concatenate(weights[t])),
                  "errors": {sc: to_numpy(xp.concatenate(v)) for sc, v in errs[t].items()}}
        out[t]["mean_abs_error"] = {sc: float(e.mean()) for sc, e in out[t]["errors"].items()}
    return out


def block_zscores(w, blocksize: int = 64):
    """Flattened weights -> each block of `blocksize` standardized to mean 0, std 1 (partial tail block dropped)."""
    xp = get_array_module(w)
    n = (w.size // blocksize) * blocksize
    b = w[:n].reshape(-1, blocksize).astype(xp.float64)                      # (n_blocks, 64)
    z = (b - b.mean(axis=1, keepdims=True)) / (b.std(axis=1, keepdims=True) + 1e-12)
    return z.reshape(-1)


def real_weight_figures(out, base_dir=None, data=None) -> list:
    """Error histograms per layer type and the Q–Q plot, for the shipped base (or base_dir); returns the paths.

    data: the output of real_weight_errors(base_dir), if already computed."""
    plt = pyplot()
    out = Path(out)
    data = real_weight_errors(base_dir) if data is None else data
    types = [t for t in LAYER_TYPES if t in data]
    fig, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3.6), sharey=True)
    for ax, t in zip(axes, types, strict=True):
        e = data[t]["errors"]
        hi = max(float(v.max()) for v in e.values())
        for sc in SCHEMES:
            ax.hist(e[sc], bins=60, range=(0.0, hi), histtype="step", log=True,
                    label=f"{sc} (mean {data[t]['mean_abs_error'][sc]:.1e})")
        ax.set(title=t, xlabel="|W − Ŵ|")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("count (log)")
    fig.suptitle("round-trip error of the pretrained base's weights, blocksize 64", fontsize=10)
    fig.tight_layout()
    paths = [save_png(fig, out / "quant_real_weights_error_hist.png")]

    nd = NormalDist()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for t in types:
        z = block_zscores(data[t]["weights"])
        xp = get_array_module(z)
        z = xp.sort(z)
        idx = xp.unique(xp.linspace(0, z.size - 1, 400).round().astype(xp.int64))   # 400 quantiles per type
        theo = [nd.inv_cdf((int(i) + 0.5) / z.size) for i in idx]
        ax.plot(theo, z[idx], ".", ms=3, label=t)
    ax.plot([-4, 4], [-4, 4], "k--", lw=1, label="N(0, 1)")
    ax.set(title="Q–Q: block-standardized weights vs N(0, 1)", xlabel="normal quantile",
           ylabel="weight quantile (z within block of 64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_png(fig, out / "quant_real_weights_qq.png"))
    return paths
