"""Benchmark: minilora's NF4 quantize_4bit / dequantize_4bit against bitsandbytes on CPU, in the same process.

    python benchmarks/bench_quant.py [--n 16777216] [--rounds 7] [--threads 1,2]

For 16M float32 values (NF4, blocksize 64, with and without double quantization) it prints, at each thread count
(both libraries at the same count: minilora.threads.set_num_threads, which dequantize_4bit's thread split follows,
and torch.set_num_threads, which sets bnb's OpenMP threads), the median time over interleaved rounds (minilora,
then bnb, then the next round: a neighbour's load hits both alike), throughput (M elements/s and GB/s of memory
traffic), the ratio to bitsandbytes (bnb's median / minilora's), and the fraction of this machine's memory
bandwidth (a large np.copyto) reached; then the peak extra memory (tracemalloc) while quantizing, beyond the
outputs: minilora works in cache-sized chunks, so it must not grow with the input.

Targets: quantize >= 3x bnb's CPU throughput, dequantize >= 1.5x bnb's CPU C++ kernel, at every thread count. The
reference quantizer (minilora/quant/reference.py, the readable version that gives the same bytes) is timed on the
same input at the first thread count, for scale. Then one thread's dequantize is split into the stages of its chunk
loop (widen, gather, scale, fresh output), each timed over the whole tensor. Quantize is single-threaded in
minilora; dequantize splits its chunks over threads above 2M values. OpenBLAS is not involved in any of these.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from functools import partial

# bnb's CPU kernels run on torch's OpenMP runtime, whose pool size is read at load time: allow the largest count
# asked for before torch is imported; torch.set_num_threads then picks each count.
_threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _threads is None and "--threads" in sys.argv[:-1]:
    _threads = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("OMP_NUM_THREADS", str(max(int(t) for t in (_threads or "1,2").split(","))))

import numpy as np  # noqa: E402

from minilora.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from minilora.quant.reference import dequantize_4bit_reference, quantize_4bit_reference  # noqa: E402
from minilora.threads import blas_info, get_num_threads, limit_threads, set_num_threads  # noqa: E402


def best_time(fn, repeats):
    fn()                                                                 # warm-up (caches, lazy tables, compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median_times(ours, theirs, rounds):
    """Median seconds of each over `rounds` interleaved rounds (after one warm-up call each); nan for no `theirs`."""
    fns = [f for f in (ours, theirs) if f]
    for f in fns:
        f()                                                              # warm-up (caches, lazy tables)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    meds = [sorted(ts)[len(ts) // 2] for ts in times]
    return meds[0], (meds[1] if theirs else float("nan"))


def dequantize_stages(packed, state, rounds):
    """ms per 1-thread dequantize (no DQ) spent in each stage of minilora's chunk loop, cumulatively: widen the bytes
    to intp indices, gather the pair table, scale each block by its absmax (all into a reused buffer), then the
    whole call with a fresh output (the rest: page faults and first writes of new memory)."""
    from minilora.quant.blockwise import chunk_size
    from minilora.quant.fourbit import pair_table
    src, lut, bs = packed.reshape(-1), pair_table(state.code, np), state.blocksize
    out, chunk = np.empty(2 * src.size, np.float32), chunk_size(np, bs)
    idx = np.empty(chunk // 2, np.intp)

    def loop(stages):
        for s in range(0, out.size, chunk):
            i, dst = idx[:(min(s + chunk, out.size) - s) // 2], out[s:s + chunk]
            np.copyto(i, src[s // 2:s // 2 + i.size], casting="unsafe")
            if stages > 1:
                np.take(lut, i, out=dst.view(np.uint64), mode="wrap")
            if stages > 2:
                dst.reshape(-1, bs)[...] *= state.absmax[s // bs:(s + dst.size) // bs, None]
    t = [median_times(partial(loop, k), None, rounds)[0] for k in (1, 2, 3)]
    t.append(median_times(partial(dequantize_4bit, packed, state, threads=1), None, rounds)[0])
    names = ["widen bytes to intp indices", "gather the 256-entry pair table", "scale each block by its absmax",
             "fresh output (page faults, first writes)"]
    return [(name, (t[k] - (t[k - 1] if k else 0)) * 1e3) for k, name in enumerate(names)] + [("total", t[3] * 1e3)]


def copy_bandwidth(n, repeats):
    src = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    t = best_time(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / t                                            # bytes read + written per second


def cpu_kind() -> str:
    """'AVX-512' or 'no AVX-512' (from /proc/cpuinfo), with the CPU model name when it is known."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return f"{platform.processor() or platform.machine()} (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}, {os.cpu_count()} cores"


def traffic(n, dq, op):
    """Bytes an ideal kernel must move: quantize reads 4n, writes n/2 + stats; dequantize the reverse."""
    stats = n // 64 * (1 if dq else 4) + (n // 64 // 256 * 4 if dq else 0)
    return 4 * n + n // 2 + stats


