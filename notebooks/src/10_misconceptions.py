# %% [markdown]
# # 10 · Six common misconceptions, each checked with a measurement
#
# **The idea in one sentence:** several statements that circulate in lecture material on LoRA and QLoRA are wrong
# in ways a single measurement exposes, so each one here is restated, measured and corrected.
#
# **After this notebook you can**
# - tell the quantization constant from the quantized value in the absmax formula;
# - say which technique contains outliers (blocking) and which saves memory (double quantization);
# - explain that LoRA learns an update from zero and leaves $W_0$ untouched;
# - locate where a transformer's parameters actually are (mostly in the MLP);
# - describe quantization as fewer bits per parameter, not fewer parameters, and say why it does not make training
#   faster.
#
# **Prerequisites:** notebooks 01–06 and 08 (this notebook reuses their tools). **Time:** about 30 minutes.
#
# Each section states the misconception in our own words, then measures. Every number in the text is checked by an
# `assert` in the cell that prints it.

# %%
# %matplotlib inline
import platform
import time

import numpy as np

import minilora
from minilora import memory
from minilora.quant import (
    dequantize_4bit,
    int8_tensorwise_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
)

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. "The constant is $c = (127/\operatorname{absmax}(X)) \cdot X_i$"
#
# **The statement.** Some notes write the absmax formula so that the product of the scale factor and each value is
# called the quantization constant, with no rounding.
#
# **What is right.** There are two different objects (QLoRA paper, arXiv 2305.14314, Eq. 1): the **constant**
# $c = 127/\operatorname{absmax}(X)$, one number for the whole tensor (or block), and the **quantized values**
# $q_i = \operatorname{round}(c\,X_i)$, one *integer* per entry. Without the rounding nothing is quantized: the
# "constant" of the wrong formula is an array of floats as large as the input, and it has as many distinct values as
# the input.

# %%
X = rng.standard_normal(4096).astype(np.float32)                        # (4096,)
wrong_c = (127 / np.abs(X).max()) * X                                   # (4096,) float32: the swapped formula
q, absmax = int8_tensorwise_quant(X)                                    # (4096,) int8 and one float32
c = 127 / float(absmax)                                                 # the real constant: one number
X_hat = int8_tensorwise_dequant(q, absmax)
print(f"swapped formula: dtype {wrong_c.dtype}, {wrong_c.nbytes:,} bytes, {np.unique(wrong_c).size:,} distinct values")
print(f"correct:         c = {c:.4f} (one number) and q of dtype {q.dtype}: {q.nbytes:,} bytes, "
      f"{np.unique(q).size} distinct values in [{q.min()}, {q.max()}]")
print(f"round trip: max |X - q/c| = {np.abs(X - X_hat).max():.5f} <= absmax/254 = {float(absmax) / 254:.5f}")
assert wrong_c.nbytes == 4 * q.nbytes and np.unique(wrong_c).size > 4000 and np.unique(q).size <= 255
assert np.abs(X - X_hat).max() <= float(absmax) / 254 * (1 + 1e-6)

# %% [markdown]
# ## 2. "Double quantization reduces the impact of outliers"
#
# **The statement.** Double quantization is sometimes described as giving every bucket its own constant so that an
# outlier only spoils its bucket.
#
# **What is right.** That describes **blockwise** quantization: one absmax per block of 64 values. Double
# quantization comes after it and quantizes those per-block constants to 8 bits, to **save memory**. We measure
# both on a $1024\times1024$ Gaussian matrix with 64 outliers of magnitude 20, comparing NF4 with one huge block
# (4096 values, close to one constant for a long run of values), with blocks of 64, and with blocks of 64 plus
# double quantization. The error is measured on the ordinary values only.

# %%
x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # (1024, 1024)
idx = rng.choice(x.size, 64, replace=False)
x.flat[idx] = rng.choice([-20.0, 20.0], 64)                                      # 64 outliers
ordinary = np.ones(x.size, dtype=bool)
ordinary[idx] = False
rows = {}
for label, bs, dq in [("NF4, blocks of 4096", 4096, False), ("NF4, blocks of 64", 64, False),
                      ("NF4, blocks of 64 + DQ", 64, True)]:
    packed, st = quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=dq)
    err = np.abs(dequantize_4bit(packed, st) - x).ravel()[ordinary].mean()
    rows[label] = (err, st.bits_per_parameter())
    print(f"{label:<24} mean |err| on ordinary values {err:.5f}   {st.bits_per_parameter():.4f} bits/param")
