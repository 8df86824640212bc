"""LoRALinear: gradients (finite differences, torch), PEFT parity, invariants (hypothesis), init statistics,
several adapters, merge/unmerge, and the errors for bad arguments."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nn_reference import check_lora_grads, check_step_against_peft, rel_err, torch_gpt

from minilora.backend import default_rng
from minilora.nn import GPT, GPTConfig, Linear, LoRALinear, Module, ModuleDict

RNG = np.random.default_rng(99)


def make(d_in=6, d_out=5, dtype="float64", seed=0, **kw):
    base = Linear(d_in, d_out, dtype=dtype, rng=np.random.default_rng(seed))
    kw.setdefault("init_lora_weights", False)                   # random B too, so the branch is not zero
    return LoRALinear(base, rng=np.random.default_rng(seed + 1), **kw)


# ------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_lora_backward_matches_finite_differences(dropout):
    layer = make(r=3, lora_alpha=5, lora_dropout=dropout)
    check_lora_grads(layer, RNG.standard_normal((2, 3, 6)), RNG.standard_normal((2, 3, 5)), seed=42)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None   # W0 frozen


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_torch_autograd(dtype, tol, use_rslora):
    torch = pytest.importorskip("torch")
    layer = make(d_in=7, d_out=4, dtype=dtype, r=2, lora_alpha=3, use_rslora=use_rslora)
    x = RNG.standard_normal((5, 7)).astype(dtype)
    y = layer(x)
    dout = RNG.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    T = lambda a, g=True: torch.tensor(np.array(a), requires_grad=g)   # noqa: E731
    tx, tW, tb = T(x), T(layer.base_layer.weight.data, False), T(layer.base_layer.bias.data, False)
    tA, tB = T(layer.lora_A["default"].weight.data), T(layer.lora_B["default"].weight.data)
    s = 3 / np.sqrt(2) if use_rslora else 3 / 2
    assert layer.scaling["default"] == pytest.approx(s)
    ty = tx @ tW.T + tb + s * ((tx @ tA.T) @ tB.T)
    (ty * torch.from_numpy(dout)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) < tol
    assert rel_err(dx, tx.grad.numpy()) < tol
    assert rel_err(layer.lora_A["default"].weight.grad, tA.grad.numpy()) < tol
    assert rel_err(layer.lora_B["default"].weight.grad, tB.grad.numpy()) < tol


# ------------------------------------------------------------------------------------------- PEFT parity

@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_equals_peft_lora_linear(use_rslora):
    torch = pytest.importorskip("torch")
    peft_lora = pytest.importorskip("peft.tuners.lora")
    layer = make(d_in=12, d_out=9, r=4, lora_alpha=6, use_rslora=use_rslora)
    base = torch.nn.Linear(12, 9, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(layer.base_layer.weight.data))
        base.bias.copy_(torch.from_numpy(layer.base_layer.bias.data))
    cfg = peft_lora.LoraConfig(r=4, lora_alpha=6, use_rslora=use_rslora)
    ref = peft_lora.Linear(base, "default", cfg, r=4, lora_alpha=6).double()
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(torch.from_numpy(layer.lora_A["default"].weight.data))
        ref.lora_B["default"].weight.copy_(torch.from_numpy(layer.lora_B["default"].weight.data))
    assert ref.scaling["default"] == pytest.approx(layer.scaling["default"])
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = RNG.standard_normal((3, 4, 12))
    ty = ref(torch.from_numpy(x)).detach().numpy()
    assert rel_err(layer(x), ty) < 1e-12
    np.testing.assert_allclose(layer.get_delta_weight("default"), ref.get_delta_weight("default").detach().numpy(),
                               rtol=1e-12, atol=1e-15)
    layer.merge()
    ref.merge()
    np.testing.assert_allclose(layer.base_layer.weight.data, ref.base_layer.weight.detach().numpy(), rtol=1e-12)


def test_adapter_weights_sit_at_peft_attribute_paths():
    """lora_A / lora_B are ModuleDicts of bias-free Linears, as in PEFT: `lora_A[name].weight` is A (r, D_in) and
    `lora_B[name].weight` is B (D_out, r), and the same expressions give the same shapes on a torch + PEFT model."""
    layer = make(d_in=12, d_out=9, r=4)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert isinstance(layer.lora_A, ModuleDict) and "default" in layer.lora_A and list(layer.lora_B) == ["default"]
    assert isinstance(A, Linear) and isinstance(B, Linear) and A.bias is None and B.bias is None
    assert (A.in_features, A.out_features, B.in_features, B.out_features) == (12, 4, 4, 9)
    assert A.weight.shape == (4, 12) and B.weight.shape == (9, 4)
    layer(RNG.standard_normal((3, 12)))
    layer.backward(RNG.standard_normal((3, 9)))
    assert A.weight.grad.shape == (4, 12) and B.weight.grad.shape == (9, 4)   # the gradients land on .weight

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from minilora.peft import LoraConfig, get_peft_model

    class Tiny(Module):
        def __init__(self):
            super().__init__()
            self.proj = Linear(12, 9, rng=np.random.default_rng(0))

    class TorchTiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 9)

    ours = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["proj"]))
    theirs = peft.get_peft_model(TorchTiny(), peft.LoraConfig(r=4, target_modules=["proj"]))
    for model in (ours, theirs):                       # one expression, both libraries
        proj = model.base_model.model.proj
        assert tuple(proj.lora_A["default"].weight.shape) == (4, 12)
        assert tuple(proj.lora_B["default"].weight.shape) == (9, 4)
        assert proj.lora_A["default"].bias is None and proj.lora_B["default"].bias is None
        assert proj.lora_A["default"].weight.requires_grad and not proj.base_layer.weight.requires_grad
    assert isinstance(theirs.base_model.model.proj.lora_A["default"], torch.nn.Linear)
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]


# ------------------------------------------------------------------------------------------- invariants

dims = st.integers(1, 12)


@settings(max_examples=30, deadline=None)
@given(d_in=dims, d_out=dims, data=st.data())
def test_b_zero_leaves_output_unchanged_and_rank_is_bounded(d_in, d_out, data):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    seed = data.draw(st.integers(0, 2**16))
    layer = make(d_in, d_out, dtype="float32", seed=seed, r=r, init_lora_weights=True)   # B = 0
    x = np.random.default_rng(seed).standard_normal((3, d_in)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), layer.base_layer(x))
    layer.lora_B["default"].weight.data[:] = np.random.default_rng(seed).standard_normal((d_out, r))
    delta = layer.get_delta_weight("default").astype(np.float64)
    sv = np.linalg.svd(delta, compute_uv=False)
    assert np.sum(sv > 1e-5 * sv.max()) <= r                    # rank up to float32 round-off


@settings(max_examples=30, deadline=None)
@given(d_in=dims, d_out=dims, alpha=st.floats(0.5, 64), rs=st.booleans(), data=st.data())
def test_merge_equals_unmerged_and_unmerge_restores_w0(d_in, d_out, alpha, rs, data):
    r = data.draw(st.integers(1, min(d_in, d_out)))
    seed = data.draw(st.integers(0, 2**16))
    layer = make(d_in, d_out, dtype="float32", seed=seed, r=r, lora_alpha=alpha, use_rslora=rs, lora_dropout=0.3)
    layer.eval()                                                # dropout off: merged == unmerged only in eval
    W0 = layer.base_layer.weight.data.copy()
    x = np.random.default_rng(seed).standard_normal((4, d_in)).astype(np.float32)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    y_merged = layer(x)
    np.testing.assert_allclose(y_merged, y, rtol=1e-4, atol=1e-4 * (1 + np.abs(y).max()))
    layer.unmerge()
    assert not layer.merged
    # float32 rounding: each entry is off by at most a few ulps of max(|W0|, |ΔW|)
    scale = np.maximum(np.abs(W0), np.abs(layer.get_delta_weight("default")))
    assert np.all(np.abs(layer.base_layer.weight.data - W0) <= 4 * np.finfo(np.float32).eps * scale + 1e-30)
    np.testing.assert_allclose(layer(x), y, rtol=1e-4, atol=1e-4 * (1 + np.abs(y).max()))


def test_dropout_only_in_training_mode():
    layer = make(r=2, lora_dropout=0.5)
    x = RNG.standard_normal((8, 6))
    layer.eval()
    e1, e2 = layer(x), layer(x)
    np.testing.assert_array_equal(e1, e2)
    layer.train()
    t1, t2 = layer(x), layer(x)
    assert not np.allclose(t1, t2)                               # fresh masks each call
    np.testing.assert_array_equal(layer.base_layer(x), layer.base_layer(x))


# ------------------------------------------------------------------------------------------- init statistics

def test_init_distributions():
    stats = pytest.importorskip("scipy.stats")
    d_in, r = 512, 16
    layer = LoRALinear(Linear(d_in, 256, rng=np.random.default_rng(0)), r=r, rng=default_rng(0))
    A = layer.lora_A["default"].weight.data.astype(np.float64).ravel()
    bound = 1 / np.sqrt(d_in)
    assert np.all(np.abs(A) <= bound) and np.abs(A).max() > 0.99 * bound
    assert stats.kstest(A, "uniform", args=(-bound, 2 * bound)).pvalue > 0.01
    assert stats.kstest(A, "norm", args=(0, A.std())).pvalue < 0.05
    assert np.all(layer.lora_B["default"].weight.data == 0)
    layer.update_layer("g", r, 16, init_lora_weights="gaussian")
    G = layer.lora_A["g"].weight.data.astype(np.float64).ravel()
    assert stats.kstest(G, "norm", args=(0, 1 / r)).pvalue > 0.01
    assert abs(G.std() - 1 / r) < 0.05 / r
    assert np.all(layer.lora_B["g"].weight.data == 0)
    layer.update_layer("f", r, 16, init_lora_weights=False)
    assert np.abs(layer.lora_B["f"].weight.data).max() > 0                 # not a no-op (PEFT's debugging init)
    assert np.abs(layer.lora_B["f"].weight.data).max() <= 1 / np.sqrt(r)


def test_init_is_seeded_and_dtype_follows_base():
    a = LoRALinear(Linear(8, 8, rng=np.random.default_rng(0)), r=2, rng=default_rng(5))
    b = LoRALinear(Linear(8, 8, rng=np.random.default_rng(0)), r=2, rng=default_rng(5))
    np.testing.assert_array_equal(a.lora_A["default"].weight.data, b.lora_A["default"].weight.data)
    assert a.lora_A["default"].weight.dtype == np.float32 and a.lora_B["default"].weight.dtype == np.float32


# ------------------------------------------------------------------------------------------- adapters

def test_several_adapters_switch_sum_delete():
    layer = make(r=2, lora_alpha=2)
    layer.update_layer("other", 3, 6, init_lora_weights=False)
    assert layer.active_adapter == "default"
    assert not layer.lora_A["other"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    x = RNG.standard_normal((4, 6))
    base = layer.base_layer(x)
    d_def = layer(x) - base
    layer.set_adapter("other")
    assert layer.lora_A["other"].weight.requires_grad and not layer.lora_B["default"].weight.requires_grad
    d_oth = layer(x) - base
    np.testing.assert_allclose(d_oth, x @ layer.get_delta_weight("other").T, rtol=1e-10, atol=1e-12)
    layer.set_adapter(["default", "other"])
    assert layer.active_adapter == ["default", "other"]
    np.testing.assert_allclose(layer(x) - base, d_def + d_oth, rtol=1e-10, atol=1e-12)
    y = layer(x)
    layer.backward(np.ones_like(y))
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_A["other"].weight.grad is not None
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["base_layer.weight", "base_layer.bias", "lora_A.default.weight", "lora_A.other.weight",
                     "lora_B.default.weight", "lora_B.other.weight"]
    layer.set_adapter("other")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        layer.delete_adapter("other")
    assert layer.active_adapter == "default" and "other" not in layer.lora_A and "other" not in layer.scaling
    with pytest.raises(ValueError, match="does not exist"):
        layer.delete_adapter("other")
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        layer.update_layer("default", 2, 2)


def test_merge_two_adapters_lifo_safe_merge_and_warnings():
    layer = make(r=2)
    layer.update_layer("b", 2, 4, init_lora_weights=False)
    W0 = layer.base_layer.weight.data.copy()
    layer.merge(adapter_names=["default", "b"])
    np.testing.assert_allclose(layer.base_layer.weight.data,
                               W0 + layer.get_delta_weight("default") + layer.get_delta_weight("b"), rtol=1e-12)
    assert layer.merged_adapters == ["default", "b"]
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("b")
    layer.unmerge()
    np.testing.assert_allclose(layer.base_layer.weight.data, W0, rtol=1e-12, atol=1e-15)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    # merged layers skip the LoRA branch in forward and have no gradient path into A, B
    x = RNG.standard_normal((3, 6))
    layer.merge()
    y = layer(x)
    layer.backward(np.ones_like(y))
    assert layer.lora_A["default"].weight.grad is None
    layer.unmerge()
    # safe_merge refuses a broken adapter and leaves W0 untouched
    layer.lora_B["default"].weight.data[0, 0] = np.nan
    W_before = layer.base_layer.weight.data.copy()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default"):
        layer.merge(safe_merge=True)
    np.testing.assert_array_equal(layer.base_layer.weight.data, W_before)
    assert not layer.merged


def test_disable_adapters_runs_the_base_layer():
    layer = make(r=2)
    x = RNG.standard_normal((3, 6))
    layer.merge()
    layer.enable_adapters(False)
    np.testing.assert_allclose(layer(x), layer.base_layer(x))
    assert not layer.merged                                      # a merged layer unmerges itself first
    layer.enable_adapters(True)
    assert not np.allclose(layer(x), layer.base_layer(x))


# ------------------------------------------------------------------------------------------- bad input

def test_bad_arguments_raise_value_errors():
    base = Linear(16, 12)
    for kw, msg in [({"r": 0}, r"\[1, 12\]"), ({"r": 13}, r"\[1, 12\]"), ({"r": 2.0}, "integer"),
                    ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -1.0}, "lora_alpha"),
                    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
                    ({"lora_dropout": -0.1}, "lora_dropout"), ({"init_lora_weights": "eva"}, "init_lora_weights"),
                    ({"adapter_name": "a.b"}, "adapter_name")]:
        with pytest.raises(ValueError, match=msg):
            LoRALinear(base, **kw)
    with pytest.raises(TypeError, match="wraps a Linear"):
        LoRALinear("not a layer")


# ------------------------------------------------------------------------------------------- in a GPT

def _add_lora(model, targets, r=4, alpha=8, init=False, cls=LoRALinear, **kw):
    for name, mod in list(model.named_modules()):
        if name.split(".")[-1] in targets and isinstance(mod, Linear):
            model.set_submodule(name, cls(mod, r=r, lora_alpha=alpha, init_lora_weights=init,
                                          rng=np.random.default_rng(len(name)), **kw))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def test_gpt_with_lora_matches_torch_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float64")
    m = GPT(cfg)
    t = torch_gpt(cfg, torch)
    t.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in m.state_dict().items()})
    targets = ["c_attn", "c_proj", "c_fc"]
    _add_lora(m, targets, r=4, alpha=8, use_rslora=True)
    pm = peft.get_peft_model(t, peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=targets))
    tp = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in m.named_parameters():
            tp["base_model.model." + name].copy_(torch.from_numpy(p.data))
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * cfg.n_layer                      # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {n for n, _ in trainable} == {n[len("base_model.model."):] for n, p in tp.items() if p.requires_grad}
    assert check_step_against_peft(m, pm, torch, seed=0) == len(trainable)


@pytest.mark.parametrize("cls_name", ["LoRALinear", "QLoRALinear"])
def test_skipping_block0_input_grad_changes_no_gradient(cls_name):
    """With frozen embeddings GPT.backward tells block 0 that nobody needs its input gradient (autograd's
    needs_input_grad); the trainable gradients must be exactly those of the unskipped pass."""
    from minilora.nn import QLoRALinear
    cls = {"LoRALinear": LoRALinear, "QLoRALinear": QLoRALinear}[cls_name]
    cfg = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dtype="float64")
    idx = np.random.default_rng(0).integers(0, 17, (2, 8))
    grads = []
    for train_wte in (False, True):
        m = GPT(cfg)
        _add_lora(m, ["c_attn", "c_fc"], cls=cls)
        m.transformer.wte.weight.requires_grad = train_wte            # True forces the full path through block 0
        m(idx, idx)
        m.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and "transformer.h.0.attn.c_attn.lora_A.default.weight" in grads[0]
    for n in grads[0]:
        np.testing.assert_array_equal(grads[0][n], grads[1][n], err_msg=n)
