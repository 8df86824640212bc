"""Files: atomic writes, and safetensors/JSON loading that fails loudly on a truncated or corrupt file.

Every file minilora writes (checkpoints, adapters, run tables) goes through `atomic_write_bytes`: the bytes land in a
temporary file in the same folder, are flushed and fsync'ed, and only then renamed over the target, so a crash or a
failed save leaves the previous file intact. Nothing is ever loaded with pickle: tensors travel as safetensors (the
format Hugging Face PEFT writes: an 8-byte little-endian header length, a JSON header, raw little-endian data) and
everything else as JSON.

Loading safetensors: F64, F32, F16, I64/I32/I16/I8, U64/U32/U16/U8 and BOOL load as themselves (the dtype is given
faithfully: an integer tensor stays integer, for the caller to refuse); BF16, which NumPy lacks, loads as float32
holding exactly the same values (a bfloat16 is the top 16 bits of a float32). F8_* and complex tensors raise
UnsupportedTensorError; any inconsistency in the header raises CorruptFileError. Both are ValueErrors naming the
file and the tensor.

Host-only code: this module may import numpy (it is on the backend test's allowlist).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


class CorruptFileError(ValueError):
    """A file minilora tried to load is truncated, corrupt or not what it claims to be."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename.

    On any failure the temp file is removed and its descriptor closed; the previous file (if any) is untouched. A
    symlink at `path` is replaced by the new file, never written through. Nothing is written outside path's folder
    (which is created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:          # owns fd from here: closed on any failure below
            os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600; give the file the mode open() would have
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path, obj) -> None:
    """JSON with indent=2 and sorted keys (PEFT's adapter_config.json style), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a dict of arrays (NumPy or CuPy; CuPy is copied to the host) as safetensors, atomically.

    metadata defaults to {"format": "pt"}, which is what PEFT and transformers write and expect."""
    from safetensors.numpy import save

    from minilora.backend import to_numpy
    host = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    meta = {"format": "pt"} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    atomic_write_bytes(path, save(host, metadata=meta))


# safetensors dtype -> the NumPy dtype it loads as. BF16 is read as float32 (a bfloat16 is the top 16 bits of a
# float32: uint16 -> uint32 << 16 -> view float32, exact). Everything else loads as itself.
SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
MAX_HEADER_BYTES = 100 * 1024 * 1024      # the safetensors library's own limit


class UnsupportedTensorError(ValueError):
    """A valid safetensors file holds a tensor of a dtype minilora cannot load (e.g. F8_E4M3, complex)."""


def read_safetensors_header(path) -> dict:
    """The checked header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} with "__metadata__"
    removed; "dtype" is the stored one ("BF16" for a tensor `load_safetensors` returns as float32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header, _ = _parse_header(path, head + f.read(min(n, MAX_HEADER_BYTES + 1)), path.stat().st_size)
    return header


def load_safetensors(path) -> tuple[dict, dict]:
    """Read a safetensors file into NumPy arrays; returns (tensors, metadata).

    Supported dtypes: F64, F32, F16, I64..I8, U64..U8 and BOOL load as themselves; BF16 loads as float32 holding the
    same values (exact). Anything else (F8_*, complex) raises UnsupportedTensorError naming the tensor. The header is
    checked completely before any data is read (a JSON object; every entry a known dtype, a shape of non-negative
    integers, two integer data_offsets that match the shape; tensors tiling the data with no gap, overlap or excess),
    so a truncated, corrupt or lying file gives a CorruptFileError naming the file and the tensor instead of a crash
    deep in a parser. The data is copied out with frombuffer: nothing is ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    header, meta = _parse_header(path, raw, len(raw))
    start = 8 + int.from_bytes(raw[:8], "little")
    tensors = {}
    for name, e in header.items():
        b, _ = e["data_offsets"]
        count = math.prod(e["shape"])
        a = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[e["dtype"]], count=count, offset=start + b)   # (count,)
        if e["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)                # (count,) the float32 of those bits
        tensors[name] = a.astype(a.dtype.newbyteorder("="), copy=True).reshape(e["shape"])
    return tensors, meta


def _parse_header(path: Path, raw: bytes, file_size: int) -> tuple[dict, dict]:
    """(entries, metadata) of a safetensors file's header, every field checked; CorruptFileError otherwise."""
    def corrupt(what: str):
        return CorruptFileError(f"{path}: corrupt safetensors file: {what}")

    if file_size < 8:
        raise CorruptFileError(f"{path}: truncated safetensors file ({file_size} bytes, the header length alone is 8)")
    n = int.from_bytes(raw[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise corrupt(f"header length {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if n > file_size - 8:
        raise CorruptFileError(f"{path}: truncated or corrupt safetensors file: header claims {n} bytes, "
                               f"only {file_size - 8} follow")

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise corrupt(f"the header names tensor {k!r} twice ({k!r} appears twice)")
            seen[k] = v
        return seen
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise corrupt("__metadata__ must map strings to strings")
    data_size = file_size - 8 - n
    for name, e in header.items():
        if not isinstance(e, dict):
            raise corrupt(f"tensor {name!r}: its entry is not a JSON object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor {name!r}: dtype {dtype!r} is not a string")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise corrupt(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {name!r}: data_offsets {offsets!r} must be two integers 0 <= begin <= end")
        if offsets[1] > data_size:
            raise CorruptFileError(f"{path}: truncated safetensors file: tensor {name!r} needs data bytes up to "
                                   f"{offsets[1]}, only {data_size} are present")
        if dtype not in SAFETENSORS_DTYPES:
            known = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "C128"}
            if dtype in known:
                raise UnsupportedTensorError(f"{path}: tensor {name!r} has dtype {dtype!r}, which minilora cannot "
                                             f"load; supported: {', '.join(SAFETENSORS_DTYPES)} (convert it first)")
            raise corrupt(f"tensor {name!r}: unknown dtype {dtype!r}")
        size = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != size:
            raise corrupt(f"tensor {name!r}: {dtype} of shape {shape} needs {size} bytes, its data_offsets "
                          f"{offsets} span {offsets[1] - offsets[0]}")
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        b, f = e["data_offsets"]
        if b < end:
            raise corrupt(f"tensor {name!r}: data_offsets {e['data_offsets']} overlap the previous tensor's data")
        if b > end:
            raise corrupt(f"tensor {name!r}: data_offsets {e['data_offsets']} leave a gap after byte {end}")
        end = f
    if end != data_size:
        raise corrupt(f"{data_size - end} bytes after the last tensor's data")
    return header, meta
