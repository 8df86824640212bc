"""Shared by the quantization tests: the pinned input of the golden numbers (quantization.md §6.2)."""
import numpy as np
import pytest


@pytest.fixture(scope="session")
def pinned():
    """numpy.random.default_rng(0).standard_normal((1024, 1024)) in float32: the input bitsandbytes 0.50.2 was run on
    to produce the golden error numbers. Session-scoped: built once for every test module that uses it."""
    return np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
