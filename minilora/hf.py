"""A minilora GPT as a Hugging Face transformers GPT-2 folder, and back: no hand conversion, no torch needed.

    export_hf(model, "out")                        out/config.json + out/model.safetensors
        -> transformers.GPT2LMHeadModel.from_pretrained("out")
    export_hf(model, "out", adapters=["run/lora"]) + out/lora/adapter_config.json + adapter_model.safetensors
        -> peft.PeftModel.from_pretrained(hf_model, "out/lora")
    export_hf(model, "out", quantize="nf4")        bitsandbytes' pre-quantized 4-bit state + quantization_config
        -> GPT2LMHeadModel.from_pretrained("out")  (transformers reads the config; bitsandbytes installed)
    import_hf("folder") -> GPT                     any GPT-2 folder minilora can represent, float or 4-bit
    import_adapter("folder/lora", "mine/lora")     a PEFT adapter of a transformers GPT-2, as a minilora adapter

What changes on the way across, and nothing else:
- Conv1D. transformers' GPT-2 keeps its four linear kinds (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) as
  `Conv1D`, weight (in, out), y = x W + b; minilora's Linear holds (out, in), y = x Wᵀ + b. Every one of them is
  transposed, chosen by name and never by shape: attn.c_proj is square (C, C), so an untransposed copy loads with
  "all keys matched" and computes something else.
- The output layer. minilora's lm_head is its own weight: the config says tie_word_embeddings=False and the file
  holds lm_head.weight. (Left tied, transformers would use wte as the output layer.)
- The config. GELU in its tanh form (`gelu_new`), LayerNorm eps 1e-5, no dropout (GPT2Config's default is 0.1),
  attention scaled by 1/√head_dim, an MLP of 4·n_embd. A minilora model without biases (GPTConfig.bias=False) is
  written with zero biases, which computes the same.
- Adapters. A (r, in) and B (out, r) keep their shapes: PEFT transposes only ΔW = s·B A when it merges into a
  Conv1D. What changes is `fan_in_fan_out`: true for Conv1D targets (PEFT warns and flips a false one), false for
  a 4-bit base, whose bitsandbytes `Linear4bit` layers hold (out, in) like minilora's. Weights saved whole for
  `modules_to_save` are transposed like the base weights.
- 4 bits. bitsandbytes quantizes a Conv1D weight after turning it to (out, in), the orientation minilora's
  Linear4bit already has, so codes and statistics are written as they are, under bitsandbytes' keys:
  P.weight (packed uint8), P.weight.absmax, P.weight.quant_map, [P.weight.nested_absmax, P.weight.nested_quant_map],
  P.weight.quant_state.bitsandbytes__nf4 (the rest, as JSON bytes).

Every file is written atomically (minilora.io) and everything is computed and checked before the first one is.
Nothing is pickled: a folder holding only pytorch_model.bin is refused.

Mirrors transformers' `GPT2LMHeadModel.save_pretrained` / `from_pretrained` (`models/gpt2/modeling_gpt2.py`,
`GPT2Config`, `pytorch_utils.Conv1D`), the pre-quantized 4-bit checkpoints of transformers' bitsandbytes
integration (`Params4bit`, `BitsAndBytesConfig`), and PEFT's `PeftModel.save_pretrained` adapter folders.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from minilora.backend import to_numpy
from minilora.io import load_json, load_safetensors, save_json, save_safetensors
from minilora.nn import GPT, GPTConfig
from minilora.nn.layers import Linear
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.lora import LoRALinear, check_adapter_name
from minilora.peft.config import CONFIG_NAME as ADAPTER_CONFIG
from minilora.peft.config import WEIGHTS_NAME as ADAPTER_WEIGHTS
from minilora.peft.save_and_load import PREFIX, read_adapter
from minilora.quant import quantize_4bit

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CONV1D_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")      # Conv1D in transformers' GPT-2
_CONV1D_WEIGHT = re.compile(r"(?:.*\.)?transformer\.h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                            r"\.weight")
QUANT_TYPES = ("nf4", "fp4")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")     # the same tanh formula; "gelu" is the erf form


class UnsupportedModelError(ValueError):
    """A model, folder or config that the conversion cannot represent exactly (named, with what would fit)."""


# ---------------------------------------------------------------------------------------------------- the names
def is_conv1d_weight(key: str) -> bool:
    """True for the weight of one of GPT-2's Conv1D layers (stored (in, out) by transformers), whatever the prefix."""
    return _CONV1D_WEIGHT.fullmatch(key) is not None


