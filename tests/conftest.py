"""Shared fixtures: the `xp` fixture runs a test once per available array backend: NumPy and the strict backend
(NumPy that refuses host/device mixes as CuPy does) always, CuPy with a GPU."""
import os

import pytest

from minilora import backend

os.environ.setdefault("MPLBACKEND", "Agg")

requires_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a CUDA device is not available")


@pytest.fixture(params=["numpy", "numpy-strict", pytest.param("cupy", marks=requires_gpu)])
def xp(request):
    """The array module of one backend, made current for the duration of the test."""
    with backend.use_backend(request.param) as module:
        yield module
