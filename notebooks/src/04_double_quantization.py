# %% [markdown]
# # 04 · Double quantization: from 4.5 to 4.127 bits per parameter
#
# **The idea in one sentence:** the per-block scales of NF4 are themselves numbers that can be quantized, so store
# them as 8-bit codes (with one float32 per 256 blocks) and save about 0.37 bits per weight.
#
# **After this notebook you can**
# - compute the bits per parameter of blockwise NF4 with and without double quantization (4.5 and 4.127);
# - explain why the scales are centred on their mean before an 8-bit signed code is applied;
# - dequantize in two steps (first the scale, then the weight) and reproduce the library's scales by hand;
# - say what double quantization is for (memory) and what it is not for (outliers: blocks handle those), with the
#   error it costs measured.
#
# **Prerequisites:** notebook 03 (NF4, `QuantState`), notebook 02 (blockwise absmax). **Time:** about 35 minutes.
#
# Blockwise NF4 (notebook 03) stores a float32 absmax for every block of 64 weights. That is $32/64 = 0.5$ extra
# bits per weight, 12.5 % on top of the 4-bit codes. QLoRA's **double quantization** (Dettmers et al., 2023,
# arXiv 2305.14314, §3) quantizes those absmax values themselves, with an 8-bit code per block and one float32 per
# 256 blocks. This notebook measures what that saves and what it costs in error.

# %%
# %matplotlib inline
import platform

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import memory
from minilora.quant import (
    create_dynamic_map,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)

print(f"python {platform.python_version()} | numpy {np.__version__} | matplotlib {matplotlib.__version__} "
      f"| minilora {minilora.__version__} | backend {minilora.get_backend()}")
plt.rcParams["figure.dpi"] = 80
x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # the pinned input (1024, 1024)

# %% [markdown]
# ## 1. The overhead of the scales
#
# With $n$ weights in blocks of $b$, NF4 stores $n/2$ bytes of codes and $n/b$ float32 absmax values:
#
# $$\text{bits per parameter} = 4 + \frac{32}{b} = 4.5 \quad (b = 64).$$
#
# `QuantState` counts its own bytes, so we can measure it on the pinned $1024\times1024$ input.

# %%
packed, state = quantize_4bit(x, blocksize=64, quant_type="nf4")
print(state)
print(f"codes {state.data_nbytes:,} B + absmax {state.stats_nbytes:,} B = {state.nbytes:,} B "
      f"-> {state.bits_per_parameter():.4f} bits/param")
assert (state.data_nbytes, state.stats_nbytes, state.bits_per_parameter()) == (524_288, 65_536, 4.5)

# %% [markdown]
# ## 2. What the absmax values look like
#
# The 16,384 absmax values are all positive and clustered: the maximum of 64 standard normals is about 2.4–2.8.
# Subtracting their mean (the `offset`, one float32 per tensor) centres them on zero, so a *signed* 8-bit code can
# represent them with all its precision near zero.

# %%
absmax = state.absmax                                                          # (16384,) float32
offset = np.float32(absmax.mean(dtype=np.float64))                              # the mean, rounded once to float32
print(f"{absmax.size:,} absmax values: min {absmax.min():.3f}, max {absmax.max():.3f}, mean (offset) {offset:.7f}")
fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(absmax, bins=100, color="C0")
ax.axvline(offset, color="k", ls="--", lw=1, label=f"offset = mean = {offset:.4f}")
ax.set(xlabel="absmax of a block of 64", ylabel="count", title="block scales of N(0,1) data")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The dynamic 8-bit map
#
# The second level does not use NF4: it uses bitsandbytes' **dynamic map** (Dettmers 2015), 256 signed values in
# $[-0.99297, 1]$ that behave like a tiny float: one sign bit, a run of zeros acting as a decimal exponent, and a
# linear fraction. It is dense near zero and sparse near ±1, so small *relative* errors everywhere.
# `create_dynamic_map(signed=True)` rebuilds it; the nested quantizer is `quantize_blockwise` with block size 256.
#
# The QLoRA paper says the second level uses "8-bit Floats"; this dynamic map is the 8-bit float-like format that
# bitsandbytes actually implements for it, so "an 8-bit float" and "the dynamic map" name the same step here.

