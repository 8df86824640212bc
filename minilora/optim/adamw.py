"""AdamW (Loshchilov & Hutter, decoupled weight decay), written out line by line in PyTorch's form.

For each trainable parameter p with gradient g, at step t = 1, 2, ...:

    p ← p · (1 − lr·wd)                              decoupled weight decay (not added to g)
    m ← β1·m + (1 − β1)·g                            first moment
    v ← β2·v + (1 − β2)·g²                           second moment
    p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)

This is `torch.optim.AdamW`'s arithmetic (bitsandbytes' 32-bit kernel computes the algebraically equal
`p − lr·(c2/c1)·m/(√v + eps·c2)`, which differs in the last bits). Defaults are PyTorch's except weight_decay,
which is bitsandbytes' and PyTorch's 1e-2.

Rounding, op for op as torch's CPU path runs it (torch.optim.AdamW on CPU takes the single-tensor loop: its
foreach and fused kernels are for accelerators). Scalars are cast to the parameter's dtype first, as torch does:
    p.mul_(1 − lr·wd)                      p · s, one rounding
    m.lerp_(g, 1 − β1)                     fma(w, g − m, m) for w < 0.5, else fma(w − 1, g − m, g): a fused
                                           multiply-add after the rounded difference g − m
    v.mul_(β2).addcmul_(g, g, 1 − β2)      fma((1 − β2)·g, g, v·β2), the two products rounded first
    denom = √v / √(1 − β2ᵗ) + eps          three roundings, none fused
    p.addcdiv_(m, denom, −lr/(1 − β1ᵗ))    p + ((s·m) / denom), unfused
In float32 the fused steps use adamw8bit.fma32 (exact through float64 and rounding to odd), so m and v equal
torch's bit for bit on an FMA CPU. √v is the IEEE square root; torch 2.13's CPU sqrt (MKL's vector math on x86)
is off by one ulp on some float32 inputs (about 19% of them on an AMD EPYC, under 1% on an Intel Xeon, both with
AVX-512), so after 20 steps the parameters differ from torch's by at most half
an ulp of the tensor's largest |value| (94-100% of elements bit-equal); with the same square roots they are
bit-identical (tests/optim/test_adamw.py). In float64 the fused steps are computed unfused
(NumPy has no float64 fma): equal to torch to ~1e-16.
AdamW.update runs adamw_update over large NumPy parameters in CHUNK-sized pieces of their flat views, so the float64
temporaries stay in cache; every step is elementwise, so the bits are those of one call over the whole tensor.
"""
from __future__ import annotations

from minilora.backend import flat_chunks, get_array_module
from minilora.optim.adamw8bit import fma32
from minilora.optim.optimizer import Optimizer, check_number


def _fma_unfused(a, b, c):
    """a·b + c with two roundings: the float64 (and float16) stand-in for a fused multiply-add."""
    return a * b + c


def _sqrt(x, out):
    """√x into out: the IEEE square root (correctly rounded). A test swaps in torch's to show the rest is exact."""
    xp = get_array_module(x)
    return xp.sqrt(x, out=out)


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One AdamW step on arrays, in place: p (the parameter), g (its gradient), m, v (its states); step counts from 1.

    Shared by AdamW and PagedAdamW so that both produce bit-identical parameters. torch's op order and roundings
    (module docstring); in float32 the two fused steps go through fma32, which allocates float64 temporaries."""
    xp = get_array_module(p)
    dt = p.dtype.type
    fma = fma32 if p.dtype == xp.float32 else _fma_unfused
    tmp = xp.subtract(g, m)                                 # g − m, rounded          (same shape as p)
    if weight_decay != 0.0:
        p *= dt(1.0 - lr * weight_decay)                    # p ← p (1 − lr·wd)
    w = dt(1.0 - beta1)
    if abs(float(w)) < 0.5:                                 # torch's lerp: from the nearer end
        m[...] = fma(w, tmp, m)                             # m ← m + (1-β1)(g − m), one rounding
    else:
        m[...] = fma(w - dt(1), tmp, g)                     # m ← g − β1 (g − m)
    xp.multiply(g, dt(1.0 - beta2), out=tmp)                # (1-β2) g, rounded
    v *= dt(beta2)
    v[...] = fma(tmp, g, v)                                 # v ← β2 v + (1-β2) g², one rounding
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    _sqrt(v, out=tmp)
    tmp /= dt(bias_correction2_sqrt)
    tmp += dt(eps)                                          # denom = √v / √(1-β2ᵗ) + eps
    num = m * dt(-(lr / bias_correction1))                  # −lr/(1-β1ᵗ) · m, rounded
    num /= tmp                                              # … / denom
    p += num                                                # p ← p − lr/(1-β1ᵗ) · m / denom


class AdamW(Optimizer):
    """AdamW over Parameters or (name, Parameter) pairs; mirrors `torch.optim.AdamW` (and bnb's `AdamW32bit`).

    States exp_avg (m) and exp_avg_sq (v), PyTorch's names, are allocated lazily on a parameter's first step and only
    for parameters that require grad, so a frozen LoRA base never costs optimizer memory. Parameters whose .grad is
    None are skipped, and each parameter counts its own steps for the bias correction (as in PyTorch)."""

    hyperparams = ("lr", "betas", "eps", "weight_decay")
    buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        check_number("lr", lr)
        betas = tuple(betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: need two numbers, each in [0, 1)")
        check_number("eps", eps)
        check_number("weight_decay", weight_decay)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        super().__init__(params)

    def update(self, p, g, state):
        b1, b2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        # Large NumPy parameters go CHUNK values at a time: elementwise, so the same bits as one call. A parameter
        # whose flat view would be a copy (not C-contiguous) takes one call, or its update would be lost.
        writable = all(a.flags.c_contiguous for a in (p, m, v))
        for pc, gc, mc, vc in (flat_chunks(CHUNK, p, g, m, v) if writable else [(p, g, m, v)]):
            adamw_update(pc, gc, mc, vc, state["step"], self.lr, b1, b2, self.eps, self.weight_decay)


CHUNK = 1 << 15   # values per adamw_update call on NumPy: fma32's float64 temporaries then stay in L2 (3x faster
                  # over a 3.2M-parameter GPT than whole tensors at once); CuPy runs each op as one kernel instead