def peak_extra(fn, outputs_nbytes):
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak - outputs_nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated thread counts, each used by both libraries (default 1,2)")
    args = ap.parse_args(argv)
    n = args.n
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    xw = x.reshape(-1, 4096) if n % 4096 == 0 else x     # timed as a weight matrix: bnb threads 2-D inputs only

    counts = [int(t) for t in args.threads.split(",")]
    print(f"n = {n:,} float32 ({x.nbytes / 2**20:.0f} MiB) as a {xw.shape} weight, NF4, blocksize 64; "
          f"median of {args.rounds} rounds")
    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print(f"CPU: {cpu_kind()}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; BLAS {blas_info()}")
    bw = copy_bandwidth(n, args.rounds)
    print(f"memory bandwidth (np.copyto, read + write): {bw / 1e9:.1f} GB/s\n")

    try:
        import bitsandbytes.functional as F
        import torch
        xt = torch.from_numpy(xw)
        print(f"bitsandbytes {__import__('bitsandbytes').__version__}, torch {torch.__version__}, "
              f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    except ImportError as e:
        F = None
        print(f"(bitsandbytes not available: {e}; minilora numbers only)\n")

    rows = []                                                            # (threads, op, ours s, bnb s, bytes)
    for threads in counts:
        set_num_threads(threads)
        if F:
            torch.set_num_threads(threads)
        print(f"threads: minilora {get_num_threads()} (BLAS limit, followed by dequantize_4bit), "
              f"bnb {torch.get_num_threads() if F else '-'} (torch.set_num_threads)", flush=True)
        for dq in (False, True):
            p, st = quantize_4bit(xw, blocksize=64, quant_type="nf4", compress_statistics=dq)
            out = np.empty_like(xw)
            ops = {    # each call bound now (functools.partial), not looked up when timed
                "quantize": (partial(quantize_4bit, xw, 64, "nf4", dq),
                             partial(F.quantize_4bit, xt, blocksize=64, quant_type="nf4", compress_statistics=dq)
                             if F else None),
                "dequantize": (partial(dequantize_4bit, p, st), None),
                "dequantize(out=)": (partial(dequantize_4bit, p, st, out=out), None),
            }
            if F:
                tp, ts = F.quantize_4bit(xt, blocksize=64, quant_type="nf4", compress_statistics=dq)
                tout = torch.empty_like(xt)
                ops["dequantize"] = (ops["dequantize"][0], partial(F.dequantize_4bit, tp, ts))
                try:                                                     # bnb 0.50.2 has no CPU kernel for .out
                    F.dequantize_4bit(tp, ts, out=tout)
                    ops["dequantize(out=)"] = (ops["dequantize(out=)"][0],
                                               partial(F.dequantize_4bit, tp, ts, out=tout))
                except (NotImplementedError, RuntimeError):
                    pass
            if not dq and threads == counts[0]:   # the readable reference (same bytes), against the same bnb calls
                ops["reference quantize"] = (partial(quantize_4bit_reference, xw, 64, "nf4"), ops["quantize"][1])
                ops["reference dequantize"] = (partial(dequantize_4bit_reference, p, st), ops["dequantize"][1])
            for name, (ours, theirs) in ops.items():
                t_ours, t_bnb = median_times(ours, theirs, args.rounds)
                rows.append((threads, name + (" +DQ" if dq else ""), t_ours, t_bnb, traffic(n, dq, name)))
    print(f"load average after timing: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")

    print(f"{'threads':>7} {'op':<22} {'minilora ms':>11} {'bnb ms':>8} {'Melem/s':>8} {'GB/s':>6} {'vs bnb':>7} "
          f"{'of bw':>6}")
    print("(vs bnb = bnb median / minilora median; 'nan' = bnb has no such CPU op; dequantize(out=) reuses a buffer)")
    for threads, name, t_ours, t_bnb, nbytes in rows:
        print(f"{threads:>7} {name:<22} {t_ours * 1e3:>11.1f} {t_bnb * 1e3:>8.1f} {n / t_ours / 1e6:>8.0f} "
              f"{nbytes / t_ours / 1e9:>6.2f} {t_bnb / t_ours:>6.2f}x {nbytes / t_ours / bw:>6.1%}")

    p, st = quantize_4bit(xw, 64, "nf4", False)
    with limit_threads(1):
        stages = dequantize_stages(p, st, args.rounds)
    print("\nwhere one thread's dequantize (no DQ) spends its time, ms (each stage timed over the whole tensor):")
    for name, ms in stages:
        print(f"  {name:<42} {ms:6.1f}")

    print("\npeak extra memory while quantizing (tracemalloc), beyond the outputs:")
    for m in (n // 16, n):
        xm = x[:m]
        for dq in (False, True):
            p, st = quantize_4bit(xm, 64, "nf4", dq)
            outputs = p.nbytes + st.stats_nbytes
            extra = peak_extra(partial(quantize_4bit, xm, 64, "nf4", dq), outputs)
            extra_d = peak_extra(partial(dequantize_4bit, p, st), m * 4)
            print(f"  n = {m:>10,} DQ={dq!s:<5}  quantize: outputs {outputs / 2**20:7.2f} MiB, extra "
                  f"{extra / 2**20:6.2f} MiB | dequantize: extra {extra_d / 2**20:6.2f} MiB")
    if F:
        print()
        for threads in counts:
            q = [r for r in rows if r[0] == threads and r[1].startswith("quantize")]
            d = [r for r in rows if r[0] == threads and r[1] in ("dequantize", "dequantize +DQ")]
            qr = min(r[3] / r[2] for r in q)
            dr = min(r[3] / r[2] for r in d)
            print(f"targets at {threads} thread(s) each: quantize >= 3x bnb: {qr:.2f}x "
                  f"{'PASS' if qr >= 3 else 'MISS'}; "
                  f"dequantize >= 1.5x bnb (worse of plain and DQ): {dr:.2f}x {'PASS' if dr >= 1.5 else 'MISS'}")
    times = {r[1]: r[2] for r in rows if r[0] == counts[0]}
    print(f"reference: quantize {times['reference quantize'] / times['quantize']:.1f}x slower than the fast path, "
          f"dequantize {times['reference dequantize'] / times['dequantize']:.1f}x (same bytes; for reading, not speed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
