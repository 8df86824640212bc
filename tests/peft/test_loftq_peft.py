"""LoftQ against PEFT's own `loftq_init`, run on the CPU.

PEFT 0.21's `loftq_init` (peft/utils/loftq_utils.py) moves the weight to CUDA (or XPU) unconditionally, so it cannot
run here as shipped. This test takes its source, replaces that one line (`compute_device = "xpu" if
is_xpu_available() else "cuda"`) by `compute_device = "cpu"`, and runs the rest unchanged: bitsandbytes' CPU NF4
(Params4bit, no double quantization, blocks of 64), torch's SVD and PEFT's √S split. If a PEFT version no longer has
that line the test is skipped rather than guessing.

The layers have rows that are whole blocks of 64: bitsandbytes 0.50's CPU dequantize_4bit is wrong on other 2-D
shapes (tests/quant/bnb_oracle.py), which would make PEFT's side wrong, not ours.

PEFT does not divide the factors by the scaling s (huggingface/peft#1982): its B A is the rank-r fit itself, ours is
that fit divided by s, so that Q + s·B A ≈ W0 for any lora_alpha. The two agree exactly when lora_alpha = r (s = 1),
and otherwise PEFT's A and B are ours times √s.
"""
import inspect

import numpy as np
import pytest

from minilora.nn.lora import loftq_factors
from minilora.pretrained import load_base
from minilora.quant import dequantize_4bit, quantize_4bit

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")

DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


@pytest.fixture(scope="module")
def peft_loftq_init_on_cpu():
    src = inspect.getsource(loftq_utils.loftq_init)
    if src.count(DEVICE_LINE) != 1:
        pytest.skip("this PEFT's loftq_init does not pick its device with the line this test replaces")
    namespace = dict(vars(loftq_utils))
    exec(src.replace(DEVICE_LINE, 'compute_device = "cpu"'), namespace)   # noqa: S102 - PEFT's own code, on CPU
    return namespace["loftq_init"]


def layers():
    base = load_base()[0]
    return {"gaussian": np.random.default_rng(0).standard_normal((96, 128)).astype(np.float32) * 0.02,
            "h.0.attn.c_attn": base.transformer.h[0].attn.c_attn.weight.data,       # (384, 128)
            "h.1.mlp.c_proj": base.transformer.h[1].mlp.c_proj.weight.data}         # (128, 512)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_equals_peft_loftq_init(peft_loftq_init_on_cpu, T):
    """Q (dequantized, as PEFT returns it) and A, B equal PEFT's at s = 1: Q bit for bit after one iteration (both
    quantize W0 itself), to float32 rounding of the residual afterwards; A, B up to one sign per rank component."""
    for name, W in layers().items():
        q, tA, tB = peft_loftq_init_on_cpu(torch.from_numpy(W.copy()), num_bits=4, reduced_rank=8, num_iter=T)
        A, B, W_res = loftq_factors(W, 8, 1.0, T)
        Q = dequantize_4bit(*quantize_4bit(W_res, blocksize=64, quant_type="nf4"))
        if T == 1:
            np.testing.assert_array_equal(Q, q.numpy(), err_msg=name)
        else:
            np.testing.assert_allclose(Q, q.numpy(), rtol=0, atol=1e-6, err_msg=name)
        tA, tB = tA.numpy(), tB.numpy()
        sign = np.sign(np.sum(A * tA, axis=1))                                          # (r,)
        np.testing.assert_allclose(A, sign[:, None] * tA, rtol=0, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(B, sign[None, :] * tB, rtol=0, atol=2e-5, err_msg=name)


def test_scaling_is_where_we_differ(peft_loftq_init_on_cpu):
    """PEFT's factors do not depend on s; ours are theirs divided by √s, so that s·B A is the rank-r fit P of
    E = W0 − Q. PEFT's model starts at E − s·P, and since ⟨E, P⟩ = ‖P‖², ‖E − s·P‖² = ‖E‖² − (2s − s²)‖P‖²: at
    lora_alpha = 2r (s = 2) exactly as far from W0 as plain QLoRA, beyond it farther."""
    W = layers()["h.0.attn.c_attn"]
    q, tA, tB = peft_loftq_init_on_cpu(torch.from_numpy(W.copy()), num_bits=4, reduced_rank=8, num_iter=1)
    P = (tB @ tA).numpy()                                                               # (D_out, D_in)
    E = W - q.numpy()                                                                   # (D_out, D_in)
    plain = np.linalg.norm(E)
    for s in (2.0, 4.0):
        A, B, _ = loftq_factors(W, 8, s, 1)
        np.testing.assert_allclose(s * B @ A, P, rtol=0, atol=1e-5)                     # s·(ours) = PEFT's B A
        assert np.linalg.norm(E - s * B @ A) < 0.95 * plain                             # ours: below plain NF4
    np.testing.assert_allclose(np.linalg.norm(E - 2.0 * P), plain, rtol=1e-4)           # PEFT at s = 2: no gain
    assert np.linalg.norm(E - 4.0 * P) > 1.05 * plain                                   # PEFT at s = 4: worse
