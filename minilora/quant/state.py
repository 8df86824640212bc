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
import numbers
from collections.abc import Mapping

from minilora.backend import get_array_module, to_numpy, xp_current
from minilora.quant.checks import check_blocksize, check_code
from minilora.quant.codebooks import create_dynamic_map, get_4bit_type

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
        self.bfloat16 = False        # read from a bnb state of a bfloat16 model: dtype float32, values rounded to bf16

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
        if not hasattr(A, "dtype") or not hasattr(A, "shape"):
            raise TypeError(f"quantized data must be a uint8 array, got {type(A).__name__}")
        xp = get_array_module(A)
        n, bs = self.numel, self.blocksize
        want = (n + 1) // 2 if self.quant_type is not None else n
        if A.dtype != xp.uint8:
            raise TypeError(f"quantized data must be a uint8 array, got dtype {A.dtype}")
        if A.size != want:
            raise ValueError(f"QuantState does not match the data: shape {self.shape} needs {want} code bytes, "
                             f"got an array of shape {tuple(A.shape)} ({A.size} bytes)")
        n_blocks = -(-n // bs)
        if self.absmax.ndim != 1 or self.absmax.size != n_blocks:
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
        dtype = "bfloat16" if self.bfloat16 else _dtype_name(self.dtype)
        d = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
             "quant_map": self.code, "dtype": dtype, "shape": self.shape}
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
        """Rebuild a QuantState from `as_dict` output (packed or not), with key prefixes such as "weight." allowed.

        4-bit states (quant_type nf4/fp4/int4, plain or double-quantized) and 8-bit ones (quant_type None) load.
        dtype "bfloat16" (bitsandbytes' state of a bfloat16 model; NumPy has no bfloat16) gives a float32 state
        flagged `bfloat16`: it dequantizes to float32 holding bnb's bfloat16 values, and as_dict writes "bfloat16"
        back. TypeError for a non-dict; ValueError naming the field for anything no quantization could have
        produced (see `_check_loaded`)."""
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"QuantState.from_dict needs a dict (as_dict's output), got {type(qs_dict).__name__}")
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
            if not isinstance(extra, dict):
                raise ValueError(f"the packed quant_state entry must be a JSON object, got a {type(extra).__name__}")
            d.update(extra)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        missing = {"quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"} - set(d)
        if missing:
            raise ValueError(f"quant_state dict is missing {sorted(missing)}")
        quant_type = d["quant_type"]
        if quant_type is not None and quant_type not in VALID_QUANT_TYPES:
            raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {VALID_QUANT_TYPES} (or None for "
                             f"an 8-bit state)")
        absmax = _array(xp, d, "absmax")
        offset = state2 = None
        nested_keys = {"nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"}
        if nested_keys & set(d):
            if quant_type is None:
                raise ValueError("an 8-bit quant_state cannot be nested (quantize_blockwise never nests)")
            if nested_keys - set(d):
                raise ValueError(f"nested quant_state is missing {sorted(nested_keys - set(d))}")
            offset = xp.asarray(_number(d, "nested_offset"), dtype=xp.float32)                   # ()
            nested_dtype, _ = _dtype(xp, d, "nested_dtype")
            if nested_dtype != xp.float32:
                raise ValueError(f"quant_state nested_dtype must be float32 (absmax is float32), got "
                                 f"{d['nested_dtype']!r}")
            state2 = cls(absmax=_array(xp, d, "nested_absmax"), shape=(int(absmax.size),),
                         code=_array(xp, d, "nested_quant_map"), blocksize=_blocksize(d, "nested_blocksize"),
                         dtype=nested_dtype)
        dtype, bf16 = _dtype(xp, d, "dtype")
        state = cls(absmax=absmax, shape=_shape(d), code=_array(xp, d, "quant_map"), blocksize=_blocksize(d),
                    quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)
        state.bfloat16 = bf16
        state._check_loaded()
        return state

    def _check_loaded(self) -> None:
        """ValueError for a state read from a file that no quantization could have produced (a corrupt or hand-edited
        checkpoint), naming the field. Without these checks such a state dequantizes to NaN or to silently wrong
        weights. A quantization produces:
            absmax         1-D, float32, one per block, finite and >= 0 (a maximum of |x|)
            quant_map      4-bit: exactly the named quant_type's table; 8-bit: 1-D, 2..256 finite values in [-1, 1]
            nested (DQ)    absmax uint8 codes; nested_absmax 1-D float32, finite, >= 0, one per 256-block of
                           codes; nested_offset finite and >= 0 (a mean of absmax); nested_quant_map exactly the
                           signed dynamic map"""
        xp = get_array_module(self.absmax)
        n_blocks = -(-self.numel // self.blocksize)
        want = xp.uint8 if self.nested else xp.float32               # 8-bit codes of absmax, or absmax itself
        if self.absmax.ndim != 1:
            raise ValueError(f"quant_state absmax must be 1-D, got shape {tuple(self.absmax.shape)}")
        if self.absmax.dtype != want or self.absmax.size != n_blocks:
            raise ValueError(f"quant_state absmax must hold {n_blocks} {xp.dtype(want).name} values for {self.numel} "
                             f"weights in blocks of {self.blocksize}, got {self.absmax.size} of {self.absmax.dtype}")
        if self.quant_type is not None:
            _check_table(xp, "quant_map", self.code, get_4bit_type(self.quant_type, xp=xp), self.quant_type)
        else:
            if self.code.dtype != xp.float32:
                raise ValueError(f"quant_state quant_map must be float32, got {self.code.dtype}")
            check_code(self.code, xp, "quant_state quant_map")
        stats = [("absmax", self.absmax)]
        if self.nested:
            _check_table(xp, "nested_quant_map", self.state2.code, create_dynamic_map(signed=True, xp=xp),
                         "signed dynamic")
            if self.state2.absmax.ndim != 1:
                raise ValueError(f"quant_state nested_absmax must be 1-D, got shape {tuple(self.state2.absmax.shape)}")
            self.state2.check_matches(self.absmax)
            stats = [("nested_absmax", self.state2.absmax), ("nested_offset", self.offset)]
        for name, a in stats:
            a = a.reshape(-1)
            bad = ~xp.isfinite(a)
            if bool(bad.any()):
                raise ValueError(f"quant_state {name} holds {int(bad.sum())} NaN/Inf value(s), the first at flat "
                                 f"index {int(xp.argmax(bad))}: the checkpoint is corrupt")
            neg = a < 0
            if bool(neg.any()):
                raise ValueError(f"quant_state {name} holds {int(neg.sum())} negative value(s), the first at flat "
                                 f"index {int(xp.argmax(neg))}: it is a maximum (or mean) of |x|, so the "
                                 f"checkpoint is corrupt")


def check_dequantize_args(A, quant_state, four_bit: bool) -> None:
    """The guard of both dequantizers: a QuantState of the right kind, and uint8 codes that fit it."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if four_bit and quant_state.quant_type not in VALID_QUANT_TYPES:
        raise ValueError(f"not a 4-bit QuantState (quant_type={quant_state.quant_type!r}); an 8-bit state "
                         f"dequantizes with dequantize_blockwise")
    if not four_bit and quant_state.quant_type is not None:
        raise ValueError(f"a 4-bit QuantState (quant_type={quant_state.quant_type!r}) holds two codes per byte; "
                         f"dequantize it with dequantize_4bit")
    quant_state.check_matches(A)


def round_to_bfloat16(x32) -> None:
    """Round a float32 array in place to the nearest bfloat16 (ties to even), as torch's .to(torch.bfloat16) does
    for finite values: a bfloat16 is the top 16 bits of a float32."""
    xp = get_array_module(x32)
    bits = x32.view(xp.uint32)
    bits += xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1))        # carries into the exponent when it must
    bits &= xp.uint32(0xFFFF0000)


def _check_table(xp, name, table, want, want_name) -> None:
    """ValueError unless `table` is exactly the code table `want` (float32, same values)."""
    if table.ndim != 1 or table.size != want.size or table.dtype != xp.float32 or not bool(xp.isfinite(table).all()):
        raise ValueError(f"quant_state {name} must be {want.size} finite float32 values, got {table.size} "
                         f"{table.dtype} value(s), {int((~xp.isfinite(table)).sum())} non-finite")
    if not bool(xp.array_equal(table, want)):
        other = [t for t in VALID_QUANT_TYPES
                 if want.size == 16 and bool(xp.array_equal(table, get_4bit_type(t, xp=xp)))]
        also = f" (it is the {other[0]} table)" if other else ""
        raise ValueError(f"quant_state {name} is not the {want_name} table{also}: dequantizing with it would give "
                         f"wrong weights; the checkpoint is corrupt or was hand-edited")


def _array(xp, d: dict, key: str):
    try:
        return xp.asarray(d[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"quant_state {key} is not an array ({e})") from None


def _integer(d: dict, key: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"quant_state {key} must hold integers, got {d[key]!r}")
    return int(v)


def _blocksize(d: dict, key: str = "blocksize") -> int:
    try:
        return check_blocksize(d[key])
    except ValueError as e:
        raise ValueError(f"quant_state {key}: {e}") from None


def _shape(d: dict) -> tuple:
    s = d["shape"]
    if not isinstance(s, (list, tuple)):
        raise ValueError(f"quant_state shape must be a list of integers, got {s!r}")
    shape = tuple(_integer(d, "shape", v) for v in s)
    if any(n < 0 for n in shape):
        raise ValueError(f"quant_state shape {shape} has a negative dimension")
    return shape


def _number(d: dict, key: str) -> float:
    v = d[key]
    if hasattr(v, "dtype") and getattr(v, "size", 0) == 1 and v.dtype.kind in "fiu":
        v = float(v.reshape(()))
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"quant_state {key} must be a number, got {v!r}")
    return float(v)


def _dtype(xp, d: dict, key: str):
    """(dtype, bfloat16?) for bnb's dtype name: float16/32/64, or bfloat16 read as float32 (an int dtype would
    silently truncate the weights)."""
    name = d[key]
    if name == "bfloat16":
        return xp.dtype(xp.float32), True
    if name not in ("float16", "float32", "float64"):
        raise ValueError(f"quant_state {key} must be float16, float32, float64 or bfloat16 (bitsandbytes' names), "
                         f"got {name!r}")
    return xp.dtype(name), False


def _dtype_name(dtype) -> str:
    """'float32' for numpy's dtype('float32') (bnb writes str(torch.float32).strip('torch.'))."""
    return None if dtype is None else str(getattr(dtype, "name", dtype))
