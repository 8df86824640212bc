"""minilora.io: atomic writes and safetensors/JSON loading that fails loudly on truncated or corrupt files."""
import contextlib
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --- safetensors: dtypes ----------------------------------------------------------------------------------------------

def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file built by hand: 8-byte little-endian header length, JSON header, data."""
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("shape", [(3, 5), (0,), (), (2, 0, 4)])
def test_bfloat16_tensors_written_by_torch_load_as_the_same_float32_values(tmp_path, shape):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e3).to(torch.bfloat16)
    st_torch.save_file({"w": t, "b": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    back, _ = io.load_safetensors(tmp_path / "a.safetensors")
    want = t.float().numpy()
    assert back["w"].dtype == np.float32 and back["w"].shape == shape
    assert np.array_equal(back["w"].view(np.uint32), want.view(np.uint32))
    assert np.array_equal(back["b"], np.ones(2, np.float32))


@settings(max_examples=50, deadline=None)
@given(bits=st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=40))
def test_any_bfloat16_bit_pattern_loads_as_the_float32_with_those_top_16_bits(bits):
    import tempfile
    u16 = np.array(bits, dtype="<u2")
    raw = _raw_safetensors({"x": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, 2 * len(bits)]}},
                           u16.tobytes())
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(raw)
        back, _ = io.load_safetensors(p)
    assert back["x"].dtype == np.float32
    assert np.array_equal(back["x"].view(np.uint32), u16.astype(np.uint32) << 16)   # NaN payloads included


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                   "uint32", "int64", "uint64", "bool"])
def test_every_other_supported_dtype_loads_as_itself(tmp_path, dtype):
    from safetensors.numpy import save_file
    a = (np.arange(-6, 6).reshape(3, 4) % 7).astype(dtype)
    save_file({"a": a}, str(tmp_path / "a.safetensors"))
    back, _ = io.load_safetensors(tmp_path / "a.safetensors")
    assert back["a"].dtype == np.dtype(dtype) and np.array_equal(back["a"], a)


def test_an_unsupported_dtype_is_refused_naming_the_tensor_and_the_dtype(tmp_path):
    p = tmp_path / "f8.safetensors"
    p.write_bytes(_raw_safetensors({"lora_A": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(io.UnsupportedTensorError, match=r"f8\.safetensors.*'lora_A'.*F8_E4M3.*supported"):
        io.load_safetensors(p)
    assert issubclass(io.UnsupportedTensorError, ValueError)


def test_the_stored_dtypes_are_reported_faithfully(tmp_path):
    from safetensors.numpy import save_file
    save_file({"i": np.arange(3, dtype=np.int32), "f": np.ones(2, np.float16)}, str(tmp_path / "a.safetensors"))
    back, _ = io.load_safetensors(tmp_path / "a.safetensors")
    assert back["i"].dtype == np.int32 and back["f"].dtype == np.float16


def test_the_header_says_which_tensors_were_bfloat16(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes(_raw_safetensors({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
                                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6))
    assert {k: v["dtype"] for k, v in io.read_safetensors_header(p).items()} == {"a": "BF16", "b": "F32"}


# --- safetensors: headers that lie ------------------------------------------------------------------------------------

def _entry(**kw):
    return {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **kw}}


BAD_HEADERS = {   # header, data, what the error says
    "offsets as strings": (_entry(data_offsets=["0", "x"]), 8, r"'w'.*data_offsets"),
    "one offset": (_entry(data_offsets=[0]), 8, r"'w'.*data_offsets"),
    "three offsets": (_entry(data_offsets=[0, 8, 8]), 8, r"'w'.*data_offsets"),
    "float offsets": (_entry(data_offsets=[0.0, 8.0]), 8, r"'w'.*data_offsets"),
    "bool offsets": (_entry(data_offsets=[False, 8]), 8, r"'w'.*data_offsets"),
    "negative offset": (_entry(data_offsets=[-8, 0]), 8, r"'w'.*data_offsets"),
    "begin after end": (_entry(data_offsets=[8, 0]), 8, r"'w'.*data_offsets"),
    "end far beyond the data": (_entry(data_offsets=[0, 10 ** 15]), 8, r"truncated"),
    "offsets disagree with the shape": (_entry(shape=[3]), 8, r"'w'.*12 bytes"),
    "shape not a list": (_entry(shape="2"), 8, r"'w'.*shape"),
    "negative shape": (_entry(shape=[-2]), 8, r"'w'.*shape"),
    "shape of strings": (_entry(shape=["2"]), 8, r"'w'.*shape"),
    "dtype not a string": (_entry(dtype=4), 8, r"'w'.*dtype"),
    "unknown dtype": (_entry(dtype="F33"), 8, r"'w'.*dtype 'F33'"),
    "missing offsets": ({"w": {"dtype": "F32", "shape": [2]}}, 8, r"'w'.*data_offsets"),
    "entry not an object": ({"w": 3}, 8, r"'w'"),
    "header a list": ([1, 2], 8, r"not a JSON object"),
    "metadata a list": ({**_entry(), "__metadata__": [1]}, 8, r"__metadata__"),
    "metadata values not strings": ({**_entry(), "__metadata__": {"format": 1}}, 8, r"__metadata__"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, r"'b'.*overlap"),
    "a hole between tensors": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12, r"'b'.*gap"),
    "bytes after the last tensor": (_entry(), 12, r"4 bytes after"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_header_that_lies_is_a_corrupt_file_error_naming_file_and_tensor(tmp_path, case):
    header, n_data, match = BAD_HEADERS[case]
    p = tmp_path / "lies.safetensors"
    p.write_bytes(_raw_safetensors(header, b"\0" * n_data))
    with pytest.raises(io.CorruptFileError, match=r"lies\.safetensors") as e:
        io.load_safetensors(p)
    assert re.search(match, str(e.value)), str(e.value)


@pytest.mark.parametrize("raw, match", [
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "'w' appears twice"),
    (None, "header length"),
])
def test_duplicate_names_and_absurd_header_lengths_are_refused(tmp_path, raw, match):
    p = tmp_path / "x.safetensors"
    if raw is None:
        p.write_bytes((2 ** 63).to_bytes(8, "little") + b"{}")
    else:
        p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(io.CorruptFileError, match=match):
        io.load_safetensors(p)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=64), cut=st.integers(0, 200))
def test_random_bytes_never_escape_as_anything_but_a_corrupt_file_error(data, cut):
    import tempfile
    good = _raw_safetensors(_entry(), b"\1" * 8)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(good[:cut] + data)
        with contextlib.suppress(io.CorruptFileError):
            io.load_safetensors(p)


# --- writes: nothing left behind, nothing outside the folder; loads: no pickle --------------------------------------

@pytest.mark.parametrize("fail", ["chmod", "write", "fsync", "replace"])
def test_a_failed_write_leaves_no_temp_file_and_no_open_descriptor(tmp_path, monkeypatch, fail):
    p = tmp_path / "sub" / "x.safetensors"
    io.save_safetensors(p, {"w": np.ones(3, np.float32)})
    before = p.read_bytes()
    fds = set(os.listdir("/proc/self/fd"))

    def boom(*a, **k):
        raise OSError(f"{fail} failed")
    if fail == "write":
        real_open = os.fdopen

        class Broken:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

            def write(self, data):
                raise OSError("write failed")
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Broken(real_open(fd, mode)))
    else:
        monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError, match=f"{fail} failed"):
        io.save_safetensors(p, {"w": np.zeros(3, np.float32)})
    monkeypatch.undo()
    assert sorted(f.name for f in tmp_path.rglob("*")) == ["sub", "x.safetensors"]
    assert p.read_bytes() == before
    assert set(os.listdir("/proc/self/fd")) <= fds


def test_writing_through_a_symlinked_file_replaces_the_link_not_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").symlink_to(victim)
    io.save_json(out / "x.json", {"a": 1})
    assert victim.read_text() == "keep me" and io.load_json(out / "x.json") == {"a": 1}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out", "victim.txt"]


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle
    p = tmp_path / "x.safetensors"
    io.save_safetensors(p, {"w": np.ones(3, np.float32)})

    def refuse(*a, **k):
        raise AssertionError("pickle or np.load used while loading")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    assert np.array_equal(io.load_safetensors(p)[0]["w"], np.ones(3, np.float32))
    src = Path(io.__file__).read_text()
    assert "import pickle" not in src and "np.load(" not in src and "allow_pickle" not in src
