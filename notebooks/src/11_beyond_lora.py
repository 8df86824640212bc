# %% [markdown]
# # 11 · Beyond LoRA: DoRA, PiSSA/OLoRA initialisation and 8-bit AdamW
#
# **The idea in one sentence:** three additions that practitioners put on top of plain (Q)LoRA change *what* the
# adapter learns (DoRA: a magnitude and a direction), *where* it starts (PiSSA/OLoRA: on the base weight's principal
# directions instead of at zero), and *how much* its optimizer costs (8-bit AdamW: 2.03 instead of 8 bytes of state
# per trainable parameter).
#
# **After this notebook you can**
# - write DoRA's weight $W' = m \odot (W_0 + sBA)/\lVert W_0 + sBA\rVert$ and check it against a DoRA layer's output;
# - say which gradient term DoRA drops by detaching the norm, and measure it;
# - see on one layer how DoRA's updates differ from LoRA's: LoRA moves a row's length and direction together, DoRA
#   moves the length on its own (Figure 1);
# - explain why a PiSSA or OLoRA adapter is not zero at step 0 while the model is still unchanged (the residual base);
# - run LoftQ's alternation (quantize, then fit the rest with a rank-$r$ SVD) and measure how much closer
#   $Q + sBA$ starts to $W_0$ than plain QLoRA's 4-bit base, and compare it with quantizing PiSSA's residual
#   (Table 1);
# - count the bytes of AdamW's and 8-bit AdamW's states, measure the 8-bit states' quantization error over a short
#   fine-tune, and read the memory saved at 7B and 65B from the calculator.
#
# **Prerequisites:** notebooks 01 (LoRA, truncated SVD), 05 (LoRA's backward) and 06 (fine-tuning the tiny GPT);
# notebook 08's memory calculator for the last section. **Time:** about 45 minutes (the cells run in well under a
# minute).
#
# Everything below runs on the tiny pretrained GPT of notebook 06 (`minilora.pretrained.load_base()`) or on a single
# layer, with the same names and options as Hugging Face PEFT and bitsandbytes:
#
# | addition | paper (arXiv) | switch |
# |---|---|---|
# | DoRA | Liu et al., 2024 (2402.09353) | `LoraConfig(use_dora=True)` |
# | PiSSA / OLoRA | Meng et al. (2404.02948) / Büyükakyüz (2406.01775), 2024 | `init_lora_weights="pissa"` / `"olora"` |
# | LoftQ | Li et al., 2023 (2310.08659) | `init_lora_weights="loftq"`, `loftq_config=LoftQConfig(...)` |
# | 8-bit AdamW | Dettmers et al., 2021 (2110.02861) | `minilora.optim.AdamW8bit`, `PagedAdamW8bit` |

# %%
# %matplotlib inline
import platform
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import memory
from minilora.backend import asarray, default_rng, get_array_module, to_numpy
from minilora.data import LN2, load_corpus
from minilora.nn import Linear, LoRALinear
from minilora.nn.lora import loftq_factors, pissa_factors
from minilora.nn.parameter import Parameter
from minilora.optim import AdamW, AdamW8bit, PagedAdamW8bit, get_constant_schedule_with_warmup
from minilora.optim.paged_pool import PagedPool
from minilora.peft import LoftQConfig, LoraConfig, get_peft_model, memory_report, quantize_model
from minilora.pretrained import eval_batches, load_base
from minilora.quant import create_dynamic_map, dequantize_4bit, quantize_4bit
from minilora.quant.blockwise import dequantize_blocks, quantize_blocks_lut
from minilora.train import evaluate, train

print(f"python {platform.python_version()} | numpy {np.__version__} | matplotlib {matplotlib.__version__} "
      f"| minilora {minilora.__version__} | backend {minilora.get_backend()}")
plt.rcParams["figure.dpi"] = 80
SEED, STEPS, BATCH, BLOCK, EVAL_WINDOWS, LR = 0, 30, 4, 64, 8, 1e-3     # notebook 06's short fine-tune
rng = np.random.default_rng(0)
base, meta = load_base()
code = load_corpus("stdlib")                                             # the fine-tuning domain of notebook 06
code_eval = eval_batches(code, BLOCK, EVAL_WINDOWS)


def val_bits(model):
    return evaluate(model, code_eval) / LN2


def finetune(model, opt):
    """Notebook 06's recipe: 30 AdamW steps, batch 4 x 64 bytes, clipping at 1, 4 warm-up steps, seed 0."""
    t0 = time.perf_counter()
    res = train(model, opt, lambda g: code.get_batch("train", BATCH, BLOCK, g), max_steps=STEPS, max_grad_norm=1.0,
                lr_schedule=get_constant_schedule_with_warmup(4), seed=SEED, progress=False)
    return res, (time.perf_counter() - t0) / STEPS


base_bits = val_bits(base)
print(f"tiny GPT: {base.get_num_params():,} parameters; validation on code {base_bits:.3f} bits/byte")
assert round(base_bits, 3) == 3.236

# %% [markdown]
# ## 1. DoRA: a magnitude and a direction
#
# DoRA (weight-decomposed low-rank adaptation) writes each output row of the adapted weight as a length times a unit
# direction. The direction is LoRA's $W_0 + sBA$, normalised row by row; the length is a new trainable vector
# $m \in \mathbb{R}^{D_{out}}$:
#
# $$W' = m \odot \frac{W_0 + sBA}{n}, \qquad n = \lVert W_0 + sBA\rVert \text{ per output row}, \qquad m_0 = n_0 .$$
#
# Starting $m$ at the initial norm makes $W' = W_0$ at step 0, as with LoRA. PEFT stores $m$ as
# `lora_magnitude_vector["default"].weight`. The layer never forms $W'$ in the forward: it computes LoRA's output and
# rescales it by $m/n$. We check that against $W'$ built by hand, on a float64 layer whose $B$ and $m$ have been moved
# off their initial values so that every term counts.

