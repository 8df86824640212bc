# %% [markdown]
# # 09 · Appendix: the GPU switch — the same code on NumPy and CuPy
#
# > **Read this first.** This appendix has **never run on a GPU in this project's continuous integration**: the
# > machines that build and test the course have no GPU. Where no GPU is usable, the second code cell prints the
# > reason, and every experiment runs on NumPy **and on `numpy-strict`**, minilora's third backend: NumPy memory that
# > refuses every host/device mix CuPy refuses. The stored outputs come from such a CPU-only machine, so the
# > comparison column below is headed `numpy-strict`. Agreement there proves that the code keeps its data on the
# > device; it does **not** measure GPU speed or CuPy's numerics (cuBLAS, reduction order), which only a GPU shows.
# > To run the NumPy-versus-CuPy comparison on a machine with a CUDA GPU, one command installs CuPy and re-executes
# > this notebook in place, storing the GPU outputs:
# >
# > ```bash
# > pip install -e ".[gpu,notebooks]" && python notebooks/build_notebooks.py 09
# > ```
#
# **The idea in one sentence:** every compute module asks `minilora.backend` for its array module instead of
# importing NumPy, so switching one setting moves the whole library to CuPy on a GPU.
#
# **After this appendix you can**
# - switch minilora between NumPy and CuPy three ways, and say what happens when CuPy cannot run;
# - use the `numpy-strict` backend to prove code GPU-ready without a GPU, and say what it cannot prove;
# - explain why quantized bytes must be identical across backends while floats only agree to rounding;
# - time GPU code correctly (warm-up, synchronize before reading the clock).
#
# **Prerequisites:** notebooks 03 (NF4), 05 (LoRA backward) and 06 (the tiny GPT). **Time:** about 20 minutes to
# read; the comparison itself needs a CUDA GPU with CuPy.
#
# No minilora compute module imports NumPy. Each one asks `minilora.backend` for its array module:
# `xp = get_array_module(x)` follows the input array, `xp = xp_current()` is where new arrays are created. CuPy
# implements NumPy's API on CUDA GPUs, so switching the backend moves every matmul, every quantizer and the whole GPT
# to the GPU without a line of model code changing.
#
# This notebook runs the same experiments on NumPy and, when a CUDA GPU with CuPy is present, on CuPy, and compares
# them: quantized **bytes** must be identical, floats must agree to rounding, and the GPU should be faster. Without a
# GPU (as in CI) it runs everything on NumPy and on `numpy-strict`, says so, and checks that the strict run gives the
# same bytes and the same floats bit for bit (it runs NumPy's own kernels, so anything less would be a bug).

# %%
# %matplotlib inline
import os
import platform
import time

import numpy as np

import minilora
from minilora.backend import BackendUnavailableError, to_numpy, use_backend

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
print(f"this run: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible")

# %% [markdown]
# ## 1. Which backends can run here?
#
# Asking for CuPy where it cannot run raises `BackendUnavailableError` with the reason (not installed, or no CUDA
# device). Nothing falls back silently; this notebook catches the error and decides explicitly.

# %%
try:
    with use_backend("cupy") as cp:
        GPU = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    BACKENDS = ["numpy", "cupy"]
    print(f"CuPy {cp.__version__} on {GPU}: every experiment runs on NumPy and on CuPy")
except BackendUnavailableError as e:
    GPU = None
    BACKENDS = ["numpy", "numpy-strict"]
    print(f"No usable GPU. The reason:\n  {e}\n"
          "So every experiment runs on NumPy and on numpy-strict (NumPy memory that refuses host/device mixes as CuPy\n"
          "does). This proves the code keeps its data on the device, not GPU speed or CuPy's numerics.")
OTHER = BACKENDS[1]                                  # the column compared with NumPy: "cupy" or "numpy-strict"

# %% [markdown]
# Three equivalent ways to switch, in order of precedence:
#
# ```python
# with minilora.use_backend("cupy"): ...     # a block
# minilora.set_backend("cupy")               # from now on
# MINILORA_BACKEND=cupy python train.py      # the environment, read at import time
# ```
#
# What the strict backend refuses is what CuPy refuses: a host NumPy array meeting a device array in one operation.
# NumPy would silently compute; CuPy raises `TypeError`, and so does `numpy-strict`. `xp.asarray(host)` is the way
# in, `to_numpy(x)` the way out:

