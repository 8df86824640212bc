"""Linear4bit: a frozen linear layer whose weight is stored in 4 bits (NF4 by default) — QLoRA's base layer.

    W (D_out, D_in) --quantize_4bit--> codes: uint8 ((n+1)//2, 1), two per byte, + QuantState (absmax per block
                                        of 64, itself 8-bit quantized with compress_statistics=True: "double quant")
    forward:   y  = x Ŵᵀ + b     with Ŵ = dequantize_4bit(codes, state), rebuilt on every call
    backward:  dx = dy Ŵ        (Ŵ rebuilt again); no gradient for W: the 4-bit weight is frozen

Ŵ is never kept in float between calls — holding it would give back the memory the 4-bit storage saved. The cost
is two dequantizations per step. Storage is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight with double
quantization (4.5 without), see `memory_report()`.

Mirrors bitsandbytes `bitsandbytes/nn/modules.py` (`Linear4bit`, `Params4bit`: weight.data are the packed codes,
weight.quant_state the statistics; state_dict keys `weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`). Unlike bnb (default
"fp4") the default quant_type here is QLoRA's "nf4".
"""
from __future__ import annotations

from minilora.backend import get_array_module
from minilora.nn import functional as F
from minilora.nn.layers import Linear, check_dout, check_input, raise_no_cache
from minilora.nn.module import Module
from minilora.nn.parameter import Parameter
from minilora.quant import QuantState, dequantize_4bit, quantize_4bit


class Params4bit(Parameter):
    """The packed 4-bit codes as a frozen Parameter, carrying its QuantState (bnb's Params4bit).

    Like bnb's, numel() counts packed bytes (half the weights); PEFT's print_trainable_parameters doubles it."""
    __slots__ = ("quant_state",)

    def __init__(self, data, quant_state):
        super().__init__(data, requires_grad=False)
        self.quant_state = quant_state

    def __setattr__(self, name, value):
        if name == "requires_grad" and value:
            raise ValueError("a 4-bit weight cannot be trained (bitsandbytes' Params4bit is frozen too); "
                             "train LoRA adapters on top of it (QLoRALinear)")
        super().__setattr__(name, value)


