# %% [markdown]
# # 03 · NF4: a 4-bit code built from the normal distribution
#
# **The idea in one sentence:** since trained weights are roughly normal, place the 16 levels of a 4-bit code at
# quantiles of the normal distribution, so that levels sit densely where weights are common and no level is wasted
# on values that hardly occur.
#
# **After this notebook you can**
# - build the 16 NF4 levels from normal quantiles (8 positive, 7 negative, an exact zero) and explain the offset
#   $\delta$;
# - quantize a tensor blockwise to NF4 codes, pack two codes per byte in bitsandbytes' order, and dequantize;
# - compare NF4, FP4 and Int4 by mean error at the same 4.5 bits per parameter, and say where each one errs;
# - explain why NF4's codes are *not* used equally often on real blocks (the block absmax is about $2.6\sigma$);
# - choose a block size by trading error against the bits spent on scales.
#
# **Prerequisites:** notebook 02 (absmax, blocks); the normal distribution and its quantile function.
# **Time:** about 60 minutes.
#
# QLoRA (Dettmers et al., 2023, arXiv 2305.14314) stores the frozen base model in **4-bit NormalFloat (NF4)**. Each
# block of 64 weights is divided by its absolute maximum, then every value is replaced by the index (0–15) of the
# nearest of 16 fixed numbers in $[-1, 1]$. This notebook builds those 16 numbers from normal quantiles step by step,
# compares NF4 with uniform Int4 and with bitsandbytes' FP4 on Gaussian data and on real trained weights, and shows
# where the error goes.

# %%
# %matplotlib inline
import platform
from statistics import NormalDist

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora.backend import to_numpy
from minilora.quant import create_normal_map, dequantize_4bit, get_4bit_type, quantize_4bit

print(f"python {platform.python_version()} | numpy {np.__version__} | matplotlib {matplotlib.__version__} "
      f"| minilora {minilora.__version__} | backend {minilora.get_backend()}")
plt.rcParams["figure.dpi"] = 80
normal = NormalDist()                      # N(0, 1): .cdf, .pdf, .inv_cdf (no SciPy needed)

# %% [markdown]
# ## 1. Sixteen quantiles, step by step
#
# The $p$-quantile of $N(0,1)$ is $\Phi^{-1}(p)$. Equal-probability pieces would use $p = \tfrac{i}{16}$, but the
# outermost quantile $\Phi^{-1}(1) = \infty$ (the paper's Eq. 4 as printed has this problem). bitsandbytes
# therefore starts from an offset $\delta = 0.9677083$ instead of 1, with $\Phi^{-1}(\delta) \approx 1.848$. The
# number is not magic: it is the mean of $1 - \tfrac{1}{32}$ and $1 - \tfrac{1}{30}$, i.e. half a step inside the
# last of 16 and of 15 equal slices of probability.
#
# 1. **8 positive values**: $\Phi^{-1}(p)$ for $p$ in `linspace(δ, 0.5, 9)` without its last point (0.5, i.e. zero);
# 2. **7 negative values**: $-\Phi^{-1}(p)$ for $p$ in `linspace(δ, 0.5, 8)` without its last point;
# 3. **one exact zero** (padding and zero weights must stay exactly zero);
# 4. sort and divide by the largest, so the table spans exactly $[-1, 1]$.
#
# It is asymmetric on purpose: 8 positive, 7 negative and one zero make 16 codes with an exact zero.

# %%
delta = 0.9677083
assert abs(delta - ((1 - 1 / 32) + (1 - 1 / 30)) / 2) < 1e-7                          # half a slice inside 1
p_pos = np.linspace(delta, 0.5, 9)[:-1]                                    # (8,)
p_neg = np.linspace(delta, 0.5, 8)[:-1]                                    # (7,)
pos = np.array([normal.inv_cdf(p) for p in p_pos])                         # (8,)  largest first
neg = -np.array([normal.inv_cdf(p) for p in p_neg])                        # (7,)
print(f"Phi^-1(delta) = {normal.inv_cdf(delta):.5f}")
print("positive quantiles:", np.round(pos, 4))
print("negative quantiles:", np.round(neg, 4))
ours = np.sort(np.concatenate([pos, [0.0], neg]))                          # (16,)
ours = ours / ours.max()                                                   # (16,) top value exactly 1.0
print("16 codes:", np.round(ours, 4))

