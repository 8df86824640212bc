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


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One AdamW step on arrays, in place: p (the parameter), g (its gradient), m, v (its states); step counts from 1.

    Shared by AdamW and PagedAdamW so that both produce bit-identical parameters."""
    xp = get_array_module(p)
    if weight_decay != 0.0:
        p *= p.dtype.type(1.0 - lr * weight_decay)          # (same shape as p)
    m *= m.dtype.type(beta1)                                # m ← β1 m
    m += m.dtype.type(1.0 - beta1) * g                      # m ← m + (1-β1) g
    v *= v.dtype.type(beta2)                                # v ← β2 v
    v += v.dtype.type(1.0 - beta2) * (g * g)                # v ← v + (1-β2) g²
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    denom = xp.sqrt(v) / p.dtype.type(bias_correction2_sqrt)  # √v / √(1-β2ᵗ)
    denom += p.dtype.type(eps)
    p -= p.dtype.type(lr / bias_correction1) * (m / denom)


class AdamW:
    """AdamW over a list of Parameters (objects with .data, .grad, .requires_grad).

    States m, v are allocated lazily on the first step, only for parameters that require grad, so a frozen LoRA
    base never costs optimizer memory. Parameters whose .grad is None are skipped (as in PyTorch)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid eps {eps} or weight_decay {weight_decay}: must be >= 0")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.step_count = 0
        self.state = {}                                     # id(param) -> {"m": array, "v": array}

    def _states(self, p):
        st = self.state.get(id(p))
        if st is None:
            xp = get_array_module(p.data)
            st = self.state[id(p)] = {"m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
        return st["m"], st["v"]

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            m, v = self._states(p)
            adamw_update(p.data, p.grad, m, v, self.step_count, self.lr, b1, b2, self.eps, self.weight_decay)

    def zero_grad(self):
        for p in self.params:
            p.grad = None
