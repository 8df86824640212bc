"""8-bit AdamW: Adam's two states stored as 8-bit block-wise dynamic-map codes, as bitsandbytes' `AdamW8bit`.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (arXiv 2110.02861). Adam keeps two float32 states
per parameter, 8 bytes; storing them as one byte each with one float32 scale per block of B = 256 elements cuts
that to 2 + 8/256 = 2.03 bytes. For each trainable parameter p with gradient g, at step t = 1, 2, ...:

    m ← qmap1[state1] · absmax1[block]                  dequantize (signed dynamic map: m can be negative)
    v ← qmap2[state2] · absmax2[block]                  dequantize (unsigned dynamic map: v ≥ 0 needs no sign bit)
    m ← β1·m + (1 − β1)·g                               update in float32
    v ← β2·v + (1 − β2)·g²
    p ← p · (1 − lr·wd)                                 decoupled weight decay (only when wd > 0)
    p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
    absmax1[b] = max |m| over block b,  state1 = code of m / absmax1[b]           requantize, blocks of 256
    absmax2[b] = max |v| over block b,  state2 = code of v / absmax2[b]

The dynamic map (minilora.quant's `create_dynamic_map`) spends its 8 bits on an exponent that runs over
seven decades and a shrinking fraction, so small and large entries of a block both keep a few significant digits.
A parameter with fewer than `min_8bit_size` (4096) elements keeps float32 states: its states are tiny, and for
those bnb uses its 32-bit kernel, whose last line is the algebraically equal

    p ← p + (−lr·√(1 − β2ᵗ) / (1 − β1ᵗ)) · m / (√v + eps·√(1 − β2ᵗ))

Mirrors bitsandbytes 0.50: `bitsandbytes/optim/adamw.py` (AdamW8bit = Optimizer2State("adam", optim_bits=8)),
`bitsandbytes/optim/optimizer.py` (init_state: uint8 state1/state2 with qmap1 = the signed map, qmap2 = the
unsigned one, float32 absmax1/absmax2 of ceil(n/256) blocks; `numel < min_8bit_size` → float32 states),
`bitsandbytes/functional.py` optimizer_update_8bit_blockwise, and its CPU kernels in
`bitsandbytes/backends/cpu/ops.py` (_optimizer_update_8bit_blockwise_cpu, _optimizer_update_32bit_cpu), line for
line, down to the rounding:

  - torch's CPU `a.add_(b, alpha=s)` and `a.addcmul_(b, c, value=s)` are fused multiply-adds (one rounding); NumPy
    has no fma, so `fma32` computes it exactly: a product of two float32 numbers is exact in float64, the float64
    sum is rounded to odd (TwoSum finds whether it was inexact), and one final rounding to float32 then equals the
    single rounding of the fused operation (Boldo & Melquiond: rounding to odd with ≥ 2 extra bits never double
    rounds). Scalars are cast to float32 first, as torch does; `mul_`, `addcdiv_`, `/` and `sqrt` are unfused.
  - bnb's CPU re-quantization is its C++ 65,536-bin lookup table (`csrc/cpu_ops.cpp`), not the nearest code:
    minilora.quant's `quantize_blocks_lut` (the kernel of `quantize_blockwise_lut`) reproduces it, including
    code 0 for an all-zero block (which dequantizes to -0.0 with the signed map); `dequantize_blocks` undoes it.

One difference is torch's, not ours: torch's CPU `sqrt` (Intel MKL's vector math on x86) is not correctly rounded;
~19% of its float32 results are 1 ulp off. We take the IEEE square root, so after many steps a few parameters
differ from bnb's by an ulp or so; the states never do (they do not depend on √v). docs/quantization.md says more.

    opt = AdamW8bit(model.named_parameters(), lr=2e-4)      # bnb.optim.AdamW8bit; paged: minilora.optim.paged
"""
from __future__ import annotations

import math

from minilora.backend import get_array_module
from minilora.optim.optimizer import Optimizer, check_number
from minilora.quant.blockwise import dequantize_blocks, quantize_blocks_lut
from minilora.quant.codebooks import create_dynamic_map

BLOCKSIZE = 256                 # bnb's blockwise optimizers (2048 before 0.44)
MIN_8BIT_SIZE = 4096            # bnb: parameters with fewer elements keep float32 states


