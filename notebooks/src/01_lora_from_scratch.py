# %% [markdown]
# # 01 · LoRA from scratch: rank, low-rank factorisation and $\Delta W = BA$
#
# **The idea in one sentence:** instead of changing every entry of a big frozen matrix $W_0$, LoRA (Hu et al., 2021,
# arXiv 2106.09685) learns a low-rank change $\Delta W = BA$ that starts at zero and costs a tiny fraction of the
# parameters.
#
# **After this notebook you can**
# - define the rank of a matrix and factor a rank-1 matrix into a column times a row by hand;
# - predict the error of a rank-$k$ truncated SVD from the singular values (Eckart–Young);
# - write the LoRA forward pass $y = xW_0^\top + s\,(xA^\top)B^\top$ with PEFT's shapes, without forming $\Delta W$;
# - count LoRA's trainable parameters for one layer and for a model, and say when the count stops being "small";
# - explain why $B$ starts at zero while $A$ is random.
#
# **Prerequisites:** matrix multiplication and transposes, NumPy basics; no calculus needed here (notebook 05 does
# the gradients). **Time:** about 45 minutes (the cells run in a few seconds).
#
# The plan:
#
# 1. what rank means, on a 4×4 matrix that is secretly a 4×1 times a 1×4;
# 2. how well a truncated SVD approximates a matrix, and what the error is;
# 3. the LoRA forward pass and its shapes (PEFT's layout);
# 4. how many parameters that saves, from a 512×64 layer up to a 180B model;
# 5. why $B$ starts at zero.

# %%
# %matplotlib inline
import platform

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora.backend import asarray

print(f"python {platform.python_version()} | numpy {np.__version__} | matplotlib {matplotlib.__version__} "
      f"| minilora {minilora.__version__} | backend {minilora.get_backend()}")
rng = np.random.default_rng(0)          # every random number in this notebook comes from here
plt.rcParams["figure.dpi"] = 80

# %% [markdown]
# ## 1. Rank: a 4×4 matrix that is really 8 numbers
#
# The rank of a matrix is the number of linearly independent rows (equivalently, columns). The matrix below has
# 16 entries, but every row is a multiple of the same row $v = [4, 1, 3, -3]$, so its rank is 1:
#
# $$W = u\,v^\top,\qquad u \in \mathbb{R}^{4\times 1},\; v^\top \in \mathbb{R}^{1\times 4}.$$

# %%
W = np.array([[-8, -2, -6, 6],
              [-4, -1, -3, 3],
              [28, 7, 21, -21],
              [24, 6, 18, -18]])                       # (4, 4)
print("rank(W) =", np.linalg.matrix_rank(W))

# %% [markdown]
# Recover the factors exactly: take the first non-zero row divided by the gcd of its entries as $v^\top$, and each
# row's multiple of it as $u$. Integers in, integers out, so the product must give back $W$ bit for bit.

# %%
from minilora.memory import square_layer_lora_params


