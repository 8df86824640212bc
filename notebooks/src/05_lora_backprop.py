# %% [markdown]
# # 05 · LoRA backprop by hand: $dA$, $dB$, $dx$, checked three ways
#
# **The idea in one sentence:** the gradients of a LoRA layer follow from the chain rule through two thin matmuls,
# and the frozen weight's own gradient is simply never computed.
#
# **After this notebook you can**
# - derive $dA$, $dB$ and $dx$ for $y = xW_0^\top + b + s\,(xA^\top)B^\top$ with their shapes;
# - check any hand-written backward with central finite differences and the "fake loss" $L = \sum y \odot dy$;
# - explain why $dA = 0$ on the first step when $B = 0$;
# - merge an adapter into $W_0$, unmerge it, and swap adapters on one shared base.
#
# **Prerequisites:** notebook 01 (the LoRA forward pass and its shapes); matrix calculus for $Y = XM^\top$.
# **Time:** about 50 minutes.
#
# minilora has no autograd. Every layer is a pair of functions, llm.c style: `*_forward` returns the output and a
# cache, `*_backward` takes the upstream gradient and the cache and returns the input gradients. This notebook
# derives LoRA's backward, checks it with central finite differences and against PyTorch's autograd, then uses the
# `LoRALinear` layer to merge, unmerge and swap adapters.

# %%
# %matplotlib inline
import platform

import numpy as np

import minilora
from minilora.backend import asarray
from minilora.nn import functional as F

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The derivation
#
# A LoRA layer computes, for $N$ rows of input $x \in \mathbb{R}^{N\times D_{in}}$, with the frozen
# $W_0 \in \mathbb{R}^{D_{out}\times D_{in}}$, $A \in \mathbb{R}^{r\times D_{in}}$, $B \in \mathbb{R}^{D_{out}\times r}$
# and scaling $s = \alpha/r$:
#
# $$h = xA^\top \;(N\times r), \qquad y = xW_0^\top + b + s\,hB^\top \;(N\times D_{out}).$$
#
# Given $dy = \partial L/\partial y$, the chain rule through each matmul ($Y = XM^\top \Rightarrow dX = dY\,M$,
# $dM = dY^\top X$) gives, with $g = s\,dy\,B$ $(N\times r)$ the gradient arriving at $h$:
#
# $$dB = s\,dy^\top h \;(D_{out}\times r),\qquad dA = g^\top x \;(r\times D_{in}),\qquad
# dx = dy\,W_0 + g\,A \;(N\times D_{in}).$$
#
# $W_0$ is frozen: its gradient $dy^\top x$ is never computed. That skipped $(D_{out}\times D_{in})$ matmul is a third
# of a linear layer's training FLOPs, and no gradient or optimizer buffer is allocated for it.
#
# In minilora the two pieces are `F.linear_forward/linear_backward` (base path) and `F.lora_forward/lora_backward`
# (adapter path). We work in float64 so that finite differences are meaningful.

# %%
N, D_in, D_out, r, alpha = 6, 5, 4, 2, 4
s = alpha / r
x = rng.standard_normal((N, D_in))                          # (N, D_in)
W0 = rng.standard_normal((D_out, D_in))                     # (D_out, D_in) frozen
b = rng.standard_normal(D_out)                              # (D_out,)
A = rng.standard_normal((r, D_in))                          # (r, D_in)
B = rng.standard_normal((D_out, r))                         # (D_out, r)  nonzero, so that dA is nonzero too


def layer_forward(x, A, B):
    base, x_cache = F.linear_forward(x, W0, b)              # (N, D_out)
    delta, lora_cache = F.lora_forward(x, A, B, s)          # (N, D_out)
    return base + delta, (x_cache, lora_cache)


def layer_backward(dy, cache):
    x_cache, lora_cache = cache
    dx_base, _, _ = F.linear_backward(dy, x_cache, W0, need_dW=False, need_db=False)   # W0 frozen
    dx_lora, dA, dB = F.lora_backward(dy, lora_cache, A, B, s)
    return dx_base + dx_lora, dA, dB


y, cache = layer_forward(x, A, B)
print("y shape:", y.shape)

# %% [markdown]
# ## 2. Finite differences with the fake-loss trick
#
# Any backward can be checked through one scalar. Pick a random $dy$ and define $L = \sum_{ij} y_{ij}\,dy_{ij}$, so
# that $\partial L/\partial y = dy$ exactly. Then every entry of every gradient must match the central difference
#
# $$\frac{\partial L}{\partial \theta} \approx \frac{L(\theta + \varepsilon) - L(\theta - \varepsilon)}{2\varepsilon},
# \qquad \varepsilon = 10^{-6},$$
#
# whose error is $O(\varepsilon^2)$ plus float64 rounding, about $10^{-9}$ relative.

