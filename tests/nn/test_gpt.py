"""The tiny GPT: loss and every gradient vs finite differences and vs an identical torch model; init; generate."""
import numpy as np
import pytest
from nn_reference import fd_grad, load_plain_weights, rel_err, torch_gpt

from minilora.nn import GPT, GPTConfig

CFG64 = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")


def _batch(cfg, B=3, T=None, seed=0):
    rng = np.random.default_rng(seed)
    T = T or cfg.block_size
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def test_gpt_gradients_match_finite_differences():
    m = GPT(CFG64)
    idx, tg = _batch(CFG64)
    m(idx, tg)
    m.backward()
    rng = np.random.default_rng(5)
    for name, p in m.named_parameters():
        # a few random entries of every parameter (all of them would be ~1k forwards per tensor)
        flat = p.data.reshape(-1)
        for j in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            view = flat[j:j + 1]
            num = fd_grad(lambda: m(idx, tg)[1], view)[0]
            hand = p.grad.reshape(-1)[j]
            assert abs(hand - num) <= 1e-6 * max(1.0, abs(num)), f"{name}[{j}]: {hand} vs {num}"


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_gpt_matches_torch(dtype, tol):
    torch = pytest.importorskip("torch")
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype=dtype)
    m = GPT(cfg)
    t = torch_gpt(cfg, torch)
    load_plain_weights(t, m, torch)
    idx, tg = _batch(cfg, B=2, T=7)
    logits, loss = m(idx, tg)
    m.backward()
    tlogits, tloss = t(torch.from_numpy(idx), torch.from_numpy(tg))
    tloss.backward()
    assert isinstance(loss, float) and logits.shape == (2, 7, 17) and logits.dtype == np.dtype(dtype)
    assert abs(loss - tloss.item()) <= tol * tloss.item()
    assert rel_err(logits, tlogits.detach().numpy()) < tol
    tp = dict(t.named_parameters())
    for name, p in m.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        assert rel_err(p.grad, tp[name].grad.numpy()) < tol, name