e4096, e64, e64dq = (v[0] for v in rows.values())
b64, b64dq = rows["NF4, blocks of 64"][1], rows["NF4, blocks of 64 + DQ"][1]
print(f"blocking 4096 -> 64 cuts the error {e4096 / e64:.1f}x; DQ changes it by {100 * (e64dq / e64 - 1):+.2f} % "
      f"and saves {b64 - b64dq:.3f} bits/param")
assert e4096 / e64 > 1.5 and 0 <= e64dq / e64 - 1 < 0.01 and round(b64 - b64dq, 2) == 0.37

# %% [markdown]
# Blocking is the outlier remedy; double quantization leaves the error where it was (slightly higher) and saves
# about 0.37 bits per parameter.
#
# ## 3. "LoRA decomposes $W_0$ into $A$ and $B$"
#
# **The statement.** The pretrained matrix is factored into two small matrices, which are then trained.
#
# **What is right.** LoRA (arXiv 2106.09685) never factors $W_0$. It keeps $W_0$ frozen and learns a separate
# *update* $\Delta W = BA$, starting from $\Delta W = 0$ because $B = 0$ at initialisation; $A$ is random and has
# nothing to do with $W_0$. (A rank-$r$ product could not equal a full-rank $W_0$ anyway.) Methods that do start
# from a factorisation of $W_0$ exist: PiSSA (arXiv 2404.02948), for example, initialises $A$ and $B$ from the top
# singular vectors of $W_0$ and freezes the residual, but that is a different method.
#
# The layers below keep their weights on minilora's backend, device memory on a GPU, so the inputs and the upstream
# gradient drawn with host NumPy go in with `asarray` (notebook 09 and docs/backends.md show the strict backend that
# checks this on a CPU).

# %%
from minilora.backend import asarray, default_rng
from minilora.nn import Linear, LoRALinear

base = Linear(256, 512, dtype="float64", rng=default_rng(0))
W0 = base.weight.data.copy()                                                    # (512, 256)
layer = LoRALinear(base, r=8, lora_alpha=16, rng=default_rng(1))
A = layer.lora_A["default"].weight.data                                         # (8, 256)
B = layer.lora_B["default"].weight.data                                         # (512, 8)
xin = asarray(rng.standard_normal((4, 256)))                                   # (N, D_in)
print(f"rank(W0) = {np.linalg.matrix_rank(W0)}, rank of any BA <= r = {A.shape[0]}")
print(f"at init: max |B| = {np.abs(B).max()}, so BA = 0 and ||W0 - s*BA|| / ||W0|| = "
      f"{np.linalg.norm(W0 - layer.scaling['default'] * B @ A) / np.linalg.norm(W0):.1f}")
print(f"output at init equals the base layer's exactly: {np.array_equal(layer(xin), base(xin))}")
layer(xin)
layer.backward(asarray(rng.standard_normal((4, 512))))                          # dL/dy (N, D_out)
print(f"after a backward: W0 has a gradient: {base.weight.grad is not None}; W0 unchanged: "
      f"{np.array_equal(base.weight.data, W0)}")
assert np.linalg.matrix_rank(W0) == 256 and not B.any() and np.array_equal(layer(xin), base(xin))
assert base.weight.grad is None

# %% [markdown]
# ## 4. "Most of an LLM's parameters sit in attention, which is why LoRA targets it"
#
# **The statement.** LoRA adapts the attention matrices because that is where the parameters are.
#
# **What is right.** In a standard block the attention projections hold $4d^2$ weights and the MLP $2\cdot4d^2 =
# 8d^2$ (GPT) or $3\,d\,d_{ff} \approx 8.1d^2$ (LLaMA's SwiGLU): the MLP holds about **two thirds**. The LoRA paper
# adapted only attention for simplicity and parameter efficiency, not because the parameters are there; QLoRA found
# that adapting all linear layers is needed to match full fine-tuning. `minilora.memory` counts it for LLaMA-7B and
# for this course's tiny GPT.

# %%
from minilora.nn import GPTConfig

tiny = memory.tiny_gpt_shape(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128))
mlp_share = {}
for name, shape in [("LLaMA-7B", memory.get_shape("llama-7b")), ("tiny GPT", tiny)]:
    lin = memory.block_linears(shape)                                           # module -> (d_in, d_out)
    attn = sum(i * o for n, (i, o) in lin.items() if "attn" in n)
    mlp = sum(i * o for n, (i, o) in lin.items() if "mlp" in n)
    mlp_share[name] = mlp / (attn + mlp)
    print(f"{name:<9} per block: attention {attn:>12,}  MLP {mlp:>12,}  -> MLP share {mlp_share[name]:.1%}")
assert round(mlp_share["LLaMA-7B"], 2) == 0.67 and round(mlp_share["tiny GPT"], 4) == 0.6667

