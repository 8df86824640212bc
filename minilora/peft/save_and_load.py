"""PEFT's adapter files: `adapter_model.safetensors` + `adapter_config.json`, written and read without torch.

The tensors file holds, for every adapted module at dotted path P of the base model,

    base_model.model.P.lora_A.weight    A  (r, in_features)
    base_model.model.P.lora_B.weight    B  (out_features, r)

with metadata {"format": "pt"}. The adapter *name* is stripped from the keys (in memory PEFT calls them
`...lora_A.default.weight`), so one file can be loaded under any name. With bias="all" every bias is saved too
(`P.base_layer.bias` for an adapted module, `P.bias` elsewhere), with bias="lora_only" only the adapted modules'
biases, and modules in `modules_to_save` are saved whole (`base_model.model.lm_head.weight`). The scaling α/r lives
in the config, never in the weights, which is why a loader that ignores the config computes wrong outputs.

Loading follows `set_peft_model_state_dict` (PEFT `src/peft/utils/save_and_load.py`, strict=False): a shape
mismatch raises "size mismatch for <key>: ...", missing adapter keys give PEFT's warning "Found missing adapter
keys while loading the checkpoint" (or a ValueError with strict=True), unexpected keys are ignored and reported.
minilora also refuses non-finite weights and an adapter file with no LoRA tensors in it (PEFT #286: a 443-byte
adapter with nothing inside). Each file is written atomically (temp file + rename), tensors first, then the config,
so the config acts as the pair's commit marker: an old config that differs from the new one is deleted before the
tensors are written, and a crash between the two files leaves a folder without a config, which loading refuses
(instead of new tensors beside an old lora_alpha, a scaling error no shape check can see). Re-saving with an
unchanged config keeps the old one, so a crash then leaves a consistent pair. PEFT itself writes the two files
without this guard. Mirrors PEFT `save_and_load.py`, `peft_model.py::save_pretrained/load_adapter`.
"""
from __future__ import annotations

import warnings
from collections import namedtuple
from pathlib import Path

from minilora.backend import get_array_module
from minilora.io import CorruptFileError, load_json, load_safetensors, save_safetensors
from minilora.nn.lora import LoRALinear
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig

PREFIX = "base_model.model."
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


def adapter_dir(save_directory, adapter_name: str) -> Path:
    """PEFT's layout: the "default" adapter at the top level, any other in a sub-folder named after it."""
    d = Path(save_directory)
    return d if adapter_name == "default" else d / adapter_name


def adapter_parameters(base_model, adapter_name: str, config: LoraConfig) -> dict:
    """{file key: Parameter} for one adapter: what save writes and what load fills (the same map both ways)."""
    out = {}
    for path, m in base_model.named_modules():
        if isinstance(m, LoRALinear) and adapter_name in m.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[adapter_name].weight    # (r, in)
            out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[adapter_name].weight    # (out, r)
    if config.bias != "none":
        for path, m in base_model.named_modules():
            if isinstance(m, LoRALinear) and m.base_layer.bias is not None:
                out[f"{PREFIX}{path}.base_layer.bias"] = m.base_layer.bias
            elif (config.bias == "all" and not isinstance(m, LoRALinear) and not _inside_lora(base_model, path)
                  and getattr(m, "bias", None) is not None and hasattr(m.bias, "data")):
                out[f"{PREFIX}{path}.bias" if path else f"{PREFIX}bias"] = m.bias
    for path, m in base_model.named_modules():
        saved = getattr(m, "modules_to_save", None)
        if saved is not None and adapter_name in saved:
            for name, p in saved[adapter_name].named_parameters():
                out[f"{PREFIX}{path}.{name}"] = p
    return out


def _inside_lora(base_model, path: str) -> bool:
    """True for the base_layer of a LoRA wrapper (its bias is saved under the wrapper's name)."""
    parent = path.rpartition(".")[0]
    return path.endswith("base_layer") and isinstance(base_model.get_submodule(parent), LoRALinear)


