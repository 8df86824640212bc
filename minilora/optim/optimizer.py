"""The part every optimizer shares: which parameters it updates, their state, zero_grad, and state_dict round trips.

Mirrors `torch/optim/optimizer.py` in spirit, without param groups. Parameters are given either as plain Parameters
(`model.parameters()`) or as `(name, Parameter)` pairs (`model.named_parameters()`); the state is keyed by that name,
or by the position in the list for plain Parameters (torch's integer keys), so a checkpoint written by one run loads
into a freshly built model of the same shape.

Only trainable parameters are kept (`requires_grad=True`): a frozen LoRA/QLoRA base never gets a state buffer. State
is allocated lazily, on the first step that sees the parameter's gradient, so parameters whose `.grad` is None cost
nothing until they are used, and each parameter counts its own steps (as in PyTorch).

    state_dict() = {"hyperparams": {...}, "step_count": int,
                    "state": {name: {"step": int, <buffer name>: array, ...}}}

Arrays in a state_dict are the optimizer's own buffers (no copy); `load_state_dict` copies into new buffers.
"""
from __future__ import annotations

import math

from minilora.backend import get_array_module


def named_trainable(params) -> list:
    """[(name, Parameter)] for the trainable ones among `params` (Parameters or (name, Parameter) pairs)."""
    params = list(params)
    out = []
    for i, item in enumerate(params):
        name, p = item if isinstance(item, tuple) else (str(i), item)
        if not hasattr(p, "data") or not hasattr(p, "requires_grad"):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, expected a Parameter "
                            "(an object with .data, .grad, .requires_grad) or a (name, Parameter) pair")
        if p.requires_grad:
            out.append((str(name), p))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate parameter names: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def check_number(name: str, value, low: float = 0.0):
    """ValueError unless value is a finite real number >= low (negative lr, NaN eps, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"invalid {name} {value!r}: must be a finite number >= {low}")


class Optimizer:
    """Base class: a subclass names its `hyperparams` and state `buffers` and implements `update(p, g, state)`."""

    hyperparams: tuple = ("lr",)                    # attribute names saved in state_dict()
    buffers: tuple = ()                             # per-parameter state arrays, e.g. ("exp_avg", "exp_avg_sq")

    def __init__(self, params):
        self.named_params = named_trainable(params)
        self.params = [p for _, p in self.named_params]
        self.initial_lr = self.lr                   # what a learning-rate schedule multiplies (torch's initial_lr)
        self.step_count = 0                         # how many times step() was called
        self.state = {}                             # name -> {"step": int, buffer: array}

    def _init_state(self, p) -> dict:
        xp = get_array_module(p.data)
        return {"step": 0, **{b: xp.zeros_like(p.data) for b in self.buffers}}

    def step(self):
        """Update every trainable parameter that has a gradient."""
        self.step_count += 1
        for name, p in self.named_params:
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(p.grad.shape)}, "
                                 f"parameter has {tuple(p.data.shape)}")
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = self._init_state(p)
            st["step"] += 1
            self.update(p.data, p.grad, st)

    def update(self, p, g, state):
        raise NotImplementedError

    def zero_grad(self):
        """Drop the gradients (set to None, PyTorch's default), so they are freed between steps."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        hp = {k: getattr(self, k) for k in (*self.hyperparams, "initial_lr")}
        return {"hyperparams": hp, "step_count": self.step_count,
                "state": {n: dict(st) for n, st in self.state.items()}}

    def load_state_dict(self, sd: dict):
        """Restore hyperparameters, step counts and buffers (copied to this optimizer's backend and dtype).

        Raises ValueError when names, shapes or buffers do not match the parameters this optimizer was built with."""
        for key in ("hyperparams", "step_count", "state"):
            if key not in sd:
                raise ValueError(f"optimizer state_dict is missing {key!r}")
        expected = {*self.hyperparams, "initial_lr"}
        if set(sd["hyperparams"]) != expected:
            raise ValueError(f"optimizer state_dict has hyperparameters {sorted(sd['hyperparams'])}, "
                             f"{type(self).__name__} has {sorted(expected)}")
        params = dict(self.named_params)
        unexpected = sorted(set(sd["state"]) - set(params))
        if unexpected:
            raise ValueError(f"optimizer state for parameters this optimizer does not train: {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} ({len(params)} trainable parameters)")
        state = {}
        for name, st in sd["state"].items():
            missing = [b for b in ("step", *self.buffers) if b not in st]
            if missing:
                raise ValueError(f"optimizer state for {name!r} is missing {missing}")
            p = params[name].data
            new = {"step": int(st["step"])}
            for b in self.buffers:
                if tuple(st[b].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{b} has shape {tuple(st[b].shape)}, "
                                     f"parameter has {tuple(p.shape)}")
                new[b] = get_array_module(p).array(st[b], dtype=p.dtype, copy=True)   # host -> device if CuPy
            state[name] = new
        for k, v in sd["hyperparams"].items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)   # JSON turns betas into a list
        self.step_count = int(sd["step_count"])
        self.state = state
