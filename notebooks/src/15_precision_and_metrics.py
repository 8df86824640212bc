# %% [markdown]
# # 15 · Precision and metrics: compute dtype, weight error against loss, a downstream metric, a rank-5 matrix
#
# **The idea in one sentence:** the numbers we report (bits per weight, mean weight error, bits per byte) are
# proxies, and each one can mislead if we forget what it leaves out: the dtype the matmul runs in, which weights the
# error hits, and whether the model actually gets more predictions right.
#
# **After this notebook you can**
# - tell the storage dtype of a QLoRA layer (4-bit codes) from its compute dtype (bfloat16 in the paper), emulate
#   bfloat16 and float16 compute in NumPy, and measure the error each adds to a layer's output;
# - show, on the shipped base, that a quantizer with a larger mean weight error can still give a lower loss, and say
#   why;
# - report a downstream metric (next-byte top-1 accuracy) with a standard error next to bits per byte, before and
#   after a short LoRA fine-tune;
# - count the parameters of a 100×100 matrix and of its rank-5 factors, and measure how well a rank-5 SVD rebuilds
#   a rank-5-plus-noise matrix.
#
# **Prerequisites:** notebooks 01 (LoRA), 03 (NF4), 06 (fine-tuning the shipped base). **Time:** about 30 minutes
# (the cells run in well under a minute).
#
# References: QLoRA (Dettmers et al., 2023, arXiv 2305.14314) for 4-bit storage with bfloat16 compute and for the
# paper-scale comparisons with 16-bit fine-tuning; LoRA (Hu et al., 2021, arXiv 2106.09685).

# %%
# %matplotlib inline
import platform
import time

import numpy as np

import minilora
from minilora.backend import asarray, default_rng, to_numpy
from minilora.data import LN2, load_corpus
from minilora.nn import Module
from minilora.optim import AdamW, get_constant_schedule_with_warmup
from minilora.peft import LoraConfig, get_peft_model, quantize_model
from minilora.pretrained import load_base
from minilora.train import train

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
SEED = 0
T0 = time.perf_counter()
base, meta = load_base()
code, docs = load_corpus("stdlib"), load_corpus("pydoc")

# %% [markdown]
# ## 1. Storage dtype and compute dtype
#
# A QLoRA layer keeps its weight as 4-bit codes plus block scales: that is the **storage** dtype. It never multiplies
# with 4-bit numbers. In the forward pass it dequantizes the codes to a **compute** dtype and runs an ordinary
# matmul in it. The QLoRA paper computes in bfloat16; minilora computes in float32. How much does the compute dtype
# add to the error the 4-bit storage already makes?
#
# NumPy has no bfloat16, but bfloat16 is just float32 with the low 16 bits of the mantissa dropped (8 exponent bits,
# 7 mantissa bits), so we can emulate it: round a float32 to its top 16 bits, to nearest with ties to even, and put
# zeros back. float16 (5 exponent bits, 10 mantissa bits) exists in NumPy. A tensor-core matmul multiplies the
# low-precision inputs exactly and accumulates in float32, so we round the inputs, multiply in float32, and round the
# output to the compute dtype again.

