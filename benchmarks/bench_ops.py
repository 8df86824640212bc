"""Per-op profile of bench_train.py's step: each op of minilora next to its PyTorch (+ PEFT, bitsandbytes) peer.

    python benchmarks/bench_ops.py [--threads 1,2] [--rounds 7] [--json FILE]
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_ops.py   # where those are set

Same model and batch as bench_train.py: GPT 4 layers x 256 wide, 4 heads, vocabulary 256, batch 8 x 128 tokens
(N = 1024 rows), LoRA r = 8 on c_attn, c_proj, c_fc. For each op the time is forward + backward (autograd on the
torch side) at that op's shapes, times the number of calls in one training step:

    matmul (full)     the Linear layers' x Wᵀ + b, dx, dW, db: per layer c_attn, attn c_proj, c_fc, mlp c_proj
                      (4 per layer), plus lm_head (C -> V)
    matmul (LoRA)     the same with the weight frozen: x Wᵀ + b and dx only (LoRA's saved dW matmul)
    attention         q kᵀ and p v as batched matmuls, the causal mask and the softmax, forward + backward, per layer
    softmax           the softmax alone on (B, H, T, T): mask, max, exp, sum, scale; backward p (dp - D) (included
                      in attention above: shown to split it)
    GELU              tanh GELU on (N, 4C), per layer
    LayerNorm         (N, C), 2 per layer + the final one
    embedding scatter dW of the token embedding (a scatter-add of (N, C) rows into (V, C)), once
    AdamW             one update of every trainable parameter (full: all weights; LoRA: the adapters)
    LoRA branch       s (x Aᵀ) Bᵀ and its dA, dB, dx, per adapted Linear (4 per layer); PEFT's lora_A / lora_B
    dequantize        NF4 + DQ weights of the 4-bit layers, twice a step (forward and backward); bitsandbytes

Then each op's share of minilora's own step (full, LoRA, QLoRA; bench_train.py's model and batch): the library's
op functions (minilora.nn.functional, adamw_update, dequantize_4bit) are wrapped with timers for a few steps, and
"other" is the rest of the step (residual adds, reshapes, dropout, the layers' bookkeeping). This is what
attributes a ratio: e.g. LoRA / full = sum over ops of (the op's ms in the LoRA step) / (the full step's ms).

Each op runs interleaved with its peer for `--rounds` rounds (a neighbour's load hits both alike); the table shows
the median ms per step, the ratio (minilora / torch), and the kernel each side runs: NumPy's BLAS (threadpoolctl's
kernel name) or the SIMD level NumPy's elementwise loops were built for (numpy.show_config), and torch's. At each
thread count both libraries get the same count (minilora.threads.set_num_threads and torch.set_num_threads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                          # bench_train
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

_threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _threads is None and "--threads" in sys.argv[:-1]:
    _threads = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("OMP_NUM_THREADS", str(max(int(t) for t in (_threads or "1,2").split(","))))

import numpy as np  # noqa: E402

from minilora.nn import functional as F  # noqa: E402
from minilora.nn.parameter import Parameter  # noqa: E402
from minilora.optim import AdamW  # noqa: E402
from minilora.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from minilora.threads import blas_info, get_num_threads, set_num_threads  # noqa: E402

L, C, H, V, B, T, R, SCALE = 4, 256, 4, 256, 8, 128, 8, 2.0
N = B * T
LINEARS = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]          # (D_in, D_out) per layer
LORA_LINEARS = LINEARS                                          # c_attn, c_proj (both), c_fc


def numpy_simd() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        return "?"
    for name in ("AVX512_SPR", "AVX512_ICL", "AVX512_SKX", "AVX512F", "AVX2", "SSE42"):
        if feats.get(name):
            return name
    return "baseline"


def cpu_kind() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


def median_pair(ours, theirs, rounds):
    """Median seconds of each over interleaved rounds, after one warm-up call each."""
    ours()
    theirs()
    a, b = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs()
        b.append(time.perf_counter() - t)
    return sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]


def build_ops(torch):
    """{name: (minilora step fn, torch step fn, numpy kernel, torch kernel)}: each fn does one step's worth."""
    rng = np.random.default_rng(0)

    def f32(*shape, s=1.0):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    tt = torch.from_numpy
    ops = {}

    # matmul: every Linear of the step, forward and backward
    lin = [(f32(N, i), f32(o, i, s=0.02), f32(o), f32(N, o)) for i, o in LINEARS] * L + \
        [(f32(N, C), f32(V, C, s=0.02), None, f32(N, V))]

    def mm(frozen):
        def run():
            for x, W, b, dy in lin:
                F.linear_forward(x, W, b)
                F.linear_backward(dy, x, W, need_dW=not frozen, need_db=not frozen and b is not None)
        return run

    tlin = [(tt(x).requires_grad_(), tt(W).requires_grad_(), None if b is None else tt(b).requires_grad_(), tt(dy))
            for x, W, b, dy in lin]

    def tmm(frozen):
        def run():   # requires_grad is set on each call: both cases share the tensors, and are built before timing
            for x, W, b, dy in tlin:
                W.requires_grad_(not frozen)
                if b is not None:
                    b.requires_grad_(not frozen)
                y = torch.nn.functional.linear(x, W, b)
                y.backward(dy)
        return run

    blas = blas_info()
    kern = f"{blas[0]['internal_api']} {blas[0]['architecture']}" if blas else "BLAS ?"
    tk = "oneDNN/MKL sgemm" if torch.backends.mkldnn.is_available() else "torch sgemm"
    ops["matmul (full)"] = (mm(False), tmm(False), kern, tk)
    ops["matmul (LoRA, frozen W)"] = (mm(True), tmm(True), kern, tk)

    # attention
    qkv, dya = f32(N, 3 * C), f32(N, C)

    def att():
        for _ in range(L):
            y, cache = F.attention_forward(qkv, B, T, H)
            F.attention_backward(dya, cache)
    tq = tt(qkv).requires_grad_()
    tdy = tt(dya)

    def tatt():
        for _ in range(L):
            q, k, v = tq.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.transpose(1, 2).reshape(N, C).backward(tdy)
    simd = f"NumPy {numpy_simd()} loops"
    ops["attention (matmuls + softmax)"] = (att, tatt, f"{kern} batched + {simd}", "SDPA (flash, CPU)")

    # softmax alone (the attention's scores)
    sc, dps = f32(B, H, T, T), f32(B, H, T, T)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)

    def sm():
        for _ in range(L):
            p = sc + mask
            p -= p.max(axis=-1, keepdims=True)
            np.exp(p, out=p)
            p *= 1.0 / p.sum(axis=-1, keepdims=True)
            D = (dps * p).sum(axis=-1, keepdims=True)
            ds = dps - D
            ds *= p
    tsc = tt(sc).requires_grad_()
    tmask = tt(mask)
    tdps = tt(dps)

    def tsm():
        for _ in range(L):
            torch.softmax(tsc + tmask, dim=-1).backward(tdps)
    ops["softmax (part of attention)"] = (sm, tsm, simd, "torch vectorized softmax")

    # GELU
    xg, dyg = f32(N, 4 * C), f32(N, 4 * C)

    def gelu():
        for _ in range(L):
            _, cache = F.gelu_forward(xg)
            F.gelu_backward(dyg, cache)
    txg, tdyg = tt(xg).requires_grad_(), tt(dyg)

    def tgelu():
        for _ in range(L):
            torch.nn.functional.gelu(txg, approximate="tanh").backward(tdyg)
    ops["GELU"] = (gelu, tgelu, simd, "torch vectorized gelu")

    # LayerNorm
    xl, dyl, wl, bl = f32(N, C), f32(N, C), f32(C), f32(C)

    def ln():
        for _ in range(2 * L + 1):
            _, cache = F.layernorm_forward(xl, wl, bl)
            F.layernorm_backward(dyl, cache, wl)
    txl, twl, tbl, tdyl = tt(xl).requires_grad_(), tt(wl).requires_grad_(), tt(bl).requires_grad_(), tt(dyl)

    def tln():
        for _ in range(2 * L + 1):
            torch.nn.functional.layer_norm(txl, (C,), twl, tbl).backward(tdyl)
    ops["LayerNorm"] = (ln, tln, simd, "torch native_layer_norm")

    # embedding scatter
    idx = rng.integers(0, V, (B, T))
    dye = f32(B, T, C)
    tidx, twe, tdye = tt(idx), tt(f32(V, C)).requires_grad_(), tt(dye)

    def emb():
        F.embedding_backward(dye, idx, (V, C))

    def temb():
        torch.nn.functional.embedding(tidx, twe).backward(tdye)
    ops["embedding scatter (dW)"] = (emb, temb, "np.add.at", "embedding_dense_backward")

    # AdamW
    def adam_case(shapes):   # each library's optimizer object, as a training step runs it
        ps = [Parameter(f32(*s)) for s in shapes]
        for p in ps:
            p.grad = f32(*p.data.shape)
        tps = [torch.nn.Parameter(tt(p.data.copy())) for p in ps]
        for p, q in zip(tps, ps, strict=True):
            p.grad = tt(q.grad)
        ours = AdamW(ps, lr=1e-4, weight_decay=0.0)
        return ours.step, torch.optim.AdamW(tps, lr=1e-4, weight_decay=0.0).step
    full_shapes = [(o, i) for i, o in LINEARS] * L + [(o,) for _, o in LINEARS] * L + [(V, C), (T, C)] + \
        [(C,)] * (4 * L + 2)
    lora_shapes = [s for i, o in LORA_LINEARS for s in ((R, i), (o, R))] * L
    a, b = adam_case(full_shapes)
    ops["AdamW (full: all weights)"] = (a, b, simd, "torch AdamW (single-tensor CPU loop)")
    a, b = adam_case(lora_shapes)
    ops["AdamW (LoRA: adapters)"] = (a, b, simd, "torch AdamW (single-tensor CPU loop)")

    # the LoRA branch
    lb = [(f32(N, i), f32(R, i, s=0.02), f32(o, R, s=0.02), f32(N, o)) for i, o in LORA_LINEARS] * L

    def lora():
        for x, A, Bm, dy in lb:
            _, cache = F.lora_forward(x, A, Bm, SCALE)
            F.lora_backward(dy, cache, A, Bm, SCALE)
    tlb = []
    for x, A, Bm, dy in lb:
        la = torch.nn.Linear(A.shape[1], R, bias=False)
        lbm = torch.nn.Linear(R, Bm.shape[0], bias=False)
        with torch.no_grad():
            la.weight.copy_(tt(A))
            lbm.weight.copy_(tt(Bm))
        tlb.append((tt(x).requires_grad_(), la, lbm, tt(dy)))

    def tlora():   # PEFT's Linear.forward: result + lora_B(lora_A(dropout(x))) * scaling
        for x, la, lbm, dy in tlb:
            (lbm(la(x)) * SCALE).backward(dy)
    ops["LoRA branch"] = (lora, tlora, f"{kern} (thin matmuls)", "torch nn.Linear x2 (PEFT)")

    # dequantize (QLoRA): every 4-bit weight, forward and backward
    try:
        import bitsandbytes.functional as bnbF
        ws = [f32(o, i, s=0.02) for i, o in LINEARS] * L
        qs = [quantize_4bit(w, 64, "nf4", True) for w in ws]
        tqs = [bnbF.quantize_4bit(tt(w), blocksize=64, quant_type="nf4", compress_statistics=True) for w in ws]

        def dq():
            for _ in range(2):
                for p, st in qs:
                    dequantize_4bit(p, st)

        def tdq():
            for _ in range(2):
                for p, st in tqs:
                    bnbF.dequantize_4bit(p, st)
        ops["dequantize (QLoRA, NF4+DQ)"] = (dq, tdq, "np.take pair table", "bnb CPU C++ kernel")
    except ImportError:
        pass
    return ops


