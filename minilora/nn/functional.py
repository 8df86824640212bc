"""The math of every layer as llm.c-style pairs: `*_forward(...) -> (out, cache)` and `*_backward(dout, cache, ...)`.

Shapes use N = rows (batch·seq), C = channels, V = vocabulary, H = heads, hs = head size. Every backward below is
the chain rule for the forward right above it, derived by hand (no autograd); the tests check each one against
central finite differences in float64 (fake loss L = Σ out·dout, so ∂L/∂out = dout) and against torch.autograd.
Backwards return gradients instead of accumulating them, and skip work they are told is not needed (`need_dW=False`
for a frozen weight: that skipped matmul is where LoRA saves a third of the step).

Mirrors: PyTorch's `torch/nn/functional.py` (linear, embedding, layer_norm, gelu(approximate="tanh"),
scaled_dot_product_attention(is_causal=True), cross_entropy) and llm.c's `train_gpt2.c` / `doc/layernorm`.
"""
from __future__ import annotations

import math

from minilora.backend import flat_chunks, get_array_module

# ---------------------------------------------------------------------------------------------------------------
# Linear: y = x Wᵀ + b
# ---------------------------------------------------------------------------------------------------------------


def linear_forward(x, W, b=None):
    """y = x Wᵀ + b.   x (N, D_in), W (D_out, D_in), b (D_out,) or None -> y (N, D_out); cache = x."""
    y = x @ W.T                                    # (N, D_out)  W.T is a view; BLAS reads it transposed
    if b is not None:
        y += b                                     # (N, D_out)
    return y, x


def linear_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """dx = dy W,  dW = dyᵀ x,  db = Σ_rows dy.   dy (N, D_out) -> dx (N, D_in), dW (D_out, D_in), db (D_out,).

    Each is None when not needed (a frozen W costs one matmul instead of two)."""
    dx = dy @ W if need_dx else None               # (N, D_in)
    dW = dy.T @ x if need_dW else None             # (D_out, D_in)
    db = dy.sum(axis=0) if need_db else None       # (D_out,)
    return dx, dW, db


# ---------------------------------------------------------------------------------------------------------------
# Embedding: y = W[idx]
# ---------------------------------------------------------------------------------------------------------------


def embedding_forward(idx, W):
    """y = W[idx].   idx int (...), W (V, C) -> y (..., C); cache = idx."""
    return W[idx], idx                             # (..., C)


def embedding_backward(dy, idx, W_shape):
    """dW[v] = Σ over positions with idx == v of dy.   dy (..., C) -> dW (V, C) (a scatter-add: repeats add up)."""
    xp = get_array_module(dy)
    dW = xp.zeros(W_shape, dtype=dy.dtype)         # (V, C)
    C = W_shape[1]
    if hasattr(xp.add, "at"):
        xp.add.at(dW, idx.reshape(-1), dy.reshape(-1, C))   # unbuffered add, so a token seen twice counts twice
    else:                                                   # older CuPy: the same scatter-add lives in cupyx
        import cupyx
        cupyx.scatter_add(dW, idx.reshape(-1), dy.reshape(-1, C))
    return dW


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm: y = (x - μ) / √(σ² + eps) · w + b   over the last axis
# ---------------------------------------------------------------------------------------------------------------


def layernorm_forward(x, w, b=None, eps=1e-5):
    """x (N, C), w (C,), b (C,) or None -> y (N, C); cache = (x̂, rstd)."""
    mean = x.mean(axis=-1, keepdims=True)          # (N, 1)
    xc = x - mean                                  # (N, C)
    # biased variance (as torch): Σ xc² / C per row, as N (1, C)·(C, 1) products: one pass, no (N, C) square
    var = (xc[..., None, :] @ xc[..., :, None])[..., 0] / xc.shape[-1]   # (N, 1)
    rstd = 1.0 / get_array_module(x).sqrt(var + eps)   # (N, 1)
    xc *= rstd                                     # (N, C)  x̂, normalised in place
    y = xc * w                                     # (N, C)
    if b is not None:
        y += b
    return y, (xc, rstd)


