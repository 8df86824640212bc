"""LoftQ (arXiv 2310.08659, init_lora_weights="loftq"): Q = NF4(W0 − s·B A) and s·B A = rank-r SVD of W0 − Q,
alternated T times, so that Q + s·B A is closer to W0 than plain QLoRA's Q0 = NF4(W0) before any training.

These tests check the algorithm's defining properties. PEFT's own `loftq_init` moves the weight to CUDA
unconditionally, so it cannot run here as shipped; tests/peft/test_loftq_peft.py runs its source with that one line
set to the CPU and compares."""
import copy
import warnings

import numpy as np
import pytest

from minilora.nn import Linear, LoRALinear, QLoRALinear
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.lora import loftq_factors
from minilora.peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model, quantize_model
from minilora.pretrained import load_base
from minilora.quant import dequantize_4bit, quantize_4bit


def nf4(W, compress_statistics=False):
    """Plain QLoRA's base: the dequantized NF4 (blocks of 64) of W (D_out, D_in)."""
    return dequantize_4bit(*quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics))


def loftq_error(W, r, s, T):
    """‖W − (Q + s·B A)‖_F for LoftQ with T iterations."""
    A, B, W_res = loftq_factors(W, r, s, T)                                 # (r, D_in), (D_out, r), (D_out, D_in)
    return float(np.linalg.norm(W - (nf4(W_res) + s * (B @ A))))


@pytest.fixture(scope="module")
def base():
    return load_base()[0]


def gaussian():
    return np.random.default_rng(0).standard_normal((96, 160)).astype(np.float32) * 0.02   # (D_out, D_in)


@pytest.mark.parametrize("which", ["gaussian", "c_fc", "c_attn"])
def test_error_below_plain_nf4_and_not_increasing(which, base):
    if which == "gaussian":
        W = gaussian()
    else:
        W = base.get_submodule(f"transformer.h.1.{'mlp' if which == 'c_fc' else 'attn'}.{which}").weight.data
    plain = float(np.linalg.norm(W - nf4(W)))                               # plain QLoRA: Q0, B = 0
    errs = [loftq_error(W, 8, 2.0, T) for T in (1, 2, 5)]
    assert errs[0] < 0.95 * plain                                           # one SVD step already removes > 5 %
    assert errs[1] <= errs[0] * (1 + 1e-6) and errs[2] <= errs[1] * (1 + 1e-6)


def test_one_iteration_is_nf4_plus_the_svd_of_its_error():
    """T = 1: Q is plain NF4(W0) and s·B A is the best rank-r approximation of W0 − Q (Eckart–Young), √S_r/√s on
    each side, for any scaling."""
    W = gaussian()
    A, B, W_res = loftq_factors(W, 6, 2.5, 1)
    np.testing.assert_array_equal(W_res, W)                                 # nothing subtracted before the 1st NF4
    U, S, Vh = np.linalg.svd(W - nf4(W), full_matrices=False)
    np.testing.assert_allclose(2.5 * B @ A, (U[:, :6] * S[:6]) @ Vh[:6], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.linalg.norm(A, axis=1), rtol=1e-5)   # S split evenly