# %%
with use_backend("numpy-strict") as xp:
    dev = xp.ones(3, dtype=xp.float32)                                                # "device" memory
    try:
        dev + np.ones(3, dtype=np.float32)                                            # host + device: refused
        refused = None
    except TypeError as e:
        refused = str(e)
    back = to_numpy(dev + xp.asarray(np.ones(3, dtype=np.float32)))                   # in, compute, out
print(f"{type(dev).__name__} + numpy.ndarray -> TypeError: {refused[:78]}...")
print(f"xp.asarray in, to_numpy out: {back} ({type(back).__module__}.{type(back).__name__})")
assert refused is not None and type(back) is np.ndarray

# %% [markdown]
# Each experiment below is one function of the backend name, run under `use_backend(name)`; results come back to the
# host with `to_numpy` for comparison. Timings synchronize the GPU first (CuPy launches kernels asynchronously).

# %%
def sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def timed(fn, xp, repeat=3):
    """Best wall time of fn() over `repeat` runs (after one warm-up run, which also compiles CuPy kernels)."""
    fn()
    sync(xp)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(xp)
        best = min(best, time.perf_counter() - t0)
    return best


# %% [markdown]
# ## 2. Experiment A: NF4 quantization of the pinned input
#
# The input is created once on the host (the golden numbers' $1024\times1024$ matrix) and copied to the backend with
# `xp.asarray`. `quantize_4bit` runs where its input lives. The packed bytes and absmax are exact integers/floats
# computed by the same operations, so NumPy and CuPy must produce **identical bytes**, and the mean error with double
# quantization must be bitsandbytes' 0.072884 (0.072813 without it, notebook 04).

# %%
from minilora.quant import dequantize_4bit, quantize_4bit

x_host = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # (1024, 1024)


def experiment_quant(name):
    with use_backend(name) as xp:
        x = xp.asarray(x_host)                                                         # host -> device (CuPy)
        packed, state = quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        err = float(xp.abs(dequantize_4bit(packed, state) - x).mean())
        t_q = timed(lambda: quantize_4bit(x, blocksize=64, quant_type="nf4"), xp)
        t_d = timed(lambda: dequantize_4bit(packed, state), xp)
        return {"packed": to_numpy(packed), "absmax_codes": to_numpy(state.absmax), "err": err,
                "array_type": type(packed).__module__ + "." + type(packed).__name__,
                "t_quant": t_q, "t_dequant": t_d, "nbytes": int(state.nbytes)}             # codes + statistics


quant = {name: experiment_quant(name) for name in BACKENDS}
for name, r in quant.items():
    print(f"{name:<12} {r['array_type']:<28} NF4+DQ mean |err| {r['err']:.6f} (ref 0.072884) | quantize "
          f"{r['t_quant'] * 1e3:6.1f} ms | dequantize {r['t_dequant'] * 1e3:6.1f} ms | {r['nbytes']:,} bytes")
    assert abs(r["err"] - 0.072884) < 1e-6

# %% [markdown]
# The bytes comparison: on a GPU machine this is the real test of the switch (the same check runs in minilora's test
# suite for every quantizer, parametrized over the backends). On `numpy-strict` it checks that the quantizer's
# CuPy-side code paths (the strict module is not called `numpy`, so minilora's NumPy-only fast paths are skipped)
# give the same bytes without one host/device mix.

# %%
same = (np.array_equal(quant["numpy"]["packed"], quant[OTHER]["packed"])
        and np.array_equal(quant["numpy"]["absmax_codes"], quant[OTHER]["absmax_codes"]))
print(f"packed NF4 bytes NumPy vs {OTHER} identical: {same} "
      f"({quant['numpy']['nbytes']:,} vs {quant[OTHER]['nbytes']:,} bytes)")
print(f"first 8 packed bytes {quant['numpy']['packed'].ravel()[:8].tobytes().hex(' ')}, "
      f"{quant['numpy']['nbytes']:,} bytes in total = {8 * quant['numpy']['nbytes'] / x_host.size:.4f} bits/param")
