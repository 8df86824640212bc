"""Shared by the quantization tests: the pinned input of the golden numbers (docs/quantization.md §6.2)."""
import pytest

from minilora import backend
from minilora.quant.report import pinned_input


@pytest.fixture(scope="session")
def pinned():
    """minilora.quant.report.pinned_input() on NumPy: the (1024, 1024) float32 input bitsandbytes 0.50.2 was run on to
    produce the golden error numbers. Session-scoped: built once for every test module that uses it."""
    with backend.use_backend("numpy"):
        return pinned_input()
