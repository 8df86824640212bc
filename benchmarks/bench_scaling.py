"""How a LoRA step's cost grows: step time and peak memory against width, sequence length and rank, for minilora
and PyTorch + PEFT side by side, with the ratio at each point.

    python benchmarks/bench_scaling.py --out DIR [--threads 1] [--rounds 3] [--no-torch]
    minilora figures --only scaling --from-run DIR        # figures/scaling.png from the saved DIR/scaling.json

Three sweeps around a base point (GPT with `--layers` layers, head size 64, vocabulary 256, batch `--batch`, LoRA
r = 8 on c_attn, c_proj, c_fc as bench_train.py): width 128 -> 768 (T = 128), sequence length 128 -> 1024
(width 256) and rank 1 -> 64 (width 256, T = 128). One step = zero_grad, forward, backward, AdamW on the adapters.
Times are medians of `--rounds` interleaved rounds (minilora, then torch, one step each, after a warm-up step).

Peak memory: minilora's is tracemalloc's peak during one step (every NumPy buffer: weights, adapters, states,
activations, temporaries). PyTorch's allocations bypass tracemalloc, so its peak is the bytes live before the step
(parameters, gradients, optimizer states, counted tensor by tensor) plus the largest running total, in time order,
of each op's own net allocation and the frees that torch.profiler(profile_memory=True) records during the step. A
temporary that an op allocates and frees inside itself is not seen, so torch's peak is a slight underestimate.

Writes DIR/scaling.json and DIR/scaling.png (the figure `minilora figures` redraws from that JSON).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                          # bench_train
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

import bench_train as bt  # noqa: E402

WIDTHS = (128, 256, 384, 512, 768)
SEQS = (128, 256, 512, 1024)
RANKS = (1, 4, 16, 64)


def configure(width: int, seq: int, rank: int, layers: int) -> None:
    """Point bench_train's model builders at this size (they read its module-level settings)."""
    bt.CFG = dict(vocab_size=256, block_size=seq, n_layer=layers, n_head=max(1, width // 64), n_embd=width)
    bt.R, bt.ALPHA = rank, 2 * rank


def torch_peak(model, opt, step, x, y) -> float:
    """Bytes: tensors live before the step (parameters, gradients, optimizer states) + the profiler's largest
    running total of allocations during it."""
    import torch
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    live += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    live += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y)
    # each op's own net allocation (children excluded) and the frees the profiler records apart, in time order
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    total = peak = 0
    for _, delta in events:
        total += delta
        peak = max(peak, total)
    return live + peak


def measure(width, seq, rank, args) -> dict:
    configure(width, seq, rank, args.layers)
    rng = np.random.default_rng(0)
    s = rng.integers(0, 256, (args.batch, seq + 1))
    x, y = s[:, :-1].copy(), s[:, 1:].copy()
    full, _, _ = bt.build_minilora("full")                   # the seeded GPT: the weights torch copies
    init_state = {n: p.data for n, p in full.named_parameters()}
    _, _, step = bt.build_minilora("lora")                    # the same seeded weights, with adapters
    cases = {"minilora": (step, (x, y))}
    tmodel = None
    if not args.no_torch:
        import torch
        tmodel, topt, tstep = bt.build_torch("lora", init_state)
        cases["torch"] = (tstep, (torch.from_numpy(x), torch.from_numpy(y)))
    for fn, b in cases.values():                              # warm-up: optimizer states, caches, page faults
        fn(*b)
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (fn, b) in cases.items():
            t0 = time.perf_counter()
            fn(*b)
            times[k].append(time.perf_counter() - t0)
    point = {"minilora_ms": statistics.median(times["minilora"]) * 1e3}
    point["minilora_peak_mib"] = minilora_peak(x, y) / 2 ** 20
    if tmodel is not None:
        point["torch_ms"] = statistics.median(times["torch"]) * 1e3
        point["ratio"] = point["minilora_ms"] / point["torch_ms"]
        point["torch_peak_mib"] = torch_peak(tmodel, topt, tstep, *cases["torch"][1]) / 2 ** 20
    return point


def minilora_peak(x, y) -> float:
    """tracemalloc's peak during one step of a model built while tracing (weights and states included)."""
    gc.collect()
    tracemalloc.start()
    try:
        _, _, step2 = bt.build_minilora("lora")
        step2(x, y)                                           # optimizer states
        gc.collect()
        tracemalloc.reset_peak()
        step2(x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for scaling.json and scaling.png")
    ap.add_argument("--threads", type=int, default=1, help="threads for both libraries (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from minilora.threads import blas_info, get_num_threads, set_num_threads
    set_num_threads(args.threads)
    torch_threads = None
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
        torch_threads = torch.get_num_threads()
    print(f"CPU {bt.cpu_kind()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; threads: minilora "
          f"{get_num_threads()} ({blas_info()}), torch {torch_threads}")
    print(f"LoRA step, {args.layers} layers, batch {args.batch}, head size 64; median of {args.rounds} rounds")
    sweeps = {"width": [(w, 128, 8) for w in WIDTHS], "seq": [(256, t, 8) for t in SEQS],
              "rank": [(256, 128, r) for r in RANKS]}
    result = {"cpu": bt.cpu_kind(), "config": {"n_layer": args.layers, "batch": args.batch, "head_size": 64,
                                               "threads": args.threads, "torch_threads": torch_threads,
                                               "vocab_size": 256, "base": {"width": 256, "seq": 128, "rank": 8}},
              "load_average": [os.getloadavg()[0]], "axes": {}}
    for axis, pts in sweeps.items():
        print(f"\n{axis:>6} {'minilora ms':>12} {'torch ms':>9} {'ratio':>6} {'minilora MiB':>13} {'torch MiB':>10}")
        result["axes"][axis] = []
        for width, seq, rank in pts:
            p = measure(width, seq, rank, args)
            p["x"] = {"width": width, "seq": seq, "rank": rank}[axis]
            result["axes"][axis].append(p)
            print(f"{p['x']:>6} {p['minilora_ms']:12.1f} {p.get('torch_ms', float('nan')):9.1f} "
                  f"{p.get('ratio', float('nan')):6.2f} {p['minilora_peak_mib']:13.1f} "
                  f"{p.get('torch_peak_mib', float('nan')):10.1f}", flush=True)
    result["load_average"].append(os.getloadavg()[0])
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    from minilora.apps.scaling_plots import scaling_figure
    print(f"\nwrote {args.out / 'scaling.json'} and {scaling_figure(result, args.out / 'scaling.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
