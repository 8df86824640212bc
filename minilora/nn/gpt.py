"""A tiny GPT-2 built from forward/backward pairs: nanoGPT's model with hand-written backprop.

    x = wte[idx] + wpe[0..T)                                   (B, T, C)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = lm_head(ln_f(x));  loss = cross_entropy(logits, targets)

attn is causal multi-head self-attention with a fused `c_attn` (C -> 3C, q|k|v) and an output `c_proj`; mlp is
`c_fc` (C -> 4C), GELU (tanh form), `c_proj` (4C -> C). `backward()` walks the same path in reverse, each layer
turning d(output) into d(input) and accumulating its parameters' gradients; the residual adds copy the gradient to
both branches.

Module paths are Hugging Face GPT-2's (`transformer.wte`, `transformer.h.0.attn.c_attn`, `transformer.h.0.mlp.c_fc`,
`lm_head`, ...), so PEFT `target_modules` such as ["c_attn"] or "all-linear" carry over. Unlike GPT-2, the weights
are (out, in) Linear layers (not Conv1D, so fan_in_fan_out=False) and lm_head is not tied to wte. Init follows
nanoGPT: N(0, 0.02), the two residual projections (`c_proj`) N(0, 0.02/√(2·n_layer)), biases 0.

`gradient_checkpointing_enable()` (Hugging Face's switch, which PEFT's `prepare_model_for_kbit_training` turns on
for QLoRA) keeps only each block's input during the forward and recomputes the block right before its backward:
activation memory drops from all blocks' caches to one block's, for one extra forward per step.
Mirrors karpathy/nanoGPT `model.py` and transformers `models/gpt2/modeling_gpt2.py`.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

from minilora.backend import default_rng, get_array_module
from minilora.nn import functional as F
from minilora.nn.layers import GELU, Embedding, LayerNorm, Linear, check_dout, raise_no_cache
from minilora.nn.module import Module, ModuleDict, ModuleList


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dtype: str = "float32"          # "float64" for gradient checks
    bias: bool = True               # biases in Linear and LayerNorm, as GPT-2
    seed: int = 0                   # weight initialisation seed

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"GPTConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")


class CausalSelfAttention(Module):
    """c_attn (C -> 3C) -> causal softmax attention over n_head heads -> c_proj (C -> C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)
        self._cache = None

    def forward(self, x):                                  # x (B, T, C)
        B, T, C = x.shape
        qkv = self.c_attn(x.reshape(B * T, C))             # (N, 3C)
        y, cache = F.attention_forward(qkv, B, T, self.n_head)   # (N, C)
        self._cache = (cache, (B, T, C))
        return self.c_proj(y).reshape(B, T, C)             # (B, T, C)

    def backward(self, dout):                              # dout (B, T, C)
        if self._cache is None:
            raise_no_cache(self)
        cache, (B, T, C) = self._cache
        check_dout(self, dout, (B, T, C), cache[-1].dtype)
        self._cache = None                                 # freed once used
        dy = self.c_proj.backward(dout.reshape(B * T, C))  # (N, C)
        dqkv = F.attention_backward(dy, cache)             # (N, 3C)
        return self.c_attn.backward(dqkv).reshape(B, T, C)   # (B, T, C)


class MLP(Module):
    """c_fc (C -> 4C) -> GELU -> c_proj (4C -> C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)
        self.act = GELU()
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))

    def backward(self, dout):
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(dout)))


class Block(Module):
    """Pre-LayerNorm transformer block with two residual branches."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, x):                                  # x (B, T, C)
        x = F.residual_forward(x, self.attn(self.ln_1(x)))   # (B, T, C)
        return F.residual_forward(x, self.mlp(self.ln_2(x)))   # (B, T, C)

    def backward(self, dout):                              # dout (B, T, C)
        d_skip, d_branch = F.residual_backward(dout)
        dx = d_skip + self.ln_2.backward(self.mlp.backward(d_branch))   # (B, T, C)
        d_skip, d_branch = F.residual_backward(dx)
        return d_skip + self.ln_1.backward(self.attn.backward(d_branch))   # (B, T, C)


