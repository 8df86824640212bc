"""Notebook 05, LoRA backprop by hand: the forward, the backward and the whole layer's gradients.

The LoRA branch is y = s·(x Aᵀ) Bᵀ. With h = s·x Aᵀ (N, r) and the upstream gradient dy (N, d_out), the chain rule
gives dB = dyᵀ h, g = s·dy B (N, r), dA = gᵀ x and dx = g A. The frozen base y0 = x W0ᵀ adds dx0 = dy W0 and no
weight gradient. Reference: minilora/nn/functional.py (lora_forward, lora_backward) and LoRALinear.backward.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex05_lora_backprop.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations


def lora_forward(x, A, B, scaling: float):
    """The LoRA branch: returns (y, cache) with y = (s·x Aᵀ) Bᵀ (N, d_out) and cache = (x, hs), hs = s·x Aᵀ (N, r).

    x (N, d_in), A (r, d_in), B (d_out, r). The scaling goes on the thin h, not on y.
    """
    raise NotImplementedError("exercise: implement lora_forward (see its docstring)")


def lora_backward(dy, cache, A, B, scaling: float):
    """Gradients of the LoRA branch. Returns (dx, dA, dB).

    dy (N, d_out), cache = (x, hs) as lora_forward returns it. dB = dyᵀ hs (d_out, r); g = s·dy B (N, r);
    dA = gᵀ x (r, d_in); dx = g A (N, d_in).
    """
    raise NotImplementedError("exercise: implement lora_backward (see its docstring)")


def lora_linear_backward(dy, x, W, A, B, scaling: float):
    """Gradients of a whole LoRA layer y = x Wᵀ + s·(x Aᵀ) Bᵀ with W (d_out, d_in) frozen. Returns (dx, dA, dB).

    dy (N, d_out), x (N, d_in). dx flows through both paths: dx = dy W + s·(dy B) A. W gets no gradient.
    """
    raise NotImplementedError("exercise: implement lora_linear_backward (see its docstring)")