CATEGORY = {"linear_forward": "matmul", "linear_backward": "matmul", "attention_forward": "attention",
            "attention_backward": "attention", "gelu_forward": "GELU", "gelu_backward": "GELU",
            "layernorm_forward": "LayerNorm", "layernorm_backward": "LayerNorm", "embedding_forward": "embedding",
            "embedding_backward": "embedding scatter", "lora_forward": "LoRA branch", "lora_backward": "LoRA branch",
            "cross_entropy_forward": "cross-entropy", "cross_entropy_backward": "cross-entropy"}


def step_shares(steps: int = 3) -> dict:
    """{mode: {category: ms per step, "step": ms}} for minilora's full / LoRA / QLoRA step, by wrapping the op
    functions where the layers look them up."""
    import bench_train as bt

    import minilora.nn.linear4bit as l4
    import minilora.nn.lora as lora_mod
    import minilora.optim.adamw as adamw_mod
    acc = {}

    def timed(fn, cat):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[cat] = acc.get(cat, 0.0) + time.perf_counter() - t
        return wrapper
    patches = [(F, name, cat) for name, cat in CATEGORY.items()] + [(adamw_mod, "adamw_update", "AdamW"),
                                                                   (l4, "dequantize_4bit", "dequantize"),
                                                                   (lora_mod, "dequantize_4bit", "dequantize")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, (B, T + 1)) for _ in range(2)]
    batches = [(q[:, :-1].copy(), q[:, 1:].copy()) for q in seqs]
    out = {}
    try:
        for mod, name, cat in patches:
            setattr(mod, name, timed(getattr(mod, name), cat))
        for mode in ("full", "lora", "qlora"):
            _, _, step = bt.build_minilora(mode)
            step(*batches[0])                                # optimizer states, caches
            acc.clear()
            t = time.perf_counter()
            for i in range(steps):
                step(*batches[i % 2])
            total = (time.perf_counter() - t) / steps * 1e3
            row = {cat: ms / steps * 1e3 for cat, ms in acc.items()}
            row["other"] = total - sum(row.values())
            row["step"] = total
            out[mode] = row
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return out