# ------------------------------------------------------------------------------------------------- float32 rounding
def fma32(a, b, c):
    """float32 fma(a, b, c) = a·b + c rounded once, exactly; a may be a float32 scalar. Returns a new float32 array.

    a·b is exact in float64 (24 + 24 bits ≤ 53), so s = a·b + c in float64 carries one rounding, and rounding s to
    float32 equals rounding the exact sum except where s sits exactly on a float32 midpoint (its 29 dropped bits are
    1000…0) or in float32's subnormal range. Only those few values take the exact path, `_fma32_exact`."""
    xp = get_array_module(b)
    s = xp.multiply(a, b, dtype=xp.float64)                               # a·b, exact
    s += c                                                                # one rounding (53 bits)
    low = xp.bitwise_and(s.view(xp.int64), 0x1FFFFFFF)                    # the bits float32 drops
    risky = xp.flatnonzero((low == 0x10000000) | (xp.abs(s) < 2.0 ** -126))
    out = s.astype(xp.float32)
    if risky.size:
        ar = a if xp.ndim(a) == 0 else a.reshape(-1)[risky]
        out.reshape(-1)[risky] = _fma32_exact(ar, b.reshape(-1)[risky], c.reshape(-1)[risky])
    return out


def _fma32_exact(a, b, c):
    """fma32 by rounding to odd, for every value: s = a·b + c in float64 may round; TwoSum gives its error e exactly,
    and if e ≠ 0 we move s to its odd neighbour towards the true sum. With 53 ≥ 24 + 2 bits, the final float32
    rounding of a round-to-odd value equals the correctly rounded a·b + c: no double rounding."""
    xp = get_array_module(b)
    f64 = xp.float64
    prod = xp.multiply(a, b, dtype=f64)                                   # exact
    c64 = c.astype(f64)
    s = prod + c64                                                        # rounded to nearest (53 bits)
    bb = s - prod
    err = (prod - (s - bb)) + (c64 - bb)                                  # TwoSum: prod + c64 == s + err exactly
    even = xp.bitwise_and(s.view(xp.int64), 1) == 0
    fix = xp.flatnonzero((err != 0) & even & xp.isfinite(s))
    if fix.size:
        s.reshape(-1)[fix] = xp.nextafter(s.reshape(-1)[fix], xp.where(err.reshape(-1)[fix] > 0, xp.inf, -xp.inf))
    return s.astype(xp.float32)


# ---------------------------------------------------------------------------------------------------- the updates
def adamw8bit_update(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, step: int, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float):
    """One 8-bit AdamW step, in place, on flat arrays whose blocks of 256 start at element 0 (a whole parameter, or
    a block-aligned slice of it with the matching slices of absmax1/absmax2). bnb's CPU kernel, op for op."""
    xp = get_array_module(p)
    f32 = xp.float32
    g32 = g.astype(f32, copy=False)
    m = dequantize_blocks(state1, absmax1, qmap1, BLOCKSIZE)              # (n,) float32
    v = dequantize_blocks(state2, absmax2, qmap2, BLOCKSIZE)              # (n,)
    m = fma32(f32(1.0 - beta1), g32, m * f32(beta1))                      # mul_(β1).add_(g, alpha=1-β1)
    v = fma32(f32(1.0 - beta2) * g32, g32, v * f32(beta2))                # mul_(β2).addcmul_(g, g, value=1-β2)
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    denom = xp.sqrt(v) / f32(correction2) + f32(eps)                     # (sqrt(v) / c2).add_(eps)
    p32 = p if p.dtype == f32 else p.astype(f32)
    if weight_decay > 0.0:
        p32 *= f32(1.0 - lr * weight_decay)
    p32 += (f32(-lr / correction1) * m) / denom                           # addcdiv_(m, denom, value=-lr/c1)
    if p32 is not p:
        p[...] = p32
    quantize_blocks_lut(m, qmap1, BLOCKSIZE, state1, absmax1, name="8-bit AdamW state1 (a non-finite gradient?)")
    quantize_blocks_lut(v, qmap2, BLOCKSIZE, state2, absmax2, name="8-bit AdamW state2 (a non-finite gradient?)")


def adamw32bit_update(p, g, state1, state2, step: int, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float):
    """bnb's 32-bit CPU Adam step (used for parameters below min_8bit_size), in place on float32 states."""
    xp = get_array_module(p)
    f32 = xp.float32
    g32 = g.astype(f32, copy=False)
    state1[...] = fma32(f32(1.0 - beta1), g32, state1 * f32(beta1))
    state2[...] = fma32(f32(1.0 - beta2) * g32, g32, state2 * f32(beta2))
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    step_size = -lr * correction2 / correction1
    update = state1 / (xp.sqrt(state2) + f32(eps * correction2))
    p32 = p if p.dtype == f32 else p.astype(f32)
    if weight_decay > 0.0:
        p32 *= f32(1.0 - lr * weight_decay)
    p32[...] = fma32(f32(step_size), update, p32)                        # add_(update, alpha=step_size)
    if p32 is not p:
        p[...] = p32


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCKSIZE)


