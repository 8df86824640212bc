"""Every layer's hand-written backward vs central finite differences (float64, fake loss L = Σ out·dout) and vs
torch autograd on the same weights and inputs (float64 rel err ≤ 1e-10, float32 ≤ 1e-4)."""
import numpy as np
import pytest
from nn_reference import fd_grad, rel_err

from minilora.backend import to_numpy
from minilora.nn import GELU, Embedding, LayerNorm, Linear
from minilora.nn import functional as F

RNG = np.random.default_rng(1234)


def _fd_check(layer_fn, x, params, dout, tol=1e-6):
    """layer_fn(x) -> out; the module's backward has already filled grads. Compare every array in `params`."""
    for name, arr, hand in params:
        num = fd_grad(lambda: float(np.sum(layer_fn(x) * dout)), arr)
        assert rel_err(hand, num) < tol, f"{name}: rel err {rel_err(hand, num):.2e}"


# ------------------------------------------------------------------------------------------- finite differences

def test_linear_backward_matches_finite_differences():
    lin = Linear(5, 3, dtype="float64", rng=np.random.default_rng(0))
    x = RNG.standard_normal((2, 4, 5))
    dout = RNG.standard_normal((2, 4, 3))
    lin(x)
    dx = lin.backward(dout)
    assert dx.shape == x.shape
    _fd_check(lin, x, [("x", x, dx), ("W", lin.weight.data, lin.weight.grad), ("b", lin.bias.data, lin.bias.grad)],
              dout)


def test_embedding_backward_matches_finite_differences_with_repeated_indices():
    emb = Embedding(6, 4, dtype="float64", rng=np.random.default_rng(0))
    idx = np.array([[1, 3, 1], [5, 1, 0]])                 # token 1 appears three times: gradients must add
    dout = RNG.standard_normal((2, 3, 4))
    emb(idx)
    assert emb.backward(dout) is None
    num = fd_grad(lambda: float(np.sum(emb(idx) * dout)), emb.weight.data)
    assert rel_err(emb.weight.grad, num) < 1e-8
    assert np.all(emb.weight.grad[[2, 4]] == 0)


def test_layernorm_backward_matches_finite_differences():
    ln = LayerNorm(6, dtype="float64")
    ln.weight.data[:] = RNG.standard_normal(6)
    ln.bias.data[:] = RNG.standard_normal(6)
    x = RNG.standard_normal((3, 2, 6)) * 2 + 1
    dout = RNG.standard_normal(x.shape)
    ln(x)
    dx = ln.backward(dout)
    _fd_check(ln, x, [("x", x, dx), ("w", ln.weight.data, ln.weight.grad), ("b", ln.bias.data, ln.bias.grad)], dout)


def test_gelu_backward_matches_finite_differences():
    g = GELU()
    x = RNG.standard_normal((4, 7)) * 3
    dout = RNG.standard_normal(x.shape)
    g(x)
    _fd_check(g, x, [("x", x, g.backward(dout))], dout)


def test_gelu_extreme_inputs_are_finite_and_exact():
    x = np.array([-1e4, -80.0, -10.0, 0.0, 10.0, 80.0, 1e4], dtype=np.float32)
    y, cache = F.gelu_forward(x)
    assert np.all(np.isfinite(y)) and y[3] == 0
    np.testing.assert_allclose(y[[-3, -2, -1]], x[[-3, -2, -1]], rtol=1e-6)   # GELU(x) → x for large x
    np.testing.assert_allclose(y[[0, 1]], 0.0, atol=1e-20)   # torch gives -0.0; we clip e^(-2u) at e^60
    assert np.all(np.isfinite(F.gelu_backward(np.ones_like(x), cache)))


@pytest.mark.parametrize("B,T,H,hs", [(2, 5, 2, 3), (1, 1, 1, 4)])
def test_attention_backward_matches_finite_differences(B, T, H, hs):
    qkv = RNG.standard_normal((B * T, 3 * H * hs))
    y, cache = F.attention_forward(qkv, B, T, H)
    dout = RNG.standard_normal(y.shape)
    dqkv = F.attention_backward(dout, cache)
    num = fd_grad(lambda: float(np.sum(F.attention_forward(qkv, B, T, H)[0] * dout)), qkv)
    assert rel_err(dqkv, num) < 1e-7


def test_attention_is_causal():
    B, T, H, hs = 1, 6, 2, 4
    qkv = RNG.standard_normal((T, 3 * H * hs))
    y1, _ = F.attention_forward(qkv, B, T, H)
    qkv2 = qkv.copy()
    qkv2[4:] += 10.0                                       # change only the future of rows 0..3
    y2, _ = F.attention_forward(qkv2, B, T, H)
    np.testing.assert_array_equal(y1[:4], y2[:4])


