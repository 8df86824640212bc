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
#   error it costs measured;
# - name the three rules bitsandbytes uses to round the nested 8-bit codes (exact nearest, its CUDA kernel's binary
#   search, its CPU kernel's lookup table), count where they disagree, and say why a CPU kernel uses a table.
#
# **Prerequisites:** notebook 03 (NF4, `QuantState`), notebook 02 (blockwise absmax). **Time:** about 45 minutes.
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
from minilora.backend import to_numpy
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
#
# The library builds the map on minilora's current backend (device memory on a GPU), while this notebook quantizes
# and plots on the host, so the map comes out with `to_numpy` (notebook 09 and docs/backends.md explain the backends
# and the strict one that checks this on a CPU).

# %%
dyn = to_numpy(create_dynamic_map(signed=True))                                 # (256,) float32, on the host
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

# %% [markdown]
# ## 8. Three ways to round the nested codes
#
# QLoRA (arXiv 2305.14314, §3) fixes the format of the second level (8-bit codes of absmax − offset, blocks of
# 256) but not how a value is rounded to its code, and bitsandbytes rounds it differently on each backend: the same
# weights give slightly different bytes on a laptop and on a GPU. Each nested block is first scaled by
# float32(1/absmax₂) into $[-1, 1]$; the three rules differ only in how such a scaled value $v$ becomes one of the
# 256 codes. `quantize_4bit(..., compress_statistics=True, nested_rounding=...)` offers all three:
#
# - `"exact"` (the default): the nearest map entry; a $v$ exactly on the float32 midpoint of two entries takes the
#   lower one. This is what bitsandbytes' pure-PyTorch kernel does.
# - `"bnb-cuda"`: bitsandbytes' CUDA kernel (`dQuantize` in `csrc/kernels.cu`), a 7-step binary search. A probe starts
#   at entry 127 and moves up or down by 64, 32, …, 1; then one comparison with the float32 midpoint between the
#   probe and its neighbour on $v$'s side decides, and on the midpoint itself the probe wins. Emulated from the
#   kernel's rule (no GPU runs here).
# - `"bnb-cpu"`: bitsandbytes' CPU kernel (`quantize_cpu` in `csrc/cpu_ops.cpp`), a 65,536-bin lookup table over
#   $[-1, 1]$: $v$ goes to bin $\lfloor (v+1)\cdot 0.5\cdot 65535 + 0.5\rfloor$, and each bin holds the code of its
#   centre. Byte for byte what bitsandbytes stores on CPU.
#
# `"bnb-cpu"` also takes the offset as torch computes it (a float32 mean in torch's own summation order), as
# bitsandbytes on CPU stores it; the other two round the float64 mean once. A search that ends next to $v$ picks the
# nearer neighbour, so the CUDA rule can only differ from the exact one for a $v$ *exactly* on a midpoint.
#
# ### 8.1 A value exactly on a midpoint
#
# Feed the 255 midpoints of the dynamic map themselves to the three kernels (with a 1.0 in the same block, so the
# scaling leaves them as they are). The CUDA search keeps its probe, which is the upper entry for 127 of them, one
# step above the exact rule; the table disagrees with the exact rule on 131, by up to 4 entries near zero, where 14
# gaps of the map are narrower than one bin.

# %%
from minilora.quant import quantize_blockwise_lut
from minilora.quant.blockwise import quantize_blockwise_cuda
from minilora.quant.codebooks import midpoints