class AdamW8bit(Optimizer):
    """AdamW with 8-bit block-wise states; mirrors `bitsandbytes.optim.AdamW8bit` (same defaults, state names).

    optimizer.state[name] holds `step`, `state1`, `state2` and, for parameters of ≥ min_8bit_size elements,
    `absmax1`, `absmax2`, `qmap1`, `qmap2` (state1/state2 are then uint8 codes of the parameter's shape, else
    float32 m and v)."""

    hyperparams = ("lr", "betas", "eps", "weight_decay", "min_8bit_size")
    buffers = ()                                    # the states are built by _init_state: their kind depends on size

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        check_number("lr", lr)
        betas = tuple(betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: need two numbers, each in [0, 1)")
        check_number("eps", eps)
        check_number("weight_decay", weight_decay)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"invalid min_8bit_size {min_8bit_size!r}: must be an int >= 0")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.min_8bit_size = min_8bit_size
        super().__init__(params)
        for name, p in self.named_params:
            if p.data.dtype.kind != "f":
                raise TypeError(f"parameter {name!r} is {p.data.dtype}; AdamW8bit updates floating-point parameters")

    def is_8bit(self, numel: int) -> bool:
        """bnb's rule: 8-bit states unless the parameter has fewer than min_8bit_size elements."""
        return numel >= self.min_8bit_size

    def _init_state(self, p) -> dict:
        xp = get_array_module(p.data)
        if not self.is_8bit(p.data.size):
            shape = p.data.shape
            return {"step": 0, "state1": xp.zeros(shape, xp.float32), "state2": xp.zeros(shape, xp.float32)}
        nb = n_blocks(p.data.size)
        qmap1, qmap2 = self._qmaps(xp)
        return {"step": 0,
                "state1": xp.zeros(p.data.shape, xp.uint8), "state2": xp.zeros(p.data.shape, xp.uint8),
                "absmax1": xp.zeros(nb, xp.float32), "absmax2": xp.zeros(nb, xp.float32),       # (n_blocks,)
                "qmap1": qmap1, "qmap2": qmap2}

    def _qmaps(self, xp) -> tuple:
        """The signed and unsigned dynamic maps, one pair per optimizer shared by every parameter's state (bnb's
        `name2qmap`), so that a memory count sees 2 KiB once, not once per parameter."""
        pair = getattr(self, "_qmap_pair", None)
        if pair is None or get_array_module(pair[0]) is not xp:
            pair = self._qmap_pair = (create_dynamic_map(signed=True, xp=xp), create_dynamic_map(signed=False, xp=xp))
        return pair

    def update(self, p, g, state):
        b1, b2 = self.betas
        if "absmax1" not in state:
            adamw32bit_update(p.reshape(-1), g.reshape(-1), state["state1"].reshape(-1), state["state2"].reshape(-1),
                              state["step"], self.lr, b1, b2, self.eps, self.weight_decay)
            return
        adamw8bit_update(p.reshape(-1), g.reshape(-1), state["state1"].reshape(-1), state["state2"].reshape(-1),
                         state["absmax1"], state["absmax2"], state["qmap1"], state["qmap2"], state["step"], self.lr,
                         b1, b2, self.eps, self.weight_decay)

    def load_state_dict(self, sd: dict):
        """Restore hyperparameters, steps and states (copied to this optimizer's backend). ValueError names the
        parameter and entry whose dtype or shape does not fit."""
        super().load_state_dict(sd)                 # names, hyperparameters, steps; buffers=() so arrays come next
        params = dict(self.named_params)
        for name, st in self.state.items():
            src, p = sd["state"][name], params[name].data
            xp = get_array_module(p)
            eight = "absmax1" in src
            want = {"state1": (p.shape, "uint8" if eight else "float32"),
                    "state2": (p.shape, "uint8" if eight else "float32")}
            if eight:
                want.update(absmax1=((n_blocks(p.size),), "float32"), absmax2=((n_blocks(p.size),), "float32"),
                            qmap1=((256,), "float32"), qmap2=((256,), "float32"))
            for key, (shape, dtype) in want.items():
                if key not in src:
                    raise ValueError(f"optimizer state for {name!r} is missing {key!r}")
                arr = src[key]
                if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
                    raise ValueError(f"optimizer state {name}.{key} is {arr.dtype}{tuple(arr.shape)}, "
                                     f"expected {dtype}{tuple(shape)}")
                st[key] = xp.array(arr, copy=True)