def test_cross_entropy_backward_matches_finite_differences_with_ignore_index():
    logits = RNG.standard_normal((6, 5))
    targets = np.array([0, 4, -100, 2, -100, 1])
    loss, cache = F.cross_entropy_forward(logits, targets)
    dz = F.cross_entropy_backward(1.0, cache)
    num = fd_grad(lambda: float(F.cross_entropy_forward(logits, targets)[0]), logits)
    assert rel_err(dz, num) < 1e-8
    assert np.all(dz[[2, 4]] == 0)


def test_dropout_scales_kept_units_and_backward_uses_the_same_mask():
    x = np.ones((200, 50))
    y, mask = F.dropout_forward(x, 0.25, np.random.default_rng(0))
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(F.dropout_backward(np.ones_like(x), mask), mask)
    same, none = F.dropout_forward(x, 0.0, None)
    assert same is x and none is None


def test_lora_functional_backward_matches_finite_differences():
    x = RNG.standard_normal((5, 6))
    A = RNG.standard_normal((2, 6))
    B = RNG.standard_normal((4, 2))
    s = 0.7
    y, cache = F.lora_forward(x, A, B, s)
    np.testing.assert_allclose(y, s * x @ (B @ A).T, rtol=1e-12)
    dout = RNG.standard_normal(y.shape)
    dx, dA, dB = F.lora_backward(dout, cache, A, B, s)
    L = lambda: float(np.sum(F.lora_forward(x, A, B, s)[0] * dout))   # noqa: E731
    for name, arr, hand in [("x", x, dx), ("A", A, dA), ("B", B, dB)]:
        assert rel_err(hand, fd_grad(L, arr)) < 1e-8, name


# ------------------------------------------------------------------------------------------- frozen parameters

def test_frozen_weight_gets_no_grad_and_bias_still_does():
    lin = Linear(4, 3, dtype="float64")
    lin.weight.requires_grad = False
    x = RNG.standard_normal((5, 4))
    lin(x)
    dx = lin.backward(np.ones((5, 3)))
    assert lin.weight.grad is None
    np.testing.assert_allclose(lin.bias.grad, 5.0)
    np.testing.assert_allclose(dx, np.ones((5, 3)) @ lin.weight.data)


def test_gradients_accumulate_over_two_backwards():
    lin = Linear(4, 3, dtype="float64")
    x = RNG.standard_normal((5, 4))
    dout = RNG.standard_normal((5, 3))
    lin(x)
    lin.backward(dout)
    g1 = lin.weight.grad.copy()
    lin(x)                                          # the backward freed the cache: one forward per backward,
    lin.backward(dout)                              # as micro-batches in gradient accumulation
    np.testing.assert_allclose(lin.weight.grad, 2 * g1)
    with pytest.raises(RuntimeError, match="twice for one forward"):
        lin.backward(dout)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    lin = Linear(4, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        lin(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="float32 weights but got a float64 input"):
        lin(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="int64 input"):
        lin(np.zeros((2, 4), np.int64))
    with pytest.raises(RuntimeError, match="without a forward"):
        Linear(4, 3).backward(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("make, x", [
    (lambda: Linear(4, 6), np.ones((4, 4), np.float32)),
    (lambda: LayerNorm(6), np.ones((4, 6), np.float32)),
    (lambda: GELU(), np.ones((4, 6), np.float32)),
    (lambda: Embedding(8, 6), np.zeros(4, np.int64))])
def test_backward_refuses_a_dout_unlike_the_output(make, x):
    """A transposed dout of the right size used to be reshaped, a (1, C) one broadcast: silently wrong gradients."""
    layer = make()
    y = layer(x)                                                  # (4, 6)
    for bad in (np.ones((6, 4), np.float32), np.ones((1, 6), np.float32)):
        with pytest.raises(ValueError, match=r"dout has shape"):
            layer.backward(bad)
    with pytest.raises(TypeError, match="dout is float64"):
        layer.backward(np.ones(y.shape))
    layer.backward(np.ones_like(y))                               # the failed calls kept the cache
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 3)
    with pytest.raises(TypeError, match="dtype"):
        Linear(2, 3, dtype="float17")
    emb = Embedding(5, 2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        emb(np.array([0, 5]))
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="LayerNorm expects"):
        LayerNorm(3)(np.zeros((2, 4), np.float32))
    logits = np.zeros((3, 4))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy_forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="outside"):
        F.cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="ignore_index"):
        F.cross_entropy_forward(logits, np.array([-100, -100, -100]))


