"""QLoRA's preparation steps and a memory report counted from the real arrays.

`quantize_model` is transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head"])` + `replace_with_bnb_linear`: every chosen Linear
becomes a `Linear4bit` whose weight is stored as 4-bit codes plus one absmax per block of 64 (itself 8-bit quantized
with double quantization), i.e. 4 + 8/64 + 32/(64·256) = 4.127 bits per weight. `prepare_model_for_kbit_training` is
PEFT's (`src/peft/utils/other.py`): freeze everything and keep norms and other non-quantized float weights in float32.

`memory_report` adds up `.nbytes` of the arrays a model and its optimizer really hold, by category, so the LoRA and
QLoRA savings are measured, not estimated:

    frozen_float   frozen float weights (embeddings, norms, a LoRA base in float)
    frozen_4bit    packed 4-bit codes + quantization statistics of every Linear4bit
    trainable      weights with requires_grad=True (LoRA A and B, or everything when fine-tuning fully)
    gradients      the .grad arrays that exist right now (none for a frozen weight, ever)
    optimizer      the optimizer's state buffers (AdamW: exp_avg, exp_avg_sq per trainable weight)

Activations cached for the backward pass are not included (they depend on batch size; see the benchmark).
"""
from __future__ import annotations

import re

from minilora.nn.layers import Linear
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.lora import LoRALinear
from minilora.nn.module import Module
from minilora.peft.config import module_name_matches
from minilora.peft.model import PeftModel


def quantize_model(model, quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                   target_modules="all-linear", skip_modules=("lm_head",), nested_rounding: str = "exact"):
    """Replace the chosen Linear layers of `model` by Linear4bit, in place; returns the model.

    nested_rounding ("exact", "bnb-cpu", "bnb-cuda"): how double quantization rounds the absmax codes
    (minilora.quant.fourbit.double_quantize). "bnb-cpu" gives the bytes transformers + bitsandbytes produce on CPU.

    target_modules: "all-linear" (every Linear not in skip_modules), a list of names (exact or dotted suffix) or a
    regex str (full match). skip_modules follows the list rule; the output layer stays in float by default, as
    transformers keeps `lm_head` unquantized. Raises ValueError when nothing matches."""
    if isinstance(model, PeftModel):
        raise ValueError("quantize the base model before get_peft_model (QLoRA wraps Linear4bit layers)")
    skip = list(skip_modules or ())
    if isinstance(target_modules, str) and target_modules != "all-linear":
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"quantize_model: target_modules pattern {target_modules!r} is not a valid regular "
                             f"expression ({e}); pass a list of names or escape it with re.escape") from None
    adapters = {id(lin) for m in model.modules() if isinstance(m, LoRALinear)   # LoRA's A and B are Linears too,
                for d in (m.lora_A, m.lora_B) for lin in d.values()}            # trained in float: never quantized
    chosen = []
    for name, m in model.named_modules():
        if not name or type(m) is not Linear or id(m) in adapters or module_name_matches(name, skip):
            continue
        if target_modules == "all-linear" or module_name_matches(name, target_modules):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"quantize_model: target_modules {target_modules!r} (minus skip_modules {skip}) matched no "
                         "Linear layer in the model")
    for name in chosen:
        lin = model.get_submodule(name)
        model.set_submodule(name, Linear4bit.from_linear(lin, quant_type=quant_type,
                                                         compress_statistics=compress_statistics, blocksize=blocksize,
                                                         nested_rounding=nested_rounding))
    return model


def prepare_model_for_kbit_training(model):
    """Freeze every parameter and cast float16/bfloat16 non-4-bit weights (norms, embeddings) to float32."""
    for m in model.modules():
        for _name, p in m._named_local_parameters():
            p.requires_grad = False
            if isinstance(m, Linear4bit) and p is m.weight:
                continue
            if p.data.dtype.kind == "f" and p.data.dtype.itemsize < 4:
                p.data = p.data.astype("float32")       # half-precision norms are unstable in training
    return model


def _arrays(obj, seen, depth=0):
    """Every NumPy/CuPy array reachable from obj (through lists, dicts and attributes), each once.

    Skipped: child Modules, forward caches (`_cache`), and 4-bit code tables (`code`: 16 or 256 constants that
    bitsandbytes shares across all layers and does not count in its 4.127 bits per parameter)."""
    if id(obj) in seen or depth > 6 or isinstance(obj, Module):
        return
    if hasattr(obj, "__array_interface__") or hasattr(obj, "__cuda_array_interface__"):   # NumPy / CuPy
        seen.add(id(obj))
        yield obj
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [v for k, v in vars(obj).items() if not k.startswith("_cache") and k != "code"]
    elif hasattr(obj, "__slots__"):
        items = [getattr(obj, k, None) for k in obj.__slots__ if k != "code"]
    else:
        return
    for v in items:
        yield from _arrays(v, seen, depth + 1)


def memory_report(model, optimizer=None) -> dict:
    """Bytes by category (see the module docstring), parameter counts and bits per 4-bit weight."""
    rep = dict(frozen_float=0, frozen_4bit=0, trainable=0, gradients=0, optimizer=0)
    n_params = n_trainable = n_4bit = 0
    seen = set()
    for m in model.modules():
        four = isinstance(m, Linear4bit)
        for _, p in m._named_local_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if four and p is m.weight:                # packed codes + their QuantState (absmax, nested absmax)
                rep["frozen_4bit"] += sum(int(a.nbytes) for a in _arrays([p.data, p.quant_state], set()))
                n = m.in_features * m.out_features
                n_4bit += n
            else:
                rep["trainable" if p.requires_grad else "frozen_float"] += int(p.data.nbytes)
                n = int(p.data.size)
            n_params += n
            n_trainable += n if p.requires_grad else 0
            if p.grad is not None:
                rep["gradients"] += int(p.grad.nbytes)
    if optimizer is not None:
        rep["optimizer"] = sum(int(a.nbytes) for a in _arrays(getattr(optimizer, "state", {}), set()))
    rep["total"] = sum(rep[k] for k in ("frozen_float", "frozen_4bit", "trainable", "gradients", "optimizer"))
    rep.update(n_params=n_params, n_trainable=n_trainable,
               trainable_percent=100.0 * n_trainable / n_params if n_params else 0.0,
               n_4bit_params=n_4bit,
               bits_per_4bit_param=8.0 * rep["frozen_4bit"] / n_4bit if n_4bit else None)
    return rep


def format_memory_report(rep: dict) -> str:
    """A small table of memory_report's numbers in MiB, with the share of the total."""
    total = rep["total"] or 1
    lines = [f"{'category':<14} {'bytes':>14} {'MiB':>10} {'share':>7}"]
    for k in ("frozen_float", "frozen_4bit", "trainable", "gradients", "optimizer", "total"):
        lines.append(f"{k:<14} {rep[k]:>14,d} {rep[k] / 2**20:>10.3f} {100 * rep[k] / total:>6.1f}%")
    lines.append(f"params {rep['n_params']:,d} | trainable {rep['n_trainable']:,d} "
                 f"({rep['trainable_percent']:.4f}%)")
    if rep.get("bits_per_4bit_param") is not None:
        lines.append(f"4-bit weights: {rep['n_4bit_params']:,d} params at {rep['bits_per_4bit_param']:.3f} bits/param")
    return "\n".join(lines)


def print_memory_report(model, optimizer=None) -> dict:
    rep = memory_report(model, optimizer)
    print(format_memory_report(rep))
    return rep