# %%
layer = LoRALinear(Linear(12, 6, dtype="float64", rng=np.random.default_rng(1)), r=3, lora_alpha=6,
                   init_lora_weights=False, use_dora=True, rng=np.random.default_rng(2))   # B random: not a no-op
mag = layer.lora_magnitude_vector["default"].weight                     # m (D_out,)
W0 = layer.base_layer.weight.data                                       # (D_out, D_in)
A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data   # (r, D_in), (D_out, r)
s = layer.scaling["default"]
V = W0 + s * B @ A                                                      # (D_out, D_in)  LoRA's weight
n = np.linalg.norm(V, axis=1)                                           # (D_out,)
print(f"m at init equals the row norms of W0 + sBA: {np.allclose(mag.data, n, rtol=1e-14)}")
assert np.allclose(mag.data, n, rtol=1e-14)
mag.data *= 1 + 0.3 * rng.standard_normal(6)                            # pretend some training moved m

x = rng.standard_normal((5, 12))                                        # (N, D_in)
W_dora = (mag.data / n)[:, None] * V                                    # (D_out, D_in)  m ⊙ V / ‖V‖
y_hand = x @ W_dora.T + layer.base_layer.bias.data
y_layer = layer(x)
print(f"max |layer(x) - (x W'^T + b)| = {np.abs(y_layer - y_hand).max():.1e}")
print(f"row norms of W' equal m: {np.allclose(np.linalg.norm(W_dora, axis=1), mag.data, rtol=1e-14)}")
assert np.abs(y_layer - y_hand).max() < 1e-12

# %% [markdown]
# **Why the norm is detached.** $n$ depends on $A$ and $B$, so the exact gradient with respect to $V = W_0 + sBA$
# has two parts. With $G = \mathrm{d}y^\top x$ the gradient with respect to $W'$ and $\hat v_i = V_i / n_i$ the unit
# rows:
#
# $$\frac{\partial L}{\partial V_i} = \frac{m_i}{n_i}\Big(G_i - (G_i\cdot\hat v_i)\,\hat v_i\Big),
# \qquad \frac{\partial L}{\partial A} = s\,B^\top \frac{\partial L}{\partial V},
# \qquad \frac{\partial L}{\partial m_i} = G_i\cdot\hat v_i .$$
#
# The second term projects the gradient off the row's own direction: it comes only from differentiating $n$. DoRA
# (arXiv 2402.09353, §4.3, on reducing the training overhead) treats $n$ as a constant in the backward, as PEFT
# does: the projection term is dropped, the backward then needs only LoRA's two thin matmuls on $\mathrm{d}y \odot
# m/n$ and no graph through the $(D_{out}, D_{in})$ norm, and the paper reports the memory saved with no noticeable
# loss of accuracy. $\partial L/\partial m$ is unchanged ($m$ is not inside $n$). We compute both versions by hand,
# compare them with the layer's backward, and check the exact one with finite differences of the full function (the
# norm recomputed at every evaluation).

# %%
dy = rng.standard_normal((5, 6))                                        # (N, D_out)
layer.zero_grad()
layer(x)
layer.backward(dy)
G = dy.T @ x                                                            # (D_out, D_in)  ∂L/∂W'
vhat = V / n[:, None]                                                   # (D_out, D_in)
along = np.sum(G * vhat, axis=1)                                        # (D_out,)  G_i · v̂_i
dV_detached = (mag.data / n)[:, None] * G                               # n held constant
dV_exact = dV_detached - (mag.data / n * along)[:, None] * vhat         # n differentiated too
dA_detached, dA_exact = s * B.T @ dV_detached, s * B.T @ dV_exact       # (r, D_in)


def loss_full():
    """Σ dy ⊙ y with the norm recomputed from the current A: the function whose exact gradient is dA_exact."""
    return float(np.sum(layer(x) * dy))


dA_fd, h = np.zeros_like(A), 1e-6
for idx in np.ndindex(A.shape):                                          # central differences, float64
    keep = A[idx]
    A[idx] = keep + h
    up = loss_full()
    A[idx] = keep - h
    down = loss_full()
    A[idx] = keep
    dA_fd[idx] = (up - down) / (2 * h)


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


print(f"layer's dA vs detached formula:        {rel(layer.lora_A['default'].weight.grad, dA_detached):.1e}")
print(f"layer's dm vs G_i . v_i:               {rel(mag.grad, along):.1e}")
print(f"exact formula vs finite differences:   {rel(dA_exact, dA_fd):.1e}")
print(f"dropped projection term, relative to the exact dA: {rel(dA_detached, dA_exact):.2f}")
assert rel(layer.lora_A["default"].weight.grad, dA_detached) < 1e-12 and rel(mag.grad, along) < 1e-12
assert rel(dA_exact, dA_fd) < 1e-7 and rel(dA_detached, dA_exact) > 0.01

# %% [markdown]
# So the layer follows the detached gradient exactly, and on this layer the term it drops is not negligible: the
# paper's argument is empirical (same accuracy, less memory), not that the term is small.
#
# On the tiny GPT, DoRA adds one magnitude per output row of each adapted layer to LoRA's parameters. With $r = 8$ on
# every linear layer (notebook 06's setting) that is $384 + 128 + 512 + 128 = 1152$ values per block. The tiny GPT
# lives on the current backend: on a GPU backend, host data such as the byte batch below go in with `asarray`, and
# arrays we check with host NumPy come back with `to_numpy` (notebook 09 explains why).