ROUNDINGS = ("exact", "bnb-cuda", "bnb-cpu")
KERNELS = {"exact": quantize_blockwise, "bnb-cuda": quantize_blockwise_cuda, "bnb-cpu": quantize_blockwise_lut}
mid, _ = midpoints(dyn)                                      # (255,) float32 midpoints of the sorted map
block_of_mids = np.append(mid, np.float32(1))                # (256,) one block; absmax 1 leaves the values as they are
on_mid = {r: KERNELS[r](block_of_mids, code=dyn, blocksize=256)[0][:-1].astype(int) for r in ROUNDINGS}   # (255,) each
step_cuda = on_mid["bnb-cuda"] - on_mid["exact"]
step_cpu = on_mid["bnb-cpu"] - on_mid["exact"]
print(f"255 midpoints: CUDA search differs from exact on {np.count_nonzero(step_cuda)} "
      f"(steps {sorted(set(step_cuda[step_cuda != 0].tolist()))}), table on {np.count_nonzero(step_cpu)} "
      f"(steps {sorted(set(step_cpu[step_cpu != 0].tolist()))}); map gaps narrower than a bin (2/65535): "
      f"{np.count_nonzero(np.diff(dyn) < 2 / 65535)}")
assert np.count_nonzero(step_cuda) == 127 and set(step_cuda[step_cuda != 0]) == {1}
assert np.count_nonzero(step_cpu) == 131 and np.abs(step_cpu).max() == 4
assert np.count_nonzero(np.diff(dyn) < 2 / 65535) == 14

# %% [markdown]
# Now the same tie inside a real `quantize_4bit` call. $m$ = `mid[239]` = 0.7890625 is exactly the float32 midpoint
# of dyn[239] and dyn[240]. A $(256, 64)$ weight holds one value per row, so its 256 blocks have the absmax values
# $a = (2,\ 1+m,\ 1-m,\ 0.5,\ 0.5,\ 1, \dots, 1)$: their mean (the offset) is exactly 1 and the largest $|a - 1|$
# (absmax₂) is exactly 1, so block 1 scales to $v = m$ and block 2 to $v = -m$, which is the midpoint of dyn[14] and
# dyn[15].

# %%
m = mid[239]
assert m == (dyn[239] + dyn[240]) * np.float32(0.5) and -m == mid[14]
a = np.ones(256, np.float32)                                 # (256,) the block absmax values: one nested block
a[:5] = [2.0, 1 + m, 1 - m, 0.5, 0.5]                        # mean exactly 1, max |a - 1| exactly 1
w_tie = np.zeros((256, 64), np.float32)
w_tie[:, 0] = a                                              # block i is row i: its absmax is a[i]
tie = {}
for rule in ROUNDINGS:
    _, st = quantize_4bit(w_tie, blocksize=64, quant_type="nf4", compress_statistics=True, nested_rounding=rule)
    tie[rule] = st.absmax.astype(int), dequantize_absmax(st)  # (256,) codes, (256,) float32 scales
    assert float(st.offset) == 1.0 and float(st.state2.absmax[0]) == 1.0
    print(f"{rule:>8}: code of block 1 ({a[1]}) {tie[rule][0][1]} -> scale {tie[rule][1][1]:.8f} | "
          f"code of block 2 ({a[2]}) {tie[rule][0][2]} -> scale {tie[rule][1][2]:.8f}")
assert [tuple(tie[r][0][1:3]) for r in ROUNDINGS] == [(239, 14), (240, 14), (239, 15)]
assert np.flatnonzero(tie["bnb-cuda"][0] != tie["exact"][0]).tolist() == [1]    # the search moves block 1 only
err_lo, err_hi = abs(tie["exact"][1][1] - a[1]), abs(tie["bnb-cuda"][1][1] - a[1])
print(f"block 1: |scale - absmax| = {err_lo:.7f} (exact) and {err_hi:.7f} (CUDA): a tie, either code is as good")
assert abs(err_lo - err_hi) < 1e-6 and abs(float(err_lo) - 0.0070312) < 5e-8
zero_v = np.flatnonzero(a == 1)                              # (251,) blocks whose scale equals the offset: v = 0
print(f"the {zero_v.size} blocks with v = 0: code {set(tie['exact'][0][zero_v].tolist())} (exact), "
      f"{set(tie['bnb-cpu'][0][zero_v].tolist())} (table) -> scale {tie['bnb-cpu'][1][zero_v[0]]:.8f} "
      f"instead of 1; dyn[131] = {dyn[131]:.4e}")