def hf_config(config: GPTConfig, quantization: dict | None = None) -> dict:
    """transformers' GPT2Config (as config.json) that computes exactly what minilora's GPT with `config` does."""
    d = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,          # None: 4 * n_embd
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
        "dtype": config.dtype,
    }
    if quantization is not None:
        d["quantization_config"] = quantization
    return d


def bnb_4bit_config(quant_type: str, double_quant: bool) -> dict:
    """The quantization_config transformers writes for BitsAndBytesConfig(load_in_4bit=True, ...) (float32 compute;
    lm_head stays in float, which transformers decides by itself when llm_int8_skip_modules is null)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
            "_load_in_8bit": False, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0}


# ------------------------------------------------------------------------------------------------------- export
def to_hf_state_dict(model: GPT, quantize: str | None = None, double_quant: bool = True,
                     nested_rounding: str = "exact") -> tuple[dict, dict | None]:
    """(tensors as transformers' GPT2LMHeadModel names and lays them out, quantization_config or None).

    Float Conv1D weights are transposed to (in, out). With quantize="nf4"/"fp4" the four Conv1D kinds are quantized
    at blocksize 64 (double quantization as `double_quant`, its absmax codes rounded as `nested_rounding`: "exact",
    "bnb-cpu" or "bnb-cuda", see minilora.quant.fourbit.double_quantize); a model whose layers are already
    `Linear4bit` (`minilora.peft.quantize_model`) is written with its own codes and statistics, unchanged."""
    _check_exportable(model, quantize)
    cfg = model.config
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    settings = {(m.quant_type, m.compress_statistics) for m in four_bit.values()}
    if quantize is not None:
        settings.add((quantize, bool(double_quant)))
    if len(settings) > 1:
        raise UnsupportedModelError(f"the 4-bit layers use different settings {sorted(settings)} (quant_type, double "
                                    "quantization); transformers' quantization_config has one of each")
    out = {}
    for key, value in model.state_dict().items():
        a = to_numpy(value)
        path = key.rsplit(".weight", 1)[0] if key.endswith(".weight") else None
        if path in four_bit or any(key.startswith(p + ".weight.") for p in four_bit):
            out[key] = a                                                   # bnb's layout already: (out, in) state
        elif quantize is not None and is_conv1d_weight(key):
            packed, qs = quantize_4bit(a, blocksize=64, quant_type=quantize, compress_statistics=bool(double_quant),
                                       nested_rounding=nested_rounding)
            out[key] = packed                                              # ((n+1)//2, 1) uint8
            out.update({f"{key}.{k}": to_numpy(v) for k, v in qs.as_dict(packed=True).items()})
        elif is_conv1d_weight(key):
            out[key] = np.ascontiguousarray(a.T)                           # (out, in) -> Conv1D's (in, out)
        else:
            out[key] = a
    if not cfg.bias:                                                       # GPT-2 always has biases: zeros compute
        for name, m in model.named_modules():                              # the same as none
            if name and name != "lm_head" and hasattr(m, "bias") and m.bias is None:
                n = m.out_features if hasattr(m, "out_features") else m.ndim
                out[f"{name}.bias"] = np.zeros(n, dtype=cfg.dtype)         # (n,)
    quantization = None
    if settings:
        (quant_type, dq), = settings
        quantization = bnb_4bit_config(quant_type, dq)
    return out, quantization


def _check_exportable(model, quantize) -> None:
    if not isinstance(model, GPT):
        inner = getattr(getattr(model, "base_model", None), "model", None)
        hint = (" (a PeftModel: export its base and pass the saved adapter folder in adapters=, or export "
                "merge_and_unload()'s model)") if isinstance(inner, GPT) else ""
        raise TypeError(f"export_hf needs a minilora GPT, got a {type(model).__name__}{hint}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UnsupportedModelError("the model holds LoRA layers: export the base model and pass the adapter's saved "
                                    "folder in adapters=, or merge_and_unload() first to export the merged weights")
    for name, m in model.named_modules():
        if isinstance(m, (Linear, Linear4bit)) and name != "lm_head" \
                and not any(name.endswith("." + k) for k in CONV1D_KINDS):
            raise UnsupportedModelError(f"{name}: a linear layer GPT-2 does not have")
        if isinstance(m, Linear4bit) and name == "lm_head":
            raise UnsupportedModelError(f"{name}: a 4-bit output layer; transformers keeps lm_head in float")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be None or one of {QUANT_TYPES}, got {quantize!r}")
    if (quantize is not None or any(isinstance(m, Linear4bit) for m in model.modules())) \
            and model.config.dtype != "float32":
        raise UnsupportedModelError(f"a 4-bit export needs a float32 model (bitsandbytes' state records its dtype; "
                                    f"transformers computes in float32 here), got {model.config.dtype}")


def hf_adapter(folder, model: GPT, four_bit: bool = False) -> tuple[dict, dict, dict]:
    """(adapter_config.json dict, tensors, safetensors metadata) of a saved adapter folder (minilora's or PEFT's),
    as PEFT expects it on transformers' GPT-2: fan_in_fan_out set for what the targets are there, `modules_to_save`
    weights of Conv1D layers transposed. The adapter is checked against `model` (every target exists, shapes fit)."""
    config, tensors = read_adapter(folder)
    _check_adapter_fits(folder, tensors, model)
    targets = {k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k or ".lora_B." in k}
    conv = sorted(t for t in targets if any(t.endswith("." + k) for k in CONV1D_KINDS))
    linear = sorted(targets - set(conv))
    if conv and linear and not four_bit:
        raise UnsupportedModelError(f"{folder}: the adapter targets both Conv1D layers ({conv[0]}, ...) and "
                                    f"nn.Linear ones ({', '.join(linear)}) in transformers' GPT-2; PEFT's one "
                                    "fan_in_fan_out flag cannot describe both (drop lm_head from target_modules)")
    d = load_json(Path(folder) / ADAPTER_CONFIG)
    d["fan_in_fan_out"] = bool(conv) and not four_bit
    out = {}
    for k, v in tensors.items():
        out[k] = np.ascontiguousarray(v.T) if (".lora_" not in k and is_conv1d_weight(k[len(PREFIX):])) else v
    _, meta = load_safetensors(Path(folder) / ADAPTER_WEIGHTS)
    return d, out, meta or {"format": "pt"}


def _check_adapter_fits(folder, tensors: dict, model) -> None:
    for k, v in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", k)
        if m is None:
            continue
        path, which = m.groups()
        try:
            layer = model.get_submodule(path)
        except (AttributeError, KeyError, IndexError, ValueError):
            raise UnsupportedModelError(f"{folder}: {k} names {path}, which the model does not have") from None
        in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        want = (v.shape[0], in_f) if which == "A" else (out_f, v.shape[1])
        if v.ndim != 2 or tuple(v.shape) != want:
            raise UnsupportedModelError(f"{folder}: {k} has shape {tuple(v.shape)}, {path} needs "
                                        f"{'(r, in_features)' if which == 'A' else '(out_features, r)'} = {want}")


def export_hf(model: GPT, out_dir, adapters=(), quantize: str | None = None, double_quant: bool = True,
              overwrite: bool = False, nested_rounding: str = "exact") -> Path:
    """Write `model` as a transformers GPT-2 folder (config.json + model.safetensors) and each adapter folder in
    `adapters` (paths, or {name: path}) into a sub-folder named after it; returns the folder.

    quantize="nf4" (or "fp4") writes bitsandbytes' pre-quantized 4-bit state (blocksize 64, double quantization
    unless double_quant=False, its absmax codes rounded as `nested_rounding`; "bnb-cpu" writes the bytes
    transformers + bitsandbytes produce on CPU) with its quantization_config; a model already quantized by
    `quantize_model` is written with its own 4-bit state. A folder that holds anything is refused unless
    overwrite=True, which replaces only the files written here. Everything is converted and checked before the
    first file is written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: a file; export_hf writes a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: the folder is not empty; pass overwrite=True (--overwrite) to replace the "
                              "exported files in it, or name a new folder")
    tensors, quantization = to_hf_state_dict(model, quantize, double_quant, nested_rounding)
    named = dict(adapters) if isinstance(adapters, dict) else {Path(a).resolve().name: a for a in adapters}
    if not isinstance(adapters, dict) and len(named) != len(list(adapters)):
        raise ValueError(f"two adapter folders share a name: {[str(a) for a in adapters]}; pass {{name: folder}}")
    converted = {}
    for name, folder in named.items():
        check_adapter_name(name)
        if name in (CONFIG_FILE, WEIGHTS_FILE):
            raise ValueError(f"adapter name {name!r} is a file name of the export")
        converted[name] = hf_adapter(folder, model, four_bit=quantization is not None)
    save_safetensors(out / WEIGHTS_FILE, tensors)
    save_json(out / CONFIG_FILE, hf_config(model.config, quantization))
    for name, (config, ts, meta) in converted.items():
        save_safetensors(out / name / ADAPTER_WEIGHTS, ts, metadata=meta)
        save_json(out / name / ADAPTER_CONFIG, config)
    return out