# ------------------------------------------------------------------------------------------- backends

def test_layers_run_on_each_backend_and_agree_with_numpy(xp):
    """The same float32 layer stack on the current backend (NumPy always, CuPy with a GPU) vs NumPy float64."""
    lin = Linear(8, 6, dtype="float32")
    ln = LayerNorm(6, dtype="float32")
    g = GELU()
    x = xp.asarray(RNG.standard_normal((3, 8)), dtype=xp.float32)
    y = g(ln(lin(x)))
    dx = lin.backward(ln.backward(g.backward(xp.ones_like(y))))
    W, b, xh = (to_numpy(a).astype(np.float64) for a in (lin.weight.data, lin.bias.data, x))
    ref, _ = F.gelu_forward(F.layernorm_forward(xh @ W.T + b, np.ones(6), np.zeros(6))[0])
    assert y.dtype == xp.float32 and dx.dtype == xp.float32
    assert rel_err(to_numpy(y), ref) < 1e-5


# ------------------------------------------------------------------------------------------- torch autograd

@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_layers_match_torch_autograd(dtype, tol):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 8)).astype(dtype)
    T = lambda a: torch.tensor(np.array(a), dtype=tdt, requires_grad=True)   # noqa: E731

    # Linear -> LayerNorm -> GELU chain, each compared separately via its own dout
    lin = Linear(8, 6, dtype=dtype, rng=np.random.default_rng(1))
    ln = LayerNorm(6, dtype=dtype)
    ln.weight.data[:] = rng.standard_normal(6)
    ln.bias.data[:] = rng.standard_normal(6)
    act = GELU()
    y = act(ln(lin(x)))
    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = lin.backward(ln.backward(act.backward(dout)))

    tx, tW, tb, tw2, tb2 = T(x), T(lin.weight.data), T(lin.bias.data), T(ln.weight.data), T(ln.bias.data)
    ty = torch.nn.functional.gelu(torch.nn.functional.layer_norm(tx @ tW.T + tb, (6,), tw2, tb2, 1e-5),
                                  approximate="tanh")
    (ty * torch.from_numpy(dout)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) < tol
    for ours, ref in [(dx, tx), (lin.weight.grad, tW), (lin.bias.grad, tb), (ln.weight.grad, tw2),
                      (ln.bias.grad, tb2)]:
        assert rel_err(ours, ref.grad.numpy()) < tol

    # embedding
    emb = Embedding(10, 4, dtype=dtype)
    idx = rng.integers(0, 10, (3, 5))
    e = emb(idx)
    de = rng.standard_normal(e.shape).astype(dtype)
    emb.backward(de)
    tE = T(emb.weight.data)
    (torch.nn.functional.embedding(torch.from_numpy(idx), tE) * torch.from_numpy(de)).sum().backward()
    assert rel_err(emb.weight.grad, tE.grad.numpy()) < tol

    # causal attention on a fused qkv
    B, Tn, H, hs = 2, 6, 3, 4
    qkv = rng.standard_normal((B * Tn, 3 * H * hs)).astype(dtype)
    a, cache = F.attention_forward(qkv, B, Tn, H)
    da = rng.standard_normal(a.shape).astype(dtype)
    dqkv = F.attention_backward(da, cache)
    tq = T(qkv)
    q, k, v = (t.reshape(B, Tn, H, hs).transpose(1, 2) for t in tq.split(H * hs, dim=1))
    ta = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    (ta.transpose(1, 2).reshape(B * Tn, H * hs) * torch.from_numpy(da)).sum().backward()
    assert rel_err(a, ta.transpose(1, 2).reshape(B * Tn, H * hs).detach().numpy()) < tol
    assert rel_err(dqkv, tq.grad.numpy()) < tol

    # cross-entropy with ignore_index
    logits = rng.standard_normal((7, 5)).astype(dtype)
    tg = np.array([1, -100, 4, 0, 0, -100, 3])
    loss, cache = F.cross_entropy_forward(logits, tg)
    dz = F.cross_entropy_backward(1.0, cache)
    tz = T(logits)
    tl = torch.nn.functional.cross_entropy(tz, torch.from_numpy(tg), ignore_index=-100)
    tl.backward()
    assert abs(float(loss) - tl.item()) <= tol * abs(tl.item())
    assert rel_err(dz, tz.grad.numpy()) < tol