def print_shares(shares: dict) -> None:
    cats = [c for c in ("matmul", "attention", "GELU", "LayerNorm", "embedding", "embedding scatter", "cross-entropy",
                        "LoRA branch", "dequantize", "AdamW", "other") if any(c in r for r in shares.values())]
    full = shares["full"]["step"]
    print("| op (minilora step) | full ms | share | LoRA ms | share | LoRA ms / full step | QLoRA ms | share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cats + ["step"]:
        f, lo, q = (shares[m].get(c, 0.0) for m in ("full", "lora", "qlora"))
        print(f"| {c} | {f:.1f} | {f / shares['full']['step']:.0%} | {lo:.1f} | {lo / shares['lora']['step']:.0%} | "
              f"{lo / full:.3f} | {q:.1f} | {q / shares['qlora']['step']:.0%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (each library at each count)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--steps", type=int, default=3, help="steps per mode for the step shares")
    args = ap.parse_args(argv)
    import torch
    counts = [int(t) for t in args.threads.split(",")]
    print(f"CPU: {cpu_kind()}, {os.cpu_count()} cores; NumPy {np.__version__} (elementwise SIMD {numpy_simd()}), "
          f"BLAS {blas_info()}; torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})")
    print(f"GPT {L} x {C}, {H} heads, vocab {V}, batch {B} x {T}, LoRA r={R}; ms per training step, median of "
          f"{args.rounds} interleaved rounds")
    ops = build_ops(torch)
    results = {"cpu": cpu_kind(), "numpy_simd": numpy_simd(), "blas": blas_info(),
               "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": []}
    for threads in counts:
        set_num_threads(threads)
        torch.set_num_threads(threads)
        load0 = os.getloadavg()[0]
        rows = []
        for name, (ours, theirs, k1, k2) in ops.items():
            a, b = median_pair(ours, theirs, args.rounds)
            rows.append({"op": name, "minilora_ms": a * 1e3, "torch_ms": b * 1e3, "numpy_kernel": k1,
                         "torch_kernel": k2})
        load1 = os.getloadavg()[0]
        print(f"\nthreads: minilora {get_num_threads()} (BLAS), torch {torch.get_num_threads()}; "
              f"load average {load0:.2f} -> {load1:.2f}")
        print("| op | minilora ms | torch ms | minilora / torch | minilora kernel | torch kernel |")
        print("|---|---:|---:|---:|---|---|")
        for r in rows:
            print(f"| {r['op']} | {r['minilora_ms']:.1f} | {r['torch_ms']:.1f} | "
                  f"{r['minilora_ms'] / r['torch_ms']:.2f} | {r['numpy_kernel']} | {r['torch_kernel']} |")
        shares = step_shares(args.steps)
        print(f"\nminilora's step by op, {threads} thread(s) (load average {os.getloadavg()[0]:.2f}):")
        print_shares(shares)
        results["runs"].append({"threads": threads, "load_average": [load0, load1], "rows": rows, "shares": shares})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