def test_init_follows_nanogpt():
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=64)
    m = GPT(cfg)
    sd = m.state_dict()
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 0.001
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.0005
    assert abs(sd["transformer.h.3.attn.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.0005
    assert np.all(sd["transformer.h.1.attn.c_attn.bias"] == 0) and np.all(sd["transformer.ln_f.weight"] == 1)
    assert all(v.dtype == np.float32 for v in sd.values())
    m64 = GPT(GPTConfig(**{**cfg.__dict__, "dtype": "float64"}))   # same seed: float32 model = rounded float64
    np.testing.assert_array_equal(m64.lm_head.weight.data.astype(np.float32), m.lm_head.weight.data)
    _, loss = m(*_batch(cfg, B=2))
    assert abs(loss - np.log(64)) < 0.05                           # near-uniform predictions at init


def test_golden_first_loss():
    """Seeded tiny model and batch: the loss a reader should see (pins init + forward)."""
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, seed=0)
    idx, tg = _batch(cfg, B=4, seed=0)
    _, loss = GPT(cfg)(idx, tg)
    assert abs(loss - 4.159423) < 2e-5, loss


def test_generate_shapes_determinism_and_greedy_top_k():
    from minilora.backend import default_rng
    m = GPT(CFG64)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    a = m.generate(idx, 10, rng=default_rng(3))                   # longer than block_size: context is cropped
    b = m.generate(idx, 10, rng=default_rng(3))
    assert a.shape == (2, 13) and np.array_equal(a, b) and np.array_equal(a[:, :3], idx)
    assert a.min() >= 0 and a.max() < CFG64.vocab_size
    g = m.generate(idx, 1, top_k=1)
    assert np.array_equal(g[:, -1], m(idx)[0][:, -1].argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(idx, 1, temperature=0)
    assert np.array_equal(m.generate(idx, 4, top_k=0, rng=default_rng(3)), a[:, :7])   # 0 = no filter (HF)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(idx, 1, top_k=-2)                                # was silently a threshold at the 3rd smallest
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(idx, -1)


def test_gpt_bad_inputs():
    m = GPT(CFG64)
    with pytest.raises(ValueError, match="block_size"):
        m(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="targets must have shape"):
        m(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        m(np.full((1, 4), 11))
    with pytest.raises(RuntimeError, match="forward with targets"):
        GPT(CFG64).backward()
    m(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    m.backward()
    with pytest.raises(RuntimeError):
        m.backward()                                              # once per forward
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="dtype"):
        GPTConfig(dtype="float16")


def test_frozen_parameters_get_no_grad_in_gpt():
    m = GPT(CFG64)
    for name, p in m.named_parameters():
        p.requires_grad = "ln_" in name                            # train only the LayerNorms
    m(*_batch(CFG64))
    m.backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == ("ln_" in name), name


@pytest.mark.parametrize("lora,ckpt", [(False, False), (True, False), (True, True)])
def test_backward_frees_every_forward_cache(lora, ckpt):
    """Nothing is held between steps (as autograd frees saved tensors), also for the layers whose backward is
    skipped in a LoRA model (block 0's ln_1, the frozen embeddings); a second backward raises."""
    from minilora.nn import Linear, LoRALinear
    m = GPT(CFG64)
    if lora:
        for name, mod in list(m.named_modules()):
            if isinstance(mod, Linear) and name != "lm_head":
                m.set_submodule(name, LoRALinear(mod, r=2))
        for n, p in m.named_parameters():
            p.requires_grad = "lora_" in n
    if ckpt:
        m.gradient_checkpointing_enable()
    m(*_batch(CFG64))
    assert any(getattr(mod, "_cache", None) is not None for mod in m.modules())
    m.backward()
    held = [name for name, mod in m.named_modules() if getattr(mod, "_cache", None) is not None]
    assert held == [] and m._checkpoints is None, held
    with pytest.raises(RuntimeError, match="runs once per forward"):
        m.backward()
    with pytest.raises(RuntimeError, match="twice for one forward"):
        m.transformer.h[1].mlp.act.backward(np.ones((3, 8, 32)))
    attn = m.transformer.h[0].attn
    attn(np.ones((3, 8, 8)))
    with pytest.raises(ValueError, match="dout has shape"):
        attn.backward(np.ones((8, 3, 8)))                           # same size, batch and time swapped


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_with_less_memory(lora):
    """Recomputing each block in the backward (dropout masks included) must reproduce every gradient exactly."""
    import tracemalloc

    from minilora.nn import Linear, LoRALinear
    cfg = GPTConfig(vocab_size=32, block_size=32, n_layer=3, n_head=2, n_embd=32)
    idx, tg = _batch(cfg, B=4, seed=3)
    results = []
    for ckpt in (False, True):
        m = GPT(cfg)
        if lora:
            for name, mod in list(m.named_modules()):
                if isinstance(mod, Linear) and name != "lm_head":
                    m.set_submodule(name, LoRALinear(mod, r=4, lora_dropout=0.2, init_lora_weights=False,
                                                     rng=np.random.default_rng(len(name))))
            for n, p in m.named_parameters():
                p.requires_grad = "lora_" in n
        if ckpt:
            m.gradient_checkpointing_enable()
        m(idx, tg)                                                  # warm-up (allocator, masks cache)
        m.backward()
        m.zero_grad()
        tracemalloc.start()
        _, loss = m(idx, tg)
        after_forward, _ = tracemalloc.get_traced_memory()
        m.backward()
        tracemalloc.stop()
        results.append((loss, after_forward, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, mem0, g0), (l1, mem1, g1) = results
    assert l0 == l1 and g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        np.testing.assert_array_equal(g0[n], g1[n], err_msg=n)
    assert mem1 < 0.6 * mem0, (mem0, mem1)                         # activations of 1 block kept, not 3


def test_gpt_with_lora_runs_on_each_backend_and_matches_numpy(xp):
    """The same seeded model on the current backend (NumPy always, CuPy with a GPU) vs a NumPy run."""
    from minilora.backend import get_array_module, to_numpy, use_backend
    from minilora.nn import Linear, LoRALinear
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx_h, tg_h = _batch(cfg, B=2)

    def run():
        m = GPT(cfg)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, Linear) and name != "lm_head":
                m.set_submodule(name, LoRALinear(mod, r=2, init_lora_weights="gaussian"))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.data[...] = 0.01                          # a non-zero adapter, same on both backends
        mod_xp = get_array_module(m.lm_head.weight.data)    # the batch goes where the model is
        _, loss = m(mod_xp.asarray(idx_h), mod_xp.asarray(tg_h))
        m.backward()
        return loss, {n: to_numpy(p.grad) for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = run()
    with use_backend("numpy"):
        loss_np, grads_np = run()
    # same init stream only within one backend (the strict backend draws NumPy's): compare those, else sanity-check
    if xp.__name__ in ("numpy", "numpy_strict"):
        assert loss == loss_np and all(np.array_equal(grads[n], grads_np[n]) for n in grads)
    assert np.isfinite(loss) and grads.keys() == grads_np.keys() and len(grads) > 0


def test_gpt_forward_moves_a_host_batch_to_the_model(xp):
    """Host token ids and targets (as Corpus.get_batch returns them) are moved to the model's backend by forward."""
    from minilora.backend import to_numpy
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx_h, tg_h = _batch(cfg, B=2)
    m = GPT(cfg)
    logits_d, loss_d = m(xp.asarray(idx_h), xp.asarray(tg_h))
    m.backward()
    grad_d = to_numpy(m.transformer.wte.weight.grad)
    m.zero_grad()
    logits_h, loss_h = m(idx_h, tg_h)                       # host arrays: no TypeError on CuPy or numpy-strict
    m.backward()
    assert type(logits_h) is type(logits_d) and loss_h == loss_d
    np.testing.assert_array_equal(to_numpy(m.transformer.wte.weight.grad), grad_d)