# %%
dy = rng.standard_normal((N, D_out))                        # (N, D_out) upstream gradient
dx, dA, dB = layer_backward(dy, cache)


def numerical_grad(f, theta, eps=1e-6):
    g = np.zeros_like(theta)
    for i in np.ndindex(theta.shape):
        old = theta[i]
        theta[i] = old + eps
        plus = f()
        theta[i] = old - eps
        minus = f()
        theta[i] = old
        g[i] = (plus - minus) / (2 * eps)
    return g


def loss():
    return np.sum(layer_forward(x, A, B)[0] * dy)       # dL/dy == dy


for name, analytic, theta in [("dA", dA, A), ("dB", dB, B), ("dx", dx, x)]:
    num = numerical_grad(loss, theta)
    rel = np.abs(analytic - num).max() / np.abs(num).max()
    print(f"{name} {str(analytic.shape):>8}: max relative error vs finite differences "
          f"{'< 1e-8' if rel < 1e-8 else f'= {rel:.1e}'}")        # ~1e-10 here; the exact digits are rounding noise
    assert rel < 1e-8

# %% [markdown]
# ## 3. Against PyTorch autograd (when installed)
#
# The same numbers through `torch.autograd`, in float64. PyTorch is a test-only dependency of minilora, so this
# cell says which path it took.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the autograd comparison (finite differences above still hold)")
if torch is not None:
    xt, At, Bt = (torch.tensor(a, requires_grad=True) for a in (x, A, B))
    yt = xt @ torch.tensor(W0).T + torch.tensor(b) + s * (xt @ At.T) @ Bt.T
    (yt * torch.tensor(dy)).sum().backward()
    gap = np.abs(y - yt.detach().numpy()).max()
    print(f"PyTorch {torch.__version__}: max |y - y_torch| {'< 1e-12' if gap < 1e-12 else f'= {gap:.1e}'}")
    for name, ours, theirs in [("dA", dA, At.grad), ("dB", dB, Bt.grad), ("dx", dx, xt.grad)]:
        g = np.abs(ours - theirs.numpy()).max()
        print(f"  {name}: max |ours - torch| {'< 1e-12' if g < 1e-12 else f'= {g:.1e}'}")
        assert g < 1e-12

# %% [markdown]
# ## 4. Why $dA = 0$ at the start, and what one step does
#
# With PEFT's initialisation $B = 0$, $g = s\,dy\,B = 0$, so $dA = 0$ and the base path alone produces $dx$.
# Only $B$ moves on the first step (notebook 01 §5); $A$ starts learning from step 2. (That holds for SGD and for
# Adam without weight decay. AdamW with weight decay $> 0$ shrinks $A$ a little at step 1 even with a zero gradient,
# because the decay term does not depend on the gradient.)

# %%
B_zero = np.zeros_like(B)                                    # (D_out, r)
y0, cache0 = layer_forward(x, A, B_zero)
dx0, dA0, dB0 = F.lora_backward(dy, cache0[1], A, B_zero, s)
print(f"B = 0: |dA|max = {np.abs(dA0).max():.1f}, |dB|max = {np.abs(dB0).max():.3f}, "
      f"|dx_lora|max = {np.abs(dx0).max():.1f}")
assert not dA0.any() and not dx0.any() and dB0.any()

# %% [markdown]
# ## 5. The same math as a layer: `LoRALinear`
#
# `minilora.nn.LoRALinear` wraps a `Linear` (the frozen $W_0$, $b$) and holds one or more named adapters with PEFT's
# names and layout: `lora_A` and `lora_B` are `ModuleDict`s of bias-free `Linear`s, so `lora_A["default"].weight` is
# $A$ $(r, D_{in})$, `lora_B["default"].weight` is $B$ $(D_{out}, r)$, and `scaling["default"]` $= \alpha/r$; the same
# expressions work on a PEFT model. Its `forward`/`backward` call exactly the functions above on those weights.
# Freshly wrapped, $B = 0$, so the layer must reproduce the base layer bit for bit; after a backward, $W_0$ has no
# gradient at all.
#
# From here on the weights live on minilora's current backend, which on a GPU is device memory, so the host-drawn
# inputs and gradients go in with `asarray` (notebook 09 and docs/backends.md explain the backends and the strict one
# that checks this on a CPU).

# %%
from minilora.backend import default_rng
from minilora.nn import Linear, LoRALinear

base = Linear(64, 32, dtype="float64", rng=default_rng(0))
x64 = asarray(rng.standard_normal((8, 64)))                                 # (N, D_in)
y_base = base(x64)                                                          # (N, D_out)
layer = LoRALinear(base, r=4, lora_alpha=8, rng=default_rng(1))
print(layer)
print(f"max |LoRA output - base output| at init: {np.abs(layer(x64) - y_base).max()}")

