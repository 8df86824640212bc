# %% [markdown]
# # 02 · absmax int8: the formula, rounding, the outlier problem, and blocks
#
# **The idea in one sentence:** store a float tensor in 8 bits by scaling it so that its largest magnitude lands on
# 127, rounding, and keeping the one number needed to undo the scaling.
#
# **After this notebook you can**
# - write absmax quantization with the quantization constant $c = 127/\operatorname{absmax}$ kept apart from the
#   quantized values $q = \operatorname{round}(cX)$, and dequantize;
# - state and check the error bound $\operatorname{absmax}/254$, including how ties are rounded;
# - show with a measurement why one outlier ruins tensor-wise quantization;
# - compare per-tensor, per-row and per-block scales by error and by bits per parameter.
#
# **Prerequisites:** notebook 01 is not needed; NumPy arrays and rounding. **Time:** about 40 minutes.
#
# This notebook walks through the formula, measures its error, breaks it with a single outlier, and then fixes it
# the way LLM.int8 (one scale per row; Dettmers et al., 2022, arXiv 2208.07339) and QLoRA (one scale per block) do.

# %%
# %matplotlib inline
import platform

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora.quant import (
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_demo,
)

print(f"python {platform.python_version()} | numpy {np.__version__} | matplotlib {matplotlib.__version__} "
      f"| minilora {minilora.__version__} | backend {minilora.get_backend()}")
plt.rcParams["figure.dpi"] = 80
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The formula
#
# $$q = \operatorname{round}\!\left(\frac{127}{\operatorname{absmax}(X)}\,X\right) \in \{-127,\dots,127\},\qquad
# \hat X = q\cdot\frac{\operatorname{absmax}(X)}{127}.$$
#
# In the QLoRA paper's notation (its Eq. 1) the **quantization constant** is $c = 127/\operatorname{absmax}(X)$ and
# the quantized value is $q = \operatorname{round}(c\,X)$: two different things, a single number for the whole tensor
# and one integer per entry (notebook 10 returns to a common slip that merges them). bitsandbytes and minilora store
# the absmax itself (one float32) rather than $c$, and divide by 127 when dequantizing; the two carry the same
# information. A worked example with absmax 2.54, so the constant is exactly $c = 127/2.54 = 50$ codes per unit:

# %%
X = np.array([0.5, -1.3, 2.54, -0.02, 1.0, 0.01], dtype=np.float32)         # (6,)
q, absmax = int8_tensorwise_quant(X)                                         # (6,) int8, () float32
X_hat = int8_tensorwise_dequant(q, absmax)                                   # (6,) float32
print("X      =", X)
print("absmax =", absmax, "-> scale 127/absmax =", 127 / absmax)
print("q      =", q)
print("X_hat  =", X_hat)
print("error  =", X_hat - X)
assert 127 / absmax == 50 and q.tolist() == [25, -65, 127, -1, 50, 0] and q.dtype == np.int8

# %% [markdown]
# The last value shows the limit: $0.01\cdot 50 = 0.5$ is a tie and rounds to 0 (half to even), so the value is lost;
# its error, 0.01, is exactly the largest possible, half a step.
#
# ## 2. Rounding and the error bound
#
# Rounding to the nearest integer moves each value by at most half a step, and a step is $\operatorname{absmax}/127$,
# so
#
# $$|X - \hat X| \le \frac{\operatorname{absmax}(X)}{254}.$$
#
# Ties round **half to even** (as `torch.round` and `np.rint` do: 0.5 → 0, 1.5 → 2, 2.5 → 2), and the range is
# symmetric: −128 is never produced. On a Gaussian matrix the errors are spread uniformly over
# $[-\Delta/2, \Delta/2]$, with mean $|\text{error}| \approx \Delta/4$.

