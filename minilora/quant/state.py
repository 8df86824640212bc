"""QuantState: everything needed to undo a blockwise quantization, and its exact size in bytes.

    4-bit, no DQ:  absmax float32 (n_blocks,)                 -> 32 / blocksize bits of overhead per parameter
    4-bit + DQ:    absmax uint8 (n_blocks,) = 8-bit codes of (absmax - offset),
                   state2.absmax float32 (ceil(n_blocks/256),), offset float32 ()
                                                              -> 8/64 + 32/(64*256) = 0.127 bits per parameter at 64

Field names, `as_dict(packed=True)` keys and the JSON-in-uint8 layout are bitsandbytes' (`bitsandbytes/functional.py`,
class QuantState, 0.50.x), so a QLoRA weight saved by minilora loads the same way:
    absmax, quant_map, [nested_absmax, nested_quant_map], quant_state.bitsandbytes__nf4 = utf-8 JSON
    {"quant_type", "blocksize", "dtype", "shape", ["nested_blocksize", "nested_dtype", "nested_offset"]}
"""
from __future__ import annotations

import json
import math

from minilora.backend import get_array_module, to_numpy, xp_current

VALID_QUANT_TYPES = ("nf4", "fp4", "int4")


class QuantState:
    """absmax, shape, dtype, blocksize, code, quant_type, offset, state2, nested: as in bitsandbytes.

    quant_type is None for 8-bit blockwise (one uint8 code per element); "nf4"/"fp4"/"int4" for 4-bit (two codes per
    byte). dtype is the dtype of the original input (what dequantization returns)."""

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None,
                 state2=None):
        self.absmax = absmax
        self.shape = tuple(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __repr__(self):
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        return (f"QuantState(quant_type={self.quant_type!r}, shape={self.shape}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, n_blocks={self.absmax.size}{nested}, "
                f"bits/param={self.bits_per_parameter():.4f})")

    # --- size accounting ---------------------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def data_nbytes(self) -> int:
        """Bytes of the codes themselves: (n+1)//2 for 4-bit (two per byte), n for 8-bit."""
        return (self.numel + 1) // 2 if self.quant_type is not None else self.numel

    @property
    def stats_nbytes(self) -> int:
        """Bytes of the scaling statistics: absmax, plus state2.absmax and the float32 offset when nested."""
        n = self.absmax.nbytes
        if self.nested:
            n += self.state2.absmax.nbytes + 4
        return n

    @property
    def nbytes(self) -> int:
        """Codes + statistics. The code tables (16 or 256 float32 constants, shared by every tensor of a model) are
        not counted; `bits_per_parameter(include_code=True)` adds them."""
        return self.data_nbytes + self.stats_nbytes

    def bits_per_parameter(self, include_code: bool = False) -> float:
        """8 * nbytes / numel: 4.5 for NF4 at blocksize 64, 4.127 with double quantization (1024x1024: 4.12698)."""
        if self.numel == 0:
            return 0.0
        n = self.nbytes
        if include_code:
            n += self.code.nbytes + (self.state2.code.nbytes if self.nested else 0)
        return 8.0 * n / self.numel

    # --- consistency --------------------------------------------------------------------------------------------------

    def check_matches(self, A) -> None:
        """TypeError unless A holds uint8 codes; ValueError unless A (packed 4-bit or 8-bit codes) and this state
        describe the same tensor."""
        xp = get_array_module(A)
        n, bs = self.numel, self.blocksize
        want = (n + 1) // 2 if self.quant_type is not None else n
        if A.dtype != xp.uint8:
            raise TypeError(f"quantized data must be uint8, got {A.dtype}")
        if A.size != want:
            raise ValueError(f"QuantState does not match the data: shape {self.shape} needs {want} code bytes, "
                             f"got an array of shape {tuple(A.shape)} ({A.size} bytes)")
        n_blocks = -(-n // bs)
        if self.absmax.size != n_blocks:
            raise ValueError(f"QuantState is inconsistent: {n} values in blocks of {bs} need {n_blocks} absmax "
                             f"entries, it has {self.absmax.size}")
        if self.nested:
            if self.absmax.dtype != xp.uint8 or self.offset is None:
                raise ValueError("nested QuantState needs uint8 absmax codes and an offset")
            self.state2.check_matches(self.absmax)
        elif self.absmax.dtype != xp.float32:
            raise ValueError(f"absmax must be float32 (or uint8 codes with a nested state2), got {self.absmax.dtype}")

    # --- serialization (bnb's layout) --------------------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict:
        """bnb's dict; packed=True gives only arrays (fit for safetensors), the rest as JSON in a uint8 array."""
        d = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
             "quant_map": self.code, "dtype": _dtype_name(self.dtype), "shape": self.shape}
        if self.nested:
            d.update({"nested_absmax": self.state2.absmax, "nested_blocksize": self.state2.blocksize,
                      "nested_quant_map": self.state2.code.copy(), "nested_dtype": _dtype_name(self.state2.dtype),
                      "nested_offset": float(self.offset)})
        if not packed or self.quant_type is None:
            return d
        xp = get_array_module(self.absmax)
        arrays = {k: v for k, v in d.items() if hasattr(v, "dtype")}
        rest = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if not hasattr(v, "dtype")}
        arrays["quant_state.bitsandbytes__" + self.quant_type] = xp.asarray(
            list(json.dumps(rest).encode("utf-8")), dtype=xp.uint8)        # (len(json),) uint8
        return arrays

    @classmethod
    def from_dict(cls, qs_dict: dict, xp=None) -> QuantState:
        """Rebuild a QuantState from `as_dict` output (packed or not), with key prefixes such as "weight." allowed."""
        xp = xp or xp_current()
        d = dict(qs_dict)
        packed_keys = [k for k in d if "quant_state" in k.split(".")[-2:-1] + [k.split(".")[-1]]
                       or k.split(".")[-1].startswith("bitsandbytes__")]
        if "quant_type" not in {k.split(".")[-1] for k in d}:
            if len(packed_keys) != 1:
                raise ValueError(f"expected exactly one packed 'quant_state.bitsandbytes__<type>' entry, "
                                 f"found {packed_keys}")
            try:
                extra = json.loads(bytes(to_numpy(d.pop(packed_keys[0])).astype("uint8")).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"the packed quant_state entry is not valid UTF-8 JSON ({e})") from None
            d.update(extra)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        missing = {"quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"} - set(d)
        if missing:
            raise ValueError(f"quant_state dict is missing {sorted(missing)}")
        if d["quant_type"] not in VALID_QUANT_TYPES:
            raise ValueError(f"unknown quant_type {d['quant_type']!r}; expected one of {VALID_QUANT_TYPES}")
        offset = state2 = None
        if "nested_absmax" in d:
            offset = xp.asarray(d["nested_offset"], dtype=xp.float32)                          # ()
            state2 = cls(absmax=xp.asarray(d["nested_absmax"]), shape=(int(xp.asarray(d["absmax"]).size),),
                         code=xp.asarray(d["nested_quant_map"]), blocksize=_positive_int(d, "nested_blocksize"),
                         dtype=_float_dtype(xp, d["nested_dtype"]))
        state = cls(absmax=xp.asarray(d["absmax"]), shape=tuple(int(s) for s in d["shape"]),
                    code=xp.asarray(d["quant_map"]), blocksize=_positive_int(d, "blocksize"),
                    quant_type=d["quant_type"], dtype=_float_dtype(xp, d["dtype"]), offset=offset, state2=state2)
        state._check_loaded()
        return state

    def _check_loaded(self) -> None:
        """ValueError for a state read from a file that no quantization could have produced (a corrupt or hand-edited
        checkpoint): negative dims, a code table of the wrong length, non-finite statistics. Without these checks
        such a state dequantizes to NaN or to silently wrong weights."""
        xp = get_array_module(self.absmax)
        if any(n < 0 for n in self.shape):
            raise ValueError(f"quant_state shape {self.shape} has a negative dimension")
        tables = [("quant_map", self.code, 16)]
        stats = [("absmax", self.absmax)] if not self.nested else [
            ("nested_absmax", self.state2.absmax), ("nested_offset", self.offset)]
        n_blocks = -(-self.numel // self.blocksize)
        want = xp.uint8 if self.nested else xp.float32               # 8-bit codes of absmax, or absmax itself
        if self.absmax.dtype != want or self.absmax.size != n_blocks:
            raise ValueError(f"quant_state absmax must hold {n_blocks} {xp.dtype(want).name} values for {self.numel} "
                             f"weights in blocks of {self.blocksize}, got {self.absmax.size} of {self.absmax.dtype}")
        if self.nested:
            tables.append(("nested_quant_map", self.state2.code, 256))
            self.state2.check_matches(self.absmax)
        for name, table, size in tables:
            if table.size != size or table.dtype != xp.float32 or not bool(xp.isfinite(table).all()):
                raise ValueError(f"quant_state {name} must be {size} finite float32 values, got {table.size} "
                                 f"{table.dtype} value(s), {int((~xp.isfinite(table)).sum())} non-finite")
        for name, a in stats:
            bad = ~xp.isfinite(a)
            if bool(bad.any()):
                raise ValueError(f"quant_state {name} holds {int(bad.sum())} NaN/Inf value(s), the first at flat "
                                 f"index {int(xp.argmax(bad.reshape(-1)))}: the checkpoint is corrupt")


def _positive_int(d: dict, key: str) -> int:
    v = int(d[key])
    if v < 1:
        raise ValueError(f"quant_state {key} must be a positive integer, got {d[key]!r}")
    return v


def _float_dtype(xp, name):
    """The dtype a state dequantizes to: float16/32/64 only (an int dtype would silently truncate the weights)."""
    dt = xp.dtype(name)
    if dt not in (xp.float16, xp.float32, xp.float64):
        raise ValueError(f"quant_state dtype must be float16, float32 or float64, got {name!r}")
    return dt


def _dtype_name(dtype) -> str:
    """'float32' for numpy's dtype('float32') (bnb writes str(torch.float32).strip('torch.'))."""
    return None if dtype is None else str(getattr(dtype, "name", dtype))
