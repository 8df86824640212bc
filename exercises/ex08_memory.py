"""Notebook 08, memory at scale: counting LoRA parameters, NF4 bytes, optimizer states and activations.

The formulas of minilora.memory, one piece each: LoRA on a d_in -> d_out linear adds r·(d_in + d_out) parameters;
an NF4 tensor stores 4-bit codes plus its block statistics; AdamW keeps two states (m, v) per trainable parameter;
a transformer block keeps s·b·d·(34 + 5·a·s/d) bytes of 16-bit activations with dropout (Korthikanti et al. 2022,
arXiv 2205.05198, §4).

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex08_memory.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)

LLAMA_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_model_params(n_layer: int, d_model: int, d_ff: int, r: int, targets) -> int:
    """LoRA parameters of a LLaMA-style model. targets: a subset of LLAMA_LINEARS, e.g. ("q", "v").

    Each block has q, k, v, o: d_model -> d_model; gate, up: d_model -> d_ff; down: d_ff -> d_model.
    Each adapted linear d_in -> d_out adds r·(d_in + d_out); every block is adapted. Returns an int.
    """
    raise NotImplementedError("exercise: implement lora_model_params (see its docstring)")


def nf4_tensor_bytes(n: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Exact bytes of one NF4 tensor of n values, as bitsandbytes stores it. Returns an int.

    codes: ceil(n / 2) bytes (two per byte); the 16-entry float32 NF4 table: 64 bytes; and the statistics,
    with n_blocks = ceil(n / blocksize): without DQ 4·n_blocks; with DQ n_blocks (uint8 codes)
    + 4·ceil(n_blocks / nested_blocksize) (float32 absmax2) + 4 (float32 offset).
    """
    raise NotImplementedError("exercise: implement nf4_tensor_bytes (see its docstring)")


def adamw_state_bytes(n_trainable: int, bytes_per_value: int = 4) -> int:
    """AdamW's optimizer state: m and v for every trainable parameter, bytes_per_value each (fp32: 4)."""
    raise NotImplementedError("exercise: implement adamw_state_bytes (see its docstring)")


def activation_bytes_per_block(seq_len: int, batch_size: int, d_model: int, n_head: int,
                               bytes_per_value: int = 2, dropout: bool = True) -> int:
    """Activation bytes one transformer block keeps for the backward (Korthikanti et al. 2022).

    With s = seq_len, b = batch_size, d = d_model, a = n_head: 16 values of s·b·d and 2 of a·s²·b, at
    bytes_per_value each; with dropout add its 1-byte masks, 2·s·b·d + a·s²·b. At 2 bytes with dropout this is
    their s·b·d·(34 + 5·a·s/d). Returns an int.
    """
    raise NotImplementedError("exercise: implement activation_bytes_per_block (see its docstring)")