# %%
lora_cfg = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
dora = get_peft_model(load_base()[0], LoraConfig(**lora_cfg, use_dora=True), rng=default_rng(SEED))
lora = get_peft_model(load_base()[0], LoraConfig(**lora_cfg), rng=default_rng(SEED))
n_dora, n_lora = dora.get_nb_trainable_parameters()[0], lora.get_nb_trainable_parameters()[0]
mags = [k for k, _ in dora.named_parameters() if "lora_magnitude_vector" in k]
print(f"LoRA r=8 trains {n_lora:,} values; DoRA {n_dora:,} (+{n_dora - n_lora:,} = {len(mags)} magnitude vectors)")
print("e.g.", mags[0])
idx = asarray(code.get_batch("val", 2, BLOCK, np.random.default_rng(1))[0])          # (2, 64) bytes
print(f"at step 0 DoRA is the base model: max |logits(DoRA) - logits(base)| = "
      f"{np.abs(dora(idx)[0] - base(idx)[0]).max():.1e}")
assert n_lora == 65_536 and n_dora - n_lora == 4 * 1152 and np.abs(dora(idx)[0] - base(idx)[0]).max() < 1e-4

# %% [markdown]
# ### How DoRA updates differently from LoRA
#
# The DoRA paper's analysis (§3, its Figure 2) follows each output row of the adapted weight during training and
# splits its change into a **magnitude** change $\Delta M = \big|\,\lVert W'_o\rVert - \lVert W_{0,o}\rVert\,\big|$
# and a **direction** change $\Delta D = 1 - \cos(W'_o, W_{0,o})$. With LoRA both come from the same $sBA$, so a row
# that turns also changes length and the two move together; DoRA has a separate knob for the length. We train one
# layer (64 → 32, $r = 4$, $\alpha = 8$) both ways from the same start ($A$ from the same seed, $B = 0$,
# $m_0 = \lVert W_0\rVert$) on the same 40 batches, to fit a target that changes every row's length (×(1 ± 0.5))
# and turns it slightly (a rank-4 change), with AdamW on the mean squared error, and record $(\Delta D, \Delta M)$ of
# every row at steps 5, 10, 20 and 40.

# %%
D_IN, D_OUT, R_FIG, LR_FIG, CHECKPOINTS = 64, 32, 4, 5e-3, (5, 10, 20, 40)
g_fig = np.random.default_rng(3)
W0_fig = g_fig.standard_normal((D_OUT, D_IN)) / np.sqrt(D_IN)                    # (D_out, D_in)
turn = g_fig.standard_normal((D_OUT, R_FIG)) @ g_fig.standard_normal((R_FIG, D_IN)) / np.sqrt(D_IN * R_FIG)
W_target = (1 + 0.5 * g_fig.standard_normal(D_OUT))[:, None] * (W0_fig + 0.3 * turn)   # (D_out, D_in)
batches = [g_fig.standard_normal((32, D_IN)) for _ in range(CHECKPOINTS[-1])]     # (N, D_in) each, shared by both


def row_changes(W):
    """(ΔD, ΔM) per output row of W against W0_fig: 1 - cos and |‖W_o‖ - ‖W0_o‖|, each (D_out,)."""
    n, n0 = np.linalg.norm(W, axis=1), np.linalg.norm(W0_fig, axis=1)
    return 1 - np.sum(W * W0_fig, axis=1) / (n * n0), np.abs(n - n0)


def fit_layer(use_dora):
    """AdamW on the mean squared error to x W_targetᵀ; returns {step: (ΔD, ΔM)} at the checkpoints."""
    lay = LoRALinear(Linear.from_weight(W0_fig.copy()), r=R_FIG, lora_alpha=2 * R_FIG, use_dora=use_dora,
                     rng=np.random.default_rng(5))
    opt = AdamW([(k, p) for k, p in lay.named_parameters() if p.requires_grad], lr=LR_FIG, weight_decay=0.0)
    out = {}
    for t, xb in enumerate(batches, start=1):
        y = lay(xb)                                                               # (N, D_out)
        lay.zero_grad()
        lay.backward(2 * (y - xb @ W_target.T) / y.size)
        opt.step()
        if t in CHECKPOINTS:
            A_fig, B_fig = lay.lora_A["default"].weight.data, lay.lora_B["default"].weight.data
            W_eff = W0_fig + lay.scaling["default"] * B_fig @ A_fig              # (D_out, D_in)  V = W0 + sBA
            if use_dora:                                                          # W' = m ⊙ V / ‖V‖
                m_fig = lay.lora_magnitude_vector["default"].weight.data
                W_eff = (m_fig / np.linalg.norm(W_eff, axis=1))[:, None] * W_eff
            out[t] = row_changes(W_eff)
    return out


tracks = {"LoRA": fit_layer(False), "DoRA": fit_layer(True)}
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True, sharey=True)
for ax, (name, track) in zip(axes, tracks.items(), strict=True):
    for t, (dD, dM) in track.items():
        ax.scatter(dD, dM, s=12, label=f"step {t}")
    ax.set(title=name, xlabel="direction change ΔD = 1 - cos")
