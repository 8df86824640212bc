"""The same fine-tune on both stacks ends with the same adapter: minilora vs transformers + PEFT + torch.optim.AdamW.

Both runs start from the exported base (minilora.hf.export_hf) and the same initial adapter (minilora's, saved and
loaded into PEFT through the export), see the same batches in the same order, with dropout off and the same AdamW
hyperparameters, for 20 steps of LoRA r=8. The loss on the torch side is cross-entropy on the logits against the
same targets (transformers' `labels=` would shift them by one).

Pass marks, measured on torch 2.13 CPU, transformers 5.24, peft 0.21:
* float64: the final adapter tensors agree to <= 1e-10 (measured 7e-14 at most).
* float32: the runs are not bit-identical (matmul and reduction order differ) and the difference is stated per
  element in ulps of the tensor's largest |value|. From a random non-zero B it stays small: <= 1e-4 of the tensor's
  largest |value| (measured 5.7e-6, about 48 of its ulps), half of the elements within 4 ulps of each other. From
  PEFT's default start (B = 0) float32 is ill-conditioned on both stacks alike: A's first gradients are tiny, and
  Adam's normalization turns their last-bit differences into whole steps. The cross-stack difference (1.6% of
  max |A|) is then the same size as each stack's own float32-vs-float64 difference (minilora 1.4%, torch 0.2%).
* QLoRA on bitsandbytes' NF4 base (CPU, train mode, the base exported with nested_rounding="bnb-cpu" so both
  stacks hold the same 4-bit bytes): float32 from a random B, <= 5e-4 of each tensor's largest |value| (measured
  8.9e-5, about 750 of its ulps; median 3 ulps per element). The 4-bit weights are equal byte for byte and
  dequantize to the same float32 values; what differs is float32 rounding in the matmuls and reductions, which
  Adam's normalization amplifies more than in the LoRA case.
"""
import dataclasses
import shutil
import warnings

import numpy as np
import pytest

from minilora.hf import export_hf
from minilora.nn import GPT
from minilora.optim import AdamW
from minilora.peft import LoraConfig, get_peft_model, quantize_model
from minilora.pretrained import load_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS, LR, BATCH, T = 20, 5e-3, 4, 64


def base(dtype="float32"):
    model, _ = load_base()
    if dtype == "float32":
        return model
    m = GPT(dataclasses.replace(model.config, dtype=dtype))
    m.load_state_dict({k: np.asarray(v, dtype=dtype) for k, v in model.state_dict().items()})
    return m


def run_both(tmp_path, dtype="float32", targets=("c_attn",), random_b=False, qlora=False):
    """20 steps on each stack from the same start; returns ({name: minilora array}, {name: torch array}, losses)."""
    model = base(dtype)
    if qlora:
        quantize_model(model, nested_rounding="bnb-cpu")
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0))
    if random_b:
        rng = np.random.default_rng(1)
        for _, layer in pm.base_model.lora_layers():
            for lin in layer.lora_B.values():
                lin.weight.data[...] = (rng.standard_normal(lin.weight.data.shape) * 0.02).astype(dtype)
    shutil.rmtree(tmp_path / "init", ignore_errors=True)
    pm.save_pretrained(tmp_path / "init")
    export_hf(base(dtype), tmp_path / "hf", adapters={"init": tmp_path / "init"}, overwrite=True,
              quantize="nf4" if qlora else None, nested_rounding="bnb-cpu")
    kw = {"device_map": "cpu"} if qlora else {"dtype": getattr(torch, dtype)}
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # transformers' is_gradient_checkpointing deprecation notice
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "hf" / "init"), is_trainable=True)
    theirs.train()                                   # dropout is 0; train mode keeps bnb's float32 dequant path
    ours = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(their_params)
    for n, p in ours.items():                        # the same start, exactly
        np.testing.assert_array_equal(np.asarray(p.data), their_params[n].detach().numpy(), err_msg=n)
    opt = AdamW(pm.named_parameters(), lr=LR)
    topt = torch.optim.AdamW(list(their_params.values()), lr=LR)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        idx, tg = rng.integers(0, 256, (BATCH, T)), rng.integers(0, 256, (BATCH, T))
        pm.zero_grad()
        _, loss = pm(idx, tg)
        pm.backward()
        opt.step()
        topt.zero_grad()
        logits = theirs(torch.from_numpy(idx)).logits                                   # (B, T, V)
        tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  torch.from_numpy(tg).reshape(-1))
        tloss.backward()
        topt.step()
        losses.append((float(loss), tloss.item()))
    return ({n: np.asarray(p.data) for n, p in ours.items()},
            {n: p.detach().numpy() for n, p in their_params.items()}, losses)


def scaled_diff(a: dict, b: dict) -> float:
    """max over tensors of max |a - b| / max |b|: the difference in units of each tensor's largest value."""
    return max(float(np.abs(a[n] - b[n]).max() / np.abs(b[n]).max()) for n in a)


def median_ulps(a: dict, b: dict) -> float:
    """Median elementwise distance in float32 ulps (the count of float32 values between the two)."""
    d = [np.abs(a[n].view(np.int32).astype(np.int64) - b[n].view(np.int32).astype(np.int64)).ravel() for n in a]
    return float(np.median(np.concatenate(d)))


@pytest.mark.parametrize("targets,random_b", [(("c_attn", "c_proj", "c_fc"), False), (("c_attn",), True)])
def test_float64_lora_ends_with_the_same_adapter(tmp_path, targets, random_b):
    ours, theirs, losses = run_both(tmp_path, "float64", targets, random_b)
    assert max(abs(a - b) for a, b in losses) <= 1e-10
    for n in ours:
        assert np.abs(ours[n] - theirs[n]).max() <= 1e-10, n


def test_float32_lora_ends_within_the_stated_bound(tmp_path):
    ours, theirs, losses = run_both(tmp_path, "float32", ("c_attn",), random_b=True)
    assert scaled_diff(ours, theirs) <= 1e-4
    assert median_ulps(ours, theirs) <= 16
    assert max(abs(a - b) for a, b in losses) <= 1e-4


def test_float32_from_zero_b_differs_as_much_as_float32_does_on_its_own(tmp_path):
    """From B = 0 the cross-stack difference is no larger than minilora's own float32-vs-float64 difference."""
    o32, t32, _ = run_both(tmp_path, "float32", ("c_attn",))
    o64, t64, _ = run_both(tmp_path, "float64", ("c_attn",))
    cross = scaled_diff(o32, t32)
    own = max(scaled_diff(o32, o64), scaled_diff(t32, t64))
    assert cross <= 0.05 and cross <= 2 * own


def test_qlora_on_bitsandbytes_nf4_ends_within_the_stated_bound(tmp_path):
    pytest.importorskip("bitsandbytes")
    ours, theirs, losses = run_both(tmp_path, "float32", ("c_attn",), random_b=True, qlora=True)
    assert scaled_diff(ours, theirs) <= 5e-4
    assert median_ulps(ours, theirs) <= 16
    assert max(abs(a - b) for a, b in losses) <= 1e-4