assert zero_v.size == 251 and set(tie["exact"][0][zero_v].tolist()) == {127} and dyn[127] == 0
assert set(tie["bnb-cpu"][0][zero_v].tolist()) == {131} and round(float(dyn[131]), 9) == 2.125e-5
assert np.flatnonzero(tie["bnb-cpu"][0] != tie["exact"][0]).tolist() == [2, *zero_v.tolist()]
zero_bin = int((np.float32(0) + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
assert zero_bin == 32_768 and 2 * zero_bin - 65535 == 1     # bin of v = 0; centre -1 + 2*32768/65535 = 1/65535

# %% [markdown]
# On a tie neither answer is better: both entries are equally far. The rules disagree on the *bytes*, which matters
# to anyone who checks a file byte for byte against one backend.
#
# The table also moves something that is no tie at all: the 251 blocks whose absmax equals the offset, $v = 0$
# exactly. Zero is entry 127 of the map, but it falls into bin 32,768, whose centre is $1/65535 \approx 1.53\times
# 10^{-5}$; the nearest entry to that centre is dyn[131] $= 2.125\times10^{-5}$, four entries up. Near zero the map's
# entries are closer together than a bin, so there the table can be several entries off.
#
# ### 8.2 On the shipped base and the pinned input
#
# Real scales almost never fall exactly on a midpoint. Over the 16 quantized linear weights of the shipped base
# model (`minilora.pretrained.load_base()`, 786,432 weights, 12,288 nested codes) and the pinned $1024\times1024$
# input (16,384 nested codes), we count the codes that differ between the rules and measure, per rule, the error of
# the dequantized scales ($|\widehat{\text{absmax}} - \text{absmax}|$) and of the weights ($|W - \hat W|$), mean and
# max over all values.

# %%
from minilora.pretrained import load_base
from minilora.quant.report import pinned_input

base, _ = load_base()
base_weights = [to_numpy(v).astype(np.float32) for k, v in base.state_dict().items()
                if k.endswith(".weight") and v.ndim == 2 and (".attn." in k or ".mlp." in k)]   # (out, in) each
assert len(base_weights) == 16 and sum(w_.size for w_ in base_weights) == 786_432
assert np.array_equal(to_numpy(pinned_input()), x)           # the same pinned input as in sections 1-6


def nested_report(tensors):
    """{rule: (codes, |absmax' - absmax|, |W - W'|)}, each concatenated over the tensors."""
    plain = [quantize_4bit(t, blocksize=64, quant_type="nf4")[1].absmax for t in tensors]
    out = {}
    for rule in ROUNDINGS:
        parts = [], [], []
        for t, am in zip(tensors, plain, strict=True):
            pk, st = quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True, nested_rounding=rule)
            parts[0].append(st.absmax)
            parts[1].append(np.abs(dequantize_absmax(st) - am))
            parts[2].append(np.abs(t - dequantize_4bit(pk, st)).ravel())
        out[rule] = tuple(np.concatenate(p_) for p_ in parts)
    return out


reports = {"shipped base": nested_report(base_weights), "pinned input": nested_report([x])}
for name, rep in reports.items():
    n = rep["exact"][0].size
    diff = {(r1, r2): int(np.count_nonzero(rep[r1][0] != rep[r2][0]))
            for r1, r2 in [("exact", "bnb-cuda"), ("exact", "bnb-cpu"), ("bnb-cuda", "bnb-cpu")]}
    print(f"{name}: {n:,} nested codes; differ: " + ", ".join(f"{r1} vs {r2} {d}" for (r1, r2), d in diff.items()))
    for rule in ROUNDINGS:
        _, ea, ew = rep[rule]
        print(f"  {rule:>8}: scales |err| mean {ea.mean(dtype=np.float64):.6e} max {ea.max():.6e} | "
              f"weights |err| mean {ew.mean(dtype=np.float64):.10f} max {ew.max():.6f}")
base_rep, pin_rep = reports["shipped base"], reports["pinned input"]
assert base_rep["exact"][0].size == 12_288 and pin_rep["exact"][0].size == 16_384
for rep, moved in [(base_rep, 21), (pin_rep, 23)]:
    assert np.array_equal(rep["exact"][0], rep["bnb-cuda"][0])                     # 0 differ: no exact ties
    assert all(np.array_equal(u, v) for u, v in zip(rep["exact"], rep["bnb-cuda"], strict=True))
    step = rep["bnb-cpu"][0].astype(int) - rep["exact"][0].astype(int)
    assert np.count_nonzero(step) == moved and np.abs(step).max() == 1             # each one entry away
    assert rep["bnb-cpu"][2].max() == rep["exact"][2].max()                        # same worst weight error
want = {("shipped base", "exact"): (2.254030e-4, 1.325443e-3, 0.0023901451, 0.034317),
        ("shipped base", "bnb-cpu"): (2.254045e-4, 1.325428e-3, 0.0023901430, 0.034317),
        ("pinned input", "exact"): (4.083176e-3, 1.684737e-2, 0.0728844608, 0.629701),
        ("pinned input", "bnb-cpu"): (4.083197e-3, 1.686168e-2, 0.0728844430, 0.629701)}
for (name, rule), (am_mean, am_max, w_mean, w_max) in want.items():
    _, ea, ew = reports[name][rule]
    assert (f"{ea.mean(dtype=np.float64):.6e}", f"{ea.max():.6e}") == (f"{am_mean:.6e}", f"{am_max:.6e}")
    assert abs(ew.mean(dtype=np.float64) - w_mean) < 1e-10 and round(float(ew.max()), 6) == w_max
offset_moved = sum(float(quantize_4bit(t, 64, "nf4", True)[1].offset)
                   != float(quantize_4bit(t, 64, "nf4", True, nested_rounding="bnb-cpu")[1].offset)
                   for t in base_weights)
print(f"base layers whose bnb-cpu offset (torch's float32 mean) differs from the rounded float64 mean: "
      f"{offset_moved} of 16")
assert offset_moved == 7

# %% [markdown]
# - **Exact vs CUDA search: 0 codes differ** on both inputs (0 of 12,288 and 0 of 16,384): no scaled value lies
#   exactly on a midpoint (counted in 8.3), so the two give the same bytes and the same errors.
# - **Exact vs CPU table: 21 of 12,288** codes on the shipped base and **23 of 16,384** on the pinned input, each one
#   entry away. (`"bnb-cpu"` also takes torch's offset, one float32 step away from the rounded float64 mean in 7 of
#   the 16 base layers, so its scales differ in their last bits even where the codes agree.)
# - **The error does not care.** Mean scale error $2.254030\times10^{-4}$ (exact) vs $2.254045\times10^{-4}$ (table)
#   on the shipped base, max $1.3254\times10^{-3}$ for both; mean weight error 0.0023901451 vs 0.0023901430, the
#   same in its first six significant digits, and the same worst weight error (0.034317), which comes from the 4-bit
#   step, not from the scale. On the pinned input: mean weight error 0.0728844608 vs 0.0728844430, max 0.629701 for
#   both, and scale errors $4.083176\times10^{-3}$ vs $4.083197\times10^{-3}$ (max $1.684737\times10^{-2}$ vs
#   $1.686168\times10^{-2}$).
#
# ### 8.3 Why a CPU kernel would use a lookup table
#
# The CUDA search costs 8 comparisons per value (7 probe steps and the final midpoint), each waiting for the one before.
# On a GPU that is cheap: the 256 map entries sit in shared memory and thousands of threads hide the waiting. A CPU
# wants the opposite: **one table read** per value (a multiply-add, a truncation, one load from a 64 KiB table that
# stays in cache), no data-dependent branches, so that it runs in SIMD lanes. The cost is **approximation near bin
# edges**: a bin is $2/65535 \approx 3.05\times10^{-5}$ wide and holds the code of its centre, so a value less than half
# a bin ($1.53\times10^{-5}$) from a midpoint can land on the wrong side of it, and near zero, where map entries are
# closer than a bin, several entries away (section 8.1). Below, each code the table moved on the two inputs lies within
# half a bin of a midpoint, and no scaled value of the exact rule lies exactly on one. (minilora's own exact rule,
# `blockwise.nearest_code`, also reads a table, but marks every bin that holds a midpoint and redoes those few values
# with an exact search: the table's speed without its approximation.)

# %%
from minilora.quant.blockwise import bnb_cpu_lut

half_bin = 1 / 65535                                         # half of a bin of width 2/65535
assert f"{2 * half_bin:.2e}" == "3.05e-05" and f"{half_bin:.2e}" == "1.53e-05"
assert bnb_cpu_lut(dyn).nbytes == 64 * 1024                  # the CPU table: 65,536 one-byte codes, 64 KiB


def scaled_nested(t, rule):
    """(v, state): the scaled values (absmax - offset) * float32(1/absmax2) a rule codes, and its QuantState."""
    _, plain = quantize_4bit(t, blocksize=64, quant_type="nf4")
    _, st = quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True, nested_rounding=rule)
    inv = np.float32(1) / st.state2.absmax                                           # (n_blocks / 256,)
    return np.clip((plain.absmax - st.offset) * np.repeat(inv, 256)[:plain.absmax.size], -1, 1), st   # (n_blocks,)