axes[0].set_ylabel("magnitude change ΔM")
axes[1].legend()
fig.suptitle("Figure 1: per-row change of one layer, LoRA vs DoRA (same start, same batches)")
plt.tight_layout()
plt.show()
print(f"{'step':>4} {'LoRA mean dD':>12} {'mean dM':>8} {'corr':>5}   {'DoRA mean dD':>12} {'mean dM':>8} {'corr':>5}")
corr = {name: {} for name in tracks}
for t in CHECKPOINTS:
    cells = []
    for name, track in tracks.items():
        dD, dM = track[t]
        corr[name][t] = np.corrcoef(dD, dM)[0, 1]
        cells.append(f"{dD.mean():>12.4f} {dM.mean():>8.4f} {corr[name][t]:>5.2f}")
    print(f"{t:>4} " + "   ".join(cells))
early = CHECKPOINTS[1]
lora_dD, lora_dM = (v.mean() for v in tracks["LoRA"][early])
dora_dD, dora_dM = (v.mean() for v in tracks["DoRA"][early])
print(f"at step {early}: about the same turn (dD {lora_dD:.4f} vs {dora_dD:.4f}), DoRA's lengths moved "
      f"{dora_dM / lora_dM:.1f}x as far as LoRA's")
assert all(corr["LoRA"][t] > corr["DoRA"][t] + 0.1 for t in CHECKPOINTS)
assert abs(dora_dD / lora_dD - 1) < 0.2 and dora_dM > 2 * lora_dM
assert all(0.8 < tracks["DoRA"][t][1].mean() / (LR_FIG * t) <= 1.0 for t in CHECKPOINTS)   # about lr per step

# %% [markdown]
# With LoRA the rows that turn most are the rows whose length changes most (a correlation of 0.65 to 0.8 at every
# checkpoint): the only way to change a row is to add a piece of $sBA$ to it, and that piece changes both. DoRA's
# points lie in horizontal bands: every row's length moves by about the same amount whatever its turn, because $m$ is
# a parameter of its own and Adam moves each entry by about its learning rate per step ($5\cdot 10^{-3} \times 40 =
# 0.2$ at step 40; the mean is 80 to 100 % of that at every checkpoint). At the same turn ($\Delta D = 0.0027$ after
# 10 steps for both) DoRA's lengths have moved 3 times as far as LoRA's. The correlation DoRA's rows build up (0.39 by
# step 40) stays below LoRA's. The paper reports the contrast on large models as a positive slope for LoRA and a
# negative one for DoRA and full fine-tuning; this toy layer shows the decoupling, not the negative slope.

# %% [markdown]
# ## 2. PiSSA and OLoRA: start the adapter on the base weight's main directions
#
# LoRA starts with $B = 0$, so the adapter begins as nothing and its first steps point wherever $A$'s random rows
# happen to point. PiSSA (arXiv 2404.02948) starts the adapter on $W_0$'s **principal singular values and
# vectors** and freezes the rest: with $W_0 = U S V^\top$,
#
# $$A = \sqrt{S_r/s}\;V_r^\top, \qquad B = U_r\sqrt{S_r/s}, \qquad W_{res} = W_0 - sBA .$$
#
# The base layer's weight is **replaced by the residual** $W_{res}$, so $W_{res} + sBA = W_0$ and the model is
# unchanged at step 0, but the adapter is not zero: $sBA$ is $W_0$'s best rank-$r$ approximation (notebook 01's
# truncated SVD), and training moves the directions that carry most of the weight. OLoRA (arXiv 2406.01775) does the
# same with a QR decomposition $W_0 = QR$: $B = Q_{:,:r}$ (orthonormal columns), $A = R_{:r}$. One layer of the tiny
# GPT, the first block's fused attention projection (384 × 128), at $r = 8$:

# %%
W_attn = base.transformer.h[0].attn.c_attn.weight.data.copy()           # (384, 128)
S_all = np.linalg.svd(W_attn.astype(np.float64), compute_uv=False)     # (128,)
for init in ("pissa", "olora"):
    lay = LoRALinear(Linear.from_weight(W_attn.copy()), r=8, lora_alpha=16, init_lora_weights=init)
    A8, B8 = to_numpy(lay.lora_A["default"].weight.data), to_numpy(lay.lora_B["default"].weight.data)   # host checks
    delta = lay.get_delta_weight("default")                              # (384, 128)  s·B A
    W_res = lay.base_layer.weight.data
    print(f"{init:>5}: |sBA| = {np.linalg.norm(delta):.3f} of |W0| = {np.linalg.norm(W_attn):.3f} (not zero); "
          f"max |W_res + sBA - W0| = {np.abs(W_res + delta - W_attn).max():.1e}; "
          f"top singular value of W_res {np.linalg.norm(W_res, 2):.3f}")
    assert np.abs(W_res + delta - W_attn).max() < 1e-5
    if init == "pissa":
        energy = np.sum(S_all[:8] ** 2) / np.sum(S_all ** 2)
        assert abs(np.linalg.norm(W_res, 2) - S_all[8]) < 1e-4 and abs(np.linalg.norm(delta) ** 2 / np.sum(
            S_all ** 2) - energy) < 1e-5
        print(f"       sBA holds the top 8 of 128 singular values: {energy:.1%} of |W0|^2; the residual's largest is "
              f"sigma_9 = {S_all[8]:.3f}")
    else:
        print(f"       B has orthonormal columns: max |B^T B - I| = {np.abs(B8.T @ B8 - np.eye(8)).max():.1e}; "
              f"A is upper triangular: {np.allclose(np.tril(A8, -1), 0)}")
        assert np.abs(B8.T @ B8 - np.eye(8)).max() < 1e-5 and np.allclose(np.tril(A8, -1), 0)

