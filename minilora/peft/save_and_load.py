"""PEFT's adapter files: `adapter_model.safetensors` + `adapter_config.json`, written and read without torch.

The tensors file holds, for every adapted module at dotted path P of the base model,

    base_model.model.P.lora_A.weight    A  (r, in_features)
    base_model.model.P.lora_B.weight    B  (out_features, r)
    base_model.model.P.lora_magnitude_vector    m  (out_features,)   DoRA adapters only (in memory
                                                                   `P.lora_magnitude_vector.<adapter>.weight`)

with metadata {"format": "pt"}. The adapter *name* is stripped from the keys (in memory PEFT calls them
`...lora_A.default.weight`), so one file can be loaded under any name. With bias="all" every bias is saved too
(`P.base_layer.bias` for an adapted module, `P.bias` elsewhere), with bias="lora_only" only the adapted modules'
biases, and modules in `modules_to_save` are saved whole (`base_model.model.lm_head.weight`). The scaling α/r lives
in the config, never in the weights, which is why a loader that ignores the config computes wrong outputs.

Loading follows `set_peft_model_state_dict` (PEFT `src/peft/utils/save_and_load.py`, strict=False): a shape
mismatch raises "size mismatch for <key>: ...", missing adapter keys give PEFT's warning "Found missing adapter
keys while loading the checkpoint" (or a ValueError with strict=True), unexpected keys are ignored and reported.
minilora also refuses non-finite or non-float weights (an integer header would reinterpret the bits) and an adapter
file with no LoRA tensors in it (PEFT #286: a 443-byte adapter with nothing inside).

Saving never loses the adapter already in the folder: both files are first written in full under temporary names,
then renamed into place, tensors first, then the config. A failed write (disk full, permissions) leaves the old
pair untouched. The tensors file records in its metadata a digest of the config fields that set the scaling but
no shape shows (lora_alpha, alpha_pattern, use_rslora), so a crash between the two renames, which would leave new
tensors beside an old lora_alpha (a scaling error no shape check can see), is refused at load time instead of
computing wrong outputs. Temporary files a killed save left behind are removed by the next save into that folder.
PEFT ignores the extra metadata and writes the two files without these guards.

Nothing is read or written outside the folder the caller names: adapter names are plain folder names
(`check_adapter_name`), and a sub-folder or file that is a symlink leading out of it is refused.
Mirrors PEFT `save_and_load.py`, `peft_model.py::save_pretrained/load_adapter`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections import namedtuple
from pathlib import Path

from minilora.backend import get_array_module
from minilora.io import load_safetensors, save_json, save_safetensors
from minilora.nn.lora import LoRALinear, check_adapter_name
from minilora.peft.config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig

PREFIX = "base_model.model."
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])
PENDING = ".new"                                     # ".<file>.new": a finished file waiting for its rename
CONFIG_DIGEST_KEY = "minilora_config_sha256"         # safetensors metadata: the scaling config the tensors belong to
# what a killed save can leave: ".<file>.new", and the atomic writer's ".<file>.<8 chars>.tmp" (also of a .new file)
_ORPHAN = re.compile(r"\.\.?(?:adapter_model\.safetensors|adapter_config\.json)(?:\.new(?:\.[a-z0-9_]{8}\.tmp)?"
                     r"|\.[a-z0-9_]{8}\.tmp)")


def adapter_dir(save_directory, adapter_name: str) -> Path:
    """PEFT's layout: the "default" adapter at the top level, any other in a sub-folder named after it."""
    d = Path(save_directory)
    return d if check_adapter_name(adapter_name) == "default" else d / adapter_name


def _inside(path: Path, folder: Path) -> bool:
    """True when `path`, symlinks followed, lies in `folder` (symlinks followed too)."""
    return path.resolve().is_relative_to(folder.resolve())


def save_target(save_directory, adapter_name: str) -> Path:
    """The folder one adapter is saved into, checked before anything is written: the save directory is a folder
    (or not there yet), and the adapter's sub-folder does not lead out of it through a symlink."""
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; save_pretrained writes a folder of adapter files")
    d = adapter_dir(root, adapter_name)
    if not _inside(d, root):
        raise ValueError(f"{d}: a symlink to {d.resolve()}, outside the save folder {root}; adapter files are only "
                         "written inside the folder you name (remove the link or save elsewhere)")
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d}: not a folder, cannot hold adapter {adapter_name!r}")
    return d