for name, tensors in [("shipped base", base_weights), ("pinned input", [x])]:
    dist_moved, n_near, n_ties = [], 0, 0
    for t in tensors:
        v, st = scaled_nested(t, "bnb-cpu")
        dist = np.abs(v[:, None] - mid[None, :]).min(axis=1)                          # to the nearest midpoint
        exact_code = np.searchsorted(mid, v, side="left")                             # the exact rule, same v
        dist_moved.append(dist[exact_code != st.absmax])
        n_near += int(np.count_nonzero(dist < half_bin))
        n_ties += int(np.isin(scaled_nested(t, "exact")[0], mid).sum())              # exact ties, exact offset
    dist_moved = np.concatenate(dist_moved)
    print(f"{name}: the table moved {dist_moved.size} codes, all within {dist_moved.max():.2e} of a midpoint "
          f"(half a bin = {half_bin:.2e}); {n_near} scaled values lie that close to one; exact ties: {n_ties}")
    assert dist_moved.size == {"shipped base": 21, "pinned input": 23}[name]
    assert dist_moved.max() < half_bin and n_near == {"shipped base": 81, "pinned input": 112}[name]
    assert n_ties == 0

# %% [markdown]
# ## Recap
#
# - The absmax of every block costs $32/64 = 0.5$ bits per weight; double quantization stores it as an 8-bit
#   dynamic-map code around the per-tensor mean, plus one float32 per 256 blocks: $4 + 8/64 + 32/16384 = 4.127$ bits
#   (measured 4.126984 on a $1024^2$ tensor, with its one float32 offset).
# - Dequantization happens in two steps: the scale from its 8-bit code, then the weight from its 4-bit code.
# - The 4-bit codes do not change; the error grows by $7\times10^{-5}$ (0.072813 → 0.072884).
# - It is a memory technique (0.30 GB at 7B, 3.0 GB at 65B), not an outlier fix: blocks are what contain outliers.
# - bitsandbytes rounds the nested codes three ways: exact nearest, its CUDA kernel's 7-step search (differs only on
#   a value exactly on a float32 midpoint: 0 of 12,288 codes on the shipped base) and its CPU kernel's 65,536-bin
#   table (21 of 12,288 codes one entry off, all within half a bin of a midpoint). The mean weight error is the same
#   in its first six significant digits; the bytes are not, so "byte-exact" always names a backend.
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
# 5. (Not graded.) Build a (256, 64) weight whose nested codes differ between `nested_rounding="exact"` and
#    `"bnb-cpu"` although no scaled value lies on a midpoint. How close to a midpoint must you put it?
#
# The graded versions are in `exercises/ex04_*.py`; check your work with `python3 -m pytest exercises/test_ex04_*.py`.