def layernorm_backward(dy, cache, w, need_dw=True, need_db=True):
    """dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  g = dy ⊙ w;   dw = Σ_rows dy ⊙ x̂,  db = Σ_rows dy.

    (x̂ depends on x through both μ and σ; the two mean terms are those two paths, cf. llm.c doc/layernorm.)"""
    xhat, rstd = cache
    dw = (dy * xhat).sum(axis=0) if need_dw else None   # (C,)
    db = dy.sum(axis=0) if need_db else None       # (C,)
    g = dy * w                                     # (N, C)
    gx = (g[..., None, :] @ xhat[..., :, None])[..., 0] / xhat.shape[-1]   # (N, 1)  mean(g ⊙ x̂) per row, one pass
    dx = g                                         # (N, C)  g is ours: finished in place
    dx -= g.mean(axis=-1, keepdims=True)
    dx -= xhat * gx                                # (N, C)
    dx *= rstd                                     # (N, C)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------
# GELU, GPT-2's tanh approximation: y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))
# First the formula as written (gelu_tanh_*); then the same function as x·σ(2u), the form the layers run.
# ---------------------------------------------------------------------------------------------------------------

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_tanh_forward(x):
    """y = ½ x (1 + tanh(u)),  u = k (x + c x³),  k = √(2/π), c = 0.044715.   x (N, C) -> y (N, C); cache = (x, t).

    The formula itself, as GPT-2's `gelu_new` and transformers' NewGELUActivation write it."""
    xp = get_array_module(x)
    t = xp.tanh(_GELU_K * (x + _GELU_C * x * x * x))   # (N, C)  t = tanh(u)
    return 0.5 * x * (1.0 + t), (x, t)             # (N, C)


def gelu_tanh_backward(dy, cache):
    """dx = dy · (½ (1 + t) + ½ x (1 − t²) k (1 + 3c x²)),  t = tanh(u)   (d tanh(u)/du = 1 − t²)."""
    x, t = cache
    du = _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)   # (N, C)  du/dx
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)   # (N, C)


def gelu_forward(x):
    """The same function, fast: ½ x (1 + tanh(u)) = x · σ(2u),  σ(z) = 1/(1 + e^(−z)).   x (N, C) -> y (N, C).

    Since 1 + tanh(u) = 2σ(2u), one exp replaces the tanh: NumPy's float32 exp is vectorised (AVX2), its tanh is
    not (~2.5x slower here). Each step is one in-place pass, run over GELU_CHUNK values at a time so the passes
    stay in the L2 cache (elementwise, so the bits do not depend on the chunking). cache = (x, s) with s = σ(2u),
    so tanh(u) = 2s − 1 in the backward. tests/nn/test_functional.py checks it against gelu_tanh_forward."""
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)                    # (N, C)  flat views below must alias it
    s, y = xp.empty_like(x), xp.empty_like(x)      # (N, C) each
    for xc, sc, yc in flat_chunks(GELU_CHUNK, x, s, y):   # (k,) flat pieces of x, s, y
        xp.multiply(xc, xc, out=sc)                # (k,)  x²
        sc *= -2.0 * _GELU_K * _GELU_C
        sc -= 2.0 * _GELU_K
        sc *= xc                                   # (k,)  −2u
        xp.clip(sc, -60.0, 60.0, out=sc)           # e^60 fits float32; σ is exactly 0 or 1 there anyway
        xp.exp(sc, out=sc)                         # (k,)  e^(−2u)
        sc += 1.0
        xp.reciprocal(sc, out=sc)                  # (k,)  s = σ(2u)
        xp.multiply(xc, sc, out=yc)                # (k,)  y = x σ(2u)
    return y, (x, s)


def gelu_backward(dy, cache):
    """dx = dy · (s + 2 x k (1 + 3c x²) s (1 − s)),  s = σ(2u)   (dσ(z)/dz = σ(1 − σ), dz/dx = 2k(1 + 3c x²)).

    Equal to the tanh form ½(1 + t) + ½ x (1 − t²) k (1 + 3c x²) with t = 2s − 1.   dy (N, C) -> dx (N, C)."""
    x, s = cache
    xp = get_array_module(x)
    g = xp.empty_like(x)                           # (N, C)
    for dyc, xc, sc, gc in flat_chunks(GELU_CHUNK, xp.ascontiguousarray(dy), x, s, g):   # (k,) flat pieces
        xp.multiply(xc, xc, out=gc)                # (k,)  x²
        gc *= 6.0 * _GELU_K * _GELU_C
        gc += 2.0 * _GELU_K                        # (k,)  dz/dx = 2k (1 + 3c x²)
        gc *= xc
        gc *= sc
        gc *= 1.0 - sc                             # (k,)  x σ'(z) dz/dx
        gc += sc                                   # (k,)  dy/dx
        gc *= dyc
    return g


GELU_CHUNK = 1 << 16   # values per pass on NumPy (256 KiB of float32 per array); CuPy runs each pass as one kernel