# %% [markdown]
# Compare with the table bitsandbytes hardcodes (`get_4bit_type("nf4")`). Our float64 `np.linspace` rounds the
# probabilities a hair differently from torch's float32 `linspace`, so a few codes differ by about one float32 ulp
# (~1e-7). minilora's `create_normal_map` re-derives the table with a torch-style float32 linspace and matches it
# exactly; the library itself uses the hardcoded table. Both functions return the table on minilora's current
# backend (device memory on a GPU), and the comparisons in this notebook are host NumPy, so the tables come out with
# `to_numpy` (notebook 09 and docs/backends.md explain the backends and the strict one that checks this on a CPU).

# %%
nf4 = to_numpy(get_4bit_type("nf4"))                                       # (16,) float32, on the host
print(f"max |step-by-step - bnb table| = {np.abs(ours - nf4).max():.1e}")
print(f"max |create_normal_map() - bnb table| = {np.abs(to_numpy(create_normal_map()) - nf4).max():.1e}")
for i, v in enumerate(nf4):
    print(f"code {i:2d} = {i:04b}: {v:+.10f}")

# %% [markdown]
# ## 2. The codebook against the normal density
#
# A block of 64 weights is divided by its absmax, so values land in $[-1, 1]$. Scaling the codes back by
# $\Phi^{-1}(\delta)$ puts them on the $N(0,1)$ axis. Each code owns the interval between the midpoints to its
# neighbours, and the probability mass of that interval is how often the code is used. Under this *idealised*
# picture (every block's absmax exactly at $1.848\sigma$) the NF4 masses are close to $1/16$ each; for the uniform
# Int4 grid ($k/7$) the middle codes get most of the data and the outer codes almost none; bitsandbytes' FP4 is in
# between, with a cluster of tiny values near zero. §4 measures how real blocks of 64 differ from this picture.

# %%
scale = normal.inv_cdf(delta)                                              # 1.848: where code +-1 sits on N(0,1)


def bin_masses(code):
    """P(X nearest to each code) for X ~ N(0, 1) after scaling the codes by Phi^-1(delta)."""
    levels = np.unique(to_numpy(code).astype(np.float64)) * scale         # sorted distinct levels
    edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
    return levels, np.diff([normal.cdf(e) if np.isfinite(e) else float(e > 0) for e in edges])


tables = {"NF4": get_4bit_type("nf4"), "FP4": get_4bit_type("fp4"), "Int4": get_4bit_type("int4")}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
t = np.linspace(-3.5, 3.5, 400)
for ax, (name, code) in zip(axes, tables.items(), strict=True):
    levels, mass = bin_masses(code)
    ax.plot(t, [normal.pdf(v) for v in t], "k", lw=1, label="N(0, 1) density")
    ax.bar(levels, mass, width=0.06, color="C1", label="mass per code")
    ax.vlines(levels, 0, 0.02, color="C0")
    ax.set(title=f"{name}: {len(levels)} distinct levels, min mass {mass.min():.3f}, max {mass.max():.3f}",
           xlabel=r"code $\times\ \Phi^{-1}(\delta)$")
    ax.title.set_fontsize(9)
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
ideal_entropy = {}
for name, code in tables.items():
    _, mass = bin_masses(code)
    ideal_entropy[name] = -(mass * np.log2(mass)).sum()
    print(f"{name:<5} entropy of the code usage, absmax at 1.848 sigma: {ideal_entropy[name]:.3f} bits "
          "(4 bits = perfectly even)")
assert round(ideal_entropy["NF4"], 3) == 3.996

# %% [markdown]
# ## 3. Quantizing Gaussian data: the golden number
#
# The pinned input that every golden number in this course uses is a $1024\times1024$ float32 matrix from
# `np.random.default_rng(0)`. `quantize_4bit` returns the packed bytes and a `QuantState`, exactly as
# `bitsandbytes.functional.quantize_4bit` does; `dequantize_4bit` gives the float32 approximation. bitsandbytes 0.50.2
# gives a mean absolute error of **0.072813** for NF4 at block size 64 and **0.096616** for FP4; minilora produces the
# same bytes, so the same errors.

# %%
x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # (1024, 1024)
deq, errors = {}, {}
for qt in ["nf4", "fp4", "int4"]:
    packed, state = quantize_4bit(x, blocksize=64, quant_type=qt)              # (524288, 1) uint8
    deq[qt] = dequantize_4bit(packed, state)                                   # (1024, 1024) float32
    err = np.abs(x - deq[qt])
    errors[qt] = err.mean()
    rel = (err / (np.abs(x) + 1e-8)).mean()
    print(f"{qt.upper():<5} bs64: mean abs err {err.mean():.6f}  mean rel err {rel:.6f}  "
          f"{state.bits_per_parameter():.3f} bits/param")
