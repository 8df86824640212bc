"""The scaling figure: LoRA step time and peak memory against width, sequence length and rank, minilora beside
PyTorch + PEFT, drawn from a `benchmarks/bench_scaling.py` result (its scaling.json).

    result = {"axes": {"width": [point, ...], "seq": [...], "rank": [...]}, "config": {...}, ...}
    point  = {"x": 256, "minilora_ms": ..., "torch_ms": ..., "minilora_peak_mib": ..., "torch_peak_mib": ...}

Top row: step ms (log-log) for both and their ratio on a second axis; bottom row: peak MiB. Host-only module (it
plots host floats).
"""
from __future__ import annotations

from pathlib import Path

from minilora.plotting import pyplot, save_png

AXES = (("width", "width (n_embd)"), ("seq", "sequence length T"), ("rank", "LoRA rank r"))


def scaling_figure(result: dict, path) -> Path:
    """Draw `result` (a bench_scaling.py result dict) into the PNG `path`; returns the path."""
    plt = pyplot()
    fig, axs = plt.subplots(2, 3, figsize=(13, 7.5))
    cfg = result.get("config", {})
    for col, (key, label) in enumerate(AXES):
        pts = result["axes"].get(key, [])
        xs = [p["x"] for p in pts]
        top, bottom = axs[0][col], axs[1][col]
        top.plot(xs, [p["minilora_ms"] for p in pts], "o-", label="minilora (NumPy)")
        if any(p.get("torch_ms") for p in pts):
            top.plot(xs, [p["torch_ms"] for p in pts], "s--", label="PyTorch + PEFT")
            twin = top.twinx()
            twin.plot(xs, [p["minilora_ms"] / p["torch_ms"] for p in pts], "^:", color="gray", label="ratio")
            twin.set_ylabel("minilora / torch", color="gray")
            twin.axhline(1.0, color="gray", lw=0.5)
        top.set_xscale("log", base=2)
        top.set_yscale("log")
        top.set_ylabel("LoRA step ms (median)")
        top.set_title(f"step time vs {label}")
        top.legend(loc="upper left", fontsize=8)
        bottom.plot(xs, [p["minilora_peak_mib"] for p in pts], "o-", label="minilora (tracemalloc)")
        if any(p.get("torch_peak_mib") for p in pts):
            bottom.plot(xs, [p["torch_peak_mib"] for p in pts], "s--", label="PyTorch (profiler)")
        bottom.set_xscale("log", base=2)
        bottom.set_yscale("log")
        bottom.set_xlabel(label)
        bottom.set_ylabel("peak MiB during a step")
        bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"LoRA step, {cfg.get('n_layer', '?')} layers, batch {cfg.get('batch', '?')}, "
                 f"{cfg.get('threads', '?')} thread(s), {result.get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, Path(path))
