"""Notebook 01, LoRA from scratch: the adapter's size, its initialisation and its forward pass.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a linear layer's weight W0 (d_out, d_in) and learns the update as a
product of two thin matrices, ΔW = B A with A (r, d_in) and B (d_out, r). The layer computes
y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ with the scaling s = alpha / r. Reference: minilora.nn.lora.LoRALinear.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex01_lora.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)

import numpy as np  # noqa: F401 (used by the code you write)


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters LoRA adds to one d_in -> d_out linear layer at rank r.

    A is (r, d_in) and B is (d_out, r), so the count is r·d_in + d_out·r = r·(d_in + d_out). The frozen W0 and its
    bias add nothing. Example: lora_param_count(768, 768, 8) == 12288. Returns a Python int.
    """
    raise NotImplementedError("exercise: implement lora_param_count (see its docstring)")


def lora_init(d_in: int, d_out: int, r: int, rng: np.random.Generator):
    """PEFT's default initialisation of one adapter: returns (A, B), both float64.

    A (r, d_in) ~ U(-1/√d_in, +1/√d_in): kaiming-uniform with a = √5, whose bound works out to 1/√fan_in with
    fan_in = d_in. Draw it with exactly one call, rng.uniform(-bound, bound, (r, d_in)), so that the same seeded
    Generator gives the same A as minilora. B (d_out, r) is all zeros: ΔW = B A = 0, the model starts unchanged.
    """
    raise NotImplementedError("exercise: implement lora_init (see its docstring)")


def lora_linear_forward(x, W, b, A, B, scaling: float):
    """The forward pass of a LoRA layer: y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ.

    x (N, d_in), W (d_out, d_in), b (d_out,) or None, A (r, d_in), B (d_out, r), scaling s a float.
    Returns y (N, d_out). Keep the brackets: x Aᵀ is a thin (N, r) matrix, so ΔW = B A (d_out, d_in) is never
    formed and the adapter costs O(N·r·(d_in + d_out)) instead of O(N·d_in·d_out).
    """
    raise NotImplementedError("exercise: implement lora_linear_forward (see its docstring)")