# %%
def to_bf16(a):
    """float32 -> the nearest bfloat16 value (round to nearest, ties to even), returned as float32."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def to_fp16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


# three checks of the rounding: 1 + 2^-8 is a tie and goes to even (1.0); 1 + 3*2^-8 goes up to 1 + 2^-6
print(to_bf16(np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7, np.pi], dtype=np.float32)))
assert to_bf16(np.float32(1 + 2**-8)) == 1.0 and to_bf16(np.float32(1 + 3 * 2**-8)) == 1 + 2**-6
assert to_bf16(np.float32(1 + 2**-7)) == 1 + 2**-7 and to_bf16(np.float32(np.pi)) == 3.140625

# %% [markdown]
# We take the first attention projection of the shipped base (`transformer.h.0.attn.c_attn`, 128 → 384), quantize it
# to NF4 with double quantization, and feed it its real input: the layer-normed embeddings of 16 validation windows
# of 128 bytes (2,048 rows). The reference is float32 compute with the float32 weight; we measure three errors
# relative to the size of the output, $\lVert y - y_{ref}\rVert / \lVert y_{ref}\rVert$.
#
# The measurements in this notebook are host NumPy (the bfloat16 emulation works on the raw bits). On a GPU backend
# the byte windows enter the model with `asarray`, and the weights and activations we measure come back with
# `to_numpy` (notebook 09 explains the rule, and the strict backend checks it on a CPU).

# %%
x_idx = asarray(docs.eval_windows("val", 128, 16)[0])                             # (16, 128) bytes
h = base.transformer.wte(x_idx) + base.transformer.wpe(asarray(np.arange(128)))   # (16, 128, 128)
xin = to_numpy(base.transformer.h[0].ln_1(h)).reshape(-1, 128)                   # (2048, 128) float32
lin = base.transformer.h[0].attn.c_attn
W, b = to_numpy(lin.weight.data), to_numpy(lin.bias.data)                         # (384, 128), (384,)
q = load_base()[0]
quantize_model(q, quant_type="nf4", compress_statistics=True)
W_hat = to_numpy(q.transformer.h[0].attn.c_attn.dequantize_weight())              # (384, 128) float32

y_ref = xin @ W.T + b                                                             # float32 weight, float32 compute
y_q32 = xin @ W_hat.T + b                                                         # NF4 storage, float32 compute
y_qbf = to_bf16(to_bf16(xin) @ to_bf16(W_hat).T + b)                              # NF4 storage, bf16 compute
y_qfp = to_fp16(to_fp16(xin) @ to_fp16(W_hat).T + b)                              # NF4 storage, fp16 compute


def rel(y):
    return float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref))


errs = {"NF4 storage, float32 compute": rel(y_q32), "NF4 storage, bfloat16 compute": rel(y_qbf),
        "NF4 storage, float16 compute": rel(y_qfp)}
only_bf = float(np.linalg.norm(y_qbf - y_q32) / np.linalg.norm(y_ref))            # what bf16 adds on its own
only_fp = float(np.linalg.norm(y_qfp - y_q32) / np.linalg.norm(y_ref))
for k, v in errs.items():
    print(f"{k:<32} relative output error {100 * v:.3f} %")
print(f"bf16 compute alone (vs NF4 + float32): {100 * only_bf:.3f} %; fp16 compute alone: {100 * only_fp:.4f} %")
print(f"W_hat exact in bf16? {np.array_equal(to_bf16(W_hat), W_hat)}; in fp16? {np.array_equal(to_fp16(W_hat), W_hat)}")
assert (round(100 * errs["NF4 storage, float32 compute"], 2), round(100 * only_bf, 2), round(100 * only_fp, 3)) == (
    3.26, 0.19, 0.024)
assert round(100 * errs["NF4 storage, bfloat16 compute"], 2) == 3.27 and only_bf > 5 * only_fp

# %% [markdown]
# Storing the weight in NF4 moves this layer's output by 3.26 % of its size. Computing in bfloat16 on top of that
# moves it by another 0.19 % (measured against the NF4 + float32 output); float16, with three more mantissa bits,
# by 0.024 %. Because the two errors are nearly independent they add like the sides of a right triangle: the total
# only goes from 3.26 % to 3.27 %. Note that the dequantized NF4 weight is not exactly representable in bfloat16
# (a code value times a float32 block scale has more mantissa bits), so the cast itself rounds.
#
# **What this measures and what it does not.** It measures the numerical error of the compute dtype, on one real
# layer and real inputs, emulated bit-exactly for the rounding of inputs and outputs. It does not measure speed: the
# reason to compute in bfloat16 on a GPU is that tensor cores run it many times faster than float32 and the
# activations take half the memory, and a NumPy emulation (which still multiplies in float32) cannot show either.
# Nor does it model a GPU's accumulation order inside the matmul, which differs between kernels.

# %% [markdown]
# ## 2. A lower weight error need not mean a lower loss
#
# Notebook 03 compares 4-bit data types by their mean weight error, $\frac{1}{n}\sum|W - \hat W|$. The quantity we
# care about is the model's loss. We quantize every linear layer of the blocks of the shipped base with NF4, FP4 and
# Int4 (no double quantization, so only the 16 code values differ), at two block sizes, and put four error measures
# next to the validation loss on the docs:
#
# * the mean weight error, over all weights;
# * the mean weight error on the 1 % largest weights $|W|$;
# * the largest weight error;
# * the **output error on real inputs**: for each layer, $\lVert X(W - \hat W)^\top\rVert / \lVert XW^\top\rVert$,
#   where $X$ holds the inputs that layer actually receives on 16 validation windows, averaged over the 16 layers.
#
# To get each layer's real inputs we wrap the layers of a float32 copy in a small recorder and run it once.

# %%
def mean_se(v):
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


class Recorder(Module):
    """Wraps a Linear and keeps the last input it saw, as (rows, in_features)."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.x = layer, None

    def forward(self, x):
        self.x = to_numpy(x).reshape(-1, x.shape[-1])
        return self.layer(x)