# %% [markdown]
# On the whole model, `init_lora_weights="pissa"` does this for every adapted layer; the model's output at step 0 is
# the base model's up to float32 rounding (the base now holds $W_{res}$ and the adapter the rest). Saving such an
# adapter alone is not enough to rebuild the model: the base it belongs to is the residual one (PEFT converts a PiSSA
# adapter to a plain LoRA one for that reason; not shown here). PiSSA needs the float base: on a 4-bit base it raises
# `TypeError` as PEFT does (quantize the residual afterwards); OLoRA dequantizes, factors and re-quantizes.
#
# Below, the four adapters on the tiny GPT with notebook 06's short fine-tune (30 steps of AdamW, $r = 8$ on every
# linear layer, learning rate $10^{-3}$ for all). Thirty steps on one seed is a smoke test, not a ranking: the papers
# compare after full fine-tunes, each with its own hyperparameters.

# %%
models = {"LoRA": lora, "DoRA": dora}
for label, init in (("PiSSA", "pissa"), ("OLoRA", "olora")):
    models[label] = get_peft_model(load_base()[0], LoraConfig(**lora_cfg, init_lora_weights=init),
                                   rng=default_rng(SEED))
print(f"{'adapter':<7} {'trainable':>9} {'|adapter| at step 0':>20} {'logits vs base':>15} "
      f"{'code before->after':>19}")
results = {}
for name, model in models.items():
    ups = [m.get_delta_weight("default") for _, m in model.base_model.lora_layers()]
    norm0 = float(np.sqrt(sum(np.sum(u.astype(np.float64) ** 2) for u in ups)))
    drift = np.abs(model(idx)[0] - base(idx)[0]).max()
    before = val_bits(model)
    finetune(model, AdamW(model.named_parameters(), lr=LR, weight_decay=0.0))
    results[name] = (before, val_bits(model))
    print(f"{name:<7} {model.get_nb_trainable_parameters()[0]:>9,} {norm0:>20.3f} {drift:>15.1e} "
          f"{before:>8.3f} -> {results[name][1]:.3f}")
    assert drift < 1e-4 and round(before, 3) == 3.236 and results[name][1] < before
    assert (norm0 == 0) == (name in ("LoRA", "DoRA"))

# %% [markdown]
# All four start at the base model's 3.236 bits/byte and all improve within 30 steps; LoRA and DoRA start with a
# zero update, PiSSA and OLoRA with a large one that the residual base cancels.
#
# ### LoftQ: start near the float model when the base is 4-bit
#
# PiSSA and OLoRA keep the model exactly unchanged at step 0. QLoRA cannot: its base is $Q_0 = \mathrm{NF4}(W_0)$,
# and with $B = 0$ the model starts off by the quantization error $\lVert W_0 - Q_0\rVert$. LoftQ (arXiv
# 2310.08659) uses the adapter to carry part of that error from the start. It alternates, $T$ times,
#
# $$Q = \mathrm{NF4}(W_0 - sBA), \qquad sBA = U_r S_r V_r^\top \text{ with } U S V^\top = \mathrm{svd}(W_0 - Q),$$
#
# starting from $BA = 0$: the first step is plain NF4 plus the best rank-$r$ fit of what NF4 missed, and later
# steps let the quantizer see the part the adapter will carry. The base becomes a 4-bit layer holding $Q$. It needs
# the float model (`get_peft_model(float_model, LoraConfig(init_lora_weights="loftq", loftq_config=...))`);
# `loftq_factors` is the function. PEFT's own `loftq_init` sends the weight to a CUDA device; run on the CPU with
# that one line changed, it gives the same $Q$, $A$ and $B$ (when `lora_alpha = r`: PEFT does not divide by $s$).
# Every adapted layer of the tiny GPT at $r = 8$, NF4 in blocks of 64 without double quantization (as PEFT's LoftQ):

# %%
def nf4(W):
    """Plain QLoRA's base as LoftQ quantizes it: NF4, blocks of 64, no double quantization. W (D_out, D_in)."""
    return dequantize_4bit(*quantize_4bit(W, blocksize=64, quant_type="nf4"))


s_loftq = lora_cfg["lora_alpha"] / lora_cfg["r"]                         # s = 16 / 8
err = {"NF4": 0.0, "T=1": 0.0, "T=5": 0.0, "PiSSA": 0.0}                  # squared errors summed over the layers
print("Table 1: |W0 - (Q + sBA)| at step 0 per layer, r = 8; the last three columns as a share of plain NF4's")
print(f"{'layer':<20} {'shape':>10} {'NF4 alone':>9} {'LoftQ T=1':>10} {'T=5':>6} {'PiSSA, NF4(W_res)':>18}")
for name, lin in base.named_modules():
    if name.startswith("transformer.h.") and name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc"):
        W = lin.weight.data                                               # (D_out, D_in)
        row = {"NF4": np.linalg.norm(W - nf4(W))}
        for T in (1, 5):
            A, B, W_res = loftq_factors(W, 8, s_loftq, T)                 # (8, D_in), (D_out, 8), (D_out, D_in)
            row[f"T={T}"] = np.linalg.norm(W - (nf4(W_res) + s_loftq * B @ A))   # the base stores NF4(W_res) = Q
        A, B, W_res = pissa_factors(W, 8, s_loftq)                         # top-8 SVD; W_res = W0 - sBA
        row["PiSSA"] = np.linalg.norm(W - (nf4(W_res) + s_loftq * B @ A))  # = |W_res - NF4(W_res)|
        for k in err:
            err[k] += row[k] ** 2
        assert row["PiSSA"] < row["T=5"] < row["T=1"] < row["NF4"]         # the order of the columns, every layer
        print(f"{name[14:]:<20} {'x'.join(map(str, W.shape)):>10} {row['NF4']:>9.3f} {row['T=1'] / row['NF4']:>10.1%} "
              f"{row['T=5'] / row['NF4']:>6.1%} {row['PiSSA'] / row['NF4']:>18.1%}")
