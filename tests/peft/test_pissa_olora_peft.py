"""PiSSA and OLoRA initialisation (init_lora_weights="pissa" / "olora") equal PEFT's on the same weights: A, B and
the residual base weight W0 − s·B A, to float32 rounding (both compute in float32). Singular and QR vectors are
defined up to sign, so each rank component may flip sign on one side as long as it flips in A and B together."""
import copy

import numpy as np
import pytest

from minilora.nn import GPT, GPTConfig, Linear, LoRALinear, QLoRALinear
from minilora.nn.lora import olora_factors, pissa_factors
from minilora.peft import LoraConfig, get_peft_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from torch_twin import torch_copy_of  # noqa: E402


def assert_same_factors(A, B, tA, tB, tol):
    """A (r, D_in), B (D_out, r) equal up to one sign per rank component, shared by A's row and B's column."""
    sign = np.sign(np.sum(A * tA, axis=1))                                                    # (r,)
    np.testing.assert_allclose(A, sign[:, None] * tA, rtol=0, atol=tol)
    np.testing.assert_allclose(B, sign[None, :] * tB, rtol=0, atol=tol)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_init_equals_peft(init, use_rslora):
    base = Linear(24, 16, dtype="float32", rng=np.random.default_rng(0))
    W0 = base.weight.data.copy()
    t = torch.nn.Linear(24, 16)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(W0))
        t.bias.copy_(torch.from_numpy(base.bias.data))
    pm = peft.get_peft_model(torch.nn.Sequential(t), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"],
                                                                      init_lora_weights=init, use_rslora=use_rslora))
    theirs = pm.base_model.model[0]
    ours = LoRALinear(base, r=4, lora_alpha=6, init_lora_weights=init, use_rslora=use_rslora)
    A, B = ours.lora_A["default"].weight.data, ours.lora_B["default"].weight.data
    assert A.dtype == B.dtype == np.float32
    assert_same_factors(A, B, theirs.lora_A["default"].weight.detach().numpy(),
                        theirs.lora_B["default"].weight.detach().numpy(), 1e-5)
    np.testing.assert_allclose(ours.base_layer.weight.data, theirs.base_layer.weight.detach().numpy(), atol=1e-5)
    # the model is unchanged at step 0: W_res + s·B A = W0
    np.testing.assert_allclose(ours.base_layer.weight.data + ours.get_delta_weight("default"), W0, atol=1e-5)


def test_the_formulas():
    """PiSSA: s·B A is W0's best rank-r approximation U_r S_r V_rᵀ (Eckart–Young), B's columns orthogonal; OLoRA:
    B has orthonormal columns and A is upper triangular."""
    W = np.random.default_rng(1).standard_normal((10, 7))                                     # (D_out, D_in)
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    A, B, W_res = pissa_factors(W, 3, 2.5)
    np.testing.assert_allclose(2.5 * B @ A, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(W_res, 2), S[3], rtol=1e-12)                  # the residual's top σ
    A, B, W_res = olora_factors(W, 3, 2.5)
    np.testing.assert_allclose(B.T @ B, np.eye(3), atol=1e-12)
    assert np.allclose(np.tril(A[:, :3], -1), 0)
    np.testing.assert_allclose(W_res + 2.5 * B @ A, W, atol=1e-12)


def test_gpt_with_pissa_equals_peft():
    base = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    tree = torch_copy_of(base, torch)
    targets = ["c_attn", "c_fc"]
    ours = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    theirs = peft.get_peft_model(tree, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights="pissa"))
    tp = {n: p.detach().numpy() for n, p in theirs.named_parameters()}
    for path, m in ours.base_model.lora_layers():
        key = f"base_model.model.{path}"
        assert_same_factors(m.lora_A["default"].weight.data, m.lora_B["default"].weight.data,
                            tp[f"{key}.lora_A.default.weight"], tp[f"{key}.lora_B.default.weight"], 1e-5)
        np.testing.assert_allclose(m.base_layer.weight.data, tp[f"{key}.base_layer.weight"], atol=1e-5)


def test_pissa_refuses_a_4bit_base_and_olora_requantizes_it():
    """PEFT's pissa_init raises TypeError for a quantized weight (it wants the float W0); its olora_init dequantizes,
    takes the QR and re-quantizes the residual. minilora does the same."""
    lin = Linear(64, 32, dtype="float32", rng=np.random.default_rng(2))
    with pytest.raises(TypeError, match="PiSSA under float32"):
        QLoRALinear(copy.deepcopy(lin), r=4, init_lora_weights="pissa")
    q = QLoRALinear(copy.deepcopy(lin), r=4, lora_alpha=8, init_lora_weights="olora")
    ref = QLoRALinear(copy.deepcopy(lin), r=4, lora_alpha=8)                                 # the same NF4 base
    A, B, W_res = olora_factors(ref.base_layer.dequantize_weight(), 4, 2.0)
    ref.base_layer.set_weight(W_res)
    np.testing.assert_array_equal(q.base_layer.weight_packed, ref.base_layer.weight_packed)
    np.testing.assert_array_equal(q.lora_A["default"].weight.data, A)
    np.testing.assert_array_equal(q.lora_B["default"].weight.data, B)


def test_fast_pissa_is_refused_clearly():
    with pytest.raises(ValueError, match="svd_lowrank"):
        LoraConfig(init_lora_weights="pissa_niter_4")