@pytest.mark.parametrize("T", [1, 3])
def test_stored_q_is_the_nf4_of_the_last_residual(T):
    """The 4-bit base holds, byte for byte, NF4(W0 − s·B_{T-1} A_{T-1}) with B_{T-1} A_{T-1} from T − 1 iterations;
    A, B are those of T iterations. The bias stays in float, unchanged."""
    lin = Linear(160, 96, rng=np.random.default_rng(3))
    W, b = lin.weight.data.copy(), lin.bias.data.copy()
    layer = LoRALinear(lin, r=4, lora_alpha=8, init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 4, "loftq_iter": T})
    s = layer.scaling["default"]
    residual = W                                                            # T = 1: plain QLoRA's NF4(W0)
    if T > 1:
        A_prev, B_prev, _ = loftq_factors(W, 4, s, T - 1)
        residual = W - s * (B_prev @ A_prev)                                # (D_out, D_in)
    codes, state = quantize_4bit(residual, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = layer.base_layer
    assert isinstance(q, Linear4bit) and not q.compress_statistics and q.quant_type == "nf4" and q.blocksize == 64
    np.testing.assert_array_equal(q.weight.data, codes)
    np.testing.assert_array_equal(q.quant_state.absmax, state.absmax)
    A, B, _ = loftq_factors(W, 4, s, T)
    np.testing.assert_array_equal(layer.lora_A["default"].weight.data, A)
    np.testing.assert_array_equal(layer.lora_B["default"].weight.data, B)
    np.testing.assert_array_equal(q.bias.data, b)
    # the layer's output is Q + s·B A applied to x
    x = np.random.default_rng(4).standard_normal((5, 160)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x @ (dequantize_4bit(codes, state) + s * B @ A).T + b, atol=1e-4)


def test_qlora_linear_quantizes_with_its_own_settings():
    lin = Linear(128, 64, rng=np.random.default_rng(5))
    W = lin.weight.data.copy()
    layer = QLoRALinear(lin, r=4, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=1),
                        compress_statistics=True, blocksize=128)
    q = layer.base_layer
    assert q.compress_statistics and q.blocksize == 128
    codes, _ = quantize_4bit(W, blocksize=128, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(q.weight.data, codes)


def logits(model, idx):
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def test_get_peft_model_loftq_starts_closer_to_the_float_model(base):
    """On the shipped GPT, all-linear r=8: the LoftQ QLoRA model's initial logits are closer to the float model's
    than plain QLoRA's (NF4 without double quantization, B = 0), and it is a QLoRA model with the same trainables."""
    idx = np.random.default_rng(0).integers(0, base.config.vocab_size, (4, 64))
    ref = logits(base, idx)                                                 # (4, 64, V)
    cfg = dict(r=8, lora_alpha=16, target_modules="all-linear")
    plain = get_peft_model(quantize_model(copy.deepcopy(base), compress_statistics=False), LoraConfig(**cfg))
    loftq = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg, init_lora_weights="loftq",
                                                           loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)))
    layers = [m for _, m in loftq.base_model.lora_layers()]
    assert layers and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    assert type(loftq.base_model.model.lm_head.weight.data) is np.ndarray   # the output layer stays float
    assert loftq.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
    e_plain = np.linalg.norm(logits(plain, idx) - ref)
    e_loftq = np.linalg.norm(logits(loftq, idx) - ref)
    assert e_loftq < 0.9 * e_plain


def test_save_and_load_reproduces_the_loftq_model(tmp_path):
    """The saved config carries loftq_config; loading onto the float base re-runs LoftQ (deterministic: the same Q)
    and then loads the trained A, B."""
    model = load_base()[0]
    idx = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16))
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                         init_lora_weights="loftq",
                                                         loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    for _, m in pm.base_model.lora_layers():
        m.lora_B["default"].weight.data *= 1.5                              # "trained"
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert loaded.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    np.testing.assert_array_equal(logits(loaded, idx), logits(pm.eval(), idx))


def test_refusals():
    with pytest.raises(ValueError, match="loftq_config` must be specified"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="Only nf4 and int8"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=3))
    with pytest.raises(ValueError, match="loftq_bits=8"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8))
    with pytest.raises(ValueError, match="greater than 0"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=0))
    with pytest.warns(UserWarning, match="ignored"):
        cfg = LoraConfig(loftq_config=LoftQConfig())
    assert cfg.loftq_config == {}
    lin = Linear(64, 32, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="float"):                          # a 4-bit base no longer holds W0
        LoRALinear(Linear4bit.from_linear(lin), init_lora_weights="loftq", loftq_config={"loftq_iter": 1})
    with pytest.raises(ValueError, match="must be specified"):
        LoRALinear(lin, init_lora_weights="loftq")
    model = quantize_model(load_base()[0])
    with warnings.catch_warnings(), pytest.raises(TypeError, match="already 4-bit"):
        get_peft_model(model, LoraConfig(target_modules=["c_attn"], init_lora_weights="loftq",
                                         loftq_config=LoftQConfig()))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())    # nothing was wrapped