ratio = {k: float(np.sqrt(v / err["NF4"])) for k, v in err.items()}
print(f"{'all 16 layers':<20} {'':>10} {np.sqrt(err['NF4']):>9.3f} {ratio['T=1']:>10.1%} {ratio['T=5']:>6.1%} "
      f"{ratio['PiSSA']:>18.1%}")
assert round(ratio["T=1"], 3) == 0.921 and round(ratio["T=5"], 3) == 0.832
assert ratio["PiSSA"] < ratio["T=5"] < ratio["T=1"] < 1

# %% [markdown]
# Table 1 orders the four starts the same way on every one of the 16 layers: plain NF4 > LoftQ $T = 1$ > $T = 5$ >
# PiSSA's quantized residual. One SVD step removes 8 % of the quantization error, five remove 17 % (the paper's gains
# are largest at 2 and 3 bits, where the error is much larger). Quantizing PiSSA's residual instead (the QPiSSA
# variant of the PiSSA paper: the adapter holds $W_0$'s top 8 singular directions in full precision, the base holds
# NF4 of the rest) starts closer still here. Its error is that of quantizing $W_{res}$ alone; a plausible reason
# it is smaller (not measured here) is that the residual has lost its largest directions, so NF4's absmax-scaled
# blocks have smaller steps. It is a different adapter, though: PiSSA's trains the principal directions, LoftQ's the
# quantization error, so "closer at step 0" does not by itself rank them after training. On the whole model: plain
# QLoRA (the same NF4 base, $B = 0$) against LoftQ with $T = 5$, the distance of the logits to the float model's and
# the loss at step 0, and the loss after the same 30-step fine-tune:

# %%
runs = {"QLoRA NF4": get_peft_model(quantize_model(load_base()[0], compress_statistics=False),
                                    LoraConfig(**lora_cfg), rng=default_rng(SEED))}
runs["LoftQ T=5"] = get_peft_model(load_base()[0], LoraConfig(**lora_cfg, init_lora_weights="loftq",
                                   loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=5)), rng=default_rng(SEED))
loftq_loss = {}
for name, model in runs.items():
    drift = np.linalg.norm(model(idx)[0] - base(idx)[0])                  # logits' distance to the float model
    before = val_bits(model)
    finetune(model, AdamW(model.named_parameters(), lr=LR, weight_decay=0.0))
    loftq_loss[name] = (drift, before, val_bits(model))
    print(f"{name:<10} |logits - float logits| {drift:6.2f}   code {before:.3f} -> {loftq_loss[name][2]:.3f} "
          f"bits/byte (float base {base_bits:.3f})")
assert all(a < b for a, b in zip(loftq_loss["LoftQ T=5"], loftq_loss["QLoRA NF4"], strict=True))

# %% [markdown]
# LoftQ's model starts closer to the float one (its logits and, slightly, its loss) and is ahead after the
# fine-tune too. The loss at step 0 follows the weight error only loosely: the error is what LoftQ minimises, and
# with $T = 1$ (not shown) the step-0 loss here is in fact a little above plain QLoRA's although the error is
# smaller. One seed and 30 steps: read the gap after training as a direction, not a size.
#
# ## 3. 8-bit AdamW: the optimizer states in one byte
#
# AdamW keeps two float32 states per trainable parameter, $m$ and $v$: **8 bytes**. bitsandbytes' 8-bit AdamW
# (arXiv 2110.02861) stores each as one-byte codes of a *dynamic* map (an exponent that spans seven decades and a
# shrinking fraction, so small and large entries both keep a few digits), with one float32 absmax per block of 256:
# $2 + 2\cdot 4/256 = 2.03$ bytes per parameter. Each step dequantizes a block, runs AdamW's update in float32 and
# re-quantizes. Tensors under 4,096 values keep float32 states (bnb's `min_8bit_size`): their states are tiny. We
# measure the bytes on one 1024 × 1024 parameter after one step:

# %%
def state_nbytes(opt):
    """Bytes of every array in the optimizer's state, each counted once (the 8-bit maps are shared)."""
    arrays = {id(a): a for st in opt.state.values() for a in st.values() if hasattr(a, "nbytes")}
    return sum(a.nbytes for a in arrays.values())


w_host = rng.standard_normal((1024, 1024)).astype(np.float32)
state_bytes = {}
for cls in (AdamW, AdamW8bit):
    p = Parameter(asarray(w_host.copy()))                                  # (1024, 1024) on the backend
    opt = cls([p], lr=1e-3)
    p.grad = np.ones_like(p.data)
    opt.step()
    state_bytes[cls.__name__] = state_nbytes(opt)
for k, v in state_bytes.items():
    print(f"{k:<9} state: {v:>9,} bytes = {v / w_host.size:.4f} bytes per parameter")
print("(8-bit: 2 x 1,048,576 codes + 2 x 4,096 float32 absmax + the two 256-entry float32 maps, shared by all "
      "parameters)")
assert state_bytes["AdamW"] == 8 * w_host.size
assert state_bytes["AdamW8bit"] == 2 * w_host.size + 2 * 4 * 4096 + 2 * 256 * 4
assert round(state_bytes["AdamW8bit"] / w_host.size, 2) == 2.03

