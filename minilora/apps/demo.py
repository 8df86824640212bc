"""`minilora demo`: one pretrained base, seven ways to fine-tune it, one table, measured on this machine.

The base (shipped in `minilora/checkpoints/`, trained by `minilora pretrain` on CPython's documentation) is
fine-tuned on Python source code of the standard library with the same seed, batches, optimizer and number of steps:

    full            every weight trains (AdamW state for all of them)
    last_layer      only lm_head trains (the cheapest classic baseline)
    lora_all        LoRA r=8, alpha=16 on every Linear but lm_head (PEFT target_modules="all-linear")
    lora_attn       LoRA r=8 on the fused q/k/v projection c_attn only (PEFT's default target for GPT-2)
    qlora_nf4       base quantized to NF4 with double quantization, then lora_all   (QLoRA's recipe)
    qlora_fp4       same with FP4 (bitsandbytes' E2M1-like table), absmax in float32
    qlora_int4      same with symmetric Int4, absmax in float32

`--extended` adds, after these, the practitioners' recipe (not in the default run, which stays within minutes):

    qlora_nf4_paged8bit   qlora_nf4 trained with bitsandbytes' PagedAdamW8bit (`optim="paged_adamw_8bit"`): m and v
                          as 8-bit codes with one absmax per 256 for adapter tensors of >= 4096 elements (bnb's rule;
                          here the c_fc B and mlp c_proj A matrices, the rest keep float32 states), paged on a pool
                          with no budget (bnb pages only tensors of >= 1e5 elements, and none is that large here)
    qlora_nf4_dora        qlora_nf4 with DoRA (`use_dora=True`, arXiv 2402.09353): a trained magnitude per output
                          row times the normalised direction W0 + s·B A
    qlora_nf4_loftq       LoRA all-linear on an NF4 base (no double quantization, as PEFT's LoftQ) initialised by
                          LoftQ (`init_lora_weights="loftq"`, T = 5, arXiv 2310.08659): Q + s·B A ≈ W0 at step 0

For each it measures trainable parameters, bytes of the frozen base, peak memory while training (tracemalloc:
NumPy reports every array buffer to it, so the peak is base + trainable weights + gradients + optimizer state +
cached activations + temporaries), validation loss in bits per byte on held-out stdlib modules before and after,
the same on the documentation text (forgetting), the bytes of the saved adapter/checkpoint, and time per step.
Then: inference time per token of the base, the unmerged adapter and the merged model; a second adapter trained on
IDLE's help HTML on the same frozen base, switched at inference; and notes comparing the miniature with the papers.
Nothing is tuned to make the papers' ordering come out: whatever is measured is printed.

Mirrors the experiments of LoRA (arXiv 2106.09685, Tables 4-6) and QLoRA (arXiv 2305.14314, Table 2, Fig. 2), run
with minilora's PEFT-compatible API (`get_peft_model`, `save_pretrained`, `merge_and_unload`, `set_adapter`).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
import tracemalloc
from itertools import pairwise
from pathlib import Path

from minilora.apps.common import add_threads_option, apply_threads, check_out_dir
from minilora.backend import asarray, default_rng, get_backend, to_numpy
from minilora.data import LN2, decode, encode, load_corpus
from minilora.hf import export_hf
from minilora.io import atomic_write_text, save_json, save_safetensors
from minilora.optim import AdamW, PagedAdamW8bit, get_constant_schedule_with_warmup
from minilora.pretrained import BASE_WEIGHTS, CHECKPOINT_DIR, eval_batches, load_base
from minilora.threads import blas_info, get_num_threads
from minilora.train import evaluate, train

METHODS = {   # key: (label, kind, quant_type)
    "full": ("full fine-tuning", "full", None),
    "last_layer": ("last layer only (lm_head)", "last_layer", None),
    "lora_all": ("LoRA r=8, all linear", "lora", None),
    "lora_attn": ("LoRA r=8, attention c_attn", "lora", None),
    "qlora_nf4": ("QLoRA NF4 + DQ, r=8", "qlora", "nf4"),
    "qlora_fp4": ("QLoRA FP4, r=8", "qlora", "fp4"),
    "qlora_int4": ("QLoRA Int4, r=8", "qlora", "int4"),
}
EXTENDED_METHODS = {   # --extended: run after METHODS
    "qlora_nf4_paged8bit": ("QLoRA NF4+DQ + paged AdamW 8-bit", "qlora", "nf4"),
    "qlora_nf4_dora": ("QLoRA NF4+DQ + DoRA, r=8", "qlora", "nf4"),
    "qlora_nf4_loftq": ("QLoRA NF4 + LoftQ init, r=8", "loftq", "nf4"),   # LoftQ quantizes the float base itself
}
ALL_METHODS = {**METHODS, **EXTENDED_METHODS}
OPTIMIZERS = {"qlora_nf4_paged8bit": "paged_adamw_8bit"}   # Hugging Face's optim= names; every other method: adamw
LOFTQ_ITER = 5                                              # LoftQ's alternations T (PEFT's default is 1)
ADAPTER_OPTIONS = {   # LoraConfig fields beyond the shared r, alpha, targets, dropout
    "qlora_nf4_dora": dict(use_dora=True),
    "qlora_nf4_loftq": dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": LOFTQ_ITER}),
}
SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)
SETTINGS = {   # default run; --quick trades accuracy of every number for a CI-sized runtime
    "default": dict(steps=100, batch_size=8, block_size=128, eval_windows=32, infer_tokens=32, infer_repeats=5),
    "quick": dict(steps=12, batch_size=4, block_size=64, eval_windows=8, infer_tokens=8, infer_repeats=1),
}
# Learning rates by rule, not by search: adapters (and the last layer alone) at half the base's pretraining peak
# (2e-3); full fine-tuning at a tenth of it, as fine-tuning recipes do for all weights. Full fine-tuning first ran
# at 1e-3 too, and in a --quick trial on a provisional base that made its code loss worse, hence the lower value.
LR, LR_FULL, WARMUP, CLIP, R, ALPHA = 1e-3, 2e-4, 10, 1.0, 8, 16
PROBE_STEPS = 2            # steps measured under tracemalloc (peak memory); excluded from the time per step
# What a run leaves in its folder: a second run into the same folder is refused unless --overwrite.
RUN_FILES = ("table.md", "table.json", "adapters", "full_finetune.safetensors", "last_layer.safetensors", "figures",
             "hf")


# ------------------------------------------------------------------------------------------------- building
def build(method: str, base_dir=None, seed: int = 0, r: int = R, alpha: float = ALPHA):
    """A fresh model for `method` on the base: (model, peft) with peft=None for full / last_layer."""
    from minilora.peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model
    _, kind, qt = ALL_METHODS.get(method, (None, "lora", None))
    model, _ = load_base(base_dir)
    if kind == "full":
        return model, None
    if kind == "last_layer":
        model.requires_grad_(False)
        model.lm_head.weight.requires_grad = True
        return model, None
    if kind == "qlora":
        quantize_model(model, quant_type=qt, compress_statistics=(qt == "nf4"))   # lm_head stays float
    if kind in ("qlora", "loftq"):                   # loftq: get_peft_model quantizes the targets (to NF4 Q)
        prepare_model_for_kbit_training(model)
    targets = ["c_attn"] if method == "lora_attn" else "all-linear"
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                     **ADAPTER_OPTIONS.get(method, {}))
    pm = get_peft_model(model, cfg, rng=default_rng(seed))
    return pm, pm


def count_params(model) -> tuple[int, int]:
    """(trainable, total); a 4-bit weight counts its logical out·in parameters (as PEFT does)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def bits(model, corpus, s) -> float:
    """Validation loss in bits per byte on the fixed windows of `corpus` (same windows for every model)."""
    return evaluate(model, eval_batches(corpus, s["block_size"], s["eval_windows"])) / LN2


