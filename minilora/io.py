"""Files: atomic writes, and safetensors/JSON loading that fails loudly on a truncated or corrupt file.

Every file minilora writes (checkpoints, adapters, run tables) goes through `atomic_write_bytes`: the bytes land in a
temporary file in the same folder, are flushed and fsync'ed, and only then renamed over the target, so a crash or a
failed save leaves the previous file intact. Nothing is ever loaded with pickle: tensors travel as safetensors (the
format Hugging Face PEFT writes: an 8-byte little-endian header length, a JSON header, raw little-endian data) and
everything else as JSON.

Host-only code: this module may import numpy (it is on the backend test's allowlist).
"""
from __future__ import annotations

import contextlib
import json
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
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600; give the file the mode open() would have
        with os.fdopen(fd, "wb") as f:
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


def load_safetensors(path) -> tuple[dict, dict]:
    """Read a safetensors file into NumPy arrays; returns (tensors, metadata).

    The header is checked by hand before anything is parsed, so a truncated or corrupt file gives a CorruptFileError
    that says what is wrong instead of a crash deep in a parser."""
    from safetensors.numpy import load
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise CorruptFileError(f"{path}: truncated safetensors file ({len(raw)} bytes, the header length alone is 8)")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise CorruptFileError(f"{path}: truncated or corrupt safetensors file: header claims {n} bytes, "
                               f"only {len(raw) - 8} follow")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"
               and isinstance(v, dict) and "data_offsets" in v] or [0])
    if 8 + n + end > len(raw):
        raise CorruptFileError(f"{path}: truncated safetensors file: tensors need {end} data bytes, "
                               f"only {len(raw) - 8 - n} are present")
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises SafetensorError on any inconsistency
        raise CorruptFileError(f"{path}: corrupt safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__") or {})
