"""Thin layer classes: they hold Parameters and a cache, and call the forward/backward pairs in `functional.py`.

Each `forward(x)` accepts any leading shape (..., C) and flattens it to 2-D rows (N, C) so every matmul is one
BLAS call; `backward(dout)` returns dx of x's shape and accumulates into `param.grad` only for parameters with
`requires_grad=True` — a frozen weight never gets a gradient array and its dW matmul is skipped. A backward frees
the cache it used (as autograd frees saved tensors), so nothing is held between training steps and a second
backward for one forward raises instead of silently reusing stale activations.

Mirrors `torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.LayerNorm`, `torch.nn.GELU(approximate="tanh")`
(PyTorch's default initialisations included).
"""
from __future__ import annotations

import math
import numbers

from minilora.backend import default_rng, xp_current
from minilora.nn import functional as F
from minilora.nn.module import Module
from minilora.nn.parameter import Parameter


def _dtype(xp, dtype):
    """A floating dtype: integer weights would truncate the initialisation to zeros (and never train)."""
    try:
        dt = xp.dtype(dtype)
    except TypeError:
        raise TypeError(f"unknown dtype {dtype!r}; use 'float32' or 'float64'") from None
    if dt.kind != "f":
        raise TypeError(f"layer weights must be a float dtype, got {dt} ({dtype!r}); use 'float32' or 'float64'")
    return dt


