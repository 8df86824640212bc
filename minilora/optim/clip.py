"""Gradient clipping by global norm, `torch.nn.utils.clip_grad_norm_` (QLoRA fine-tunes with max_grad_norm = 0.3).

    total = ‖(‖g_1‖, ‖g_2‖, ...)‖                    the norm of all gradients seen as one long vector
    coef  = min(1, max_norm / (total + 1e-6))        the 1e-6 is PyTorch's; it keeps coef finite when total = 0
    g_i  ← coef · g_i

Every gradient is scaled by the same coefficient, so the update keeps its direction and only its length shrinks.
"""
from __future__ import annotations

import math

from minilora.backend import get_array_module


def clip_grad_norm_(params, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale the gradients of `params` (Parameters or (name, Parameter) pairs) in place; returns the total norm
    before clipping, as a float. norm_type 2.0 (default) or inf. Parameters without a gradient are ignored."""
    if not (isinstance(max_norm, (int, float)) and max_norm >= 0):
        raise ValueError(f"invalid max_norm {max_norm!r}: must be a number >= 0")
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type {norm_type} not supported: use 2.0 or inf")
    named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(params)]
    grads = [(n, p.grad) for n, p in named if p.grad is not None]
    if not grads:
        return 0.0
    norms = []
    for _, g in grads:
        xp = get_array_module(g)
        if norm_type == 2.0:
            norms.append(float(xp.sqrt(xp.vdot(g.ravel(), g.ravel()).real)))   # ‖g‖₂ of one tensor
        else:
            norms.append(float(xp.abs(g).max()) if g.size else 0.0)
    total = math.sqrt(math.fsum(n * n for n in norms)) if norm_type == 2.0 else max(norms)
    if not math.isfinite(total):
        bad = [n for (n, _), v in zip(grads, norms, strict=True) if not math.isfinite(v)]
        if error_if_nonfinite:
            raise ValueError(f"the total gradient norm is {total}: {len(bad)} of {len(grads)} gradients are "
                             f"non-finite, the first is {bad[0]!r}")
    coef = max_norm / (total + 1e-6)
    if not coef >= 1.0:                              # torch multiplies by min(coef, 1) always (×1.0 is a no-op);
        for _, g in grads:                           # a NaN total makes every gradient NaN, as in torch
            g *= g.dtype.type(coef)
    return total
