"""DoRA equals Hugging Face PEFT's `use_dora=True`: the layer's forward and gradients at 1e-10 in float64 (with and
without dropout, with the same mask on both sides), merge and unmerge, DoRA on a 4-bit base
(against PEFT on the same dequantized weight in float64, and against PEFT's bitsandbytes Linear4bit in float32), and
the adapter files both ways with PEFT's key `lora_magnitude_vector` of shape (out_features,)."""
import json

import numpy as np
import pytest

from minilora.nn import GPT, GPTConfig, Linear, LoRALinear, QLoRALinear
from minilora.peft import LoraConfig, PeftModel, get_peft_model
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.numpy import load_file  # noqa: E402
from torch_twin import torch_copy_of  # noqa: E402

CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
RNG = np.random.default_rng(5)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class FixedMask(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout: multiplies by our mask, so both sides drop the same entries."""

    def __init__(self, mask):
        super().__init__()
        self.mask = torch.from_numpy(mask)

    def forward(self, x):
        return x * self.mask


def pair(d_in=12, d_out=9, r=3, bias=True, dropout=0.0, dtype="float64", four_bit=False):
    """Our DoRA layer and PEFT's on the same W0 (for a 4-bit base: PEFT gets our dequantized Ŵ0), each initialised
    by its own code from the same A and B = 0, then given the same random A, B and m."""
    base = Linear(d_in, d_out, bias=bias, dtype=dtype, rng=np.random.default_rng(0))
    ours = (QLoRALinear if four_bit else LoRALinear)(base, r=r, lora_alpha=5, lora_dropout=dropout, use_dora=True)
    W0 = ours._base_weight()                                                              # (D_out, D_in)
    tlin = torch.nn.Linear(d_in, d_out, bias=bias, dtype=getattr(torch, dtype))
    with torch.no_grad():
        tlin.weight.copy_(torch.from_numpy(np.array(W0)))
        if bias:
            tlin.bias.copy_(torch.from_numpy(base.bias.data if not four_bit else ours.base_layer.bias.data))
    tm = peft.get_peft_model(torch.nn.Sequential(tlin), peft.LoraConfig(r=r, lora_alpha=5, target_modules=["0"],
                                                                         lora_dropout=dropout, use_dora=True))
    theirs = tm.base_model.model[0]
    # the initial magnitude: ‖W0‖ per row on both sides
    np.testing.assert_allclose(ours.lora_magnitude_vector["default"].weight.data,
                               theirs.lora_magnitude_vector["default"].weight.detach().numpy(), rtol=1e-6 if
                               dtype == "float32" else 1e-13)
    rng = np.random.default_rng(1)
    for name, shape in [("lora_A", (r, d_in)), ("lora_B", (d_out, r))]:
        v = (rng.standard_normal(shape) * 0.3).astype(dtype)
        getattr(ours, name)["default"].weight.data[...] = v
        with torch.no_grad():
            getattr(theirs, name)["default"].weight.copy_(torch.from_numpy(v))
    m = ours.lora_magnitude_vector["default"].weight.data
    m *= (1.0 + 0.2 * rng.standard_normal(m.shape)).astype(dtype)
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    return ours, theirs


def grads_equal(ours, theirs, x, dout, tol, mask_too=False):
    y = ours(x)
    if mask_too:                                                      # our mask, given to PEFT's dropout slot
        theirs.lora_dropout["default"] = FixedMask(ours._cache[0][1])
    dx = ours.backward(dout)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    (ty * torch.from_numpy(dout)).sum().backward()
    assert rel_err(y, ty.detach().numpy()) < tol
    assert rel_err(dx, tx.grad.numpy()) < tol
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        assert rel_err(getattr(ours, name)["default"].weight.grad,
                       getattr(theirs, name)["default"].weight.grad.numpy()) < tol, name


@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_layer_forward_and_gradients_equal_peft(bias, dropout):
    ours, theirs = pair(bias=bias, dropout=dropout)
    x, dout = RNG.standard_normal((6, 12)), RNG.standard_normal((6, 9))
    grads_equal(ours, theirs, x, dout, 1e-10, mask_too=dropout > 0)


def test_merge_and_unmerge_equal_peft():
    ours, theirs = pair()
    ours.eval()
    theirs.eval()
    W0 = ours.base_layer.weight.data.copy()
    ours.merge()
    theirs.merge()
    assert rel_err(ours.base_layer.weight.data, theirs.base_layer.weight.detach().numpy()) < 1e-13
    ours.unmerge()
    theirs.unmerge()
    assert rel_err(ours.base_layer.weight.data, theirs.base_layer.weight.detach().numpy()) < 1e-13
    assert rel_err(ours.base_layer.weight.data, W0) < 1e-13


def test_dora_on_a_4bit_base_equals_peft_on_the_dequantized_weight():
    ours, theirs = pair(four_bit=True)
    x, dout = RNG.standard_normal((6, 12)), RNG.standard_normal((6, 9))
    grads_equal(ours, theirs, x, dout, 1e-10)


def test_dora_on_a_4bit_base_equals_peft_bitsandbytes_linear4bit():
    """PEFT's own QLoRA path (bnb.nn.Linear4bit base, PEFT's lora.bnb.Linear4bit wrapper) in float32: our NF4 codes
    equal bitsandbytes' for this shape (rows of whole 64-blocks), so forward, gradients and the merged weight agree
    to float32 rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    base = Linear(128, 64, dtype="float32", rng=np.random.default_rng(3))
    ours = QLoRALinear(base, r=4, lora_alpha=8, use_dora=True)
    ref = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(torch.from_numpy(base.weight.data.copy()), requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, blocksize=64)
    ref.bias = torch.nn.Parameter(torch.from_numpy(base.bias.data.copy()), requires_grad=False)
    seq = torch.nn.Sequential(ref.to("cpu"))                          # bnb quantizes on the move to a device
    seq.is_loaded_in_4bit = True                                      # what transformers sets; PEFT dispatches on it
    theirs = peft.get_peft_model(seq, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    theirs = theirs.base_model.model[0]
    assert type(theirs).__module__ == "peft.tuners.lora.bnb"
    np.testing.assert_array_equal(ours.base_layer.weight_packed, theirs.base_layer.weight.data.numpy())
    rng = np.random.default_rng(4)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            p = getattr(ours, name)["default"].weight
            p.data += (0.1 * rng.standard_normal(p.data.shape)).astype(np.float32)
            getattr(theirs, name)["default"].weight.copy_(torch.from_numpy(p.data))
    x, dout = rng.standard_normal((5, 128)).astype(np.float32), rng.standard_normal((5, 64)).astype(np.float32)
    grads_equal(ours, theirs, x, dout, 1e-5)
    ours.eval()
    theirs.eval()
    with pytest.warns(UserWarning, match="rounding"):
        ours.merge()
    with pytest.warns(UserWarning, match="rounding"):
        theirs.merge()
    W_ours = ours.base_layer.dequantize_weight()
    W_theirs = bnb.functional.dequantize_4bit(theirs.base_layer.weight.data, theirs.base_layer.weight.quant_state)
    assert rel_err(W_ours, W_theirs.numpy()) < 1e-5


def test_adapter_saved_here_loads_in_peft(tmp_path):
    base = GPT(GPTConfig(**CFG))
    tree = torch_copy_of(base, torch)
    ours = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True))
    rng = np.random.default_rng(0)
    for name, p in ours.named_parameters():
        if "lora_B" in name or "magnitude" in name:
            p.data += (0.3 * rng.standard_normal(p.data.shape)).astype(p.data.dtype)
    ours.eval()
    ours.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    assert tensors[key].shape == (48,)                                # (out_features,), PEFT's key and shape
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tree, str(tmp_path))
    res = theirs.load_adapter(str(tmp_path), adapter_name="again")
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    assert theirs.peft_config["default"].use_dora is True
    theirs.eval()
    outputs_match(ours, theirs)


def test_adapter_saved_by_peft_loads_here(tmp_path):
    base = GPT(GPTConfig(**CFG))
    tree = torch_copy_of(base, torch)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tree, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_fc", "c_attn"],
                                                       init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    ours = PeftModel.from_pretrained(base, tmp_path)
    res = ours._load_results["default"]
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert ours.peft_config["default"].use_dora
    outputs_match(ours, theirs)


def outputs_match(ours, theirs):
    rng = np.random.default_rng(7)
    paths = [n for n, _ in ours.base_model.lora_layers()]
    assert len(paths) == 4
    for path in paths:
        a, b = ours.base_model.model.get_submodule(path), theirs.base_model.model.get_submodule(path)
        x = rng.standard_normal((5, a.in_features)).astype(np.float32)
        with torch.no_grad():
            y_theirs = b(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(a(x), y_theirs, rtol=1e-5, atol=1e-5, err_msg=path)
        assert np.abs(a(x) - a.base_layer(x)).max() > 1e-3            # the adapter really changes the output