print(f"\nNF4 golden number: {errors['nf4']:.6f} (bitsandbytes: 0.072813) -> "
      f"{'match' if abs(errors['nf4'] - 0.072813) < 1e-6 else 'MISMATCH'}")
print(f"NF4 error is {100 * (1 - errors['nf4'] / errors['fp4']):.0f} % below FP4 and "
      f"{100 * (1 - errors['nf4'] / errors['int4']):.0f} % below Int4")
assert round(float(errors["nf4"]), 6) == 0.072813 and round(float(errors["fp4"]), 6) == 0.096616

# %% [markdown]
# Where does the error go? Left: the histograms of $x - \hat x$ (log scale). NF4 has *larger* worst-case errors
# than Int4, because its outer levels are far apart. Right: the mean error as a function of $x$ explains the lower
# average anyway: NF4 is more precise near zero, where most of the data lies, and less precise in the rare tails.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
bins = np.linspace(-0.5, 0.5, 201)
centers = np.linspace(-3.5, 3.5, 57)
which = np.digitize(x.ravel(), (centers[1:] + centers[:-1]) / 2)                 # (n,) bin of each x
for qt, color in zip(["int4", "fp4", "nf4"], ["C2", "C1", "C0"], strict=True):
    e = (x - deq[qt]).ravel()                                                     # (n,)
    ax1.hist(e, bins=bins, histtype="step", lw=1.5, color=color, label=f"{qt.upper()}  mean |err| {errors[qt]:.4f}")
    ax2.plot(centers, np.bincount(which, np.abs(e), 57) / np.maximum(np.bincount(which, minlength=57), 1),
             color=color, label=qt.upper())
ax1.set(yscale="log", xlabel=r"$x - \hat{x}$", ylabel="count", title="error histogram, N(0,1) data, block 64")
ax2.plot(t, [0.25 * normal.pdf(v) for v in t], "k:", lw=1, label="N(0,1) density (scaled)")
ax2.set(xlabel="x", ylabel=r"mean $|x - \hat{x}|$ at this x", title="error as a function of the value")
ax1.legend(fontsize=8)
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. How often each code is used
#
# The packed array holds two codes per byte, the **even** element in the **high** nibble (bitsandbytes' order):
# `code[2j] = byte[j] >> 4`, `code[2j+1] = byte[j] & 15`. A worked example: `[1, -1, 0.3]` in one block has absmax 1;
# 1 → code 15, −1 → code 0, 0.3 → code 11, and the odd length is padded with a zero (code 7), so the bytes are
# `F0 B7`.

# %%
packed, state = quantize_4bit(np.array([1.0, -1.0, 0.3], dtype=np.float32), blocksize=64, quant_type="nf4")
print("bytes:", packed.tobytes().hex(" ").upper(), "| shape", packed.shape, "| absmax", state.absmax)

packed, _ = quantize_4bit(x, blocksize=64, quant_type="nf4")
codes = np.stack([packed.ravel() >> 4, packed.ravel() & 15], axis=1).ravel()    # (1048576,) even element first
usage = np.bincount(codes, minlength=16) / codes.size                           # (16,)
entropy = -(usage * np.log2(usage)).sum()
print(f"code usage on the pinned input: min {usage.min():.4f}, max {usage.max():.4f}, entropy {entropy:.3f} bits")
print("usage per code:", " ".join(f"{u:.4f}" for u in usage))
assert round(float(entropy), 3) == 3.884 and 0.09 < usage.max() < 0.095
assert min(usage[1], usage[14]) > 0.035 and max(usage[1], usage[14]) < 0.045   # outer non-extreme codes

# %% [markdown]
# Two things in these numbers need explaining.
#
# **The extreme codes 0 and 15.** In every block the absmax itself maps to ±1 exactly, but to *one* of the two codes:
# to 15 if the largest magnitude is positive, to 0 if negative. That gives each code about one use per two blocks,
# $1/128 \approx 0.008$, not $1/64$. The rest of their usage comes from other values of the block that lie beyond the
# midpoint to the next level ($0.86$ of the absmax on the positive side).
#
# **The uneven middle.** The usage is far from $1/16 = 0.0625$ per code: the inner codes get about 0.09, the outer
# non-extreme ones about 0.04, and the entropy is 3.884 bits instead of §2's 3.996. §2 assumed every block's absmax
# sits at $\Phi^{-1}(\delta)\sigma = 1.848\sigma$. The maximum of 64 normal samples is larger: about $2.6\sigma$
# (notebook 04 plots all 16,384 of them). Dividing by a larger absmax squeezes the values toward zero, so the inner
# codes get more than their share. The cell measures both explanations, and then quantizes the same data with a
# fixed scale of $1.848\sigma$ (clipping the rare larger values) to show that §2's number comes back.