# %% [markdown]
# ## 5. "Quantization turns 12 parameters into 4"
#
# **The statement.** A picture shows a dozen coloured parameters "compressed" into a few, with one parameter lost.
#
# **What is right.** Quantization keeps **every** parameter and stores each in fewer bits. We quantize 12 values to
# NF4: 12 values come back, in $12 \times 4$ bits of codes plus one float32 scale for the block, instead of
# $12 \times 32$ bits. What can be "lost" is precision: a value much smaller than the block's absmax lands on the
# zero code and comes back as exactly 0.

# %%
w12 = np.array([0.9, -0.7, 0.4, 0.35, -0.3, 0.2, -0.15, 0.1, 0.05, -0.04, 0.003, -1.2], dtype=np.float32)
packed12, st12 = quantize_4bit(w12, blocksize=64, quant_type="nf4")
w12_hat = dequantize_4bit(packed12, st12)
print(f"values in: {w12.size}, values out: {w12_hat.size}")
print(f"bytes: float32 {w12.nbytes} -> NF4 codes {packed12.nbytes} + absmax {st12.absmax.nbytes} "
      f"= {packed12.nbytes + st12.absmax.nbytes}")
print("dequantized:", np.round(w12_hat, 3))
print(f"values that came back as exactly 0: {int((w12_hat == 0).sum())} (the smallest ones)")
assert w12_hat.size == w12.size == 12 and (w12.nbytes, packed12.nbytes, st12.absmax.nbytes) == (48, 6, 4)
assert (w12_hat == 0).sum() >= 1

# %% [markdown]
# ## 6. "8-bit (or 4-bit) weights make QLoRA training faster"
#
# **The statement.** Integer weights mean integer arithmetic, which is faster, so QLoRA trains faster than LoRA.
#
# **What is right.** QLoRA never multiplies in 4 or 8 bits: every forward and backward first **dequantizes** the
# weight to the compute dtype (BF16 on a GPU, float32 here) and then runs an ordinary matmul. The dequantization is
# extra work, so a step is slower, not faster; the QLoRA paper trades speed for memory. Integer matmuls do speed up
# *inference* on hardware built for them (LLM.int8, arXiv 2208.07339), which is a different setting. We time, best of
# several runs, a $1024\times1024$ layer applied to 16 rows.

# %%
W = rng.standard_normal((1024, 1024)).astype(np.float32)                      # (D_out, D_in)
xb = rng.standard_normal((16, 1024)).astype(np.float32)                       # (N, D_in)
p4, s4 = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
q8, rs8, _ = int8_vectorwise_quant(W)


def best_ms(fn, repeat=15):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


t_float = best_ms(lambda: xb @ W.T)
t_nf4 = best_ms(lambda: xb @ dequantize_4bit(p4, s4).T)
t_int8 = best_ms(lambda: xb @ int8_vectorwise_dequant(q8, rs8).T)
print(f"float32 matmul:               {t_float:6.2f} ms")
print(f"NF4 dequantize + matmul:      {t_nf4:6.2f} ms  ({t_nf4 / t_float:.1f}x the float time)")
print(f"int8 dequantize + matmul:     {t_int8:6.2f} ms  ({t_int8 / t_float:.1f}x the float time)")
assert t_nf4 > t_float and t_int8 > t_float

# %% [markdown]
# The exact ratios depend on the machine and its load; that dequantize-then-multiply costs more than multiplying
# does not.
#
# ## Recap
#
# - $c = 127/\operatorname{absmax}$ is one constant; $q = \operatorname{round}(cX)$ are the int8 values.
# - Blocks contain outliers; double quantization saves about 0.37 bits per parameter and slightly raises the error.
# - LoRA learns $\Delta W = BA$ from zero next to a frozen $W_0$; it does not factor $W_0$.
# - The MLP holds about two thirds of a block's weights (67 % in LLaMA-7B, exactly 2/3 in a GPT block).
# - Quantization keeps every parameter and changes its bits (48 bytes → 10 bytes for 12 values).
# - QLoRA dequantizes before every matmul: it saves memory and costs time.
#
# ## Exercises
#
# 1. Find another statement about LoRA or QLoRA in a tutorial you have read, restate it, and write one cell that
#    measures whether it holds.
# 2. Repeat §2 with int8 instead of NF4 (`int8_blockwise_quant`). Does the conclusion change?
# 3. Count the attention share of LLaMA-7B's *total* parameters, embeddings and output head included. Does the
#    picture of §4 change?
# 4. In §6, increase the number of rows from 16 to 4096. How does the ratio change, and why (what grows with the
#    rows and what does not)?
