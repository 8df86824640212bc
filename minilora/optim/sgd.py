"""Stochastic gradient descent with momentum and (coupled, L2) weight decay, in `torch.optim.SGD`'s form.

For each trainable parameter p with gradient g, at step t = 1, 2, ...:

    g ← g + wd·p                                     weight decay is added to the gradient (unlike AdamW)
    b ← g                        at t = 1            momentum buffer
    b ← μ·b + (1 − dampening)·g  at t > 1
    g ← g + μ·b  (nesterov)   or   g ← b
    p ← p − lr·g

With momentum = 0 no buffer is allocated at all (the plain update p ← p − lr·g), as in PyTorch.
"""
from __future__ import annotations

from minilora.optim.optimizer import Optimizer, check_number


def sgd_update(p, g, buf, step: int, lr: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool):
    """One SGD step on arrays, in place on p and buf (the momentum buffer, None without momentum)."""
    if weight_decay != 0.0:
        g = g + p.dtype.type(weight_decay) * p                 # (same shape as p), a new array: .grad stays as is
    if buf is not None:
        if step == 1:
            buf[...] = g                                        # the first step copies g, PyTorch's torch.clone(g)
        else:
            buf *= buf.dtype.type(momentum)                     # b ← μ b
            buf += buf.dtype.type(1.0 - dampening) * g          # b ← b + (1 − dampening) g
        g = g + buf.dtype.type(momentum) * buf if nesterov else buf
    p -= p.dtype.type(lr) * g


class SGD(Optimizer):
    """SGD over Parameters or (name, Parameter) pairs; mirrors `torch.optim.SGD` (no `maximize`, no param groups)."""

    hyperparams = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        check_number("lr", lr)
        check_number("momentum", momentum)
        check_number("dampening", dampening)
        check_number("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0 (as in PyTorch)")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, bool(nesterov)
        self.buffers = ("momentum_buffer",) if momentum != 0.0 else ()   # torch's name for the buffer
        super().__init__(params)

    def update(self, p, g, state):
        sgd_update(p, g, state.get("momentum_buffer"), state["step"], self.lr, self.momentum, self.dampening,
                   self.weight_decay, self.nesterov)