def rank1_factorize(W):
    """Exact factors of an integer rank-1 matrix W = u vᵀ (v's first non-zero entry made positive)."""
    row = next(r for r in W if r.any())                                  # (n,) the first non-zero row
    g = np.gcd.reduce(row) * np.sign(row[np.flatnonzero(row)[0]])        # its gcd, signed
    vT = (row // g)[None, :]                                             # (1, n)
    j = np.flatnonzero(vT[0])[0]
    u = (W[:, j] // vT[0, j])[:, None]                                   # (m, 1) each row's multiple of v
    assert np.array_equal(u @ vT, W), "W has rank > 1: no exact u vᵀ"
    return u, vT


u, vT = rank1_factorize(W)                            # (4, 1), (1, 4)
print("u =", u.ravel(), " v^T =", vT.ravel())
print("u (4x1) @ v^T (1x4) == W exactly:", np.array_equal(u @ vT, W))
print(f"numbers stored: {W.size} -> {u.size + vT.size}")
assert np.linalg.matrix_rank(W) == 1 and np.array_equal(u @ vT, W) and u.size + vT.size == 8
assert u.ravel().tolist() == [-2, -1, 7, 6] and vT.ravel().tolist() == [4, 1, 3, -3]

# %% [markdown]
# ## 2. Truncated SVD: the best rank-$k$ approximation and its error
#
# Any matrix has a singular value decomposition $W = U\Sigma V^\top$ with $\sigma_1 \ge \sigma_2 \ge \dots \ge 0$.
# Keeping the top $k$ singular triplets gives $W_k = U_{:,:k}\Sigma_{:k}V_{:,:k}^\top$, and the Eckart–Young
# theorem says no rank-$k$ matrix is closer. Its error is exactly the energy left out:
#
# $$\lVert W - W_k \rVert_F = \sqrt{\textstyle\sum_{i>k} \sigma_i^2}.$$
#
# First the 4×4 example: $\sigma_2 = \dots = 0$, so the rank-1 truncation is exact (up to float64 rounding).

# %%
U, S, Vt = np.linalg.svd(W.astype(np.float64))
W1 = S[0] * np.outer(U[:, 0], Vt[0])                    # (4, 4) rank-1 truncation
print("singular values:", np.round(S, 6))
gap = np.abs(W - W1).max()
print(f"max |W - W_1| {'< 1e-12' if gap < 1e-12 else f'= {gap:.1e}'}  (float64 rounding only)")
assert gap < 1e-12 and np.all(S[1:] < 1e-12)

# %% [markdown]
# Now a realistic case. LoRA's hypothesis is that the *update* a fine-tune needs has a low "intrinsic rank":
# a few directions carry most of it. We build a 256×128 matrix with a quickly decaying spectrum
# (a rank-8 signal plus small noise) and, for contrast, a pure Gaussian matrix with no structure, then truncate both.

# %%
D_out, D_in = 256, 128
signal = rng.standard_normal((D_out, 8)) @ rng.standard_normal((8, D_in))          # (256, 128) rank 8
structured = signal + 0.1 * rng.standard_normal((D_out, D_in))                      # (256, 128)
gaussian = rng.standard_normal((D_out, D_in))                                       # (256, 128)


def truncation_errors(M, ks):
    """Relative Frobenius error of the rank-k truncation, measured and from the singular values."""
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    measured = [np.linalg.norm(M - (U[:, :k] * S[:k]) @ Vt[:k]) / np.linalg.norm(M) for k in ks]
    predicted = [np.sqrt(np.sum(S[k:] ** 2)) / np.sqrt(np.sum(S ** 2)) for k in ks]
    return np.array(measured), np.array(predicted), S


ks = [1, 2, 4, 8, 16, 32, 64, 128]
err_s, pred_s, S_s = truncation_errors(structured, ks)
err_g, pred_g, S_g = truncation_errors(gaussian, ks)
print(" k   structured   gaussian")
for k, a, b in zip(ks, err_s, err_g, strict=True):
    print(f"{k:3d}   {a:10.4f}   {b:8.4f}")
ey_gap = max(np.abs(err_s - pred_s).max(), np.abs(err_g - pred_g).max())
print(f"Eckart-Young check, max |measured - predicted| {'< 1e-12' if ey_gap < 1e-12 else f'= {ey_gap:.1e}'}")
assert ey_gap < 1e-12 and err_s[ks.index(8)] < 0.05 < 0.9 < err_g[ks.index(8)]   # rank 8 captures the signal

# %% [markdown]
# The structured matrix is captured almost perfectly at $k = 8$ (what remains is the noise), while the Gaussian one
# needs nearly all 128 directions. Low rank pays off exactly when the matrix *has* low-rank structure.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.semilogy(S_s, label="rank-8 signal + noise")
ax1.semilogy(S_g, label="Gaussian")
ax1.set(title="singular values", xlabel="index i", ylabel=r"$\sigma_i$")
ax1.legend()
ax2.plot(ks, err_s, "o-", label="rank-8 signal + noise")
ax2.plot(ks, err_g, "s-", label="Gaussian")
ax2.set(xscale="log", title="rank-k truncation error", xlabel="k", ylabel=r"$\|W-W_k\|_F / \|W\|_F$")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The LoRA forward pass: $\Delta W = BA$, never formed
#
# PEFT stores the base weight torch-style, $W_0 \in \mathbb{R}^{D_{out}\times D_{in}}$, and the adapter as
# $A \in \mathbb{R}^{r\times D_{in}}$ ("down") and $B \in \mathbb{R}^{D_{out}\times r}$ ("up"). With scaling
# $s = \alpha / r$:
#
# $$y = x W_0^\top + s\,(x A^\top) B^\top = x\,(W_0 + s\,BA)^\top.$$
#
# The brackets matter: $h = xA^\top$ is only $(N, r)$, so the adapter costs $r(D_{in}+D_{out})$ multiply-adds per
# row instead of $D_{in}D_{out}$, and the $(D_{out}, D_{in})$ matrix $\Delta W$ is never built. minilora's
# `nn.functional.lora_forward(x, A, B, s)` is exactly these two thin matmuls; we check it against the merged form.

# %%
from minilora.nn import functional as F

N, D_in, D_out, r, alpha = 16, 64, 512, 8, 16
s = alpha / r
x = rng.standard_normal((N, D_in))                                   # (N, D_in)
W0 = rng.standard_normal((D_out, D_in)) / np.sqrt(D_in)              # (D_out, D_in) frozen
A = rng.uniform(-1 / np.sqrt(D_in), 1 / np.sqrt(D_in), (r, D_in))    # (r, D_in)   PEFT's kaiming-uniform bound
B = rng.standard_normal((D_out, r)) * 0.01                           # (D_out, r)  pretend it was trained a little

delta, (_, h) = F.lora_forward(x, A, B, s)                           # (N, D_out) = s (x A^T) B^T, h = x A^T (N, r)
y_lora = x @ W0.T + delta                                            # (N, D_out)
y_merged = x @ (W0 + s * B @ A).T                                    # (N, D_out)  the merged form
form_gap = np.abs(y_lora - y_merged).max()
print(f"max |two-matmul form - merged form| {'< 1e-12' if form_gap < 1e-12 else f'= {form_gap:.1e}'}")
print("rank(BA) =", np.linalg.matrix_rank(B @ A), f"(<= r = {r}; the full matrix is {D_out}x{D_in})")
print(f"h = x A^T has shape {h.shape}; multiply-adds per row: adapter {r * (D_in + D_out):,} "
      f"vs dense dW {D_in * D_out:,}")
assert form_gap < 1e-12 and np.linalg.matrix_rank(B @ A) == r and h.shape == (N, r)

# %% [markdown]
# ## 4. Parameter counts
#
# A LoRA adapter on a $D_{out}\times D_{in}$ layer trains $r\,(D_{in} + D_{out})$ numbers instead of
# $D_{in}D_{out}$. For the 512×64 layer at $r = 8$:

# %%
full = D_out * D_in
lora = r * (D_in + D_out)
print(f"full: {full:,} | LoRA r={r}: {lora:,} = A {A.size:,} + B {B.size:,} | {100 * (1 - lora / full):.0f} % fewer")
assert (full, lora, round(100 * (1 - lora / full))) == (32_768, 4_608, 86)

# %% [markdown]
# Scale it up. Pretend a whole model of $N$ parameters were one square $d\times d$ layer, $d = \sqrt{N}$. LoRA then
# trains $2\,d\,r = 2\sqrt{N}\,r$ parameters (`minilora.memory.square_layer_lora_params`). The last column gives the
# share of the model at the largest rank.

# %%
def fmt(n):
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}" if n / div < 10 else f"{n / div:.0f} {unit}"
    return f"{n:.0f}"


sizes = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}
ranks = [1, 2, 8, 16, 512, 1024, 8192]
print(f"{'model':>6} {'d = sqrt(N)':>12} " + " ".join(f"{'r=' + str(r_):>8}" for r_ in ranks) + "   % at r=8192")
share = {}                                                             # model -> % of N trained at r = 8192
for name, n_params in sizes.items():
    counts = [square_layer_lora_params(n_params, r_) for r_ in ranks]    # 2·sqrt(N)·r each
    share[name] = 100 * counts[-1] / n_params
    print(f"{name:>6} {np.sqrt(n_params):12,.0f} " + " ".join(f"{fmt(c):>8}" for c in counts)
          + f" {share[name]:11.1f} %")
