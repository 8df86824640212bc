"""Optimizers written out line by line: AdamW and SGD (PyTorch's arithmetic), global-norm gradient clipping, and
Hugging Face's learning-rate schedules. `minilora.optim.paged` adds bitsandbytes' paged AdamW on top of AdamW."""
from minilora.optim.adamw import AdamW, adamw_update
from minilora.optim.clip import clip_grad_norm_
from minilora.optim.optimizer import Optimizer
from minilora.optim.schedule import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from minilora.optim.sgd import SGD, sgd_update

__all__ = ["AdamW", "adamw_update", "SGD", "sgd_update", "Optimizer", "clip_grad_norm_",
           "get_constant_schedule_with_warmup", "get_cosine_schedule_with_warmup"]