# ------------------------------------------------------------------------------------------------------- import
_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                  "tie_word_embeddings": True}


def gpt_config_from_hf(d: dict, dtype: str = "float32") -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config.json dict (GPT2Config's defaults for missing keys), or
    UnsupportedModelError naming the field minilora's GPT cannot compute."""
    if d.get("model_type") != "gpt2":
        raise UnsupportedModelError(f"model_type {d.get('model_type')!r}: only transformers' GPT-2 ('gpt2') converts")
    c = {**_GPT2_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k == "n_inner"}}
    checks = [
        (c["activation_function"] in GELU_TANH, "activation_function", "the tanh GELU 'gelu_new'"),
        (math.isclose(float(c["layer_norm_epsilon"]), 1e-5, rel_tol=1e-9), "layer_norm_epsilon", "1e-5"),
        (c["n_inner"] in (None, 4 * c["n_embd"]), "n_inner", f"None or 4 * n_embd = {4 * c['n_embd']}"),
        (c["scale_attn_weights"] is True, "scale_attn_weights", "true (scores / √head_dim)"),
        (c["scale_attn_by_inverse_layer_idx"] is False, "scale_attn_by_inverse_layer_idx", "false"),
        (c["add_cross_attention"] is False, "add_cross_attention", "false (no encoder)"),
    ]
    for ok, key, want in checks:
        if not ok:
            raise UnsupportedModelError(f"config.json {key} = {c[key]!r}: minilora's GPT computes only {want}")
    try:
        return GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
                         n_head=c["n_head"], n_embd=c["n_embd"], dtype=dtype, bias=True)
    except ValueError as e:
        raise UnsupportedModelError(f"config.json: {e}") from None