def config_digest(config: LoraConfig) -> str:
    """SHA-256 of the config fields that set the scaling s = lora_alpha / r (or / √r) and that no tensor shape
    shows (a changed r or rank_pattern is already caught as a size mismatch, with PEFT's message)."""
    d = config.to_saved_dict()
    keys = {k: d.get(k) for k in ("lora_alpha", "alpha_pattern")}
    keys["use_rslora"] = bool(d.get("use_rslora", False))
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def remove_orphans(folder: Path) -> None:
    """Delete the temporary files a killed save left in `folder` (only names of minilora's own temp pattern)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if _ORPHAN.fullmatch(p.name) and not p.is_dir():
                p.unlink(missing_ok=True)


def adapter_parameters(base_model, adapter_name: str, config: LoraConfig) -> dict:
    """{file key: Parameter} for one adapter: what save writes and what load fills (the same map both ways)."""
    out = {}
    for path, m in base_model.named_modules():
        if isinstance(m, LoRALinear) and adapter_name in m.lora_A:
            out[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[adapter_name].weight    # (r, in)
            out[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[adapter_name].weight    # (out, r)
            if adapter_name in m.lora_magnitude_vector:                               # DoRA's m, PEFT's key
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name].weight  # (out,)
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
    """Write one adapter and return its folder: both files in full under temporary names, then renamed into place
    (tensors, then config), so a failed save leaves the previous adapter in the folder loadable."""
    d = save_target(save_directory, adapter_name)
    state = get_peft_model_state_dict(base_model, adapter_name, config)
    if not any(".lora_A.weight" in k for k in state):
        raise ValueError(f"adapter {adapter_name!r} has no LoRA weights in this model; refusing to write an empty "
                         "adapter file (PEFT #286)")
    remove_orphans(d)
    tensors_new, config_new = d / f".{WEIGHTS_NAME}{PENDING}", d / f".{CONFIG_NAME}{PENDING}"
    try:
        save_safetensors(tensors_new, state, metadata={"format": "pt", CONFIG_DIGEST_KEY: config_digest(config)})
        save_json(config_new, config.to_saved_dict())
        os.replace(tensors_new, d / WEIGHTS_NAME)
        os.replace(config_new, d / CONFIG_NAME)         # last: the pair is committed
    finally:
        for p in (tensors_new, config_new):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return d


def read_adapter(directory) -> tuple[LoraConfig, dict]:
    """(config, tensors) of an adapter folder; clear errors for a missing, corrupt, mismatched or linked-out file."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such adapter directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            extra = " (PEFT's pickle format adapter_model.bin is not read: no pickle)" if name == WEIGHTS_NAME \
                and (d / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{d / name}: missing; an adapter folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}{extra}")
        if not _inside(d / name, d):
            raise ValueError(f"{d / name}: a symlink to {(d / name).resolve()}, outside the adapter folder {d}; "
                             "only files inside the folder are read (copy the file in instead)")
    config = LoraConfig.from_pretrained(d)
    tensors, meta = load_safetensors(d / WEIGHTS_NAME)    # CorruptFileError on a truncated or corrupt file
    if not any(k.endswith(".lora_A.weight") for k in tensors):
        raise ValueError(f"{d / WEIGHTS_NAME}: no '*.lora_A.weight' tensors in this file; it is not a LoRA adapter "
                         f"(keys: {sorted(tensors)[:6]})")
    stamp = meta.get(CONFIG_DIGEST_KEY)
    if stamp is not None and stamp != config_digest(config):
        raise ValueError(f"{d}: {WEIGHTS_NAME} was written with a different lora_alpha / alpha_pattern / "
                         f"use_rslora than {CONFIG_NAME} now holds: the two files come from a different "
                         "save (an interrupted save_pretrained, or a file copied or edited by hand); loading them "
                         "would scale the adapter wrongly. Save the adapter again")
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
    ints = [k for k in params if k in tensors and tensors[k].dtype.kind != "f"]
    if ints:
        k = ints[0]
        raise ValueError(f"{k}: dtype {tensors[k].dtype} in the adapter file ({len(ints)} such tensor(s)); adapter "
                         "weights are float (F16/BF16/F32/F64): the file is corrupt or not a LoRA adapter")
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
