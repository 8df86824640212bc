"""minilora.io: atomic writes and safetensors/JSON loading that fails loudly on truncated or corrupt files."""
import os
import stat

import numpy as np
import pytest

from minilora import io


def test_safetensors_round_trip_is_exact(tmp_path):
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.uint8)}
    io.save_safetensors(tmp_path / "x.safetensors", t)
    back, meta = io.load_safetensors(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])


@pytest.mark.parametrize("cut", [0, 5, 20, -3])
def test_truncated_safetensors_raises_a_clear_error(tmp_path, cut):
    p = tmp_path / "x.safetensors"
    io.save_safetensors(p, {"w": np.ones((4, 4), np.float32)})
    raw = p.read_bytes()
    p.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    with pytest.raises(io.CorruptFileError, match="truncated|corrupt"):
        io.load_safetensors(p)


def test_corrupt_header_raises(tmp_path):
    p = tmp_path / "x.safetensors"
    io.save_safetensors(p, {"w": np.ones(3, np.float32)})
    raw = bytearray(p.read_bytes())
    raw[9] = ord("#")                                  # break the JSON header
    p.write_bytes(bytes(raw))
    with pytest.raises(io.CorruptFileError, match="corrupt"):
        io.load_safetensors(p)


def test_corrupt_json_raises(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"r": 8,')
    with pytest.raises(io.CorruptFileError, match="not valid JSON"):
        io.load_json(p)


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    p = tmp_path / "c.json"
    io.save_json(p, {"r": 8})

    def boom(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_json(p, {"r": 16})
    assert io.load_json(p) == {"r": 8}
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]      # no temp file left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    p = tmp_path / "x.bin"
    io.atomic_write_bytes(p, b"abc")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