# %%
blocks64 = x.reshape(-1, 64)                                                     # (16384, 64)
amax = np.abs(blocks64).max(axis=1)                                              # (16384,)
positive = (blocks64[np.arange(len(blocks64)), np.abs(blocks64).argmax(axis=1)] > 0).mean()
print(f"blocks whose absmax is positive: {positive:.3f} -> from the absmax alone code 15 gets "
      f"{positive / 64:.4f}, code 0 gets {(1 - positive) / 64:.4f}; measured {usage[15]:.4f} and {usage[0]:.4f}")
print(f"mean block absmax: {amax.mean():.3f} sigma (the idealised picture assumed {scale:.3f} sigma)")
fixed = np.clip(x.ravel() / scale, -1, 1)                                        # one global scale of 1.848 sigma
nearest = np.abs(fixed[:, None] - nf4[None, :]).argmin(axis=1)                    # (1048576,) NF4 code index
u_fixed = np.bincount(nearest, minlength=16) / nearest.size
h_fixed = -(u_fixed * np.log2(u_fixed)).sum()
print(f"entropy with blocks of 64 (measured): {entropy:.3f} bits; with a fixed 1.848-sigma scale: {h_fixed:.3f} bits")
assert 0.49 < positive < 0.52 and round(float(amax.mean()), 2) == 2.6
assert abs(h_fixed - ideal_entropy["NF4"]) < 0.01 and h_fixed - entropy > 0.1

# %%
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(16), usage, color="C0")
ax.axhline(1 / 16, color="k", ls="--", lw=1, label="1/16")
ax.set(xticks=range(16), xlabel="NF4 code", ylabel="fraction of values", title="NF4 code usage, N(0,1) data, block 64")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Block size: precision against overhead
#
# Smaller blocks mean a tighter absmax (fewer values squeezed toward zero) but more float32 scales: each block costs
# 32 bits, i.e. $32/\text{blocksize}$ extra bits per weight. bitsandbytes' test suite lists the expected NF4 error for
# each block size (`tests/test_functional.py`, 200 random 1024² samples); ours on the pinned input:

# %%
bnb_nf4 = {32: 0.067746, 64: 0.072798, 128: 0.076831, 256: 0.080337, 512: 0.083547, 1024: 0.086610,
           2048: 0.089592, 4096: 0.092547}