def read_hf_folder(folder) -> tuple[dict, dict]:
    """(config.json dict, tensors) of a transformers folder: model.safetensors, or the shards its index names."""
    d = Path(folder)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d / CONFIG_FILE}: missing; a transformers model folder holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}")
    config = load_json(d / CONFIG_FILE)
    index = d / (WEIGHTS_FILE + ".index.json")
    if (d / WEIGHTS_FILE).is_file():
        tensors, _ = load_safetensors(d / WEIGHTS_FILE)
    elif index.is_file():
        tensors = {}
        for shard in sorted(set(load_json(index).get("weight_map", {}).values())):
            if Path(shard).name != shard:
                raise UnsupportedModelError(f"{index}: shard {shard!r} is not a file in the folder")
            tensors.update(load_safetensors(d / shard)[0])
    else:
        pickled = " (pytorch_model.bin is pickle, which minilora never loads: re-save with safe_serialization)" \
            if (d / "pytorch_model.bin").is_file() else ""
        raise FileNotFoundError(f"{d / WEIGHTS_FILE}: missing{pickled}")
    return config, tensors


def from_hf_state_dict(tensors: dict, config: GPTConfig, tied: bool, four_bit: set) -> dict:
    """transformers' GPT-2 tensors -> minilora's state dict: the `transformer.` prefix added where a bare GPT2Model
    left it out, the causal-mask buffers of old checkpoints dropped, float Conv1D weights transposed to (out, in),
    a tied lm_head copied from wte, everything cast to the model's dtype (4-bit entries left as they are)."""
    out = {}
    for k, v in tensors.items():
        if re.fullmatch(r"(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)", k):
            continue                                                       # causal-mask buffers, not weights
        key = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        if key.split(".weight", 1)[0] in four_bit:
            out[key] = v                                                   # bnb's (out, in) 4-bit state
        elif is_conv1d_weight(key):
            out[key] = np.ascontiguousarray(v.T).astype(config.dtype)     # Conv1D (in, out) -> (out, in)
        elif v.dtype.kind == "f":
            out[key] = v.astype(config.dtype)
        else:
            raise UnsupportedModelError(f"tensor {k!r} has dtype {v.dtype}; only float weights (and bitsandbytes' "
                                        "4-bit states) convert")
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"].copy()      # (V, C) the tied output layer, untied
    return out