assert same and quant["numpy"]["nbytes"] == quant[OTHER]["nbytes"] == 540_932
if OTHER == "cupy":
    print(f"quantize speed-up on the GPU: {quant['numpy']['t_quant'] / quant['cupy']['t_quant']:.1f}x, "
          f"dequantize: {quant['numpy']['t_dequant'] / quant['cupy']['t_dequant']:.1f}x")
else:
    assert quant["numpy"]["err"] == quant[OTHER]["err"]
    print(f"mean |err| NumPy vs numpy-strict equal: {quant['numpy']['err'] == quant[OTHER]['err']} "
          "(no GPU: no speed-up to measure)")

# %% [markdown]
# ## 3. Experiment B: a LoRA layer's forward and backward
#
# $y = xW_0^\top + b + s\,(xA^\top)B^\top$ and its hand-written backward (notebook 05), in float32. The base weights
# are created on the host and loaded into each backend's layer, so both start from the same numbers. Floats from
# different BLAS/cuBLAS kernels differ in the last bits (different summation order), so we compare with a relative
# tolerance instead of bytes.

# %%
from minilora.backend import default_rng
from minilora.nn import Linear, LoRALinear

rng = np.random.default_rng(0)
W0_h = (rng.standard_normal((512, 256)) / 16).astype(np.float32)                     # (D_out, D_in)
A_h = (rng.standard_normal((16, 256)) / 16).astype(np.float32)                       # (r, D_in)
B_h = (rng.standard_normal((512, 16)) / 16).astype(np.float32)                       # (D_out, r)
xb_h = rng.standard_normal((4096, 256)).astype(np.float32)                           # (N, D_in)
dy_h = rng.standard_normal((4096, 512)).astype(np.float32)                           # (N, D_out)


def experiment_lora(name):
    with use_backend(name) as xp:
        layer = LoRALinear(Linear(256, 512, rng=default_rng(0)), r=16, lora_alpha=32)
        layer.load_state_dict({"base_layer.weight": W0_h, "base_layer.bias": np.zeros(512, np.float32),
                               "lora_A.default.weight": A_h, "lora_B.default.weight": B_h})
        x, dy = xp.asarray(xb_h), xp.asarray(dy_h)

        def step():
            layer.zero_grad()
            y = layer(x)                                                              # (N, D_out)
            dx = layer.backward(dy)                                                   # (N, D_in)
            return y, dx

        y, dx = step()
        t = timed(step, xp)
        return {"y": to_numpy(y), "dx": to_numpy(dx), "dA": to_numpy(layer.lora_A["default"].weight.grad),
                "dB": to_numpy(layer.lora_B["default"].weight.grad), "t": t}


lora = {name: experiment_lora(name) for name in BACKENDS}
for name, r in lora.items():
    print(f"{name:<12} forward+backward of a 256->512 LoRA layer (r=16) on 4096 rows: {r['t'] * 1e3:6.1f} ms, "
          f"|y|mean {np.abs(r['y']).mean():.5f}")
for k in ["y", "dx", "dA", "dB"]:
    a, b = lora["numpy"][k], lora[OTHER][k]
    print(f"  {k:<2}: max relative difference NumPy vs {OTHER} {np.abs(a - b).max() / np.abs(a).max():.1e}")
    if OTHER == "numpy-strict":                       # the same NumPy kernels: bit for bit, not just to rounding
        assert np.array_equal(a, b), k
if OTHER == "cupy":
    print(f"  speed-up {lora['numpy']['t'] / lora['cupy']['t']:.1f}x")

# %% [markdown]
# ## 4. Experiment C: a training step of the tiny GPT
#
# The whole model: embedding, attention, MLP, LayerNorm, cross-entropy, every backward. The weights are initialised
# on NumPy (CuPy's random stream differs from NumPy's for the same seed) and loaded into each backend's model.

# %%
from minilora.nn import GPT, GPTConfig

cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
with use_backend("numpy"):
    weights = {k: np.asarray(v) for k, v in GPT(cfg).state_dict().items()}
idx_h = np.random.default_rng(1).integers(0, 256, (8, 65))                           # (B, T+1) token ids


