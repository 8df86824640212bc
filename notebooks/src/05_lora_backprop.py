# %% [markdown]
# # 05 · LoRA backprop by hand: $dA$, $dB$, $dx$, checked three ways
#
# minilora has no autograd. Every layer is a pair of functions, llm.c style: `*_forward` returns the output and a
# cache, `*_backward` takes the upstream gradient and the cache and returns the input gradients. This notebook
# derives LoRA's backward, checks it with central finite differences and against PyTorch's autograd, then uses the
# `LoRALinear` layer to merge, unmerge and swap adapters.

# %%
%matplotlib inline
import platform

import numpy as np

import minilora
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


loss = lambda: np.sum(layer_forward(x, A, B)[0] * dy)       # dL/dy == dy
for name, analytic, theta in [("dA", dA, A), ("dB", dB, B), ("dx", dx, x)]:
    num = numerical_grad(loss, theta)
    rel = np.abs(analytic - num).max() / np.abs(num).max()
    print(f"{name} {str(analytic.shape):>8}: max relative error vs finite differences = {rel:.1e}")

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
    print(f"PyTorch {torch.__version__}: max |y - y_torch| = {np.abs(y - yt.detach().numpy()).max():.1e}")
    for name, ours, theirs in [("dA", dA, At.grad), ("dB", dB, Bt.grad), ("dx", dx, xt.grad)]:
        print(f"  {name}: max |ours - torch| = {np.abs(ours - theirs.numpy()).max():.1e}")

# %% [markdown]
# ## 4. Why $dA = 0$ at the start, and what one step does
#
# With PEFT's initialisation $B = 0$, $g = s\,dy\,B = 0$, so $dA = 0$ and the base path alone produces $dx$.
# Only $B$ moves on the first step (notebook 01 §5); $A$ starts learning from step 2.

# %%
B_zero = np.zeros_like(B)                                    # (D_out, r)
y0, cache0 = layer_forward(x, A, B_zero)
dx0, dA0, dB0 = F.lora_backward(dy, cache0[1], A, B_zero, s)
print(f"B = 0: |dA|max = {np.abs(dA0).max():.1f}, |dB|max = {np.abs(dB0).max():.3f}, "
      f"|dx_lora|max = {np.abs(dx0).max():.1f}")
