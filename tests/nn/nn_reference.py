"""Test helpers for minilora.nn: finite differences with the fake-loss trick, and a torch twin of minilora's GPT.

The torch model below is written independently with torch.nn / autograd (the reference); `load_from_minilora`
copies our weights in (for a QLoRA layer, the dequantized W0) so both compute the same function.
"""
import numpy as np


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() w.r.t. every entry of the float64 array x (modified in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_lora_grads(layer, x, dout, seed=0, tol=1e-7):
    """dx, dA, dB of a LoRA/QLoRA layer (adapter "default") vs finite differences of L = Σ layer(x)·dout.

    The layer's generator is re-seeded before every forward, so each evaluation draws the same dropout mask."""
    def fwd():
        layer._rng = np.random.default_rng(seed)
        return layer(x)

    fwd()
    dx = layer.backward(dout)
    L = lambda: float(np.sum(fwd() * dout))                     # noqa: E731
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for name, arr, hand in [("x", x, dx), ("A", A.data, A.grad), ("B", B.data, B.grad)]:
        assert rel_err(hand, fd_grad(L, arr)) < tol, name


def check_step_against_peft(m, pm, torch, seed=0, tol=1e-10):
    """One loss + backward on the same random (2, block_size) batch through our GPT `m` and the torch + PEFT model
    `pm`: equal losses, equal gradients for every trainable parameter, no gradient for a frozen one. Returns the
    number of gradients compared."""
    rng = np.random.default_rng(seed)
    V, T = m.config.vocab_size, m.config.block_size
    idx, tg = rng.integers(0, V, (2, T)), rng.integers(0, V, (2, T))
    _, loss = m(idx, tg)
    m.backward()
    _, tloss = pm(torch.from_numpy(idx), torch.from_numpy(tg))
    tloss.backward()
    assert abs(loss - tloss.item()) < tol * tloss.item()
    tp = dict(pm.named_parameters())
    n_checked = 0
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, tp["base_model.model." + name].grad.numpy()) < tol, name
            n_checked += 1
        else:
            assert p.grad is None, name                                 # frozen W0 never gets a gradient
    return n_checked


def torch_gpt(cfg, torch):
    """The same architecture in plain torch (modules named like ours and HF GPT-2)."""
    nn = torch.nn
    F = torch.nn.functional
    dt = getattr(torch, cfg.dtype)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias, dtype=dt)
            self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias, dtype=dt)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / (C // cfg.n_head) ** 0.5
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias, dtype=dt)
            self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias, dtype=dt)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=dt)
            self.attn = Attn()
            self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=dt)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd, dtype=dt),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd, dtype=dt),
                h=nn.ModuleList(Block() for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias, dtype=dt)))
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False, dtype=dt)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))
            for b in self.transformer.h:
                x = b(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return GPT()


def load_plain_weights(tmodel, ours, torch):
    """Copy every parameter of our (LoRA-free) model into the torch twin, by name."""
    sd = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    tmodel.load_state_dict(sd, strict=True)                   # strict: the module paths must match one to one