# %%
print("np.rint([0.5, 1.5, 2.5, -0.5]) =", np.rint([0.5, 1.5, 2.5, -0.5]))
x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # the pinned input (1024, 1024)
q, a = int8_tensorwise_quant(x)
err_t = int8_tensorwise_dequant(q, a) - x                                        # (1024, 1024)
step = float(a) / 127
print(f"absmax {float(a):.4f}, step {step:.5f}: max |err| {np.abs(err_t).max():.6f} <= bound {float(a) / 254:.6f}; "
      f"mean |err| {np.abs(err_t).mean():.6f} (step/4 = {step / 4:.6f})")
print(f"codes used: {q.min()}..{q.max()}")
assert np.abs(err_t).max() <= float(a) / 254 * (1 + 1e-6) and q.min() > -128

# %%
fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(err_t.ravel(), bins=100, color="C0")
ax.axvline(-step / 2, color="k", ls="--", lw=1)
ax.axvline(step / 2, color="k", ls="--", lw=1, label=r"$\pm$ absmax/254")
ax.set(xlabel=r"$\hat x - x$", ylabel="count",
       title="tensor-wise int8 error on N(0,1) data: uniform within half a step")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The outlier problem
#
# One absmax for the whole tensor means one extreme value decides the step for *everybody*. Put a single 100 among
# 4,096 standard-normal values: the step becomes $100/127 \approx 0.79$, so the ordinary values collapse onto a
# handful of codes around zero (almost a third of them onto 0 itself). Transformers really do have such outlier
# features (Dettmers et al., LLM.int8, 2022). `outlier_demo` measures it, with the outlier itself excluded from the
# error.

# %%
demo = outlier_demo(n=4096, outlier=100.0, blocksize=64, seed=0)
print(f"tensor-wise: mean |err| {demo['tensorwise_mean_abs_err']:.4f}, "
      f"{100 * demo['tensorwise_zero_fraction']:.1f} % of values round to 0")
print(f"block-wise (64): mean |err| {demo['blockwise_mean_abs_err']:.4f}, "
      f"{100 * demo['blockwise_zero_fraction']:.1f} % of values round to 0")
print(f"block-wise error is {demo['tensorwise_mean_abs_err'] / demo['blockwise_mean_abs_err']:.0f}x smaller")
assert 0.28 < demo["tensorwise_zero_fraction"] < 0.33 and demo["blockwise_zero_fraction"] < 0.02

# %% [markdown]
# ## 4. Fix 1: one scale per row (the vector-wise part of LLM.int8)
#
# `int8_vectorwise_quant` takes the absmax of every row (`row_stats`), exactly like bitsandbytes'
# `int8_vectorwise_quant`, bit for bit. An outlier now only damages its own row. (LLM.int8 itself does one more
# thing this notebook leaves out: the few feature columns with outliers are multiplied in 16-bit, apart from the
# int8 rest; that mixed-precision decomposition is what makes it work on large models.) On the pinned input, the
# reference (bitsandbytes 0.50.2) gives mean abs error **0.006784**, relative error **0.034719**.

# %%
q_r, row_stats, _ = int8_vectorwise_quant(x)                                    # (1024, 1024) int8, (1024,) float32
err_r = int8_vectorwise_dequant(q_r, row_stats) - x                             # (1024, 1024)
rel_r = (np.abs(err_r) / (np.abs(x) + 1e-8)).mean()
print(f"row-wise: mean |err| {np.abs(err_r).mean():.6f} (ref 0.006784), mean rel err {rel_r:.6f} (ref 0.034719)")
print(f"tensor-wise on the same data: mean |err| {np.abs(err_t).mean():.6f}")
assert round(float(np.abs(err_r).mean()), 6) == 0.006784 and round(float(rel_r), 6) == 0.034719

# %% [markdown]
# ## 5. Fix 2: one scale per block of 64
#
# Block-wise quantization cuts the flattened tensor into runs of 64 values, each with its own absmax. That is the
# idea QLoRA's 4-bit format builds on (notebook 03). The price is one float32 per block:
#
# $$\text{bits per parameter} = 8 + \frac{32}{64} = 8.5.$$
#
# Now a tensor with a handful of outliers: 8 values of ±60 hidden in the pinned matrix. The histograms show what each
# granularity does to the *other* million values.