# ------------------------------------------------------------------------------------------------- one run
def make_optimizer(model, lr: float, optim: str = "adamw"):
    """AdamW (torch's arithmetic) or, for optim="paged_adamw_8bit", bitsandbytes' PagedAdamW8bit; weight decay 0."""
    if optim == "paged_adamw_8bit":
        return PagedAdamW8bit(model.named_parameters(), lr=lr, weight_decay=0.0)
    if optim != "adamw":
        raise ValueError(f"unknown optimizer {optim!r}; choose adamw or paged_adamw_8bit")
    return AdamW(model.named_parameters(), lr=lr, weight_decay=0.0)


def finetune(model, corpus, s, seed: int, desc: str, progress: bool, probe_memory: bool = True, lr: float = LR,
             optim: str = "adamw"):
    """Train `model` on corpus/train for s["steps"] steps; returns (TrainResult, peak bytes or None, optimizer)."""
    opt = make_optimizer(model, lr, optim)
    peak, cpu = {}, [time.process_time()]

    def probe(rec):
        cpu.append(time.process_time())          # CPU seconds of this process (all its threads) per step
        if probe_memory and rec["step"] == PROBE_STEPS and tracemalloc.is_tracing():
            peak["bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    if probe_memory:
        tracemalloc.reset_peak()
    B, T = s["batch_size"], s["block_size"]
    res = train(model, opt, lambda rng: corpus.get_batch("train", B, T, rng), max_steps=s["steps"],
                max_grad_norm=CLIP, lr_schedule=get_constant_schedule_with_warmup(min(WARMUP, s["steps"] // 4)),
                seed=seed, progress=progress, desc=desc, log=probe)
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    res.cpu_time = [b - a for a, b in pairwise(cpu)]
    return res, peak.get("bytes"), opt


def run_method(method, corpora, s, seed, out: Path, base_dir, progress) -> dict:
    from minilora.peft import memory_report
    gc.collect()
    tracemalloc.start()                              # counts the base's arrays too: they are allocated below
    try:
        model, peft = build(method, base_dir, seed)
        code, docs = corpora["stdlib"], corpora["pydoc"]
        before = {"code": bits(model, code, s), "docs": bits(model, docs, s)}
        trainable, total = count_params(model)
        res, peak, opt = finetune(model, code, s, seed, desc=method, progress=progress,
                                  lr=LR_FULL if method == "full" else LR, optim=OPTIMIZERS.get(method, "adamw"))
    finally:
        if tracemalloc.is_tracing():                 # stopped after PROBE_STEPS unless something failed
            tracemalloc.stop()
    rep = memory_report(model, opt)
    after = {"code": bits(model, code, s), "docs": bits(model, docs, s)}
    if peft is not None:
        path = out / "adapters" / method
        peft.save_pretrained(path)
        files = [path / "adapter_model.safetensors"]
    elif method == "full":
        files = [out / "full_finetune.safetensors"]
        save_safetensors(files[0], model.state_dict(), metadata={"format": "pt", "minilora": "gpt-full-finetune"})
    else:
        files = [out / "last_layer.safetensors"]
        save_safetensors(files[0], {"lm_head.weight": model.lm_head.weight.data},
                         metadata={"format": "pt", "minilora": "lm_head-only"})
    times, cpus = res.step_time[PROBE_STEPS:], res.cpu_time[PROBE_STEPS:]
    row = {
        "label": ALL_METHODS[method][0], "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "frozen_base_bytes": rep["frozen_float"] + rep["frozen_4bit"], "trainable_bytes": rep["trainable"],
        "gradient_bytes": rep["gradients"], "optimizer_bytes": rep["optimizer"], "peak_bytes": peak,
        "code_bits_before": before["code"], "code_bits_after": after["code"],
        "docs_bits_before": before["docs"], "docs_bits_after": after["docs"],
        "file": str(files[0].relative_to(out)), "file_bytes": files[0].stat().st_size,
        "s_per_step": sorted(times)[len(times) // 2], "cpu_s_per_step": sorted(cpus)[len(cpus) // 2],
        "train_loss_bits": [v / LN2 for v in res.train_loss],
    }
    return row, model, peft


# ------------------------------------------------------------------------------------------- inference, swap
def time_per_token(model, s, seed: int) -> float:
    """Seconds per generated token (fastest of the repeats: the least disturbed by other processes): batch 1,
    a 32-byte prompt, s["infer_tokens"] new tokens."""
    model.eval()
    prompt = asarray(encode("    def __init__(self, *args):\n")[None, :].astype("int64"))   # (1, 32)
    ts = []
    for _ in range(s["infer_repeats"]):
        t0 = time.perf_counter()
        model.generate(prompt, s["infer_tokens"], rng=default_rng(seed))
        ts.append((time.perf_counter() - t0) / s["infer_tokens"])
    return min(ts)


def inference_rows(corpora, s, seed, out: Path, base_dir, lora_model, qlora_model) -> dict:
    """Base, unmerged LoRA, merged LoRA (reloaded from its PEFT folder), unmerged QLoRA: time/token and code loss."""
    from minilora.peft import PeftModel
    base, _ = load_base(base_dir)
    merged = PeftModel.from_pretrained(load_base(base_dir)[0], out / "adapters" / "lora_all").merge_and_unload()
    rows = {}
    for key, label, m in (("base", "base model", base), ("lora_unmerged", "LoRA all-linear, unmerged", lora_model),
                          ("lora_merged", "LoRA all-linear, merged (W0 + s·BA)", merged),
                          ("qlora_nf4_unmerged", "QLoRA NF4, unmerged (dequantize per matmul)", qlora_model)):
        if m is None:
            continue
        rows[key] = {"label": label, "s_per_token": time_per_token(m, s, seed),
                     "code_bits": bits(m, corpora["stdlib"], s)}
    return rows


def adapter_swap(peft, corpora, s, seed, out: Path, base_dir, progress) -> dict:
    """Train a second adapter ("idle") on the same frozen base; switch adapters and evaluate on every domain."""
    from minilora.peft import LoraConfig
    idle = corpora["idle"]
    peft.add_adapter("idle", LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
                     rng=default_rng(seed + 1))
    peft.set_adapter("idle")
    finetune(peft, idle, s, seed, desc="idle adapter", progress=progress, probe_memory=False)
    peft.save_pretrained(out / "adapters", selected_adapters=["idle"])     # -> adapters/idle/
    domains = {"code": corpora["stdlib"], "idle_html": idle, "docs": corpora["pydoc"]}
    rows = {}
    with peft.disable_adapter():
        rows["none (base)"] = {d: bits(peft, c, s) for d, c in domains.items()}
    for name, label in (("default", "stdlib code adapter"), ("idle", "IDLE HTML adapter")):
        peft.set_adapter(name)
        rows[label] = {d: bits(peft, c, s) for d, c in domains.items()}
    files = {"code": out / "adapters" / "lora_all" / "adapter_model.safetensors",
             "idle": out / "adapters" / "idle" / "adapter_model.safetensors"}
    return {"rows": rows, "adapter_bytes": {k: v.stat().st_size for k, v in files.items()},
            "base_bytes": (Path(base_dir or CHECKPOINT_DIR) / BASE_WEIGHTS).stat().st_size}


# ------------------------------------------------------------------------------------------------- reporting
def _kib(n) -> str:
    return "n/a" if n is None else f"{n / 1024:,.1f} KiB"


def static_bytes(r: dict) -> int:
    """Memory that does not depend on the batch: frozen base + trainable weights + their gradients + AdamW state."""
    return r["frozen_base_bytes"] + r["trainable_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"]


def format_table(result: dict) -> str:
    rows = {k: result["methods"][k] for k in ALL_METHODS if k in result["methods"]}   # the demo's order, also JSON
    full = rows.get("full", {})
    L = ["| method | trainable params | trainable % | frozen base | weights + grads + AdamW | peak memory "
         "| code val bits/byte before → after "
         "| docs val bits/byte before → after (forgetting) | saved file | ms/step wall / CPU |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        fb = r["frozen_base_bytes"]
        ratio = f" ({r['file_bytes'] / full['file_bytes']:.1%} of full)" if full and k != "full" else ""
        L.append(f"| {r['label']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f}% | "
                 f"{_kib(fb) if fb else '— (all trainable)'} | {_kib(static_bytes(r))} | {_kib(r['peak_bytes'])} | "
                 f"{r['code_bits_before']:.3f} → {r['code_bits_after']:.3f} | "
                 f"{r['docs_bits_before']:.3f} → {r['docs_bits_after']:.3f} "
                 f"({r['docs_bits_after'] - r['docs_bits_before']:+.3f}) | {_kib(r['file_bytes'])}{ratio} | "
                 f"{1000 * r['s_per_step']:.0f} / {1000 * r['cpu_s_per_step']:.0f} |")
    out = ["## Fine-tuning the shipped base on stdlib source code", "", *L, ""] if rows else []
    inf = result.get("inference")
    if inf:
        out += ["## Inference (batch 1, time per generated token)", "", "| model | ms/token | code val bits/byte |",
                "|---|---:|---:|"]
        out += [f"| {r['label']} | {1000 * r['s_per_token']:.2f} | {r['code_bits']:.3f} |" for r in inf.values()]
        out.append("")
    sw = result.get("swap")
    if sw:
        out += ["## Adapter swapping: two adapters on one frozen base (val bits/byte)", "",
                "| active adapter | stdlib code | IDLE help HTML | docs (pretraining) |", "|---|---:|---:|---:|"]
        out += [f"| {name} | {v['code']:.3f} | {v['idle_html']:.3f} | {v['docs']:.3f} |"
                for name, v in sw["rows"].items()]
        ab = sw["adapter_bytes"]
        out += ["", f"Storage for both tasks: base {_kib(sw['base_bytes'])} once + adapters {_kib(ab['code'])} + "
                f"{_kib(ab['idle'])} = {_kib(sw['base_bytes'] + ab['code'] + ab['idle'])}, versus two full "
                f"checkpoints {_kib(2 * full['file_bytes']) if full else 'n/a'}.", ""]
    elif result.get("swap_skipped"):
        out += [f"Adapter swapping skipped: {result['swap_skipped']}", ""]
    sweep = result.get("sweep")
    if sweep:
        out += ["## Rank sweep: LoRA all-linear, lora_alpha=16 fixed (scaling 16/r)", "",
                "| r | trainable params | code val bits/byte after |", "|---:|---:|---:|"]
        out += [f"| {r['r']} | {r['trainable_params']:,} | {r['code_bits_after']:.3f} |" for r in sweep]
        out.append("")
    out += ["Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(out) + "\n"


# The paper notes: one named step per claim, each returning its notes (none when the run lacks the numbers).
def note_short_run(result: dict) -> list:
    """Caveat first: a --quick run (or one with fewer steps than the default) is too short for any verdict."""
    s, full = result["settings"], SETTINGS["default"]
    if s.get("mode") != "quick" and s["steps"] >= full["steps"]:
        return []
    what = "this is a --quick run" if s.get("mode") == "quick" else "this run is shortened"
    return [f"Caveat: {what} ({s['steps']} steps, {s['eval_windows']} eval windows of {s['block_size']} bytes), "
            "too short for the verdicts below to confirm or refute the papers: it shows that every path runs. "
            f"`minilora demo` without --quick ({full['steps']} steps, about 5 minutes on 2 cores) gives the numbers "
            "worth comparing."]


def note_setup(result: dict) -> list:
    """The shared recipe: seed, steps, batch, optimizer, learning rates, LoRA settings, what the loss measures."""
    s = result["settings"]
    w = min(WARMUP, s["steps"] // 4)
    eight = " (the 8-bit row: the same, 8-bit states)" if "qlora_nf4_paged8bit" in result.get("methods", {}) else ""
    return [
        f"Same seed ({s['seed']}), same {s['steps']} steps of batch {s['batch_size']}×{s['block_size']} bytes and the "
        f"same AdamW settings (constant lr after {w} warmup steps, no weight decay, clip {CLIP}) for every run"
        f"{eight}; lr "
        f"{LR} for adapters and the last layer, {LR_FULL} for full fine-tuning (not searched: half and a tenth of the "
        f"pretraining peak; full fine-tuning got its smaller lr after a --quick trial where {LR} made its code loss "
        f"worse). LoRA r={R}, lora_alpha={ALPHA}, dropout 0. "
        f"Loss is bits per byte on fixed held-out windows ({s['eval_windows']}×{s['block_size']} bytes; the texts are "
        ">99% ASCII, so ≈ bits per character)."]


def note_measurement(result: dict) -> list:
    """What the table's columns count: peak memory, lora_attn's target, FP4/Int4's absmax, last_layer's backward."""
    if not result["methods"]:
        return []
    return [
        "Peak memory: tracemalloc's peak over the first training steps (NumPy reports its buffers to "
        "tracemalloc): base + trainable weights + gradients + AdamW state + cached activations + temporaries. "
        "'frozen base' counts the frozen arrays only (4-bit codes + absmax for QLoRA; lm_head and embeddings stay "
        "float32).",
        "lora_attn adapts GPT-2's fused c_attn, i.e. Wq, Wk and Wv together: PEFT's default target for GPT-2 and "
        "the closest our fused layer allows to the LoRA paper's Wq,Wv-only default.",
        "QLoRA FP4 and Int4 keep float32 absmax (no double quantization), so their base is ~0.37 bits/weight "
        "larger than NF4+DQ's. last_layer still backpropagates through the whole network in minilora (dx is "
        "always computed), so it skips only the weight-gradient matmuls, not the backward pass."]


def note_forgetting(result: dict) -> list:
    """Biderman et al. (arXiv 2405.09673): LoRA forgets less than full fine-tuning (docs loss after code tuning)."""
    m = result["methods"]
    if not ("full" in m and "lora_all" in m):
        return []
    f, lo = m["full"], m["lora_all"]
    df, dl = f["docs_bits_after"] - f["docs_bits_before"], lo["docs_bits_after"] - lo["docs_bits_before"]
    return [f"Forgetting (the lecture notes; Biderman et al., arXiv 2405.09673: LoRA forgets less than full "
            f"fine-tuning): docs loss changed {df:+.3f} bits with full FT vs {dl:+.3f} with LoRA all-linear -> "
            + ("agrees." if dl < df else "the miniature DISAGREES here.")]


def note_quality(result: dict) -> list:
    """LoRA Table 4: LoRA reaches the quality of full fine-tuning (code loss after tuning)."""
    m, steps = result["methods"], result["settings"]["steps"]
    if not ("full" in m and "lora_all" in m):
        return []
    f, lo = m["full"]["code_bits_after"], m["lora_all"]["code_bits_after"]
    return [f"Quality (LoRA Table 4: LoRA ≈ full FT): code loss after {f:.3f} (full) vs {lo:.3f} (LoRA all-linear) -> "
            + ("LoRA is within 0.05 bits or better." if lo <= f + 0.05 else
               f"LoRA is {lo - f:.3f} bits worse after {steps} steps: the miniature does not reproduce parity at "
               "this budget.")]


def note_storage(result: dict) -> list:
    """LoRA §4.2: an adapter is a tiny fraction of a full checkpoint."""
    m = result["methods"]
    if not ("full" in m and "lora_all" in m):
        return []
    f, lo = m["full"]["file_bytes"], m["lora_all"]["file_bytes"]
    return [f"Storage (LoRA §4.2): the adapter is {lo:,} bytes, {f / lo:.0f}× smaller than the full checkpoint "
            f"({f:,} bytes; the paper's ratio for GPT-3 at r=4 is ~10,000×)."]


def note_training_memory(result: dict) -> list:
    """LoRA (3× less memory for GPT-3) and QLoRA (4-bit base): static bytes vs the measured peak."""
    m = result["methods"]
    f, lo, q = m.get("full"), m.get("lora_all"), m.get("qlora_nf4")
    if not (f and lo and f.get("peak_bytes") and lo.get("peak_bytes")):
        return []
    return [f"Training memory (LoRA: 3× less for GPT-3; QLoRA: 4-bit base): weights + gradients + AdamW state are "
            f"{static_bytes(f) / static_bytes(lo):.1f}× smaller with LoRA"
            + (f" and {static_bytes(f) / static_bytes(q):.1f}× with QLoRA NF4" if q else "")
            + f", but the measured peak is {lo['peak_bytes'] / f['peak_bytes']:.0%} of full fine-tuning's: at this "
            "size the cached activations (the same for every method) dwarf the weights; see the memory bars."]


def note_optimizer_8bit(result: dict) -> list:
    """8-bit optimizers (Dettmers et al. 2110.02861): 8-bit AdamW states match 32-bit ones in quality."""
    m = result["methods"]
    a, b = m.get("qlora_nf4"), m.get("qlora_nf4_paged8bit")
    if not (a and b):
        return []
    d = b["code_bits_after"] - a["code_bits_after"]
    return [f"8-bit AdamW (8-bit optimizers paper: same quality as 32-bit states): QLoRA NF4 with paged AdamW 8-bit "
            f"reaches {b['code_bits_after']:.3f} bits vs {a['code_bits_after']:.3f} with 32-bit AdamW ({d:+.3f}); its "
            f"optimizer state is {_kib(b['optimizer_bytes'])} vs {_kib(a['optimizer_bytes'])} (only adapter tensors "
            "of >= 4096 elements get 8-bit states, as in bitsandbytes; at 7B-65B every one does: 2.03 vs 8 bytes per "
            "parameter)."]


def note_dora(result: dict) -> list:
    """DoRA (arXiv 2402.09353): magnitude + direction beats LoRA at the same rank, for a few more parameters."""
    m = result["methods"]
    a, d = m.get("qlora_nf4"), m.get("qlora_nf4_dora")
    if not (a and d):
        return []
    diff = d["code_bits_after"] - a["code_bits_after"]
    return [f"DoRA (arXiv 2402.09353: better than LoRA at the same rank, the same cost at inference once merged): "
            f"QLoRA NF4+DQ + DoRA reaches {d['code_bits_after']:.3f} bits vs {a['code_bits_after']:.3f} for plain "
            f"QLoRA NF4 ({diff:+.3f}) -> "
            + ("agrees in direction; " if diff < 0 else "the miniature does not show DoRA's gain at this budget; ")
            + f"it trains {d['trainable_params'] - a['trainable_params']:,} more parameters (one magnitude per output "
            f"feature) and takes {d['s_per_step'] / a['s_per_step']:.1f}× the time per step (each step recomputes "
            "the row norms ‖W0 + s·B A‖ from the dequantized base)."]


def note_loftq(result: dict) -> list:
    """LoftQ (arXiv 2310.08659): start from Q + s·B A ≈ W0, closer to the float model than plain QLoRA."""
    m = result["methods"]
    q, lq, f = m.get("qlora_nf4"), m.get("qlora_nf4_loftq"), m.get("lora_all")
    if not (q and lq):
        return []
    start = (f"before training the code loss is {lq['code_bits_before']:.3f} bits with LoftQ (T={LOFTQ_ITER}) vs "
             f"{q['code_bits_before']:.3f} with plain QLoRA NF4+DQ (B = 0)")
    if f:
        gap = q["code_bits_before"] - f["code_bits_before"]
        start += f" and {f['code_bits_before']:.3f} for the float base"
        share = (q["code_bits_before"] - lq["code_bits_before"]) / gap if gap > 0 else None
        if share is not None:
            start += (": the whole 4-bit gap closed" if share >= 1 else f": {share:.0%} of the 4-bit gap closed")
    diff = lq["code_bits_after"] - q["code_bits_after"]
    return [f"LoftQ (arXiv 2310.08659: a quantization-aware start closes part of the gap to the float model; its "
            f"gains are largest at 2-3 bits, small at 4): {start}; after fine-tuning {lq['code_bits_after']:.3f} vs "
            f"{q['code_bits_after']:.3f} ({diff:+.3f}) -> "
            + ("LoftQ stays ahead." if diff < 0 else "the head start does not last at this budget (at 4 bits the "
               "paper's gains are small too).")
            + " The LoftQ row's base is NF4 without double quantization (as PEFT's LoftQ), so its frozen base is a "
            "little larger."]


def note_targets(result: dict) -> list:
    """QLoRA Fig. 2: LoRA on every linear layer beats LoRA on attention only."""
    m = result["methods"]
    if not ("lora_all" in m and "lora_attn" in m):
        return []
    a, q = m["lora_all"]["code_bits_after"], m["lora_attn"]["code_bits_after"]
    return [f"Where LoRA goes (QLoRA Fig. 2: all linear layers are needed): all-linear {a:.3f} vs attention-only "
            f"{q:.3f} bits -> " + ("agrees." if a < q else "the miniature DISAGREES here.")]


_DTYPES = ("NF4", "FP4", "Int4")


def _dtype_order(v) -> str:
    return " < ".join(_DTYPES[i] for i in sorted(range(3), key=lambda i: v[i]))


def _dtype_verdict(v) -> str:
    if v[0] <= v[1] <= v[2]:
        return "agrees"
    return "partly agrees (NF4 is best)" if v[0] <= min(v[1], v[2]) else "DISAGREES"


def note_data_types(result: dict) -> list:
    """QLoRA Table 2: NF4 < FP4 < Int4 in loss, before tuning (the quantized base) and after QLoRA."""
    m = result["methods"]
    qs = ("qlora_nf4", "qlora_fp4", "qlora_int4")
    if not all(k in m for k in qs):
        return []
    b, a = [m[k]["code_bits_before"] for k in qs], [m[k]["code_bits_after"] for k in qs]
    base = m.get("lora_all", {}).get("code_bits_before")
    return ["Data types (QLoRA Table 2: NF4 < FP4 < Int4 in loss): quantized base before tuning "
            f"NF4 {b[0]:.3f}, FP4 {b[1]:.3f}, Int4 {b[2]:.3f}"
            + (f" (float base {base:.3f})" if base is not None else "")
            + f", i.e. {_dtype_order(b)} -> {_dtype_verdict(b)}; after QLoRA NF4 {a[0]:.3f}, FP4 {a[1]:.3f}, Int4 "
            f"{a[2]:.3f}, i.e. {_dtype_order(a)} -> {_dtype_verdict(a)} (spread after tuning {max(a) - min(a):.3f} "
            "bits: the adapter absorbs most of the quantization damage)."]


def note_inference(result: dict) -> list:
    """LoRA §4.1: no inference latency once the adapter is merged."""
    inf = result.get("inference") or {}
    if not all(k in inf for k in ("base", "lora_unmerged", "lora_merged")):
        return []
    b, u, g = (inf[k]["s_per_token"] for k in ("base", "lora_unmerged", "lora_merged"))
    return [f"Inference (LoRA §4.1: no latency once merged): merged {1000 * g:.2f} ms/token vs base {1000 * b:.2f} "
            f"({g / b:.2f}×); unmerged {1000 * u:.2f} ({u / b:.2f}×): the merged model runs exactly the base's code on "
            "same-shaped arrays, so any gap is timing noise (fastest of "
            f"{result['settings']['infer_repeats']} repeats)."]


def note_rank(result: dict) -> list:
    """LoRA Table 6: r=1 already suffices (and the lecture notes' plateau above ~16), from a --sweep-rank run."""
    if not result.get("sweep"):
        return []
    vals = {r["r"]: r["code_bits_after"] for r in result["sweep"]}
    best = min(vals.values())
    plateau = [r for r, v in vals.items() if v <= best + 0.02]
    r1 = vals.get(1, float("nan"))
    tail = "."
    if 16 in vals and 64 in vals:
        d = vals[64] - vals[16]
        tail = (f"; from r=16 to r=64 the loss {'falls' if d < 0 else 'rises'} by {abs(d):.3f} bits."
                if round(abs(d), 3) else "; from r=16 to r=64 the loss does not move (< 0.001 bits).")
    return [f"Rank (LoRA Table 6: r=1 already suffices; the lecture notes: plateau above ~16): within 0.02 bits of "
            f"the best ({best:.3f}) for r in {plateau}; r=1 reaches {r1:.3f} -> "
            + ("agrees: rank 1 is enough" if r1 <= best + 0.02 else
               f"the miniature DISAGREES with 'rank 1 suffices' (r=1 is {r1 - best:.3f} bits behind)") + tail]


NOTE_STEPS = (note_short_run, note_setup, note_measurement, note_forgetting, note_quality, note_storage,
              note_training_memory, note_optimizer_8bit, note_dora, note_loftq, note_targets, note_data_types,
              note_inference, note_rank)


def paper_notes(result: dict) -> list:
    """Compare the measurements with the papers' claims, one step per claim (NOTE_STEPS); say plainly where the
    miniature disagrees."""
    return [note for step in NOTE_STEPS for note in step(result)]


# ------------------------------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(prog="minilora demo", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (≤ 60 s): 12 steps, short windows")
    p.add_argument("--extended", action="store_true",
                   help=f"also run {', '.join(EXTENDED_METHODS)} (QLoRA NF4+DQ with paged AdamW 8-bit, with DoRA, "
                        "and QLoRA NF4 with LoftQ init) after the default methods")
    p.add_argument("--sweep-rank", action="store_true",
                   help=f"instead of the table: LoRA all-linear r in {SWEEP_RANKS}")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<timestamp>); the run writes only there")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (without it such a folder is refused)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps per method")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the adapters' init and the batch order (>= 0)")
    p.add_argument("--base", default=None, help="folder with base.safetensors + base.json (default: shipped base)")
    p.add_argument("--figures-dir", default=None,
                   help="also write the figures into this folder (default: only the run folder's figures/)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_threads_option(p)
    return p


def parse(argv):
    """Parsed arguments, every one checked before any work starts (the output folders included: created, writable,
    and not holding an earlier run unless --overwrite)."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.steps is not None and args.steps <= PROBE_STEPS:
        p.error(f"--steps must be > {PROBE_STEPS} (the first {PROBE_STEPS} steps measure memory), got {args.steps}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (NumPy seeds are non-negative), got {args.seed}")
    if args.base is not None and not (Path(args.base) / BASE_WEIGHTS).is_file():
        p.error(f"--base {args.base}: no {BASE_WEIGHTS} there (make one with `minilora pretrain --out DIR`)")
    args.out = Path(args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S")))
    check_out_dir(p, "--out", args.out, earlier=RUN_FILES, overwrite=args.overwrite)
    if _figures_dir(args) is not None:
        check_out_dir(p, "--figures-dir", _figures_dir(args))
    return args


def _settings(args) -> dict:
    s = dict(SETTINGS["quick" if args.quick else "default"])
    s.update({k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None})
    s.update(seed=args.seed, mode="quick" if args.quick else "default")
    return s


def _figures_dir(args):
    """Where figures go besides the run folder's own figures/: only a folder the user named (`minilora figures`
    passes its --out here). A run never writes into the repository."""
    return None if args.figures_dir in (None, "none") else Path(args.figures_dir)


def _finish(result, out: Path, fig_dirs, plot, t_start: float, files: str) -> int:
    """Add the paper notes and wall time, write table.md/table.json and the figures, print the table."""
    result["notes"] = paper_notes(result)
    result["wall_time_s"] = time.perf_counter() - t_start
    text = format_table(result)
    atomic_write_text(out / "table.md", text)
    save_json(out / "table.json", result)
    from minilora.apps import demo_plots  # imported here: matplotlib only when writing figures
    for d in fig_dirs:
        plot(demo_plots, result, d)
    print(text)
    print(f"wrote {out}/{files} and figures in {', '.join(str(d) for d in fig_dirs)} ({result['wall_time_s']:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    apply_threads(args.threads)
    s = _settings(args)
    out = args.out
    fig_dirs = [out / "figures"] + ([d] if (d := _figures_dir(args)) is not None else [])
    progress = not args.no_progress
    corpora = {n: load_corpus(n) for n in ("stdlib", "pydoc")}
    _, base_meta = load_base(args.base)
    result = {"settings": s, "base": {k: base_meta[k] for k in ("config", "n_params", "val_bits_per_byte")},
              "corpora": {n: c.stats() for n, c in corpora.items()},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "blas_threads": get_num_threads(),
                          "blas": blas_info(), "backend": get_backend()}}
    t_start = time.perf_counter()

    if args.sweep_rank:
        rows = []
        for r in SWEEP_RANKS:
            gc.collect()
            model, peft = build(f"lora_r{r}", args.base, args.seed, r=r)
            trainable, _ = count_params(model)
            finetune(model, corpora["stdlib"], s, args.seed, desc=f"LoRA r={r}", progress=progress,
                     probe_memory=False)
            rows.append({"r": r, "trainable_params": trainable, "code_bits_after": bits(model, corpora["stdlib"], s)})
        result.update(methods={}, sweep=rows)
        return _finish(result, out, fig_dirs, lambda dp, res, d: dp.rank_sweep_figure(res, d), t_start,
                       "table.md, table.json")

    rows, keep = {}, {}
    for method in ALL_METHODS if args.extended else METHODS:
        row, model, peft = run_method(method, corpora, s, args.seed, out, args.base, progress)
        rows[method] = row
        if method in ("lora_all", "qlora_nf4"):
            keep[method] = model
        del model, peft
    result["methods"] = rows
    result["inference"] = inference_rows(corpora, s, args.seed, out, args.base, keep.get("lora_all"),
                                         keep.get("qlora_nf4"))
    keep.pop("qlora_nf4", None)
    try:
        corpora["idle"] = load_corpus("idle")
        result["corpora"]["idle"] = corpora["idle"].stats()
        result["swap"] = adapter_swap(keep["lora_all"], corpora, s, args.seed, out, args.base, progress)
    except FileNotFoundError as e:                   # idlelib is a separate package on some Linux distributions
        result["swap_skipped"] = str(e)
    # the base and the LoRA adapter as transformers + PEFT load them (docs/real_stack.md)
    export_hf(load_base(args.base)[0], out / "hf", adapters={"lora_all": out / "adapters" / "lora_all"}, overwrite=True)
    return _finish(result, out, fig_dirs, lambda dp, res, d: dp.demo_figures(res, d), t_start,
                   "table.md, table.json, adapters/, hf/, full_finetune.safetensors")


# ------------------------------------------------------------------------------------------------- sample
def sample_main(argv=None) -> int:
    """`minilora sample`: the same prompt and seed through the base and through a code adapter."""
    from minilora.peft import PeftModel
    p = argparse.ArgumentParser(prog="minilora sample", description=sample_main.__doc__)
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder (e.g. runs/demo-*/adapters/lora_all); "
                                                   "default: train a quick LoRA adapter on stdlib code first")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--steps", type=int, default=60, help="steps of the quick adapter (without --adapter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.tokens < 1 or args.steps < 1:
        p.error("--tokens and --steps must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (NumPy seeds are non-negative), got {args.seed}")
    if args.base is not None and not (Path(args.base) / BASE_WEIGHTS).is_file():
        p.error(f"--base {args.base}: no {BASE_WEIGHTS} there (make one with `minilora pretrain --out DIR`)")
    if not args.prompt:
        p.error("--prompt must not be empty")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        p.error(f"--adapter {args.adapter}: no adapter_config.json there")
    apply_threads(args.threads)
    base, meta = load_base(args.base)
    if args.adapter is not None:
        try:
            tuned = PeftModel.from_pretrained(load_base(args.base)[0], args.adapter)
        except ValueError as e:        # an adapter for another model, or a damaged one: the loader says which
            p.error(f"--adapter {args.adapter} does not fit the base model: {e}")
        how = f"adapter {args.adapter}"
    else:
        tuned, _ = build("lora_all", args.base, args.seed)
        s = dict(SETTINGS["default"], steps=args.steps, seed=args.seed)
        finetune(tuned, load_corpus("stdlib"), s, args.seed, desc="quick LoRA adapter", progress=not args.no_progress,
                 probe_memory=False)
        how = f"LoRA all-linear r={R} trained {args.steps} steps on stdlib code"
    ids = encode(args.prompt)[-meta["config"]["block_size"]:]
    prompt = asarray(ids[None, :].astype("int64"))                                       # (1, P)
    for label, m in (("base model (pretrained on CPython docs)", base), (how, tuned)):
        m.eval()
        outp = m.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                          rng=default_rng(args.seed))
        print(f"=== {label} ===\n{decode(to_numpy(outp)[0])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