# ---------------------------------------------------------------------------------------------------------------
# Causal multi-head self-attention on a fused qkv (as GPT-2's c_attn output): y = softmax(q kᵀ/√hs + mask) v
# ---------------------------------------------------------------------------------------------------------------

_mask_cache = {}


def _causal_mask(xp, T, dtype):
    """(T, T) additive mask: 0 on and below the diagonal, −inf above (a token cannot see the future)."""
    key = (xp.__name__, T, str(dtype))
    m = _mask_cache.get(key)
    if m is None:
        m = xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)   # (T, T)
        _mask_cache[key] = m
    return m


def attention_forward(qkv, B, T, n_head):
    """qkv (N, 3C) with N = B·T, laid out [q | k | v] and heads contiguous inside each -> y (N, C).

    p = softmax(q kᵀ / √hs + mask) per head, y = p v, heads concatenated back. cache = (q, k, v, p, y): q, k, v
    are views into qkv (kept alive by them), so the cache costs qkv + p + y."""
    xp = get_array_module(qkv)
    C = qkv.shape[1] // 3
    hs = C // n_head
    qkv5 = qkv.reshape(B, T, 3, n_head, hs)        # (B, T, 3, H, hs) view
    q = qkv5[:, :, 0].transpose(0, 2, 1, 3)        # (B, H, T, hs) views: each (T, hs) matrix is BLAS-ready
    k = qkv5[:, :, 1].transpose(0, 2, 1, 3)        # (B, H, T, hs)
    v = qkv5[:, :, 2].transpose(0, 2, 1, 3)        # (B, H, T, hs)
    p = (q * (1.0 / math.sqrt(hs))) @ k.transpose(0, 1, 3, 2)   # (B, H, T, T)  scale the thin q (a temporary), not p
    p += _causal_mask(xp, T, p.dtype)              # (B, H, T, T)  −inf above the diagonal
    p -= p.max(axis=-1, keepdims=True)             # stable softmax: the diagonal keeps every row finite
    xp.exp(p, out=p)
    p *= 1.0 / p.sum(axis=-1, keepdims=True)       # (B, H, T, T)  rows sum to 1, masked entries exactly 0
    y = p @ v                                      # (B, H, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B * T, C)  # (N, C)  heads side by side again (one copy)
    return y, (q, k, v, p, y)


def attention_backward(dy, cache):
    """dy (N, C) -> dqkv (N, 3C).

    dv = pᵀ dy,  dp = dy vᵀ,  ds = p ⊙ (dp − D)  with D_i = Σ_j dp_ij p_ij  (the softmax Jacobian, row-wise),
    dq = ds k / √hs,  dk = dsᵀ q / √hs.   Masked entries have p = 0, so they get no gradient.
    D is computed FlashAttention's way: Σ_j dp_ij p_ij = Σ_j (dy_i·v_j) p_ij = dy_i·y_i, a (T, hs) product per
    head instead of a (T, T) one."""
    q, k, v, p, y = cache
    xp = get_array_module(dy)
    B, H, T, hs = q.shape
    dy4 = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)   # (B, H, T, hs) view
    y4 = y.reshape(B, T, H, hs).transpose(0, 2, 1, 3)     # (B, H, T, hs) view
    D = (dy4 * y4).sum(axis=-1, keepdims=True)            # (B, H, T, 1)
    dqkv = xp.empty((B, T, 3, H, hs), dtype=dy.dtype)     # (B, T, 3, H, hs)
    dqkv[:, :, 2] = (p.transpose(0, 1, 3, 2) @ dy4).transpose(0, 2, 1, 3)   # dv
    ds = dy4 @ v.transpose(0, 1, 3, 2)             # (B, H, T, T)  dp
    ds -= D
    ds *= p                                        # (B, H, T, T)  gradient of the scores (q kᵀ)/√hs
    scale = 1.0 / math.sqrt(hs)                    # applied to the thin dq, dk rather than the (T, T) ds
    dq = ds @ k                                    # (B, H, T, hs)
    dq *= scale
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
    dk = ds.transpose(0, 1, 3, 2) @ q              # (B, H, T, hs)
    dk *= scale
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    return dqkv.reshape(B * T, 3 * H * hs)         # (N, 3C)