class GPT(Module):
    """`logits, loss = model(idx, targets)`, then `model.backward()` fills `param.grad` for trainable params."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        cfg = self.config = config
        self.transformer = ModuleDict(
            wte=Embedding(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype),
            wpe=Embedding(cfg.block_size, cfg.n_embd, dtype=cfg.dtype),
            h=ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=cfg.dtype),
        )
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False, dtype=cfg.dtype)
        self._init_weights()
        self._cache = None
        self.gradient_checkpointing = False
        self._checkpoints = None                                  # [(block input, saved RNGs)] per block

    def gradient_checkpointing_enable(self):
        """Recompute each block in the backward instead of keeping its activations (only in training mode)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def _init_weights(self):
        """nanoGPT's init, drawn in float64 from one seeded stream (so float32 and float64 models agree)."""
        rng = default_rng(self.config.seed)
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)   # residual projections: keep the stream's variance
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.data[...] = 0
            elif ".ln_" in name:
                p.data[...] = 1                                    # LayerNorm weight
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                p.data[...] = (rng.standard_normal(p.data.shape) * std).astype(p.data.dtype)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx int (B, T) -> logits (B, T, V), and loss (a Python float, mean over tokens) when targets are given.

        idx and targets may be host arrays (batches are sampled on the host): like the prompt of generate, they are
        moved to the model's backend first."""
        _check_idx(idx)
        xp = get_array_module(self.transformer.wte.weight.data)
        idx = xp.asarray(idx)                                      # the batch goes where the model is
        targets = None if targets is None else xp.asarray(targets)
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        tr = self.transformer
        pos = xp.arange(T)                                         # (T,)
        x = tr.wte(idx) + tr.wpe(pos)                              # (B, T, C)  position embedding broadcast over B
        ckpt = self.gradient_checkpointing and self.training
        self._checkpoints = [] if ckpt else None
        for block in tr.h:
            if ckpt:
                # keep the input and the dropout RNGs (so the recomputation draws the same masks), drop the caches
                self._checkpoints.append((x, _save_rngs(block)))
                x_out = block(x)                                   # (B, T, C)
                _drop_caches(block)
                x = x_out
            else:
                x = block(x)                                       # (B, T, C)
        x = tr.ln_f(x)                                             # (B, T, C)
        logits = self.lm_head(x)                                   # (B, T, V)
        loss = None
        self._cache = None
        if targets is not None:
            if tuple(targets.shape) != (B, T):
                raise ValueError(f"targets must have shape {(B, T)} like idx, got {tuple(targets.shape)}")
            V = logits.shape[-1]
            loss_arr, ce_cache = F.cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
            loss = float(loss_arr)
            self._cache = (ce_cache, (B, T, V))
        return logits, loss

    def backward(self):
        """Backpropagate the last forward's loss (dL/dL = 1) through every layer in reverse order."""
        if self._cache is None:
            raise RuntimeError("GPT.backward() needs a forward with targets first (and runs once per forward)")
        ce_cache, (B, T, V) = self._cache
        self._cache = None                                         # the softmax buffer is reused in place
        dlogits = F.cross_entropy_backward(1.0, ce_cache)          # (N, V)
        tr = self.transformer
        dx = self.lm_head.backward(dlogits.reshape(B, T, V))       # (B, T, C)
        dx = tr.ln_f.backward(dx)                                  # (B, T, C)
        need_emb = tr.wte.weight.requires_grad or tr.wpe.weight.requires_grad
        ckpts, self._checkpoints = self._checkpoints, None
        for i in reversed(range(len(tr.h))):
            block = tr.h[i]
            if ckpts is not None:
                x_in, rngs = ckpts[i]
                with _restored_rngs(block, rngs):
                    block(x_in)                                    # recompute this block's caches
            # With frozen embeddings (LoRA) block 0's dx is not needed. Skipping it saved 2-4% of this backward on
            # the 4-layer demo model (less on deeper ones): too little for a protocol, so every block computes it.
            dx = block.backward(dx)                                # (B, T, C)  frees the block's caches
        if need_emb:
            tr.wte.backward(dx)                                    # scatter-add into wte.grad
            tr.wpe.backward(dx.sum(axis=0))                        # (T, C): positions are shared across the batch
        else:
            _drop_caches(tr.wte)                                   # frozen embeddings: their backward is skipped
            _drop_caches(tr.wpe)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, rng=None):
        """Sample max_new_tokens tokens after idx (B, T), feeding the last block_size tokens each step."""
        _check_idx(idx, "prompt")
        xp = get_array_module(self.transformer.wte.weight.data)
        idx = xp.asarray(idx)                                      # the prompt goes where the model is
        # transformers' TemperatureLogitsWarper: a strictly positive float (NaN or inf would sample garbage)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} (it divides the logits; "
                             "for greedy decoding use top_k=1)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 = no top-k filter, as transformers), "
                             f"got {top_k!r}")
        rng = default_rng() if rng is None else rng
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size:]                 # (B, ≤block_size)
            logits, _ = self(ctx)                                  # (B, t, V)
            z = logits[:, -1, :] / temperature                     # (B, V)
            if top_k:
                kth = xp.sort(z, axis=-1)[:, -min(int(top_k), z.shape[-1])][:, None]   # (B, 1)
                z = xp.where(z < kth, -xp.inf, z)                  # (B, V)
            p = xp.exp(z - z.max(axis=-1, keepdims=True))          # (B, V)
            p /= p.sum(axis=-1, keepdims=True)
            u = xp.asarray(rng.random((p.shape[0], 1)))            # (B, 1)  inverse-CDF sampling works on CuPy too
            nxt = (xp.cumsum(p, axis=-1) < u).sum(axis=-1)         # (B,)
            nxt = xp.minimum(nxt, p.shape[-1] - 1)[:, None]        # (B, 1)  guard against round-off at the top
            idx = xp.concatenate([idx, nxt.astype(idx.dtype)], axis=1)   # (B, T+1)
        return idx


