"""Parameter: an array plus its gradient, as in PyTorch (`param.data`, `param.grad`, `param.requires_grad`).

`grad` starts as None and is allocated by the first backward that reaches the parameter; backward passes
accumulate into it (`+=`), so a weight used twice gets the sum of both gradients. A frozen parameter
(`requires_grad=False`, e.g. LoRA's W0) never gets a gradient array, and optimizers never allocate state for it.
"""
from __future__ import annotations


class Parameter:
    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data, requires_grad: bool = True):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad

    def accumulate_grad(self, g, owned: bool = False):
        """grad += g (allocating it on first use); a no-op for frozen parameters.

        owned=True says g is a fresh array nobody else holds (e.g. the result of a matmul inside a backward), so the
        first call may keep it as the gradient instead of copying it: one fewer full-size copy per step."""
        if not self.requires_grad:
            return
        if self.grad is None:
            self.grad = g if owned else g.copy()
        else:
            self.grad += g

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def numel(self) -> int:
        return int(self.data.size)

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, requires_grad={self.requires_grad})"
