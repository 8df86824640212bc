"""AdamW (Loshchilov & Hutter, decoupled weight decay), written out line by line in PyTorch's form.

For each trainable parameter p with gradient g, at step t = 1, 2, ...:

    p ← p · (1 − lr·wd)                              decoupled weight decay (not added to g)
    m ← β1·m + (1 − β1)·g                            first moment
    v ← β2·v + (1 − β2)·g²                           second moment
    p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)

This is `torch.optim.AdamW`'s arithmetic (bitsandbytes' 32-bit kernel computes the algebraically equal
`p − lr·(c2/c1)·m/(√v + eps·c2)`, which differs in the last bits). Defaults are PyTorch's except weight_decay,
which is bitsandbytes' and PyTorch's 1e-2.
"""
from __future__ import annotations

import math

from minilora.backend import get_array_module
from minilora.optim.optimizer import Optimizer, check_number


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One AdamW step on arrays, in place: p (the parameter), g (its gradient), m, v (its states); step counts from 1.

    Shared by AdamW and PagedAdamW so that both produce bit-identical parameters. Every line is one elementwise
    pass; all of them write into `tmp` or in place, so a step allocates one scratch array instead of six (the
    update is memory-bound: for a full fine-tune it reads and writes every weight's p, g, m, v)."""
    xp = get_array_module(p)
    dt = p.dtype.type
    tmp = xp.empty_like(p)                                  # scratch, (same shape as p)
    if weight_decay != 0.0:
        p *= dt(1.0 - lr * weight_decay)                    # p ← p (1 − lr·wd)
    xp.multiply(g, dt(1.0 - beta1), out=tmp)                # (1-β1) g
    m *= dt(beta1)
    m += tmp                                                # m ← β1 m + (1-β1) g
    xp.multiply(g, g, out=tmp)
    tmp *= dt(1.0 - beta2)                                  # (1-β2) g²
    v *= dt(beta2)
    v += tmp                                                # v ← β2 v + (1-β2) g²
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    xp.sqrt(v, out=tmp)
    tmp /= dt(bias_correction2_sqrt)
    tmp += dt(eps)                                          # denom = √v / √(1-β2ᵗ) + eps
    xp.divide(m, tmp, out=tmp)                              # m / denom
    tmp *= dt(lr / bias_correction1)
    p -= tmp                                                # p ← p − lr/(1-β1ᵗ) · m / denom


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
        adamw_update(p, g, state["exp_avg"], state["exp_avg_sq"], state["step"], self.lr, b1, b2, self.eps,
                     self.weight_decay)
