"""Notebook 11, beyond LoRA: DoRA's weight, PiSSA's initialisation and the bytes of 8-bit AdamW's states.

DoRA (Liu et al. 2024, arXiv 2402.09353) writes each output row of the adapted weight as a length m times the unit
direction of LoRA's W0 + s·B A. PiSSA (Meng et al. 2024, arXiv 2404.02948) starts the adapter on W0's top-r singular
triplets and freezes the residual. 8-bit AdamW (Dettmers et al. 2021, arXiv 2110.02861) stores m and v as one-byte
codes with one float32 absmax per block of 256, except for small tensors, which keep float32 states.
Reference: minilora/nn/functional.py (dora_weight_norm) with minilora.nn.LoRALinear(use_dora=True).merge,
minilora.nn.lora.pissa_factors, and minilora.optim.AdamW8bit, as PEFT's and bitsandbytes'.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex11_beyond_lora.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)

import numpy as np  # noqa: F401 (used by the code you write)


def dora_weight(W0, A, B, scaling: float, m):
    """DoRA's merged weight W' = m ⊙ V / n with V = W0 + s·B A and n the L2 norm of each OUTPUT ROW of V.

    W0 (d_out, d_in), A (r, d_in), B (d_out, r), m (d_out,) -> W' (d_out, d_in); every row o of W' has length m[o]."""
    raise NotImplementedError("exercise: implement dora_weight (see its docstring)")


def pissa_init(W0, r: int, scaling: float):
    """PiSSA's (A, B, W_res) from W0 = U S Vᵀ (np.linalg.svd, full_matrices=False, singular values descending):

        A = √(S_r / s) V_rᵀ  (r, d_in),   B = U_r √(S_r / s)  (d_out, r),   W_res = W0 − s·B A  (d_out, d_in)

    S_r is divided by s so that s·B A = U_r S_r V_rᵀ (W0's best rank-r approximation) whatever lora_alpha is, and
    W_res + s·B A = W0. W0 is float64 here; keep float64."""
    raise NotImplementedError("exercise: implement pissa_init (see its docstring)")


def adam8bit_state_bytes(numel: int, min_8bit_size: int = 4096) -> int:
    """Bytes of 8-bit AdamW's two states (m and v) for one parameter of `numel` values, without the two shared
    256-entry maps: below min_8bit_size values both states stay float32 (4 bytes each per value); otherwise each is
    one uint8 code per value plus one float32 absmax per block of 256 values (the last block may be shorter)."""
    raise NotImplementedError("exercise: implement adam8bit_state_bytes (see its docstring)")