print(f"{'blocksize':>9} {'NF4 err':>9} {'bnb mean':>9} {'FP4 err':>9} {'bits/param':>10}")
sweep = {}
for bs in bnb_nf4:
    e = {}
    for qt in ["nf4", "fp4"]:
        p, s = quantize_4bit(x, blocksize=bs, quant_type=qt)
        e[qt] = np.abs(x - dequantize_4bit(p, s)).mean()
    sweep[bs] = e
    print(f"{bs:>9} {e['nf4']:>9.6f} {bnb_nf4[bs]:>9.6f} {e['fp4']:>9.6f} {s.bits_per_parameter():>10.4f}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
bss = list(sweep)
ax.plot(bss, [sweep[b]["nf4"] for b in bss], "o-", label="NF4 (minilora)")
ax.plot(bss, [bnb_nf4[b] for b in bss], "k+", ms=10, label="NF4 (bitsandbytes test table)")
ax.plot(bss, [sweep[b]["fp4"] for b in bss], "s-", label="FP4 (minilora)")
ax.set(xscale="log", xticks=bss, xticklabels=bss, xlabel="block size", ylabel="mean |x - x'|",
       title="4-bit error vs block size, N(0,1) data")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Real trained weights
#
# The QLoRA paper calls NF4 information-theoretically optimal for normally distributed weights. Two things bend
# that in practice: the block absmax normalisation itself (§4: the normalised values are not spread as the codebook
# assumes), and trained weights, which are close to normal but have heavier tails (Yoshida, 2023, arXiv 2306.06965,
# discusses both). Here we quantize the linear weight matrices of minilora's shipped, pretrained base model.

# %%
def load_real_weights():
    """Linear weight matrices of minilora's shipped, pretrained base model, keyed by module path, on the host."""
    from minilora import pretrained
    model, meta = pretrained.load_base()
    return {n: to_numpy(p.data) for n, p in model.named_parameters() if p.data.ndim == 2 and ".h." in n}


weights = load_real_weights()
WEIGHTS_SOURCE = "minilora's shipped pretrained base checkpoint"
print("WEIGHTS_SOURCE:", WEIGHTS_SOURCE)
print(f"{len(weights)} matrices, {sum(w.size for w in weights.values()):,} weights")

# %%
w_all = np.concatenate([w.ravel() for w in weights.values()]).astype(np.float32)
kurt = ((w_all - w_all.mean()) ** 4).mean() / w_all.var() ** 2 - 3
print(f"excess kurtosis of all weights: {kurt:.2f} (0 for a normal distribution)")
print(f"{'matrix':<20} {'NF4':>8} {'FP4':>8} {'Int4':>8}   (mean |w - w'| / mean |w|)")
rel_err = {qt: [] for qt in ["nf4", "fp4", "int4"]}
for name, w in weights.items():
    row = []
    for qt in rel_err:
        p, s = quantize_4bit(w, blocksize=64, quant_type=qt)
        r_ = np.abs(w - dequantize_4bit(p, s)).mean() / np.abs(w).mean()
        rel_err[qt].append(r_)
        row.append(r_)
    short = name.replace("transformer.", "").replace(".weight", "")
    print(f"{short:<20} " + " ".join(f"{v:8.4f}" for v in row))
print("mean over matrices: " + ", ".join(f"{qt.upper()} {np.mean(v):.4f}" for qt, v in rel_err.items()))
assert np.mean(rel_err["nf4"]) < min(np.mean(rel_err["fp4"]), np.mean(rel_err["int4"])) and kurt > 1

# %% [markdown]
# The histogram of block-normalized weights ($w / \text{absmax of its block}$) is what the codebook actually sees;
# NF4's levels are drawn on top.

# %%
blocks = w_all[: w_all.size // 64 * 64].reshape(-1, 64)
normalized = (blocks / np.abs(blocks).max(axis=1, keepdims=True)).ravel()        # (n,) in [-1, 1]
fig, ax = plt.subplots(figsize=(8, 3.4))
ax.hist(normalized, bins=200, density=True, color="C0", alpha=0.6, label="block-normalized weights")
ax.vlines(nf4, 0, ax.get_ylim()[1], color="C1", lw=1, label="NF4 levels")
ax.set(xlabel="w / absmax(block)", ylabel="density", title=WEIGHTS_SOURCE)
ax.title.set_fontsize(9)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Recap
#
# - NF4's 16 levels are normal quantiles (8 positive, 7 negative, an exact zero), normalised to $[-1, 1]$, with the
#   offset $\delta = 0.9677083$ keeping the outermost quantile finite.
# - At block size 64 NF4 has the lowest mean error of the three 4-bit formats at the same 4.5 bits per weight
#   (0.072813 vs 0.096616 for FP4, bit-exact with bitsandbytes), though its worst-case error is larger than Int4's.
# - Its codes are not used equally often: the absmax of 64 normal values is about $2.6\sigma$, not $1.848\sigma$, so
#   the inner codes are busier (entropy 3.884 bits measured, 3.996 only under the idealised scale).
# - Smaller blocks cut the error and cost $32/\text{blocksize}$ bits per weight for the scales.
#
# Notebook 04 shrinks that 0.5 bits of absmax overhead to 0.127.
#
# ## Exercises
#
# 1. Build the NF4 codebook from normal quantiles yourself (use `statistics.NormalDist`), and check it against
#    `get_4bit_type("nf4")` to within one float32 ulp.
# 2. Quantize a tensor blockwise to NF4 and pack two codes per byte (even element in the high nibble); compare your
#    bytes with `quantize_4bit`, including an odd length that needs padding.
# 3. Measure the code usage and entropy for block sizes 32, 256 and 4096 on the pinned input. Does a larger block
#    make the usage more or less even? Explain it with the expected block absmax.
# 4. Replace NF4 by a codebook built from Student-t quantiles (5 degrees of freedom) and compare the error on the
#    real weights of §6.
#
# The graded versions are in `exercises/ex03_*.py`; check your work with `python3 -m pytest exercises/test_ex03_*.py`.
