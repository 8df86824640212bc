"""Notebook 06, merging an adapter: ΔW = s·B A folded into W0, and taken out again.

After training, W = W0 + s·B A serves with no extra latency (LoRA, Hu et al. 2021, arXiv 2106.09685, §4.1);
unmerging subtracts the same ΔW to get W0 back for another adapter. The scaling is s = alpha / r, or
alpha / √r with rank-stabilised LoRA (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732).
Reference: minilora.nn.lora.LoRALinear (get_delta_weight, merge, unmerge), as PEFT's.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex06_merge.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / √r when use_rslora is True. Returns a float."""
    raise NotImplementedError("exercise: implement lora_scaling (see its docstring)")


def delta_weight(A, B, scaling: float):
    """ΔW = s · B @ A, shape (d_out, d_in), for A (r, d_in) and B (d_out, r)."""
    raise NotImplementedError("exercise: implement delta_weight (see its docstring)")


def merge(W, A, B, scaling: float):
    """W0 + ΔW as a new array (W (d_out, d_in) is left untouched)."""
    raise NotImplementedError("exercise: implement merge (see its docstring)")


def unmerge(W_merged, A, B, scaling: float):
    """W_merged - ΔW as a new array: W0 again, up to rounding."""
    raise NotImplementedError("exercise: implement unmerge (see its docstring)")