def import_hf(folder, dtype: str | None = None) -> GPT:
    """A minilora GPT computing what `GPT2LMHeadModel.from_pretrained(folder)` computes.

    dtype: "float32" or "float64" (default: float64 if the checkpoint is, else float32; half precision is widened).
    A tied output layer (tie_word_embeddings, GPT-2's default) is copied from wte: the logits are the same, but
    minilora's lm_head is its own weight from then on. GPT-2's dropout is not carried (minilora's base has none; it
    matters only when training the base itself). A bitsandbytes 4-bit folder (quantization_config load_in_4bit)
    gives Linear4bit layers holding its codes and statistics exactly; 8-bit folders are refused."""
    hf, tensors = read_hf_folder(folder)
    qc = hf.get("quantization_config")
    four_bit = set()
    if qc is not None:
        if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") or qc.get("load_in_8bit"):
            raise UnsupportedModelError(f"{folder}: quantization_config {qc.get('quant_method')!r} "
                                        f"(load_in_8bit={qc.get('load_in_8bit')}): only bitsandbytes 4-bit folders "
                                        "convert")
        paths = {k.split(".weight.quant_state.")[0] for k in tensors if ".weight.quant_state.bitsandbytes__" in k}
        four_bit = {p if p.startswith(("transformer.", "lm_head")) else "transformer." + p for p in paths}
        if dtype not in (None, "float32"):
            raise UnsupportedModelError("a 4-bit folder imports in float32 (its states are float32)")
    float_dtypes = {v.dtype for k, v in tensors.items() if v.dtype.kind == "f" and ".weight." not in k}
    dtype = dtype or ("float64" if float_dtypes == {np.dtype("float64")} else "float32")
    config = gpt_config_from_hf(hf, dtype)
    tied = bool(hf.get("tie_word_embeddings", True))
    state = from_hf_state_dict(tensors, config, tied, four_bit)
    model = GPT(config)
    if four_bit:
        from minilora.peft.utils import quantize_model
        qt = {json_type for k in tensors if (json_type := _quant_type_of(k))}
        quantize_model(model, quant_type=qt.pop() if len(qt) == 1 else "nf4",
                       compress_statistics=bool(qc.get("bnb_4bit_use_double_quant")),
                       target_modules=sorted(four_bit), skip_modules=())
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise UnsupportedModelError(f"{folder}: the checkpoint lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}"
                                    f" ({len(missing)} tensor(s))")
    model.load_state_dict(state, strict=True)      # shapes checked against GPTConfig; ValueError names the tensor
    return model


def _quant_type_of(key: str) -> str | None:
    m = re.search(r"\.weight\.quant_state\.bitsandbytes__(\w+)$", key)
    return m.group(1) if m else None


def import_adapter(folder, out_dir, model: GPT | None = None) -> Path:
    """Write a PEFT adapter of transformers' GPT-2 (fan_in_fan_out true for Conv1D) as a minilora adapter folder
    (fan_in_fan_out false: minilora's Linear holds (out, in)); `modules_to_save` Conv1D weights are transposed.
    With `model` (e.g. import_hf's result) the adapter is checked against it first. Returns out_dir."""
    config, tensors = read_adapter(folder)
    if model is not None:
        _check_adapter_fits(folder, tensors, model)
    d = load_json(Path(folder) / ADAPTER_CONFIG)
    d["fan_in_fan_out"] = False
    out = {k: np.ascontiguousarray(v.T) if (".lora_" not in k and is_conv1d_weight(k[len(PREFIX):])) else v
           for k, v in tensors.items()}
    _, meta = load_safetensors(Path(folder) / ADAPTER_WEIGHTS)
    out_dir = Path(out_dir)
    save_safetensors(out_dir / ADAPTER_WEIGHTS, out, metadata=meta or {"format": "pt"})
    save_json(out_dir / ADAPTER_CONFIG, d)
    return out_dir

