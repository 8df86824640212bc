"""Training-step speed and peak memory: minilora full / LoRA / QLoRA next to PyTorch (+ PEFT), and the FLOP floor.

    python benchmarks/bench_train.py                 # GPT 4 layers x 256 wide, batch 8 x 128 tokens
    python benchmarks/bench_train.py --quick         # fewer repetitions (a smoke run, numbers are noisier)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_train.py   # where those are set

One step = zero_grad, forward, backward, AdamW update (the step a training loop repeats). The same GPT (same
weights, copied) runs in minilora (NumPy float32) and in PyTorch on CPU with the same number of threads; PyTorch
fine-tunes fully with torch.optim.AdamW and does LoRA through Hugging Face PEFT, with the same target modules
(c_attn, c_proj, c_fc: every Linear but lm_head, PEFT's "all-linear") and r = 8.

Timing: the cases run interleaved, a few steps each per round, so a load spike from other processes on this shared
machine hits every case alike; the table shows the median step and the spread (interquartile range).

Floor: the step's matrix-multiply FLOPs divided by this machine's measured float32 matmul rate. With P the weights
of the Linear layers and N = B·T tokens, full fine-tuning costs 6·N·P (forward 2NP, backward 2NP for dx and 2NP for
dW) plus attention (12·B·T²·C per layer: QKᵀ and AV, forward and backward); LoRA skips the frozen weights' dW, so
4·N·P plus attention plus the small adapters.

QLoRA runs twice: as is, and with gradient checkpointing (model.gradient_checkpointing_enable(), as the QLoRA paper
trains): each block keeps only its input and recomputes its activations in the backward. Its peak is checked
against <= 0.35x full fine-tuning's, with its step time next to QLoRA's.

Peak memory: tracemalloc is on from before the model is built (NumPy reports every array buffer to tracemalloc), so
after a warm-up step `reset_peak()` + one more step gives the largest total of live NumPy buffers during a step:
weights (the 4-bit base for QLoRA), gradients, optimizer states, the activations cached for the backward pass and
the temporaries. Python objects are included but tiny. PyTorch's allocations bypass tracemalloc, so its column is
left empty. The persistent part (weights, gradients, optimizer) is also counted array by array with
minilora.peft.memory_report, to show what the peak is made of.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # run from a checkout

CFG = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
BATCH, SEQ = 8, 128
TARGETS = ["c_attn", "c_proj", "c_fc"]           # every Linear except lm_head ("all-linear")
R, ALPHA = 8, 16
MODES = ("full", "lora", "qlora", "qlora+ckpt")  # qlora+ckpt: QLoRA with gradient checkpointing (the paper's setup)


# ---- this machine --------------------------------------------------------------------------------------------------

def blas_threads() -> tuple[int, str]:
    try:
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return info["num_threads"], f"{info['internal_api']} {info.get('version')} {info.get('architecture')}"
    except ImportError:
        pass
    return os.cpu_count() or 1, "unknown BLAS (pip install threadpoolctl to see it)"


def cpu_kind() -> str:
    """'AVX-512' or 'no AVX-512' (from /proc/cpuinfo) after the model name, or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


