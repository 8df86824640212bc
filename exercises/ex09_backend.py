"""Notebook 09 (appendix), one code path for CPU and GPU: never import numpy in the math.

minilora's compute code asks minilora.backend for the array module that owns its input (xp = numpy or cupy) and
creates every new array through it, with the input's dtype. NumPy is named in one place only: the boundary that
hands arrays to plotting and printing. The rule for this file: no import of numpy (or cupy) at module level;
`to_numpy` alone may import numpy, inside its body.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex09_backend.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations

import math  # noqa: F401 (used by the code you write)

from minilora.backend import get_array_module  # noqa: F401 (used by the code you write)


def gelu(x):
    """GPT-2's GELU: y = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), elementwise, same shape and dtype as x.

    Use xp = get_array_module(x) for tanh; do not change the dtype (float32 in, float32 out; float64 stays float64).
    """
    raise NotImplementedError("exercise: implement gelu (see its docstring)")


def causal_mask(T: int, dtype, xp):
    """The (T, T) additive attention mask of the array module xp: 0 on and below the diagonal, -inf above it
    (token i may look at tokens j <= i). dtype is the scores' dtype, e.g. xp.float32."""
    raise NotImplementedError("exercise: implement causal_mask (see its docstring)")


def embedding_backward(dy, idx, vocab_size: int):
    """Gradient of y = W[idx] with respect to W (vocab_size, C): dW[v] = Σ of dy over the positions where idx == v.

    dy (..., C) float, idx int (...). Returns dW (vocab_size, C) with dy's dtype and array module. A token that
    appears twice must count twice: fancy-index assignment (dW[idx] += dy) does not; xp.add.at does.
    """
    raise NotImplementedError("exercise: implement embedding_backward (see its docstring)")


def to_numpy(x):
    """The boundary: a NumPy array for plotting or printing. A CuPy array (its type's module is cupy, e.g.
    cupy.ndarray) is copied to the host with x.get(); anything else goes through numpy.asarray(x)."""
    raise NotImplementedError("exercise: implement to_numpy (see its docstring)")