linears = [n for n, m in base.named_modules() if n.startswith("transformer.h.") and type(m).__name__ == "Linear"]
recording, _ = load_base()
for n in linears:
    recording.set_submodule(n, Recorder(recording.get_submodule(n)))
recording(x_idx)                                                                 # the 16 windows of section 1
X = {n: recording.get_submodule(n).x for n in linears}                           # (2048, in_features) each
W0 = {n: to_numpy(base.get_submodule(n).weight.data) for n in linears}
dx, dy = docs.eval_windows("val", 128, 256)                                      # 256 windows, 32,768 bytes


def window_bits(model, x, y):
    """(n_windows,) bits per byte of each window, in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(x), 16):
        z = to_numpy(model(asarray(x[i:i + 16]))[0]).astype(np.float64)         # (16, 128, 256)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        out.append(-np.take_along_axis(logp, y[i:i + 16, :, None], -1)[..., 0].mean(1) / LN2)
    model.train(True)
    return np.concatenate(out)


rows, per_win = {}, {}
for bs in (64, 1024):
    for qt in ("nf4", "fp4", "int4"):
        m, _ = load_base()
        quantize_model(m, quant_type=qt, compress_statistics=False, blocksize=bs)
        dW = {n: W0[n] - to_numpy(m.get_submodule(n).dequantize_weight()) for n in linears}
        e = np.concatenate([np.abs(d).ravel() for d in dW.values()])
        big = np.concatenate([np.abs(w).ravel() for w in W0.values()])
        top = big >= np.quantile(big, 0.99)                                     # the 1 % largest weights
        out_err = np.mean([np.linalg.norm(X[n] @ dW[n].T) / np.linalg.norm(X[n] @ W0[n].T) for n in linears])
        per_win[qt, bs] = window_bits(m, dx, dy)
        rows[qt, bs] = (e.mean(), e[top].mean(), e.max(), out_err, per_win[qt, bs].mean())
base_bits = window_bits(base, dx, dy).mean()
print(f"float32 base: {base_bits:.4f} bits/byte on 256 docs validation windows")
print(f"{'type':<5} {'block':>5} {'mean |dW|':>10} {'top 1 %':>8} {'max |dW|':>9} {'output err':>11} {'bits/byte':>10}")
for (qt, bs), (mean, top1, mx, oe, bits) in rows.items():
    print(f"{qt:<5} {bs:>5} {mean:>10.5f} {top1:>8.5f} {mx:>9.5f} {100 * oe:>10.2f}% {bits:>10.4f}")
diff = per_win["fp4", 1024] - per_win["int4", 1024]
print("loss of FP4 minus Int4, blocks of 1,024, paired over 256 windows: {:+.4f} ± {:.4f} bits/byte".format(
    *mean_se(diff)))
R2 = {k: tuple(round(float(v), 4) for v in r) for k, r in rows.items()}
assert R2[("int4", 1024)] == (0.0047, 0.0062, 0.0227, 0.0733, 2.2213)
assert R2[("fp4", 1024)] == (0.0046, 0.0108, 0.0465, 0.076, 2.2396)
assert [R2[k, 64][4] for k in ("nf4", "fp4", "int4")] == [2.1948, 2.214, 2.2103]
assert rows["int4", 1024][0] > rows["fp4", 1024][0] and rows["int4", 1024][4] < rows["fp4", 1024][4]
assert rows["int4", 1024][3] < rows["fp4", 1024][3]                              # the output error orders them right
assert [round(v, 4) for v in mean_se(diff)] == [0.0183, 0.0029] and mean_se(diff)[0] > 6 * mean_se(diff)[1]
assert round(base_bits, 4) == 2.1744 and rows["int4", 64][3] < rows["nf4", 1024][3]
assert rows["int4", 64][4] > rows["nf4", 1024][4]                                # the output error's one miss
assert round(rows["fp4", 1024][2] / rows["int4", 1024][2]) == 2 and sum(w.size for w in W0.values()) == 786_432
assert all(rows["int4", bs][1] < rows["nf4", bs][1] and rows["int4", bs][4] > rows["nf4", bs][4] for bs in (64, 1024))
assert rows["int4", 64][0] < rows["fp4", 64][0] and rows["int4", 64][4] < rows["fp4", 64][4]   # blocks of 64 agree

# %% [markdown]
# The interesting pair is Int4 against FP4 with blocks of 1,024. Int4 has the *larger* mean weight error (0.0047
# against 0.0046) and yet the *lower* loss (2.2213 against 2.2396 bits/byte, on 256 windows where the float32 base
# scores 2.1744). The difference, 0.0183 ± 0.0029 bits/byte, is more than six paired standard errors, so it is not
# noise. With blocks of 64 the two measures agree.
#
# Why? A layer does not care about $W - \hat W$ as such; it cares about $(W - \hat W)x$ for the inputs $x$ it
# actually receives. Those inputs are far from uniform: a few features carry much larger activations than the rest,
# so an error in a column that meets a large feature costs much more than the same error elsewhere. The mean weight
# error weighs all 786,432 weights alike and cannot see that. The output error on real inputs can, and it orders
# this pair correctly (7.33 % for Int4 against 7.60 % for FP4).
#
# A tempting shortcut, "only the errors on the largest weights matter", does not hold either. FP4's code values are
# dense near zero and sparse near the block maximum, so it rounds the largest weights coarsely (0.0108 on the top
# 1 %, against 0.0062 for Int4's evenly spaced levels, and twice Int4's worst error). But NF4 also has larger errors
# on the largest weights than Int4, at both block sizes, and still the lowest loss of all: it spends its levels where
# most weights are. What matters is the error where the inputs are large, and the output error measures exactly
# that. Even it is only a proxy: it ranks Int4 with blocks of 64 (4.92 %) ahead of NF4 with blocks of 1,024
# (5.26 %), and the loss ranks them the other way (2.2103 against 2.2009). Errors also travel through later layers
# and the softmax, which is why a quantizer is finally judged by the loss, on held-out data, with a standard error.

# %% [markdown]
# ## 3. A downstream metric next to bits per byte
#
# Bits per byte is the average surprise of the model. A downstream metric counts whether a prediction is *right*:
# here, **next-byte top-1 accuracy** on held-out Python code, the fraction of positions where the model's most
# likely next byte is the true one. We measure it on 64 validation windows of 128 bytes (8,192 predictions) before
# and after a short LoRA fine-tune on code (notebook 13's recipe: $r = 8$ on all linear layers, 40 AdamW steps), with
# a standard error over windows, paired because both models see the same windows.

# %%
cx, cy = code.eval_windows("val", 128, 64)                                      # (64, 128) each


def per_window(model):
    """(accuracy, bits/byte) of each of the 64 windows, each (64,)."""
    model.eval()
    acc, bits = [], []
    for i in range(0, 64, 16):
        z = to_numpy(model(asarray(cx[i:i + 16]))[0]).astype(np.float64)        # (16, 128, 256)
        y = cy[i:i + 16]
        acc.append((z.argmax(-1) == y).mean(1))
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        bits.append(-np.take_along_axis(logp, y[..., None], -1)[..., 0].mean(1) / LN2)
    model.train(True)
    return np.concatenate(acc), np.concatenate(bits)


lora = get_peft_model(load_base()[0], LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                      rng=default_rng(SEED))
acc0, bits0 = per_window(lora)                                                   # B = 0: identical to the base
opt = AdamW(lora.named_parameters(), lr=1e-3, weight_decay=0.0)
train(lora, opt, lambda rng: code.get_batch("train", 4, 64, rng), max_steps=40, max_grad_norm=1.0,
      lr_schedule=get_constant_schedule_with_warmup(4), seed=SEED, progress=False)
acc1, bits1 = per_window(lora)
for name, a, bb in (("base", acc0, bits0), ("LoRA, 40 steps", acc1, bits1)):
    print("{:<15} top-1 accuracy {:.2%} ± {:.2%}   {:.3f} ± {:.3f} bits/byte".format(name, *mean_se(a),
                                                                                      *mean_se(bb)))
d_acc, d_bits = mean_se(acc1 - acc0), mean_se(bits0 - bits1)
print("paired change: accuracy {:+.2%} ± {:.2%}, bits/byte {:+.3f} ± {:.3f} (lower is better)".format(
    *d_acc, -d_bits[0], d_bits[1]))
R3 = (round(acc0.mean(), 4), round(acc1.mean(), 4), round(d_acc[0], 4), round(d_acc[1], 4), round(d_bits[0], 3),
      round(d_bits[1], 3))
assert R3 == (0.4702, 0.4764, 0.0062, 0.0033, 0.148, 0.016)
assert d_bits[0] > 9 * d_bits[1] and 1.5 * d_acc[1] < d_acc[0] < 2 * d_acc[1]

# %% [markdown]
# The base already predicts 47.02 % of the next bytes of held-out code exactly (much of code is spaces, brackets
# and repeated names). After 40 steps of LoRA the loss falls by 0.148 ± 0.016 bits/byte, about nine standard errors,
# while top-1 accuracy rises by only 0.62 ± 0.33 percentage points, under two standard errors. Both describe the same
# model. The loss moves on every prediction: it rewards putting more probability on the right byte even when another
# byte is still ranked first. Accuracy only moves when the ranking flips, so it is coarser and needs more data to
# show a small change; it is also closer to what a user sees.
#
# The lecture notes judge fine-tuning by ROUGE-1 on a summarization task. ROUGE-1 is the same kind of number as our
# accuracy: it counts overlap of single words between a generated text and a reference, so it scores discrete
# outputs rather than probabilities, and its differences between methods need a standard error just as much. The
# miniature cannot reproduce the notes' numbers (the model writes no summaries); what carries over is the lesson
# that a loss and a task metric answer different questions and move by different amounts.

# %% [markdown]
# ## 4. The 100×100 example: parameter counts and a rank-5 reconstruction
#
# A 100×100 weight has 10,000 numbers. LoRA with $r = 5$ replaces its update by $B$ (100×5) times $A$ (5×100): 500
# + 500 = 1,000 trainable numbers, a tenth. Whether that loses anything depends on the update's rank. We build a
# matrix that is exactly rank 5 plus a little noise and rebuild it from its top five singular values (the best rank-5
# approximation, by the Eckart–Young theorem).

# %%
rng = np.random.default_rng(SEED)
d, r = 100, 5
M5 = rng.standard_normal((d, r)) @ rng.standard_normal((r, d)) / np.sqrt(r)     # rank 5, entries of size ~1
noise = 0.01 * rng.standard_normal((d, d))
M = M5 + noise
U, S, Vt = np.linalg.svd(M)
B_, A_ = U[:, :r] * S[:r], Vt[:r]                                                # (100, 5) and (5, 100)
err = np.linalg.norm(M - B_ @ A_) / np.linalg.norm(M)
err_clean = np.linalg.norm(M5 - B_ @ A_) / np.linalg.norm(M5)
print(f"full: {M.size:,} numbers; factors: {B_.size} + {A_.size} = {B_.size + A_.size:,} numbers "
      f"({M.size // (B_.size + A_.size)}x fewer)")
print("singular values 1-7:", np.round(S[:7], 3))
print(f"rank-5 reconstruction: relative error {100 * err:.3f} % of M; {100 * err_clean:.3f} % of the rank-5 part")
print(f"noise alone is {100 * np.linalg.norm(noise) / np.linalg.norm(M):.3f} % of M")
print(f"run time {time.perf_counter() - T0:.1f} s")
assert (M.size, B_.size + A_.size) == (10_000, 1_000)
assert round(100 * np.linalg.norm(noise) / np.linalg.norm(M), 3) == 1.067 and round(float(S[4] / S[5])) == 168
assert (round(100 * err, 3), round(100 * err_clean, 3), round(float(S[4] / S[5]), 1)) == (1.014, 0.332, 167.7)

# %% [markdown]
# Five factors of 100 numbers on each side hold the whole matrix: the rank-5 rebuild misses 1.014 % of $M$, which
# is just below the size of the noise itself (1.067 %): the five kept directions even absorb a little of it. Against
# the clean rank-5 part the error is 0.332 %. The spectrum shows why: the fifth singular value is 168 times the
# sixth, a sharp cliff after rank 5. A real weight update has no such cliff, which is why notebook 12 sweeps the rank
# instead of reading it off.
#
# ## Recap
#
# - QLoRA stores 4-bit codes and computes in bfloat16. On a layer of the shipped base, NF4 storage moves the output
#   by 3.26 %; bfloat16 compute adds 0.19 % and float16 compute 0.024 %, which together barely change the total.
#   The speed that bfloat16 buys on GPUs cannot be measured in NumPy.
# - Mean weight error is a proxy. With blocks of 1,024, Int4 has a larger mean error than FP4 but a lower loss,
#   because FP4 rounds the largest weights coarsely and the loss weights errors by the inputs they meet.
# - A downstream metric (top-1 next-byte accuracy) moves far less, in standard errors, than bits per byte after the
#   same fine-tune: +0.62 ± 0.33 points against −0.148 ± 0.016 bits/byte.
# - A 100×100 matrix has 10,000 numbers, its rank-5 factors 1,000; a rank-5-plus-noise matrix is rebuilt by its
#   top five singular directions to within the noise.
#
# ## Exercises
#
# 1. Make `to_bf16` truncate instead of rounding (drop the low 16 bits). How much does the bfloat16 compute error of
#    section 1 grow, and is it still small next to the NF4 error?
# 2. Add block sizes 128 and 256 to section 2. At which block size does the ordering of FP4 and Int4 by mean error
#    first disagree with their ordering by loss?
# 3. Measure, for each quantizer of section 2, the relative output error of every quantized layer on its real inputs
#    (as in section 1). Does its average order the quantizers as the loss does?
# 4. Train the LoRA of section 3 for 160 steps instead of 40. Does the accuracy gain reach three standard errors?
# 5. In section 4, raise the noise from 0.01 to 0.5. What happens to the cliff between the fifth and sixth singular
#    values, and to the rank-5 error against the clean part?
