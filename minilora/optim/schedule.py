"""Learning-rate schedules as multipliers of the initial lr, with Hugging Face transformers' names and formulas
(`transformers/optimization.py`): the QLoRA paper trains with a constant schedule, many LoRA recipes with cosine.

    constant with warmup:  f(t) = t / W                      for t < W,  else 1
    cosine with warmup:    f(t) = t / W                      for t < W,
                           f(t) = ½ (1 + cos(π · min(1, (t − W) / (T − W))))   afterwards

t counts optimizer steps from 0, so with warmup the very first update uses lr = 0, exactly as in transformers. The
training loop sets `optimizer.lr = optimizer.initial_lr * f(step)` before every step.
"""
from __future__ import annotations

import math


def _check_steps(**steps):
    for name, v in steps.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"invalid {name} {v!r}: must be an integer >= 0")


def get_constant_schedule_with_warmup(num_warmup_steps: int):
    _check_steps(num_warmup_steps=num_warmup_steps)

    def lr_lambda(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return 1.0
    return lr_lambda


def get_cosine_schedule_with_warmup(num_warmup_steps: int, num_training_steps: int):
    _check_steps(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)

    def lr_lambda(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        progress = min(progress, 1.0)           # stay at 0 past the end (transformers' cosine would rise again)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return lr_lambda
