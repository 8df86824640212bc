"""Code tables ("codebooks"): the 16 or 256 values a 4-bit or 8-bit code can stand for, all inside [-1, 1].

A blockwise quantizer stores, per element, the index of the table value nearest to x / absmax(block).

* NF4 (NormalFloat, QLoRA §3): quantiles of N(0, 1), rescaled to [-1, 1]. With k bits it has 2^(k-1) positive
  values, one exact zero and 2^(k-1) - 1 negative ones (asymmetric on purpose: zero must be exact, and a symmetric
  table with an exact zero would waste a code):
      q_i = Phi^-1(p_i) / Phi^-1(offset),   p_i from linspace(offset, 0.5, ...)
* FP4: bitsandbytes' own 1-sign / 2-exponent / 1-mantissa float, listed in bit-pattern order, divided by 12.
* Int4: the 15 levels k/7, in bitsandbytes' (descending) order.
* Dynamic 8-bit map (Dettmers 2015): a sign, a run of zeros that acts as a dynamic exponent (each zero = one decade),
  an indicator bit, and a linear fraction in the remaining bits; 256 values, used for double quantization.

Mirrors `bitsandbytes/functional.py` (get_4bit_type, create_normal_map, create_fp8_map, create_dynamic_map, 0.50.x).
The library uses the exact hardcoded tables; the `create_*` functions re-derive them for teaching. They use
`statistics.NormalDist` instead of SciPy and a torch-style float32 linspace, which makes them bit-exact too.
"""
from __future__ import annotations

import functools
import itertools
import struct
from statistics import NormalDist

from minilora.backend import get_array_module, xp_current

# --- the tables bitsandbytes hardcodes (every value is exactly a float32) -------------------------------------------