def get_peft_model_state_dict(base_model, adapter_name: str, config: LoraConfig) -> dict:
    """{key: host-or-device array} exactly as written to adapter_model.safetensors (adapter name stripped)."""
    return {k: p.data for k, p in adapter_parameters(base_model, adapter_name, config).items()}


def save_adapter(base_model, config: LoraConfig, save_directory, adapter_name: str = "default") -> Path:
    """Write one adapter (tensors first, then the config; each file atomically) and return its folder."""
    state = get_peft_model_state_dict(base_model, adapter_name, config)
    if not any(".lora_A.weight" in k for k in state):
        raise ValueError(f"adapter {adapter_name!r} has no LoRA weights in this model; refusing to write an empty "
                         "adapter file (PEFT #286)")
    d = adapter_dir(save_directory, adapter_name)
    old_config = d / CONFIG_NAME
    if old_config.is_file():
        try:
            stale = load_json(old_config) != config.to_saved_dict()
        except CorruptFileError:
            stale = True
        if stale:                                      # it would not describe the new tensors: remove it first
            old_config.unlink()
    save_safetensors(d / WEIGHTS_NAME, state, metadata={"format": "pt"})
    config.save_pretrained(d)                          # last: a folder with a config holds a finished save
    return d


def read_adapter(directory) -> tuple[LoraConfig, dict]:
    """(config, tensors) of an adapter folder; clear errors for a missing, corrupt or incomplete file."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such adapter directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            extra = " (PEFT's pickle format adapter_model.bin is not read: no pickle)" if name == WEIGHTS_NAME \
                and (d / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{d / name}: missing; an adapter folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}{extra}")
    config = LoraConfig.from_pretrained(d)
    tensors, _ = load_safetensors(d / WEIGHTS_NAME)    # CorruptFileError on a truncated or corrupt file
    if not any(k.endswith(".lora_A.weight") for k in tensors):
        raise ValueError(f"{d / WEIGHTS_NAME}: no '*.lora_A.weight' tensors in this file; it is not a LoRA adapter "
                         f"(keys: {sorted(tensors)[:6]})")
    return config, tensors


def set_peft_model_state_dict(base_model, tensors: dict, adapter_name: str, config: LoraConfig,
                              strict: bool = False) -> LoadResult:
    """Copy file tensors into the adapter's Parameters in place (cast to each Parameter's dtype and device).

    Everything is checked before anything is written, so a failed load leaves the model unchanged."""
    params = adapter_parameters(base_model, adapter_name, config)
    bad = [k for k in params if k in tensors and tuple(tensors[k].shape) != tuple(params[k].data.shape)]
    if bad:                                 # reported in the model's module order, first mismatch in full
        k = bad[0]
        raise ValueError(f"size mismatch for {k}: copying a param with shape {tuple(tensors[k].shape)} from "
                         f"checkpoint, the shape in current model is {tuple(params[k].data.shape)} ({len(bad)} "
                         f"mismatched tensor(s); the config says r={config.r}: check that adapter_config.json's r "
                         "matches the file)")
    for k, v in tensors.items():
        if k in params:
            xp = get_array_module(v)
            bad = ~xp.isfinite(v)
            n_bad = int(bad.sum())
            if n_bad:
                first = tuple(int(i) for i in xp.argwhere(bad)[0])
                raise ValueError(f"{k}: {n_bad} non-finite value(s) (NaN/Inf) in the adapter, first at index {first}")
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    if missing and strict:
        raise ValueError(f"missing adapter keys while loading the checkpoint (strict=True): {missing}")
    for k, v in tensors.items():
        if k in params:
            p = params[k]
            xp = get_array_module(p.data)
            p.data[...] = xp.asarray(v, dtype=p.data.dtype)       # in place: optimizer states keep pointing here
    if missing:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}.", UserWarning,
                      stacklevel=3)
    return LoadResult(missing, unexpected)