print(f"sanity: 7B at r=1 -> {square_layer_lora_params(7e9, 1):,.0f} trainable parameters")
assert round(square_layer_lora_params(7e9, 1)) == 167_332
assert [round(v, 1) for v in share.values()] == [19.6, 14.4, 6.2, 3.9]
assert all(100 * square_layer_lora_params(n, 16) / n < 0.05 for n in sizes.values())   # usual ranks: tiny

# %% [markdown]
# These are the values of the rank table in the lecture notes (167 k … 7.0 B; the notes cut two cells instead of
# rounding them: 270 M for 270.9 M and 1.8 B for 1.87 B). Read the last column before calling LoRA "always tiny":
# at the ranks people use ($r \le 16$) every model trains under 0.05 %, but at $r = 8192$ the square-layer picture
# trains **19.6 %** of a 7B model and **14.4 %** of a 13B one (6.2 % and 3.9 % for 70B and 180B). The saving comes
# from $r \ll d$; once $r$ is a tenth of $d = \sqrt{N}$, the adapter is a fifth of the model.

# %% [markdown]
# ## 5. Why $B$ starts at zero
#
# PEFT (and the paper) initialise $A$ randomly and $B = 0$. Then $\Delta W = BA = 0$: the adapted model starts
# *exactly* as the pretrained one, so fine-tuning begins from the base model's quality, not from a perturbed one.
#
# The gradients (derived in notebook 05) with upstream gradient $\partial L/\partial y = dy$ are
#
# $$dB = s\,dy^\top (xA^\top),\qquad dA = s\,(dy\,B)^\top x .$$
#
# With $B = 0$, $dA = 0$ but $dB \ne 0$: the first step moves $B$, after which $A$ gets gradients too. If *both*
# were zero, both gradients would be zero forever; if both were random, the model would start off its pretrained
# output.
#
# The layers keep their weights on minilora's current backend, which on a GPU is device memory, so the host arrays
# they meet here go in with `asarray` first (notebook 09 and docs/backends.md show the strict backend that checks this
# without a GPU).

