"""Optimizers written out line by line: AdamW and SGD (PyTorch's arithmetic), global-norm gradient clipping, and
Hugging Face's learning-rate schedules. `minilora.optim.paged` adds bitsandbytes' paged AdamW on top of AdamW;
`AdamW8bit` / `PagedAdamW8bit` are bitsandbytes' 8-bit block-wise AdamW (states as 8-bit codes, byte-exact on CPU)."""
from minilora.optim.adamw import AdamW, adamw_update
from minilora.optim.adamw8bit import AdamW8bit
from minilora.optim.clip import clip_grad_norm_
from minilora.optim.optimizer import Optimizer
from minilora.optim.paged8bit import PagedAdamW8bit
from minilora.optim.schedule import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from minilora.optim.sgd import SGD, sgd_update

__all__ = ["AdamW", "adamw_update", "AdamW8bit", "PagedAdamW8bit", "SGD", "sgd_update", "Optimizer", "clip_grad_norm_",
           "get_constant_schedule_with_warmup", "get_cosine_schedule_with_warmup"]