NF4_CODE = [  # ascending, so code == position; get_4bit_type("nf4")
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bit-pattern order: index = 4-bit code, bit 3 = sign; raw magnitudes 0, 1/16, 8, 12, 4, 6, 2, 3. Code 8 is the
# "-0" pattern, but bnb writes it as the Python integer -0 == 0, so its table value is +0.0 (checked against bnb).
FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# bnb's int4 list [7 .. 0, -0, -1 .. -7] / 7. Its "-0" is the Python *integer* -0 == 0, so codes 7 and 8 are both +0.0.
INT4_RAW = [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]
_TABLES = {"nf4": NF4_CODE, "fp4": FP4_RAW, "int4": INT4_RAW}
_DIVISORS = {"nf4": 1.0, "fp4": 12.0, "int4": 7.0}


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (and back to a Python float)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def get_4bit_type(typename: str, xp=None):
    """The 16-entry float32 table of "nf4", "fp4" or "int4"; index = 4-bit code.

    bnb 0.50.2 accepts "int4" in its table but crashes building it and `quantize_4bit` refuses it: minilora's int4
    uses bnb's table and the same nearest-midpoint rule as FP4 (see blockwise.py)."""
    if typename not in _TABLES:
        raise ValueError(f"unknown 4-bit type {typename!r}; choose one of {sorted(_TABLES)}")
    xp = xp or xp_current()
    code = xp.asarray(_TABLES[typename], dtype=xp.float32)            # (16,)
    return code / xp.float32(_DIVISORS[typename])                     # float32 division, as bnb's `data /= data.max()`


# --- re-deriving the tables ------------------------------------------------------------------------------------------

def linspace_f32(start: float, end: float, steps: int) -> list:
    """torch.linspace(start, end, steps, dtype=float32) on CPU, bit for bit, as Python floats.

    torch computes step = float32((end - start) / (steps - 1)) and fills the first half forwards
    (start + step*i) and the second half backwards (end - step*(steps-1-i)), each point rounded once. Products and
    sums of these small float32 numbers are exact in float64, so rounding the float64 result once is the same."""
    start, end = f32(start), f32(end)
    if steps == 1:
        return [start]
    step = f32(f32(end - start) / (steps - 1))
    half = steps // 2
    return [f32(start + step * i) if i < half else f32(end - step * (steps - 1 - i)) for i in range(steps)]


def create_normal_float_map(bits: int = 4, offset: float | None = None, xp=None):
    """A k-bit NormalFloat table (NF2, NF3, NF4, ...): 2^(k-1) positive quantiles, 0, 2^(k-1)-1 negative ones.

    The default offset generalises 0.9677083 = mean(1 - 1/(2*15), 1 - 1/(2*16)) (our reading, not documented by
    the authors) to mean(1 - 1/(2(2^k - 1)), 1 - 1/(2*2^k)). The paper's Eq. 4 at p = 1 would give Phi^-1(1) = inf,
    which is why an offset below 1 is needed at all."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2 for a NormalFloat table, got {bits}")
    if offset is None:
        offset = 0.5 * ((1 - 1 / (2 * (2 ** bits - 1))) + (1 - 1 / (2 * 2 ** bits)))
    half = 2 ** (bits - 1)
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in linspace_f32(offset, 0.5, half + 1)[:-1]]      # half values, largest first
    neg = [-ppf(p) for p in linspace_f32(offset, 0.5, half)[:-1]]         # half - 1 values
    values = sorted(f32(v) for v in pos + [0.0] + neg)                   # bnb: torch.Tensor(list) -> float32
    xp = xp or xp_current()
    v = xp.asarray(values, dtype=xp.float32)                              # (2^bits,)
    return v / v.max()                                                    # float32 division: top is exactly 1.0


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True, xp=None):
    """bnb's create_normal_map: the NF4 table (16 values; bnb pads it with zeros to 256, we do not).

    use_extra_value=True is the asymmetric NF4 (8 positive, 0, 7 negative). use_extra_value=False gives the
    symmetric variant: 7 positive, two zeros, 7 negative."""
    if use_extra_value:
        return create_normal_float_map(4, offset, xp=xp)
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in linspace_f32(offset, 0.5, 8)[:-1]]
    values = sorted(f32(v) for v in pos + [0.0, 0.0] + [-v for v in pos])
    xp = xp or xp_current()
    v = xp.asarray(values, dtype=xp.float32)                              # (16,)
    return v / v.max()


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8, xp=None):
    """bnb's small-float map: bias = 2^(e-1); normals (1 + m) * 2^-(E - bias - 1), subnormals m * 2^-bias.

    Returned sorted and divided by its maximum (bnb pads short tables with zeros to 256 entries; we return only the
    2^total_bits values). Note the exponent runs *downwards* (larger field, smaller value). bnb's comment says FP4
    can be regenerated with create_fp8_map(True, 2, 1, 4), but that gives the subnormal 1/48, not the hardcoded
    table's 1/192 = 0.0625/12; all other 12 nonzero values agree (checked against bnb 0.50.2)."""
    if exponent_bits + precision_bits != total_bits - (1 if signed else 0):
        raise ValueError("exponent_bits + precision_bits must equal total_bits minus the sign bit")
    bias = 2 ** (exponent_bits - 1)
    values = []
    for e in range(2 ** exponent_bits):
        for mantissa in itertools.product([0, 1], repeat=precision_bits):
            v = (1 if e != 0 else 0) + sum(b * 2.0 ** -(i + 1) for i, b in enumerate(mantissa))
            v = v * 2.0 ** -bias if e == 0 else v * 2.0 ** -(e - bias - 1)
            values += [v, -v] if signed else [v]
    xp = xp or xp_current()
    code = xp.asarray(sorted(values), dtype=xp.float32)                  # (2^total_bits,)
    return code / code.max()


@functools.lru_cache(maxsize=16)
def _dynamic_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple:
    return tuple(_dynamic_list(signed, max_exponent_bits, total_bits))


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8, xp=None):
    """The dynamic 8-bit map: for each decade 10^(i-6), i = 0..6, the midpoints of linspace(0.1, 1, 2^i + 1)
    (2^(i+1) + 1 points unsigned), scaled by the decade; plus 0 and 1.0; sorted. Signed: 127 negatives, zero at
    index 127, max 1.0, min -0.99296875. Bit-exact with bnb thanks to the torch-style linspace.
    (Built once per argument set in Python floats, then cached: double quantization asks for it on every call.)"""
    xp = xp or xp_current()
    return xp.asarray(_dynamic_values(signed, max_exponent_bits, total_bits), dtype=xp.float32)   # (256,)


def _dynamic_list(signed, max_exponent_bits, total_bits):
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data = []

    def decade(i, n_points):
        b = linspace_f32(0.1, 1.0, n_points)
        means = [f32(f32(b[j] + b[j + 1]) / 2.0) for j in range(n_points - 1)]   # float32 add, exact halving
        scale = f32(10.0 ** (-(max_exponent_bits - 1) + i))  # torch casts the Python scalar to float32 first
        return [f32(scale * m) for m in means]

    for i in range(max_exponent_bits):
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        n = 2 ** fraction_bits + 1
        vals = decade(i, n)
        data += vals + ([-v for v in vals] if signed else [])
    if additional_items > 0:
        vals = decade(max_exponent_bits - 1, additional_items + 1)
        data += vals + ([-v for v in vals] if signed else [])
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return sorted(data)


def midpoints(code):
    """Decision thresholds of a table: the float32 midpoints of its sorted values, and the sort order.

    searchsorted(mid, v, side="left") counts the midpoints strictly below v, so a value exactly on a midpoint goes
    to the lower code, like bnb's torch.bucketize. `order` maps sorted position -> code (a *stable* argsort: FP4's
    +0 (code 0) sorts before -0 (code 8))."""
    xp = get_array_module(code)
    # CuPy's argsort is always stable (and accepts no `kind`); NumPy's default quicksort is not
    order = xp.argsort(code, kind="stable") if xp.__name__ == "numpy" else xp.argsort(code)   # (n_codes,)
    s = code[order]                                                       # (n_codes,) sorted values
    return (s[:-1] + s[1:]) / 2, order                                   # (n_codes - 1,) float32
