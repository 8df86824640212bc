"""Notebook 06, merging an adapter: ΔW = s·B A folded into W0, and taken out again.

After training, W = W0 + s·B A serves with no extra latency (LoRA, Hu et al. 2021, arXiv 2106.09685, §4.1);
unmerging subtracts the same ΔW to get W0 back for another adapter. The scaling is s = alpha / r, or
alpha / √r with rank-stabilised LoRA (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732).
Reference: minilora.nn.lora.LoRALinear (get_delta_weight, merge, unmerge), as PEFT's.
"""
from __future__ import annotations

import math


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / √r when use_rslora is True. Returns a float."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(A, B, scaling: float):
    """ΔW = s · B @ A, shape (d_out, d_in), for A (r, d_in) and B (d_out, r)."""
    return scaling * (B @ A)                        # (d_out, d_in)


def merge(W, A, B, scaling: float):
    """W0 + ΔW as a new array (W (d_out, d_in) is left untouched)."""
    return W + delta_weight(A, B, scaling)          # (d_out, d_in)


def unmerge(W_merged, A, B, scaling: float):
    """W_merged - ΔW as a new array: W0 again, up to rounding."""
    return W_merged - delta_weight(A, B, scaling)   # (d_out, d_in)