# %%
dyn = create_dynamic_map(signed=True)                                           # (256,) float32
print(f"{dyn.size} values, min {dyn.min():.8f}, max {dyn.max()}, zero at index {int(np.flatnonzero(dyn == 0)[0])}, "
      f"smallest |v| > 0: {np.abs(dyn[dyn != 0]).min():.2e}")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3))
ax1.plot(dyn, ".", ms=3)
ax1.set(xlabel="code", ylabel="value", title="signed dynamic map (sorted)")
ax2.semilogy(np.abs(dyn[dyn > 0]), ".", ms=3)
ax2.set(xlabel="positive code (rank)", ylabel="value", title="positive half, log scale: one decade per 'exponent'")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Quantizing the scales, by hand and with `compress_statistics=True`
#
# $$\text{offset} = \overline{\text{absmax}},\qquad (q_a, \text{absmax}_2) = \text{quantize\_blockwise}
# (\text{absmax} - \text{offset},\ \text{dyn},\ 256),$$
# $$\widehat{\text{absmax}}_i = \text{dyn}[q_{a,i}]\cdot \text{absmax}_{2,\lfloor i/256\rfloor} + \text{offset}.$$
#
# First by hand with the 8-bit quantizer, then through `quantize_4bit(..., compress_statistics=True)`, which must give
# the same reconstructed scales. (The offset's last bit depends on the order of the summation: minilora takes the
# float64 mean and rounds it once; torch's float32 cascade can land one ulp away, which the reference allows for.)

# %%
qa, state2 = quantize_blockwise(absmax - offset, code=dyn, blocksize=256)      # (16384,) uint8, 64 float32 absmax2
absmax_hat = dequantize_blockwise(qa, state2) + offset                         # (16384,) float32
rel = np.abs(absmax_hat - absmax) / absmax
print(f"by hand: {qa.size:,} uint8 codes + {state2.absmax.size} float32 absmax2; "
      f"relative error of the scales: mean {rel.mean():.2e}, max {rel.max():.2e}")

packed_dq, state_dq = quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
print(state_dq)
print(f"offset {float(state_dq.offset):.7f} (by hand {offset:.7f}); library scales == by-hand scales: "
      f"{np.array_equal(dequantize_absmax(state_dq), absmax_hat)}; 4-bit codes unchanged: "
      f"{np.array_equal(packed_dq, packed)}")

# %% [markdown]
# ## 5. Bits per parameter: 4.5 → 4.127
#
# Per 64 weights: one 8-bit code instead of a 32-bit float, plus one float32 per $64\cdot256 = 16{,}384$ weights:
#
# $$4 + \frac{8}{64} + \frac{32}{64\cdot 256} = 4.126953\ldots \approx 4.127.$$
#
# Measured on the pinned input (per tensor there is also one float32 offset, which is why the measured value is a
# hair above the asymptotic one):

# %%
formula = memory.bits_per_param(64, double_quant=True)
print(f"formula:  {memory.bits_per_param(64, double_quant=False)} -> {formula:.6f} bits/param "
      f"(saving {memory.bits_per_param(64, double_quant=False) - formula:.3f})")
print(f"measured: {state.bits_per_parameter():.6f} -> {state_dq.bits_per_parameter():.6f} bits/param "
      f"({state.nbytes:,} -> {state_dq.nbytes:,} bytes)")
assert round(formula, 6) == 4.126953 and round(state_dq.bits_per_parameter(), 6) == 4.126984

# %% [markdown]
# ## 6. What it costs in error
#
# The codes are identical; only the scale each block is multiplied by moves a little, so the error barely changes.
# The reference numbers on this input (bitsandbytes 0.50.2) are 0.072813 without and 0.072884 with double
# quantization.

# %%
err = np.abs(x - dequantize_4bit(packed, state)).mean()
err_dq = np.abs(x - dequantize_4bit(packed_dq, state_dq)).mean()
print(f"NF4 bs64 mean abs error: {err:.6f} -> {err_dq:.6f} with DQ (+{err_dq - err:.1e}; "
      "reference 0.072813 -> 0.072884)")