def _size(name, value):
    """A layer size must be a plain integer (8.5 or '8' would fail deep inside NumPy, True would mean 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_input(layer, x, dtype, features):
    """TypeError unless x is an array with the layer's dtype (as torch: no silent up-casting of a float32 model),
    ValueError unless its last axis has `features` entries."""
    if not hasattr(x, "dtype") or not hasattr(x, "reshape"):
        raise TypeError(f"{type(layer).__name__} expects an array input, got a {type(x).__name__}; "
                        "wrap it with np.asarray(x, dtype)")
    if x.dtype != dtype:
        raise TypeError(f"{type(layer).__name__} has {dtype} weights but got a {x.dtype} input; "
                        f"cast it with x.astype('{dtype}')")
    if x.ndim < 1 or x.shape[-1] != features:
        raise ValueError(f"{type(layer).__name__} expects inputs (..., {features}), got shape {tuple(x.shape)}")


def raise_no_cache(layer):
    raise RuntimeError(f"{type(layer).__name__}.backward called without a forward first "
                       "(or twice for one forward)")


def check_dout(layer, dout, shape, dtype):
    """dout must have the forward output's shape and dtype, as torch requires of a backward's gradient: a reshape
    or a broadcast would otherwise turn a transposed or (1, C)-shaped dout into silently wrong gradients."""
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"{type(layer).__name__}.backward: dout has shape {tuple(dout.shape)}, the forward output "
                         f"had {tuple(shape)}")
    if dout.dtype != dtype:
        raise TypeError(f"{type(layer).__name__}.backward: dout is {dout.dtype}, the forward output was {dtype}")


class Linear(Module):
    """y = x Wᵀ + b with W (out_features, in_features), b (out_features,) or None.

    Initialised as torch.nn.Linear: W, b ~ U(−1/√in_features, +1/√in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype="float32", rng=None):
        super().__init__()
        in_features, out_features = _size("in_features", in_features), _size("out_features", out_features)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs in_features, out_features >= 1, got {in_features}, {out_features}")
        xp = xp_current()
        dt = _dtype(xp, dtype)
        rng = default_rng() if rng is None else rng
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(dt))  # (out, in)
        self.bias = Parameter(rng.uniform(-bound, bound, (out_features,)).astype(dt)) if bias else None
        self._cache = None

    @classmethod
    def from_weight(cls, weight, bias=None) -> Linear:
        """A Linear holding the given arrays as its Parameters, W (out_features, in_features) and b (out_features,)
        or None, with no random draw (torch builds an uninitialised one with `torch.nn.utils.skip_init`)."""
        if weight.ndim != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"Linear.from_weight needs W (out, in) and b (out,) or None, got W {tuple(weight.shape)}"
                             f", b {None if bias is None else tuple(bias.shape)}")
        obj = cls.__new__(cls)
        Module.__init__(obj)
        obj.out_features, obj.in_features = weight.shape
        obj.weight = Parameter(weight)                                                    # (out, in)
        obj.bias = None if bias is None else Parameter(bias)                              # (out,)
        obj._cache = None
        return obj

    def forward(self, x):
        check_input(self, x, self.weight.data.dtype, self.in_features)
        lead = x.shape[:-1]
        b = None if self.bias is None else self.bias.data
        y, x2 = F.linear_forward(x.reshape(-1, self.in_features), self.weight.data, b)   # (N, out)
        self._cache = (x2, lead)
        return y.reshape(*lead, self.out_features)                                        # (..., out)

    def backward(self, dout):
        if self._cache is None:
            raise_no_cache(self)
        x2, lead = self._cache
        check_dout(self, dout, (*lead, self.out_features), x2.dtype)
        self._cache = None                                 # one backward per forward: free x as soon as it is used
        W, b = self.weight, self.bias
        dx, dW, db = F.linear_backward(dout.reshape(-1, self.out_features), x2, W.data,
                                       need_dW=W.requires_grad, need_db=b is not None and b.requires_grad)
        if dW is not None:
            W.accumulate_grad(dW, owned=True)
        if db is not None:
            b.accumulate_grad(db, owned=True)
        return dx.reshape(*lead, self.in_features)                                        # (..., in)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """y = W[idx] with W (num_embeddings, embedding_dim); torch's init W ~ N(0, 1). backward returns None."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype="float32", rng=None):
        super().__init__()
        num_embeddings, embedding_dim = _size("num_embeddings", num_embeddings), _size("embedding_dim", embedding_dim)
        xp = xp_current()
        dt = _dtype(xp, dtype)
        rng = default_rng() if rng is None else rng
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(rng.standard_normal((num_embeddings, embedding_dim)).astype(dt))  # (V, C)
        self._cache = None

    def forward(self, idx):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"Embedding indices must be integers, got dtype {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings):
            raise ValueError(f"Embedding indices must lie in [0, {self.num_embeddings}), "
                             f"got min {int(idx.min())}, max {int(idx.max())}")
        y, self._cache = F.embedding_forward(idx, self.weight.data)   # (..., C)
        return y

    def backward(self, dout):
        if self._cache is None:
            raise_no_cache(self)
        check_dout(self, dout, (*self._cache.shape, self.embedding_dim), self.weight.data.dtype)
        idx, self._cache = self._cache, None
        if self.weight.requires_grad:
            self.weight.accumulate_grad(F.embedding_backward(dout, idx, self.weight.data.shape), owned=True)
        return None                                                    # integer inputs have no gradient

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """y = (x − μ)/√(σ² + eps) · weight + bias over the last axis; weight = 1, bias = 0 at init."""

    def __init__(self, ndim: int, eps: float = 1e-5, bias: bool = True, dtype="float32"):
        super().__init__()
        ndim = _size("ndim", ndim)
        xp = xp_current()
        dt = _dtype(xp, dtype)
        self.ndim, self.eps = ndim, eps
        self.weight = Parameter(xp.ones(ndim, dtype=dt))              # (C,)
        self.bias = Parameter(xp.zeros(ndim, dtype=dt)) if bias else None   # (C,)
        self._cache = None

    def forward(self, x):
        check_input(self, x, self.weight.data.dtype, self.ndim)
        lead = x.shape[:-1]
        b = None if self.bias is None else self.bias.data
        y, cache = F.layernorm_forward(x.reshape(-1, self.ndim), self.weight.data, b, self.eps)   # (N, C)
        self._cache = (cache, lead)
        return y.reshape(x.shape)

    def backward(self, dout):
        if self._cache is None:
            raise_no_cache(self)
        check_dout(self, dout, (*self._cache[1], self.ndim), self.weight.data.dtype)
        (cache, lead), self._cache = self._cache, None
        w, b = self.weight, self.bias
        dx, dw, db = F.layernorm_backward(dout.reshape(-1, self.ndim), cache, w.data, need_dw=w.requires_grad,
                                          need_db=b is not None and b.requires_grad)
        if dw is not None:
            w.accumulate_grad(dw, owned=True)
        if db is not None:
            b.accumulate_grad(db, owned=True)
        return dx.reshape(*lead, self.ndim)

    def extra_repr(self):
        return f"({self.ndim},), eps={self.eps}"


class GELU(Module):
    """GPT-2's tanh-approximate GELU (torch.nn.GELU(approximate="tanh"), HF's "gelu_new")."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        y, self._cache = F.gelu_forward(x)
        return y

    def backward(self, dout):
        if self._cache is None:
            raise_no_cache(self)
        x = self._cache[0]
        check_dout(self, dout, x.shape, x.dtype)
        cache, self._cache = self._cache, None
        return F.gelu_backward(dout, cache)