def matmul_rate(n=1024, repeats=7) -> float:
    """Best-of float32 GFLOP/s of an n x n x n NumPy matmul (2n³ FLOPs)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def step_flops(mode: str) -> float:
    """Matmul FLOPs of one training step (see the module docstring)."""
    C, L, V, N = CFG["n_embd"], CFG["n_layer"], CFG["vocab_size"], BATCH * SEQ
    per_layer = {"c_attn": (C, 3 * C), "attn.c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    P = L * sum(i * o for i, o in per_layer.values()) + C * V
    attention = L * 12 * BATCH * SEQ ** 2 * C
    if mode == "full":
        return 6 * N * P + attention
    adapters = L * sum(R * (i + o) for i, o in per_layer.values())
    return 4 * N * P + attention + 6 * N * adapters


# ---- minilora ------------------------------------------------------------------------------------------------------

def build_minilora(mode: str):
    from minilora.nn import GPT, GPTConfig
    from minilora.optim import AdamW
    model = GPT(GPTConfig(**CFG, dtype="float32"))
    if mode in ("qlora", "qlora+ckpt"):
        from minilora.peft import prepare_model_for_kbit_training, quantize_model
        model = prepare_model_for_kbit_training(quantize_model(model, quant_type="nf4", compress_statistics=True))
    if mode in ("lora", "qlora", "qlora+ckpt"):
        from minilora.peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    if mode == "qlora+ckpt":       # as the QLoRA paper trains: each block's activations recomputed in the backward
        model.gradient_checkpointing_enable()
    opt = AdamW(model.named_parameters(), lr=1e-4, weight_decay=0.0)

    def step(x, y):
        model.zero_grad()
        _, loss = model(x, y)
        model.backward()
        opt.step()
        return float(loss)
    return model, opt, step


def minilora_memory(mode: str, batches) -> dict:
    """Peak traced bytes during one step after a warm-up step, and the persistent arrays by category."""
    gc.collect()
    tracemalloc.start()
    try:
        model, opt, step = build_minilora(mode)
        step(*batches[0])                                   # allocates the optimizer states
        gc.collect()
        tracemalloc.reset_peak()
        step(*batches[1])
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = {"peak_bytes": peak, "after_step_bytes": current}
    try:
        from minilora.peft import memory_report
        out["arrays"] = memory_report(model, opt)
    except ImportError:
        pass
    return out


# ---- PyTorch -------------------------------------------------------------------------------------------------------

def build_torch(mode: str, init_state: dict):
    import torch
    from torch import nn
    from torch.nn import functional as F
    C, H, V, L = CFG["n_embd"], CFG["n_head"], CFG["vocab_size"], CFG["n_layer"]

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.act, self.c_proj = nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C)

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(C), Attn(), nn.LayerNorm(C), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(CFG["block_size"], C),
                                                  h=nn.ModuleList(Block() for _ in range(L)), ln_f=nn.LayerNorm(C)))
            self.lm_head = nn.Linear(C, V, bias=False)

        def forward(self, idx, targets):
            tr = self.transformer
            x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
            for block in tr.h:
                x = block(x)
            logits = self.lm_head(tr.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = TorchGPT()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in init_state.items()})
    if mode == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.item()
    return model, opt, step


# ---- the run -------------------------------------------------------------------------------------------------------

def time_cases(cases: dict, batches: dict, rounds: int, steps_per_round: int) -> dict:
    """Per-step seconds for each case, plus "matmul" (seconds of one 1024³ float32 matmul) measured in the same
    rounds, so the floor is computed with the matmul rate the machine delivered while the steps ran."""
    times = {name: [] for name in cases}
    times["matmul"] = []
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    for name, step in cases.items():                        # warm-up: states, caches, first-touch page faults
        for b in batches[name][:2]:
            step(*b)
    for r in range(rounds):
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            times["matmul"].append(time.perf_counter() - t0)
        for name, step in cases.items():
            for k in range(steps_per_round):
                x, y = batches[name][(r * steps_per_round + k) % len(batches[name])]
                t0 = time.perf_counter()
                step(x, y)
                times[name].append(time.perf_counter() - t0)
    return times


def summary(ts):
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_ms": 1e3 * statistics.median(ts), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "n": len(ts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch / PEFT cases")
    ap.add_argument("--threads", type=int, help="BLAS and torch threads (needs threadpoolctl; default: BLAS's)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps_per_round = 2, 2

    if args.threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            ap.error("--threads needs threadpoolctl (pip install threadpoolctl); or start with OPENBLAS_NUM_THREADS=N")
        threadpool_limits(args.threads)
    threads, blas = blas_threads()
    rate = matmul_rate()
    print(f"NumPy {np.__version__} ({blas}), {threads} BLAS threads; float32 matmul 1024³: {rate:.1f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU {cpu_kind()}")
    print(f"GPT {CFG['n_layer']} layers x {CFG['n_embd']} wide, {CFG['n_head']} heads, vocab {CFG['vocab_size']}; "
          f"batch {BATCH} x {SEQ} tokens; LoRA r={R} alpha={ALPHA} on {TARGETS}")

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, CFG["vocab_size"], (BATCH, SEQ + 1)) for _ in range(4)]
    host = [(s[:, :-1].copy(), s[:, 1:].copy()) for s in seqs]             # (B, T) inputs, (B, T) next tokens
    cases, batches, available = {}, {}, {}
    for mode in MODES:
        try:
            model, _, step = build_minilora(mode)
        except (ImportError, AttributeError, NotImplementedError) as e:
            available[f"minilora {mode}"] = f"not available ({type(e).__name__}: {e})"
            continue
        cases[f"minilora {mode}"], batches[f"minilora {mode}"] = step, host
        if mode == "full":
            init_state = {n: p.data for n, p in model.named_parameters()}
    first_loss = {}
    if not args.no_torch and "minilora full" in cases:
        try:
            import torch
            torch.set_num_threads(threads)
            tb = [tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in b) for b in host]
            for mode in ("full", "lora"):
                try:
                    _, _, step = build_torch(mode, init_state)
                except ImportError as e:
                    available[f"torch {mode}"] = f"not available ({e})"
                    continue
                name = "torch full (AdamW)" if mode == "full" else "torch + PEFT lora"
                cases[name], batches[name] = step, tb
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        except ImportError:
            print("torch not installed: PyTorch columns skipped")
    for name, step in cases.items():                         # same weights, same batch -> same first loss
        first_loss[name] = step(*batches[name][0])
    for name, why in available.items():
        print(f"{name}: {why}")

    times = time_cases(cases, batches, args.rounds, args.steps_per_round)
    rate_during = 2 * 1024 ** 3 / statistics.median(times.pop("matmul")) / 1e9
    print(f"float32 matmul 1024³ while the steps ran (median): {rate_during:.1f} GFLOP/s "
          f"(best of 7 before: {rate:.1f})")
    rate = rate_during
    res = {name: summary(ts) for name, ts in times.items()}
    for name in list(res):
        res[name]["first_loss"] = first_loss[name]
    mem = {}
    for mode in MODES:
        if f"minilora {mode}" in cases:
            mem[mode] = minilora_memory(mode, host)
            res[f"minilora {mode}"]["peak_mib"] = mem[mode]["peak_bytes"] / 2 ** 20

    floor = {"full": step_flops("full") / (rate * 1e9) * 1e3, "lora": step_flops("lora") / (rate * 1e9) * 1e3}
    print(f"\nfloor (matmul FLOPs / {rate:.0f} GFLOP/s): full {step_flops('full') / 1e9:.2f} GFLOP = "
          f"{floor['full']:.0f} ms, LoRA {step_flops('lora') / 1e9:.2f} GFLOP = {floor['lora']:.0f} ms\n")
    print(f"{'case':<22} {'step ms':>8} {'(q1-q3)':>15} {'x floor':>8} {'peak MiB':>9} {'first loss':>11}")
    for name, r in res.items():
        fl = floor["full" if "full" in name else "lora"]
        peak = f"{r['peak_mib']:9.1f}" if "peak_mib" in r else f"{'-':>9}"
        print(f"{name:<22} {r['median_ms']:8.1f} {r['q1_ms']:7.1f}-{r['q3_ms']:<7.1f} {r['median_ms'] / fl:8.2f} "
              f"{peak} {r['first_loss']:11.6f}")

    def med(name):
        return res[name]["median_ms"] if name in res else None

    checks = []

    def check(label, value, limit):
        if value is None:
            checks.append((label, None, limit, "n/a"))
        else:
            checks.append((label, value, limit, "PASS" if value <= limit else "MISS"))
    lora, full, qlora = med("minilora lora"), med("minilora full"), med("minilora qlora")
    tfull, tlora = med("torch full (AdamW)"), med("torch + PEFT lora")
    check("minilora LoRA / torch+PEFT LoRA", lora / tlora if lora and tlora else None, 1.0)
    check("minilora LoRA / minilora full", lora / full if lora and full else None, 0.75)
    check("minilora full / floor", full / floor["full"] if full else None, 1.5)
    check("minilora QLoRA / minilora LoRA", qlora / lora if qlora and lora else None, 1.3)
    ck = med("minilora qlora+ckpt")
    check("QLoRA+ckpt peak / full peak", mem["qlora+ckpt"]["peak_bytes"] / mem["full"]["peak_bytes"]
          if "qlora+ckpt" in mem and "full" in mem else None, 0.35)
    check("QLoRA+ckpt step / QLoRA step", ck / qlora if ck and qlora else None, math.inf)
    check("QLoRA peak / full peak (no ckpt)", mem["qlora"]["peak_bytes"] / mem["full"]["peak_bytes"]
          if "qlora" in mem and "full" in mem else None, math.inf)
    check("QLoRA persistent / full persistent",
          mem["qlora"]["arrays"]["total"] / mem["full"]["arrays"]["total"]
          if "arrays" in mem.get("qlora", {}) and "arrays" in mem.get("full", {}) else None, math.inf)
    check("minilora full / torch full", full / tfull if full and tfull else None, math.inf)
    print(f"\n{'ratio':<34} {'value':>7} {'target':>7}")
    for label, v, limit, verdict in checks:
        print(f"{label:<34} {(f'{v:.3f}') if v is not None else 'n/a':>7} "
              f"{(f'<= {limit:.2f}') if limit != math.inf else '':>7}  {verdict if limit != math.inf else ''}")

    if mem:
        small = [(x[:1], y[:1]) for x, y in host]            # activations scale with tokens; weights do not
        mem1 = {mode: minilora_memory(mode, small) for mode in mem}
        print(f"\npeak MiB at batch 8 x {SEQ} and at batch 1 x {SEQ} (activations are ~1/8):")
        for mode in mem:
            print(f"  {mode:<6} {mem[mode]['peak_bytes'] / 2 ** 20:8.1f} {mem1[mode]['peak_bytes'] / 2 ** 20:8.1f}")
        if "qlora" in mem1 and "full" in mem1:
            ratio = mem1["qlora"]["peak_bytes"] / mem1["full"]["peak_bytes"]
            print(f"  QLoRA peak / full peak at batch 1: {ratio:.2f}")
        for mode in mem:
            mem[mode]["peak_bytes_batch1"] = mem1[mode]["peak_bytes"]
        print("\npersistent arrays after a step (memory_report), MiB, and the traced peak:")
        print(f"{'mode':<6} {'frozen':>8} {'4-bit':>7} {'train':>7} {'grads':>7} {'optim':>7} {'total':>7} "
              f"{'peak':>7} {'peak-total':>10}   (peak-total: activations cached for backward + temporaries)")
        for mode, m in mem.items():
            a = m.get("arrays")
            if a:
                mib = {k: a[k] / 2 ** 20 for k in ("frozen_float", "frozen_4bit", "trainable", "gradients",
                                                    "optimizer", "total")}
                print(f"{mode:<6} {mib['frozen_float']:8.2f} {mib['frozen_4bit']:7.2f} {mib['trainable']:7.2f} "
                      f"{mib['gradients']:7.2f} {mib['optimizer']:7.2f} {mib['total']:7.2f} "
                      f"{m['peak_bytes'] / 2 ** 20:7.2f} {(m['peak_bytes'] - a['total']) / 2 ** 20:10.2f}")
    if args.json:
        out = {"config": dict(CFG, batch=BATCH, seq=SEQ, r=R, alpha=ALPHA, targets=TARGETS), "threads": threads,
               "cpu": cpu_kind(), "load_average": os.getloadavg(),
               "blas": blas, "matmul_gflops": rate, "floor_ms": floor, "cases": res,
               "memory": {k: {kk: vv for kk, vv in v.items()} for k, v in mem.items()},
               "checks": [dict(label=c[0], value=c[1], limit=None if c[2] == math.inf else c[2], verdict=c[3])
                          for c in checks]}
        from minilora.io import atomic_write_text  # imported here: a partial results file never replaces a good one
        atomic_write_text(args.json, json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
