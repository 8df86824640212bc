"""Corpora, splits and batches: deterministic, disjoint, byte-level, resumable."""

import numpy as np
import pytest

from minilora import data


@pytest.mark.parametrize("name", ["pydoc", "stdlib", "idle"])
def test_corpus_loads_with_both_splits(name):
    try:
        c = data.load_corpus(name)
    except FileNotFoundError as e:
        pytest.skip(f"corpus {name} not available on this Python: {e}")
    assert c.train.dtype == np.uint8 and c.val.dtype == np.uint8
    assert c.val.size > 4000 and c.train.size > 8 * c.val.size // 2
    assert len(c.sha256) == 64
    assert c.stats()["ascii_fraction"] > 0.99       # so bits per byte is (almost) bits per character


def test_splits_are_deterministic_and_disjoint():
    py = data._texts_pydoc()
    assert py == data._texts_pydoc()
    assert not set(py[2]["train"]) & set(py[2]["val"])               # no topic in both splits
    assert len(py[2]["val"]) == 8 and py[2]["val"][0] == "attribute-access"
    assert not set(data.STDLIB_TRAIN_MODULES) & set(data.STDLIB_VAL_MODULES)
    assert list(data.STDLIB_TRAIN_MODULES) == sorted(data.STDLIB_TRAIN_MODULES)
    # no validation module's text appears in the training text
    c = data.load_corpus("stdlib")
    train = c.train.tobytes()
    for m, text in zip(data.STDLIB_VAL_MODULES, data._texts_stdlib()[1], strict=True):
        assert text.encode()[1000:1200] not in train, m


def test_idle_split_is_a_clean_cut():
    try:
        tr, va, _ = data._texts_idle()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path = data.os.path.join(data.stdlib_dir(), "idlelib", "help.html")
    with open(path, encoding="utf-8") as f:
        assert tr[0].endswith("\n") and tr[0] + va[0] == f.read()


def test_encode_decode_roundtrip_and_vocab():
    s = "def f(x):\n    return x ** 2  # bytes → ünïcödé"
    ids = data.encode(s)
    assert ids.max() < data.VOCAB_SIZE and data.decode(ids) == s
    assert data.decode(ids[:-1]).endswith("\ufffd")                    # half a character never crashes


def test_get_batch_shapes_shift_and_seed():
    c = data.load_corpus("pydoc")
    x, y = c.get_batch("train", 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x2, _ = c.get_batch("train", 4, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    x3, _ = c.get_batch("train", 4, 16, np.random.default_rng(1))
    assert not np.array_equal(x, x3)


def test_eval_windows_fixed_and_inside_the_split():
    c = data.load_corpus("stdlib")
    x, y = c.eval_windows("val", 32, 10)
    x2, _ = c.eval_windows("val", 32, 10)
    np.testing.assert_array_equal(x, x2)
    assert x.shape == (10, 32)
    np.testing.assert_array_equal(x[0], c.val[:32])
    np.testing.assert_array_equal(y[-1], c.val[-32:])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("shakespeare")
    c = data.load_corpus("pydoc")
    with pytest.raises(ValueError, match="split must be"):
        c.get_batch("test", 2, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than block_size"):
        data.get_batch(np.zeros(5, np.uint8), 2, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must be >= 1"):
        data.get_batch(c.train, 0, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_windows must be"):
        c.eval_windows("val", 8, 0)                                 # was an empty set (then a division by zero)
    with pytest.raises(ValueError, match="read-only"):
        c.train[0] = 0                                              # the cached corpus is shared by every caller
    assert abs(data.bits_per_byte(np.log(2.0)) - 1.0) < 1e-12