def _check_idx(idx, what="idx"):
    """Token ids must be a non-empty (B, T) array: an empty batch or sequence has no loss and no next token."""
    if not hasattr(idx, "ndim") or not hasattr(idx, "dtype"):
        raise TypeError(f"{what} must be an integer array of shape (B, T), got a {type(idx).__name__}; "
                        "wrap it with np.asarray")
    if idx.ndim != 2:
        raise ValueError(f"{what} must have shape (B, T), got {tuple(idx.shape)}")
    if idx.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(idx.shape)}): the batch and the sequence need at least "
                         "one token each")


def _drop_caches(module):
    """Free what every layer of `module` kept for its backward."""
    for m in module.modules():
        if getattr(m, "_cache", None) is not None:
            m._cache = None


def _save_rngs(module):
    """Copies of the random generators that will draw dropout masks in `module`, taken before a checkpointed
    forward: one copy per distinct generator, with every layer that draws from it.

    Layers often share one generator (get_peft_model gives all LoRA layers one stream), and the forward draws their
    masks from it one after the other. So the recomputation must also run them off ONE copy, in the same order:
    a copy per layer would make the second layer replay the first one's masks."""
    groups = {}                                        # id(generator) -> (generator, [layers drawing from it])
    for m in module.modules():
        rng = getattr(m, "rng", None)                  # a layer that draws dropout masks (LoRALinear) exposes it
        if rng is not None:
            groups.setdefault(id(rng), (rng, []))[1].append(m)
    return [(layers, copy.deepcopy(rng)) for rng, layers in groups.values()]


class _restored_rngs:
    """Run the recomputation with the saved generators, then put the (already advanced) originals back."""

    def __init__(self, module, saved):
        self.saved = saved
        self.originals = []

    def __enter__(self):
        for layers, rng in self.saved:
            replay = copy.deepcopy(rng)                # one replaying generator, shared as the original was
            for m in layers:
                self.originals.append((m, m.rng))
                m.rng = replay

    def __exit__(self, *exc):
        for m, rng in self.originals:
            m.rng = rng
        return False
