"""The quantization report: every scheme's round-trip error and storage cost on one seeded Gaussian tensor.

    mean abs err = mean |x - x'|        mean rel err = mean |x - x'| / (|x| + 1e-8)   (bnb's test_4bit_quant metric)
    bits/param   = 8 * (codes + statistics bytes) / numel    (code tables not counted; see QuantState.nbytes)

Default input: numpy.random.default_rng(0).standard_normal((1024, 1024)).astype(float32), the pinned input of the
golden numbers (NF4/64: 0.072813 / 0.203431, bnb 0.50.2 gives the same bytes). `scheme_errors()` returns the rows
as dicts for notebooks; `roundtrip_errors()` gives per-element errors for histograms.

Run: `minilora quantize-report [--seed S] [--rows R] [--cols C]` (minilora/apps/quantize_report.py).
"""
from __future__ import annotations

from minilora.backend import default_rng, get_array_module
from minilora.quant.blockwise import dequantize_blockwise, quantize_blockwise
from minilora.quant.fourbit import dequantize_4bit, quantize_4bit
from minilora.quant.int8 import (
    int8_blockwise_dequant,
    int8_blockwise_quant,
    int8_tensorwise_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)

SCHEMES = ("int8 tensor-wise", "int8 row-wise", "int8 block-wise/64",
           "NF4/64", "NF4/64 + DQ", "FP4/64", "FP4/64 + DQ", "Int4/64", "Int4/64 + DQ", "8-bit dynamic/4096")


def pinned_input(seed: int = 0, shape=(1024, 1024)):
    """default_rng(seed).standard_normal(shape) in float64, cast to float32 (the golden numbers' input)."""
    xp_rng = default_rng(seed)
    x = xp_rng.standard_normal(shape)
    return x.astype(get_array_module(x).float32)


def roundtrip(x, scheme: str):
    """(x', bits per parameter) for one scheme name from SCHEMES."""
    n = x.size
    if scheme == "int8 tensor-wise":
        q, a = int8_tensorwise_quant(x)
        return int8_tensorwise_dequant(q, a), 8 + 32 / n
    if scheme == "int8 row-wise":
        x2 = x.reshape(-1, x.shape[-1])
        q, s, _ = int8_vectorwise_quant(x2)
        return int8_vectorwise_dequant(q, s).reshape(x.shape), 8 + 32 * s.size / n
    if scheme == "int8 block-wise/64":
        q, a = int8_blockwise_quant(x, 64)
        return int8_blockwise_dequant(q, a, 64), 8 + 32 * a.size / n
    if scheme == "8-bit dynamic/4096":
        q, st = quantize_blockwise(x, blocksize=4096)
        return dequantize_blockwise(q, st), st.bits_per_parameter()
    name, _, rest = scheme.partition("/")
    quant_type = {"NF4": "nf4", "FP4": "fp4", "Int4": "int4"}.get(name)
    if quant_type is None:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    blocksize = int(rest.split()[0])
    packed, st = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics="DQ" in rest)
    y = dequantize_4bit(packed, st)
    return y, st.bits_per_parameter()


def roundtrip_errors(x, scheme: str):
    """Per-element signed error x' - x (float32, x's shape), for histograms."""
    y, _ = roundtrip(x, scheme)
    return y - x


def scheme_errors(x=None, schemes=SCHEMES, seed: int = 0):
    """[{scheme, mean_abs_err, mean_rel_err, max_abs_err, bits_per_param}] for each scheme on x (default: pinned)."""
    x = pinned_input(seed) if x is None else x
    rows = []
    for scheme in schemes:
        y, bits = roundtrip(x, scheme)
        xp = get_array_module(x)
        err = xp.abs(x - y)
        rows.append({"scheme": scheme, "mean_abs_err": float(err.mean()),
                     "mean_rel_err": float((err / (xp.abs(x) + 1e-8)).mean()),
                     "max_abs_err": float(err.max()), "bits_per_param": float(bits)})
    return rows