# %% [markdown]
# **What the 8 bits cost.** The same LoRA fine-tune twice from the same start and batches, once with AdamW and once
# with `AdamW8bit`. At $r = 32$ on every linear layer each adapter matrix has at least 4,096 values, so every state of
# the 8-bit run is 8-bit. Two measures of the error: the round-trip error of the 32-bit run's final $m$ and $v$
# through the 8-bit format (what one re-quantization costs), and how far the two runs end up apart.

# %%
cfg32 = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.0)
runs = {}
for cls in (AdamW, AdamW8bit):
    model = get_peft_model(load_base()[0], cfg32, rng=default_rng(SEED))
    opt = cls(model.named_parameters(), lr=LR, weight_decay=0.0)
    res, sec = finetune(model, opt)
    runs[cls.__name__] = {"model": model, "opt": opt, "loss": np.array(res.train_loss) / LN2, "val": val_bits(model),
                          "ms": sec * 1e3, "state": memory_report(model, opt)["optimizer"]}
eight = runs["AdamW8bit"]["opt"]
assert all("absmax1" in st for st in eight.state.values())                    # every state is 8-bit here

signed, unsigned = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
err = {"m": [0.0, 0.0], "v": [0.0, 0.0]}                                       # sum |x̂ - x|, sum |x|
for st in runs["AdamW"]["opt"].state.values():
    for key, qmap, x32 in (("m", signed, st["exp_avg"]), ("v", unsigned, st["exp_avg_sq"])):
        xp = get_array_module(x32)                                             # where the state lives
        codes, amax = xp.empty(x32.shape, xp.uint8), xp.empty(-(-x32.size // 256), xp.float32)
        quantize_blocks_lut(x32, qmap, 256, codes, amax)
        back = dequantize_blocks(codes, amax, qmap, 256)
        err[key][0] += float(np.abs(back - x32.ravel()).sum())
        err[key][1] += float(np.abs(x32).sum())
rel_m, rel_v = (e[0] / e[1] for e in err.values())
print(f"round trip of the 32-bit run's states through 8 bits: mean |error| / mean |value| = {rel_m:.2%} (m), "
      f"{rel_v:.2%} (v)")
p32 = dict(runs["AdamW"]["model"].named_parameters())
p8 = dict(runs["AdamW8bit"]["model"].named_parameters())
drift = max(np.abs(p8[k].data - p32[k].data).max() / np.abs(p32[k].data).max() for k in p32 if p32[k].requires_grad)
print(f"after {STEPS} steps the two runs' adapters differ by at most {drift:.1%} of a tensor's largest entry")
print(f"{'optimizer':<10} {'state bytes':>12} {'B/param':>8} {'last-10 train loss':>19} {'code val':>9} {'ms/step':>8}")
n_train = runs["AdamW"]["model"].get_nb_trainable_parameters()[0]
for k, r in runs.items():
    print(f"{k:<10} {r['state']:>12,} {r['state'] / n_train:>8.3f} {r['loss'][-10:].mean():>19.3f} {r['val']:>9.3f} "
          f"{r['ms']:>8.1f}")
gap = abs(runs["AdamW8bit"]["val"] - runs["AdamW"]["val"])
gain = base_bits - runs["AdamW"]["val"]
print(f"validation gap 8-bit vs 32-bit: {gap:.1e} bits/byte, {gap / gain:.2%} of what the fine-tune gained "
      f"({gain:.3f})")
blocks = sum(-(-p.data.size // 256) for p in p32.values() if p.requires_grad)
print(f"8-bit state = 2 x {n_train:,} codes + 2 x {blocks:,} float32 absmax + 2 KiB of maps")
assert round(rel_m, 3) == 0.012 and round(rel_v, 4) == 0.0063 and gap / gain < 0.01
assert runs["AdamW8bit"]["state"] == 2 * n_train + 8 * blocks + 2048 and runs["AdamW"]["state"] == 8 * n_train
assert round(runs["AdamW8bit"]["state"] / n_train, 2) == 2.04

# %% [markdown]
# A round trip loses about 1 % of each state (1.2 % of $m$, 0.63 % of $v$: the dynamic map keeps relative precision,
# and the errors do not pile up, since each step re-quantizes fresh values), and the two fine-tunes end less than 1 %
# of the fine-tune's gain apart. On this small model the two 256-entry maps add 2 KiB, so the state is 2.04 rather
# than 2.03 bytes per parameter. The paper reports 8-bit Adam matching 32-bit Adam on full-length training runs;
# thirty steps cannot show that, only that nothing breaks.
#
# `PagedAdamW8bit` (Hugging Face's `optim="paged_adamw_8bit"`, the optimizer of most QLoRA recipes) is the same
# arithmetic with the codes in pages of notebook 07's pool. Every block of 256 codes lies inside one page, so paging
# cannot change a bit, even when a tight device evicts every page between steps:

# %%
small = [rng.standard_normal((256, 512)).astype(np.float32) for _ in range(2)]
grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in small] for _ in range(5)]
p_ref, p_pag = [Parameter(asarray(w.copy())) for w in small], [Parameter(asarray(w.copy())) for w in small]
o_ref = AdamW8bit(p_ref, lr=1e-2)
tight = PagedPool(budget_bytes=384 * 1024, page_size=64 * 1024)            # room for one parameter's states
o_pag = PagedAdamW8bit(p_pag, lr=1e-2, pool=tight)
for g_step in grads:
    for p, q, g in zip(p_ref, p_pag, g_step, strict=True):
        p.grad, q.grad = asarray(g.copy()), asarray(g.copy())
    o_ref.step()
    o_pag.step()
    tight.evict_all()
same = all(np.array_equal(p.data, q.data) for p, q in zip(p_ref, p_pag, strict=True))
print(f"PagedAdamW8bit vs AdamW8bit after 5 steps: bit-identical {same}; pages moved out "
      f"{tight.stats.bytes_evicted / 2**20:.2f} MiB")
assert same and tight.stats.bytes_evicted > 0

# %% [markdown]
# **At scale.** The memory calculator of notebook 08 counts the 8-bit states with `optim_bits=8`. For QLoRA's
# settings ($r = 64$ on every linear layer, gradient checkpointing, NF4 + double quantization):

# %%
print(f"{'model':<10} {'trainable':>12} {'AdamW 32-bit':>13} {'8-bit':>8} {'saved':>8} {'total 32 -> 8-bit':>19}")
saved = {}
for name in ("llama-7b", "llama-65b"):
    e32, e8 = memory.estimate(name, "qlora"), memory.estimate(name, "qlora", optim_bits=8)
    o32, o8 = e32.breakdown["optimizer_states"], e8.breakdown["optimizer_states"]
    saved[name] = (o32 - o8) / memory.GB
    print(f"{name:<10} {e32.trainable_params:>12,} {o32 / memory.GB:>10.2f} GB {o8 / memory.GB:>5.2f} GB "
          f"{saved[name]:>5.2f} GB {e32.total_bytes / memory.GB:>8.2f} -> {e8.total_bytes / memory.GB:.2f} GB")
    assert round(o8 / e32.trainable_params, 2) == 2.03
assert [round(v, 2) for v in saved.values()] == [0.95, 4.77]
full = memory.estimate("llama-7b", "full")
share = full.breakdown["optimizer_states"] / full.total_bytes
print(f"full fine-tuning of llama-7b: AdamW's states are {share:.0%} of {full.total_bytes / memory.GB:.1f} GB")
assert share > 0.5

# %% [markdown]
# At 65B that is 4.77 GB of a 48 GB card; at 7B under a gigabyte. With LoRA the optimizer state is small to begin
# with (it covers only the adapters), so the 8-bit optimizer matters most for full fine-tuning, where AdamW's
# 8 bytes per parameter are most of the memory: `memory.estimate(name, "full", optim_bits=8)` shows it.
#
# ## Recap
#
# - DoRA learns a magnitude $m$ per output row and a direction $(W_0 + sBA)/\lVert W_0 + sBA\rVert$; the norm is
#   treated as a constant in the backward, which drops a projection term (measurably non-zero) for less memory.
#   On the tiny GPT it adds one value per output row of each adapted layer (4,608 on top of LoRA's 65,536).
# - PiSSA and OLoRA start the adapter on $W_0$'s top singular directions / first QR directions and freeze the
#   residual $W_0 - sBA$: the model is unchanged at step 0 although the adapter is not zero. PiSSA's adapter holds
#   $W_0$'s best rank-$r$ approximation.
# - DoRA's updates differ from LoRA's: with LoRA a row's length and direction change together, DoRA moves the
#   lengths on their own (Figure 1: about 3x as far at the same turn after 10 steps on one layer).
# - LoftQ alternates $Q = \mathrm{NF4}(W_0 - sBA)$ and a rank-$r$ SVD of $W_0 - Q$, so that a QLoRA model starts
#   nearer its float model: on the tiny GPT the weight error falls to 92 % of plain NF4's after one iteration and
#   83 % after five; quantizing PiSSA's residual starts closer still (Table 1).
# - 8-bit AdamW stores $m$ and $v$ as one-byte dynamic-map codes with a float32 absmax per 256: 8 → 2.03 bytes per
#   parameter, a round-trip error of a few percent, and a short fine-tune that ends where the 32-bit one does;
#   paging it changes no bit. For QLoRA it saves 0.95 GB at 7B and 4.77 GB at 65B.
#
# ## Exercises
#
# **Graded:** `exercises/ex11_beyond_lora.py` asks for three functions, each compared with minilora's own code:
# `dora_weight` (DoRA's $W' = m \odot (W_0 + sBA)/n$ with row norms, as a merged DoRA layer), `pissa_init`
# (PiSSA's $A$, $B$ and $W_{res}$, as `minilora.nn.lora.pissa_factors`) and `adam8bit_state_bytes` (the bytes of
# 8-bit AdamW's states for one parameter, as `AdamW8bit` allocates them). Check your work with
# `python3 -m pytest exercises/test_ex11_beyond_lora.py`.
#
# **To explore:**
#
# 1. Take the DoRA layer of §1 and apply one SGD step to $A$ with the exact gradient and one with the detached
#    gradient. By how much does the loss differ after the step, compared with the change the step itself made? Then
#    try a layer whose $m$ is still at its initial value: what is the projection term's size there, and why?
# 2. PiSSA's $sBA$ is the best rank-$r$ approximation of $W_0$. Compute, for each adapted layer of the tiny GPT at
#    $r = 8$, the share of $\lVert W_0\rVert^2$ the adapter starts with. Which layers are closest to low-rank? What does
#    OLoRA's adapter hold instead, and does it depend on the order of $W_0$'s columns?
# 3. Use `memory.estimate` with `optim_bits=8` for full fine-tuning of LLaMA-7B and LLaMA-65B. How much of the memory
#    do the optimizer states take with 32-bit and with 8-bit AdamW, and does 8-bit full fine-tuning of 65B fit where
#    QLoRA does (notebook 08)?