class Linear4bit(Module):
    """y = x Ŵᵀ + b with Ŵ the dequantized 4-bit weight. Build one with `Linear4bit.from_linear(linear)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 compress_statistics: bool = True, blocksize: int = 64, dtype="float32", rng=None):
        lin = Linear(in_features, out_features, bias=bias, dtype=dtype, rng=rng)
        self._init_from(lin, quant_type, compress_statistics, blocksize)

    @classmethod
    def from_linear(cls, linear: Linear, quant_type: str = "nf4", compress_statistics: bool = True,
                    blocksize: int = 64, nested_rounding: str = "exact") -> Linear4bit:
        """Quantize a Linear's weight (the bias stays in float, frozen). The Linear is not modified.

        nested_rounding: how double quantization rounds the absmax codes ("exact", "bnb-cpu", "bnb-cuda"; see
        minilora.quant.fourbit.double_quantize). set_weight re-quantizes with the same choice."""
        if not isinstance(linear, Linear):
            raise TypeError(f"Linear4bit.from_linear expects a Linear, got {type(linear).__name__}")
        obj = cls.__new__(cls)
        obj._init_from(linear, quant_type, compress_statistics, blocksize, nested_rounding)
        return obj

    def _init_from(self, linear, quant_type, compress_statistics, blocksize, nested_rounding="exact"):
        Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.compress_statistics, self.blocksize = quant_type, compress_statistics, blocksize
        self.nested_rounding = nested_rounding
        self.compute_dtype = linear.weight.data.dtype          # what Ŵ is computed in (the input model's dtype)
        self.weight = Params4bit(*quantize_4bit(linear.weight.data, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=compress_statistics,
                                                nested_rounding=nested_rounding))   # ((n+1)//2, 1) uint8
        self.bias = None if linear.bias is None else Parameter(linear.bias.data.copy(), requires_grad=False)
        self._cache = None

    # ---- the stored weight --------------------------------------------------------------------------------
    @property
    def weight_packed(self):
        """The uint8 codes ((n+1)//2, 1), two 4-bit codes per byte."""
        return self.weight.data

    @property
    def quant_state(self) -> QuantState:
        return self.weight.quant_state

    def dequantize_weight(self):
        """Ŵ (D_out, D_in) in compute_dtype, freshly rebuilt from the codes (the caller should not keep it)."""
        W = dequantize_4bit(self.weight.data, self.weight.quant_state)        # (D_out, D_in)
        return W if W.dtype == self.compute_dtype else W.astype(self.compute_dtype)

    def set_weight(self, W):
        """Re-quantize a new float weight (D_out, D_in) with the same settings (used by merging LoRA into 4-bit)."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"set_weight expects shape {(self.out_features, self.in_features)}, got {tuple(W.shape)}")
        packed, qs = quantize_4bit(W, blocksize=self.blocksize, quant_type=self.quant_type,
                                   compress_statistics=self.compress_statistics,
                                   nested_rounding=getattr(self, "nested_rounding", "exact"))
        self.weight.data, self.weight.quant_state = packed, qs

    # ---- the two passes -----------------------------------------------------------------------------------
    def forward(self, x):
        check_input(self, x, self.compute_dtype, self.in_features)
        lead = x.shape[:-1]
        b = None if self.bias is None else self.bias.data
        y, x2 = F.linear_forward(x.reshape(-1, self.in_features), self.dequantize_weight(), b)   # (N, D_out)
        self._cache = (x2, lead)                                              # x only: Ŵ is dropped right away
        return y.reshape(*lead, self.out_features)

    def backward(self, dout):
        if self._cache is None:
            raise_no_cache(self)
        x2, lead = self._cache
        check_dout(self, dout, (*lead, self.out_features), x2.dtype)
        self._cache = None                                                     # freed once used
        b = self.bias
        need_db = b is not None and b.requires_grad
        W = self.dequantize_weight()                                           # (D_out, D_in) Ŵ, rebuilt for dx
        dx, _, db = F.linear_backward(dout.reshape(-1, self.out_features), x2, W,
                                      need_dW=False, need_db=need_db)           # dx = dy Ŵ; never dW
        if db is not None:
            b.accumulate_grad(db, owned=True)
        return dx.reshape(*lead, self.in_features)

    # ---- size and state -----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: codes + quantization statistics (+ the float bias)."""
        return self.quant_state.nbytes + (0 if self.bias is None else int(self.bias.data.nbytes))

    def memory_report(self) -> dict:
        """Measured storage of the frozen weight vs float32: 4.127 bits per parameter for NF4 + double quant."""
        qs = self.quant_state
        n = self.in_features * self.out_features
        return {"n_params": n, "codes_bytes": int(qs.data_nbytes), "stats_bytes": int(qs.stats_nbytes),
                "weight_bytes": int(qs.nbytes), "float32_bytes": 4 * n, "bits_per_param": qs.bits_per_parameter(),
                "compression_vs_float32": 4 * n / qs.nbytes}

    def _extra_state(self) -> dict:
        return {f"weight.{k}": v for k, v in self.quant_state.as_dict(packed=True).items()}

    def _check_extra_state(self, state: dict) -> QuantState:
        qs = QuantState.from_dict(state, xp=get_array_module(self.weight.data))   # ValueError on a corrupt state
        if tuple(qs.shape) != (self.out_features, self.in_features):
            raise ValueError(f"the checkpoint's 4-bit weight has shape {qs.shape}, this layer is "
                             f"{(self.out_features, self.in_features)}")
        return qs

    def _load_extra_state(self, state: dict) -> None:
        qs = self._check_extra_state(state)
        self.weight.quant_state = qs
        self.quant_type, self.blocksize, self.compress_statistics = qs.quant_type, qs.blocksize, qs.nested

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.compress_statistics}")