dy64 = asarray(rng.standard_normal((8, 32)))                                # (N, D_out)
layer(x64)
dx64 = layer.backward(dy64)                                                 # (N, D_in)
for name, p in layer.named_parameters():
    grad = "None" if p.grad is None else f"|grad|max {np.abs(p.grad).max():.3f}"
    print(f"{name:<26} {str(p.shape):<9} requires_grad={str(p.requires_grad):<5} {grad}")

# %% [markdown]
# ## 6. Merging and unmerging: no inference latency
#
# For deployment, fold the adapter into the weight: $W = W_0 + s\,BA$. The merged layer is a plain matmul again, so
# inference costs exactly what the base model costs (LoRA §4.1). `unmerge()` subtracts the same $\Delta W$, restoring
# $W_0$ up to floating-point rounding. We first give $B$ some values, as training would.

# %%
layer.lora_B["default"].weight.data[...] = asarray(rng.standard_normal((32, 4)) * 0.1)   # pretend it was trained
W0_before = base.weight.data.copy()                                         # (D_out, D_in)
y_unmerged = layer(x64)                                                     # (N, D_out) two-path forward
layer.merge()
y_merged = layer(x64)                                                       # (N, D_out) one matmul
merge_gap = np.abs(y_merged - y_unmerged).max()
print(f"merged={layer.merged}: max |merged - unmerged output| {'< 1e-12' if merge_gap < 1e-12 else merge_gap}")
print(f"rank of the merged change W - W0: {np.linalg.matrix_rank(base.weight.data - W0_before)} (r = 4)")
layer.unmerge()
unmerge_gap = np.abs(base.weight.data - W0_before).max()
print(f"merged={layer.merged}: max |W after unmerge - W0| {'< 1e-12' if unmerge_gap < 1e-12 else unmerge_gap}")
assert merge_gap < 1e-12 and unmerge_gap < 1e-12

# %% [markdown]
# ## 7. Swapping adapters on one frozen base
#
# One base model, many tasks: each task is only an $(A, B)$ pair. `update_layer` adds a second named adapter,
# `set_adapter` chooses which one runs (and trains). Switching back must give the first adapter's output again,
# bit for bit, and the base weights are stored once however many adapters there are.

# %%
layer.update_layer("task_b", r=4, lora_alpha=8)
layer.lora_B["task_b"].weight.data[...] = asarray(rng.standard_normal((32, 4)) * 0.1)
y_a = layer(x64)                                                             # active: "default"
layer.set_adapter("task_b")
y_b = layer(x64)
layer.set_adapter("default")
y_a_again = layer(x64)
print(f"active adapters: {layer.active_adapters}; |y_a - y_b|max = {np.abs(y_a - y_b).max():.3f}; "
      f"back to 'default' identical: {np.array_equal(y_a, y_a_again)}")
A_default, A_task_b = layer.lora_A["default"].weight, layer.lora_A["task_b"].weight      # (r, D_in) each
print(f"trainable flags: default A {A_default.requires_grad}, task_b A {A_task_b.requires_grad}")
base_bytes = base.weight.data.nbytes + base.bias.data.nbytes
adapter_bytes = {n: layer.lora_A[n].weight.data.nbytes + layer.lora_B[n].weight.data.nbytes for n in layer.lora_A}
print(f"bytes: base {base_bytes:,} (once) + adapters {adapter_bytes}")

# %% [markdown]
# ## Recap
#
# - With $h = xA^\top$ and $g = s\,dy\,B$: $dB = s\,dy^\top h$, $dA = g^\top x$, $dx = dy\,W_0 + g\,A$, and nothing for
#   $W_0$, whose skipped weight gradient is a third of a linear layer's training FLOPs.
# - Finite differences agree to better than $10^{-8}$ relative (about $10^{-10}$), and PyTorch's autograd to better
#   than $10^{-12}$, in float64.
# - With $B = 0$ the first step moves only $B$.
# - Merging folds $s\,BA$ into $W_0$ (same outputs, no extra latency), unmerging restores it up to rounding, and
#   adapters swap on one shared base.
#
# Next: QLoRA puts that base in NF4 (notebook 06).
#
# ## Exercises
#
# 1. Derive and implement `lora_backward(dy, x, A, B, s)` returning `(dx, dA, dB)`, and check it with the
#    finite-difference helper of §2 on new random shapes.
# 2. Add the base layer's bias gradient $db = \sum_i dy_i$ to your derivation. Why is it not computed for a frozen
#    base?
# 3. Implement `merge` and `unmerge` for one adapter; check that merging twice without unmerging is caught, and that
#    merge → unmerge returns $W_0$ to within $10^{-12}$.
# 4. Count the multiply-adds of LoRA's backward for $N$ rows and compare them with a full linear layer's backward;
#    at what rank are they equal?
#
# The graded versions are in `exercises/ex05_*.py`; check your work with `python3 -m pytest exercises/test_ex05_*.py`.