# %%
from minilora.backend import default_rng
from minilora.nn import Linear, LoRALinear

x_in = asarray(x)                                                    # (N, D_in)  §3's x, on the layers' backend
dy = asarray(rng.standard_normal((N, D_out)))                        # (N, D_out) upstream gradient


def lora_grads(A, B):
    """max |dA|, max |dB| from minilora's hand-written LoRA backward (derived in notebook 05)."""
    _, cache = F.lora_forward(x_in, A, B, s)
    _, dA, dB = F.lora_backward(dy, cache, A, B, s)                  # dA (r, D_in), dB (D_out, r)
    return np.abs(dA).max(), np.abs(dB).max()


base = Linear(D_in, D_out, dtype="float64", rng=default_rng(0))    # a frozen base layer
layer = LoRALinear(base, r=r, lora_alpha=alpha)                      # PEFT's init: A kaiming-uniform, B = 0
A0, B0 = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
print(f"B = 0:        max |LoRALinear(x) - base(x)| = {np.abs(layer(x_in) - base(x_in)).max():.1f} | "
      f"max|dA| = {lora_grads(A0, B0)[0]:.3f}, max|dB| = {lora_grads(A0, B0)[1]:.3f}")
print(f"A = B = 0:    max|dA| = {lora_grads(0 * A0, B0)[0]:.3f}, max|dB| = {lora_grads(0 * A0, B0)[1]:.3f}  (stuck)")
B_rand = asarray(rng.uniform(-1 / np.sqrt(r), 1 / np.sqrt(r), (D_out, r)))   # (D_out, r)
y_rand = base(x_in) + F.lora_forward(x_in, A0, B_rand, s)[0]                # (N, D_out)
print(f"both random:  max |y - base(x)| = {np.abs(y_rand - base(x_in)).max():.3f}  (the pretrained output is lost)")

assert np.abs(layer(x_in) - base(x_in)).max() == 0 and lora_grads(A0, B0)[0] == 0 < lora_grads(A0, B0)[1]
assert lora_grads(0 * A0, B0) == (0, 0)

# %% [markdown]
# ## Recap
#
# - Rank counts independent directions; a rank-1 $4\times4$ matrix is a column times a row (16 numbers → 8).
# - The best rank-$k$ approximation is the truncated SVD, with error $\sqrt{\sum_{i>k}\sigma_i^2}$: exact when the
#   matrix really has low rank, poor when it has none.
# - LoRA adds $s\,BA$ to a frozen $W_0$ and applies it as two thin matmuls; a $D_{out}\times D_{in}$ layer trains
#   $r(D_{in}+D_{out})$ numbers (4,608 instead of 32,768 for 512×64 at $r = 8$).
# - "Small" depends on $r \ll d$: at $r = 8192$ the square-layer picture trains 19.6 % of a 7B model.
# - $B = 0$ makes training start exactly at the pretrained model; $A$ random keeps $B$'s gradient non-zero.
#
# Next: shrinking the *frozen* weights with quantization (notebooks 02–04).
#
# ## Exercises
#
# 1. Factor the $4\times4$ matrix of §1 by hand (pick $v^\top$ from the first row), then write `lora_forward(x, A, B,
#    s)` yourself and check it against the merged form $x(W_0 + sBA)^\top$ on random shapes.
# 2. For a $100\times100$ layer adapted at $r = 5$: how many parameters does the adapter train, and what fraction of
#    the layer is that? At which $r$ does the adapter have as many parameters as the layer itself?
# 3. Build a $256\times128$ matrix of rank 16 plus noise of standard deviation 0.1 and predict, from its singular
#    values alone, the relative error of the rank-8 and rank-16 truncations; then measure them.
# 4. Start a `LoRALinear` with $B$ random and $A = 0$ instead. Which gradient is zero now, and does the layer still
#    start at the base model's output?
#
# The graded versions are in `exercises/ex01_*.py`; check your work with `python3 -m pytest exercises/test_ex01_*.py`.