print(f"matches the reference: {abs(err - 0.072813) < 1e-6 and abs(err_dq - 0.072884) < 1e-6}")
assert round(float(err), 6) == 0.072813 and round(float(err_dq), 6) == 0.072884
assert 0 < (err_dq - err) / err < 0.0015                                 # DQ adds about 0.1 % error

# %% [markdown]
# Double quantization therefore does nothing for outliers. The outlier problem of notebook 02 is solved by the
# *blocks* (one scale per 64 values keeps an outlier's damage inside its block); double quantization only stores
# those scales in fewer bits, which makes each scale slightly less exact and the error slightly *larger*
# (+0.1 %). It is a memory saving, paid for with a tiny amount of precision.
#
# ## 7. Memory saved at 7B and 65B
#
# 0.373 bits per parameter sounds small; over the 6.5 billion linear weights of LLaMA-7B and the 64.8 billion of
# LLaMA-65B it is 0.30 GB and 3.0 GB (the paper: "approximately 3 GB for a 65B model"). The memory calculator counts
# every tensor exactly (per-tensor offsets and maps included).

# %%
rows = []
for model in ["llama-7b", "llama-65b"]:
    plain = memory.estimate(model, "qlora", double_quant=False).breakdown["weights"]
    dq = memory.estimate(model, "qlora", double_quant=True).breakdown["weights"]
    bf16 = memory.param_counts(memory.get_shape(model))["total"] * 2
    rows.append((model, bf16, plain, dq))
    print(f"{model}: base weights bf16 {bf16 / 1e9:6.2f} GB | NF4 {plain / 1e9:5.2f} GB | NF4+DQ {dq / 1e9:5.2f} GB "
          f"| DQ saves {(plain - dq) / 1e9:.2f} GB")
assert [round((r_[2] - r_[3]) / 1e9, 2) for r_ in rows] == [0.30, 3.02]

fig, ax = plt.subplots(figsize=(7, 3.4))
w = 0.27
for i, (label, color) in enumerate([("bf16", "#999999"), ("NF4", "#4C72B0"), ("NF4 + DQ", "#55A868")]):
    vals = [r_[1 + i] / 1e9 for r_ in rows]
    bars = ax.bar(np.arange(2) + (i - 1) * w, vals, w, label=label, color=color)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
ax.set_xticks(range(2), ["LLaMA-7B", "LLaMA-65B"])
ax.set(ylabel="GB", title="frozen base weights, embeddings and norms included (they stay 16-bit)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# These bars count the whole base model, embeddings, norms and output head included (kept in 16-bit). A chart of the
# quantized linear layers alone, without those, shows smaller totals for the same models; both are right, they
# answer different questions.
#
# ## Recap
#
# - The absmax of every block costs $32/64 = 0.5$ bits per weight; double quantization stores it as an 8-bit
#   dynamic-map code around the per-tensor mean, plus one float32 per 256 blocks: $4 + 8/64 + 32/16384 = 4.127$ bits
#   (measured 4.126984 on a $1024^2$ tensor, with its one float32 offset).
# - Dequantization happens in two steps: the scale from its 8-bit code, then the weight from its 4-bit code.
# - The 4-bit codes do not change; the error grows by $7\times10^{-5}$ (0.072813 → 0.072884).
# - It is a memory technique (0.30 GB at 7B, 3.0 GB at 65B), not an outlier fix: blocks are what contain outliers.
#
# ## Exercises
#
# 1. Write `double_quantize(absmax)` returning the 8-bit codes, the per-256-block float32 scales and the offset, and
#    its inverse; check the reconstructed scales against `dequantize_absmax`.
# 2. Compute the bits per parameter for block sizes 32, 64 and 128, with and without double quantization, first by
#    hand and then with `memory.bits_per_param`.
# 3. Skip the offset (quantize the absmax values without subtracting their mean). How much larger does the relative
#    error of the scales become, and why?
# 4. For LLaMA-13B, how many GB does double quantization save? Check with `memory.estimate`.
#
# The graded versions are in `exercises/ex04_*.py`; check your work with `python3 -m pytest exercises/test_ex04_*.py`.