# ---------------------------------------------------------------------------------------------------------------
# Softmax cross-entropy, mean over the non-ignored rows: L = −(1/n) Σ_i log softmax(z_i)[t_i]
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits (N, V), targets int (N,) -> (loss as a 0-d array, cache). Rows with target == ignore_index count 0.

    Raises TypeError for non-integer targets, ValueError for targets outside [0, V) or when every row is
    ignored (PyTorch would return NaN)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
    if targets.shape != (N,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({N},) to match logits {(N, V)}")
    valid = targets != ignore_index                # (N,)
    bad = valid & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(xp.argmax(bad))
        raise ValueError(f"{int(bad.sum())} target(s) outside [0, {V}) (and not ignore_index={ignore_index}); "
                         f"the first is {int(targets[i])} at row {i}")
    n = int(valid.sum())
    if n == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}: the mean loss is undefined")
    t = xp.where(valid, targets, 0)                # (N,)  safe indices for the gather
    rows = xp.arange(N)
    z = logits - logits.max(axis=-1, keepdims=True)   # (N, V)  shift for stability
    probs = xp.exp(z)                              # (N, V)
    sumexp = probs.sum(axis=-1)                    # (N,)
    logp_t = z[rows, t] - xp.log(sumexp)           # (N,)  log softmax at the target
    loss = -(logp_t * valid).sum() / n             # ()
    probs /= sumexp[:, None]                       # (N, V)  softmax, kept for the backward
    return loss, (probs, t, valid, n)


def cross_entropy_backward(dloss, cache):
    """dz_i = dloss · (softmax(z_i) − onehot(t_i)) / n for kept rows, 0 for ignored rows.   -> dlogits (N, V).

    Reuses the cached softmax buffer in place (no (N, V) copy), so it can be called once per forward."""
    probs, t, valid, n = cache
    xp = get_array_module(probs)
    dz = probs                                     # (N, V)  overwritten in place
    dz[xp.arange(dz.shape[0]), t] -= 1.0
    dz *= (valid * (dloss / n)).astype(dz.dtype)[:, None]   # (N, V)  ignored rows -> 0
    return dz


# ---------------------------------------------------------------------------------------------------------------
# Residual: y = x + f(x) — the gradient is copied to both branches
# ---------------------------------------------------------------------------------------------------------------


def residual_forward(x, fx):
    """y = x + fx (both (N, C))."""
    return x + fx                                  # (N, C)


def residual_backward(dy):
    """∂y/∂x = ∂y/∂fx = I, so both branches receive dy unchanged."""
    return dy, dy


# ---------------------------------------------------------------------------------------------------------------
# Inverted dropout: y = x ⊙ m / (1 − p),  m ~ Bernoulli(1 − p)
# ---------------------------------------------------------------------------------------------------------------


def dropout_forward(x, p, rng):
    """x (N, C) -> y (N, C); cache = the scaled mask (N, C) (None when p == 0: the identity, as PEFT)."""
    if p == 0.0:
        return x, None
    mask = rng.random(x.shape, dtype=x.dtype) >= p  # (N, C) keep with probability 1 − p
    mask = mask.astype(x.dtype)
    mask *= 1.0 / (1.0 - p)                        # scale now so eval mode needs no rescaling
    return x * mask, mask


def dropout_backward(dy, mask):
    """dx = dy ⊙ m / (1 − p)."""
    return dy if mask is None else dy * mask


# ---------------------------------------------------------------------------------------------------------------
# The LoRA branch: y = s · (x Aᵀ) Bᵀ     (ΔW = s·B A is never formed)
# ---------------------------------------------------------------------------------------------------------------


def lora_forward(x, A, B, scaling):
    """x (N, D_in) (already dropped out), A (r, D_in), B (D_out, r) -> y (N, D_out); cache = (x, s·h).

    The brackets matter: two thin matmuls cost O(N·r·(D_in + D_out)) instead of O(N·D_in·D_out). The scaling
    is applied to the thin h (N, r), not to y (N, D_out)."""
    hs = x @ A.T                                   # (N, r)
    hs *= scaling                                  # (N, r)  s·h, kept for dB
    return hs @ B.T, (x, hs)                       # (N, D_out)


def lora_backward(dy, cache, A, B, scaling, need_dx=True, need_dA=True, need_dB=True):
    """g = s · dy B (N, r);  dB = s · dyᵀ h (D_out, r);  dA = gᵀ x (r, D_in);  dx = g A (N, D_in)."""
    x, hs = cache
    dB = dy.T @ hs if need_dB else None            # (D_out, r)  s is already inside hs
    if not (need_dA or need_dx):
        return None, None, dB
    g = dy @ B                                     # (N, r)
    g *= scaling
    dA = g.T @ x if need_dA else None              # (r, D_in)
    dx = g @ A if need_dx else None                # (N, D_in)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------------------------