def experiment_gpt(name):
    with use_backend(name) as xp:
        model = GPT(cfg)
        model.load_state_dict(weights)
        idx = xp.asarray(idx_h)

        def step():
            model.zero_grad()
            _, loss = model(idx[:, :-1], idx[:, 1:])
            model.backward()
            return loss

        loss = step()
        t = timed(step, xp)
        grad = to_numpy(model.lm_head.weight.grad)
        return {"loss": loss, "grad": grad, "t": t}


gpt = {name: experiment_gpt(name) for name in BACKENDS}
for name, r in gpt.items():
    print(f"{name:<12} loss {r['loss']:.6f} (ln 256 = {np.log(256):.6f} for a uniform guess) "
          f"| one step {r['t'] * 1e3:6.1f} ms")
g_n, g_o = gpt["numpy"]["grad"], gpt[OTHER]["grad"]
print(f"  |loss NumPy - loss {OTHER}| = {abs(gpt['numpy']['loss'] - gpt[OTHER]['loss']):.1e}; "
      f"lm_head grad max relative difference {np.abs(g_n - g_o).max() / np.abs(g_n).max():.1e}")
if OTHER == "cupy":
    print(f"  speed-up {gpt['numpy']['t'] / gpt['cupy']['t']:.1f}x")
else:
    assert gpt["numpy"]["loss"] == gpt[OTHER]["loss"] and np.array_equal(g_n, g_o)

# %% [markdown]
# ## 5. Summary
#
# One table of what ran where: NumPy against the second backend, which is CuPy on a GPU machine and `numpy-strict`
# here. The ratio is NumPy's time over the other's. On `numpy-strict` it measures only the cost of the strict checks
# (the same NumPy kernels run underneath), never GPU speed; the last column says what agreed.

# %%
rows = [("NF4 quantize 1M values", quant, "t_quant", "bytes identical"),
        ("NF4 dequantize 1M values", quant, "t_dequant", "bytes identical"),
        ("LoRA layer fwd+bwd", lora, "t", "bit-identical" if OTHER == "numpy-strict" else "to rounding"),
        ("tiny GPT train step", gpt, "t", "bit-identical" if OTHER == "numpy-strict" else "to rounding")]
print(f"{'experiment':<26} {'NumPy':>10} {OTHER:>13} {'ratio':>7}  result")
for label, res, key, agreed in rows:
    t_np, t_o = res["numpy"][key] * 1e3, res[OTHER][key] * 1e3
    print(f"{label:<26} {t_np:8.1f}ms {t_o:11.1f}ms {t_np / t_o:6.2f}x  {agreed}")
print(f"\nbackend now: {minilora.get_backend()} (use_backend restored it after every experiment)")
if GPU is None:
    print("No usable GPU: every experiment ran on NumPy and on numpy-strict. This proves the code keeps its data on\n"
          "the device; it does not show GPU speed or CuPy's numerics.")

# %% [markdown]
# ## Recap
#
# - minilora's compute code never imports NumPy directly; `use_backend`, `set_backend` or `MINILORA_BACKEND` choose
#   NumPy or CuPy, and an unusable CuPy raises `BackendUnavailableError` instead of falling back silently.
# - Quantized bytes are the result of the same exact operations, so they must be identical on both backends;
#   floating-point results agree to rounding, because BLAS and cuBLAS sum in different orders.
# - GPU timings need a warm-up run and a synchronize before the clock is read.
# - Without a GPU, the `numpy-strict` backend runs every experiment with CuPy's host/device rules on NumPy's kernels:
#   identical bytes and bit-identical floats prove the data stays on the device, not GPU speed or CuPy's numerics.
# - The stored outputs are CPU-only (NumPy and `numpy-strict`); the command at the top runs the comparison where a
#   GPU exists.
#
# ## Exercises
#
# 1. Write a function that takes any array (NumPy or CuPy) and returns its absmax-int8 quantization using only the
#    array module returned by `get_array_module(x)`; check it on NumPy (and on CuPy if you have a GPU).
# 2. Why would `np.asarray(x)` inside a library function silently break the GPU path? Find the helper minilora uses
#    to bring results back to the host.
# 3. Time `quantize_4bit` without the warm-up run and without the synchronize. On a GPU, which of the two mistakes
#    changes the number more?
#
# The graded versions are in `exercises/ex09_*.py`; check your work with `python3 -m pytest exercises/test_ex09_*.py`.