# %%
x_out = x.copy()
idx = rng.choice(x.size, 8, replace=False)
x_out.flat[idx] = rng.choice([-60.0, 60.0], 8)                                  # 8 outliers among 1,048,576
keep = np.ones(x.size, dtype=bool)
keep[idx] = False
results = {}
q, a = int8_tensorwise_quant(x_out)
results["tensor-wise"] = (int8_tensorwise_dequant(q, a) - x_out).ravel()[keep], 8 + 32 / x.size
q, s, _ = int8_vectorwise_quant(x_out)
results["row-wise"] = (int8_vectorwise_dequant(q, s) - x_out).ravel()[keep], 8 + 32 * s.size / x.size
q, a = int8_blockwise_quant(x_out, blocksize=64)
results["block-wise/64"] = ((int8_blockwise_dequant(q, a, blocksize=64) - x_out).ravel()[keep],
                            8 + 32 * a.size / x.size)
for name, (e, bits) in results.items():
    print(f"{name:<14} mean |err| {np.abs(e).mean():.6f}   max |err| {np.abs(e).max():.4f}   {bits:.4f} bits/param")
assert [round(b, 4) for _, b in results.values()] == [8.0, 8.0312, 8.5]

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
bins = np.linspace(-0.25, 0.25, 201)
for (name, (e, _)), color in zip(results.items(), ["C3", "C1", "C0"], strict=True):
    ax.hist(e, bins=bins, histtype="step", lw=1.5, color=color, label=f"{name}: mean |err| {np.abs(e).mean():.4f}")
ax.set(yscale="log", xlabel=r"$\hat x - x$ (non-outlier values)", ylabel="count",
       title="int8 error with 8 outliers of ±60 in a 1024×1024 N(0,1) matrix")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Block size: precision against overhead
#
# Smaller blocks isolate outliers better but store more scales. A sweep on the outlier matrix:

# %%
print(f"{'blocksize':>9} {'mean |err|':>11} {'bits/param':>10}")
for bs in [32, 64, 256, 1024, 4096]:
    q, a = int8_blockwise_quant(x_out, blocksize=bs)
    e = (int8_blockwise_dequant(q, a, blocksize=bs) - x_out).ravel()[keep]
    print(f"{bs:>9} {np.abs(e).mean():>11.6f} {8 + 32 * a.size / x.size:>10.4f}")

# %% [markdown]
# ## Recap
#
# - absmax int8: $c = 127/\operatorname{absmax}(X)$ is one constant, $q = \operatorname{round}(cX)$ are the codes,
#   $\hat X = q/c$; the error is at most $\operatorname{absmax}/254$, ties round half to even, −128 is never used.
# - One scale for a whole tensor lets a single outlier wipe out the resolution of every other value (30.3 % of the
#   values became 0 in §3).
# - A scale per row costs $32/1024 \approx 0.031$ extra bits per value here; a scale per block of 64 costs 0.5 bits
#   and contains the damage best; the block size trades error against that overhead.
#
# Next: can we go down to 4 bits (notebook 03)?
#
# ## Exercises
#
# 1. Implement `absmax_quantize(x)` returning `(q, absmax)` and its inverse, and check the bound
#    $|x - \hat x| \le \operatorname{absmax}/254$ on random data.
# 2. Find an input whose error is exactly half a step (a tie), and predict the code it gets under half-to-even
#    rounding before running it.
# 3. With the 8 outliers of ±60 from §5, which block size is the largest one whose mean error stays within 10 % of
#    the outlier-free tensor's? What does it cost in bits per parameter?
# 4. Implement the block-wise version (pad the last block) and check it against `int8_blockwise_quant` on a length
#    that is not a multiple of the block size.
#
# The graded versions are in `exercises/ex02_*.py`; check your work with `python3 -m pytest exercises/test_ex02_*.py`.