# DoRA (arXiv 2402.09353): W' = m ⊙ (W0 + s·B A) / n,  n = ‖W0 + s·B A‖ per output row, held constant (detached)
# ---------------------------------------------------------------------------------------------------------------


def dora_weight_norm(W0, A, B, scaling):
    """n_o = ‖W0[o, :] + s·(B A)[o, :]‖₂ for every output o.   W0 (D_out, D_in), A (r, D_in), B (D_out, r) -> (D_out,).

    PEFT's `DoraLinearLayer.get_weight_norm`: torch.linalg.norm(W0 + s·B A, dim=1) of the (out, in) weight, which
    is the paper's column norm ‖·‖_c of its (in, out) W. The only place DoRA forms a full (D_out, D_in) matrix."""
    W = B @ A                                      # (D_out, D_in)
    W *= scaling
    W += W0                                        # (D_out, D_in)  W0 + s·B A
    W *= W
    return get_array_module(W).sqrt(W.sum(axis=1))   # (D_out,)


def dora_forward(xd, base_out, A, B, scaling, magnitude, weight_norm):
    """The DoRA term added on top of the base layer's output (PEFT's `DoraLinearLayer.forward`):

        extra = (c − 1) ⊙ base_out + c ⊙ s · xd Aᵀ Bᵀ,      c = m / n   (D_out,),  n = weight_norm (a constant)

    with base_out = xd W0ᵀ, the base output without its bias. Without dropout xd = x and
    base(x) + extra = x W0ᵀ + b + (c − 1) ⊙ x W0ᵀ + c ⊙ s·x Aᵀ Bᵀ = x (c ⊙ (W0 + s·B A))ᵀ + b = x W'ᵀ + b:
    the bias is not rescaled (PEFT subtracts it from the base result first). With dropout PEFT gives the dropped-out
    xd to both W0 and the LoRA branch while base(x) keeps the full x, so then extra = (c − 1) ⊙ xd W0ᵀ + c ⊙ s·xd Aᵀ Bᵀ.

    xd (N, D_in), base_out (N, D_out), A (r, D_in), B (D_out, r), magnitude m (D_out,), weight_norm n (D_out,)
    -> extra (N, D_out); cache = (lora cache, direction (N, D_out) = base_out + s·xd Aᵀ Bᵀ, c)."""
    c = magnitude / weight_norm                    # (D_out,)  m / n
    lora_out, lora_cache = lora_forward(xd, A, B, scaling)   # (N, D_out)  s·xd Aᵀ Bᵀ
    direction = base_out + lora_out                # (N, D_out)  xd (W0 + s·B A)ᵀ
    extra = direction * c                          # (N, D_out)  c ⊙ (base_out + s·xd Aᵀ Bᵀ)
    extra -= base_out                              # (N, D_out)  (c − 1) ⊙ base_out + c ⊙ s·xd Aᵀ Bᵀ
    return extra, (lora_cache, direction, c, weight_norm)


def dora_backward(dy, cache, A, B, scaling, W0, need_dx=True, need_dA=True, need_dB=True, need_dm=True):
    """Gradients of extra = c ⊙ direction − base_out with c = m / n and n held constant (detached, as PEFT):

        dm  = Σ_rows dy ⊙ direction / n                   (D_out,)
        g   = dy ⊙ c                                      (N, D_out)   the LoRA branch's incoming gradient
        dA, dB, dxd_lora = lora_backward(g)               (r, D_in), (D_out, r), (N, D_in)
        dxd = (dy ⊙ (c − 1)) W0 + dxd_lora                (N, D_in)    this term's gradient w.r.t. xd

    The base layer's own dy W0 (for base(x)) is the caller's; without dropout the two add up to (dy ⊙ c) W0 + dxd_lora.
    W0 (D_out, D_in) is the dequantized weight for a 4-bit base. Returns (dxd, dA, dB, dm), None where not needed."""
    lora_cache, direction, c, n = cache
    dm = None
    if need_dm:
        dm = (dy * direction).sum(axis=0)          # (D_out,)
        dm /= n                                    # (D_out,)  ∂c/∂m = 1/n
    g = dy * c                                     # (N, D_out)
    dxd, dA, dB = lora_backward(g, lora_cache, A, B, scaling, need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)
    if need_dx:
        dxd += (dy * (c - 1.0)) @ W0               # (N, D_in)  through base_out = xd W0ᵀ
    return dxd, dA, dB, dm
