"""LoraConfig and the rules that decide which modules get an adapter: Hugging Face PEFT's, field for field.

A LoRA adapter replaces a frozen linear layer y = x W0ᵀ + b by

    y = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ,     A (r, in_features), B (out_features, r),
    s = lora_alpha / r                        (or lora_alpha / √r with use_rslora, arXiv 2312.03732)

and this file holds everything that is *configuration*: r, alpha, dropout, which modules to adapt, and how the
config travels in `adapter_config.json`. The matching rules are PEFT's `check_target_module_exists`
(`src/peft/tuners/tuners_utils.py`), checked in this order:

1. `exclude_modules` wins: a str is a full regex match, a list matches exactly or by `name.endswith("." + item)`.
2. `target_modules` as a str: `re.fullmatch(pattern, full_dotted_name)`.
3. `target_modules` as a list: exact match, or `name.endswith("." + item)` ("c_attn" matches
   "transformer.h.0.attn.c_attn", never "...c_attn_extra").
4. `layers_to_transform` (+ `layers_pattern`) keeps only the listed layer indices (list targets only).
5. `"all-linear"` means every Linear except the output layer `lm_head`; `None` falls back to a per-architecture
   table (PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: gpt2 → ["c_attn"]).

Mirrors `src/peft/tuners/lora/config.py` (LoraConfig), `src/peft/config.py` (to_dict/from_pretrained) and
`src/peft/utils/constants.py` (default targets) of PEFT 0.21.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from minilora.io import load_json, save_json
from minilora.nn.lora import check_loftq_config, check_lora_args

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT's defaults for `target_modules=None`, keyed by transformers' `model_type` (a subset of constants.py).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = {
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
# minilora's own model classes, mapped to the transformers model_type whose module names they copy.
MODEL_TYPE_OF_CLASS = {"GPT": "gpt2"}

TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Keys written to adapter_config.json: only those every PEFT since 0.4 understands (docs/lora.md §9.4; an older PEFT
# raises "unexpected keyword argument" on newer keys). use_rslora (0.8) is written only when it is true, so a PEFT
# too old to apply √r scaling refuses the file instead of silently computing wrong outputs.
SAVED_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
              "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "modules_to_save", "init_lora_weights",
              "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")
# Required in a file we load. PEFT itself needs only peft_type and silently defaults the rest; a missing r or
# lora_alpha is exactly how loaders compute wrong outputs (vllm #6909), so minilora refuses such a file.
REQUIRED_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")
# Keys newer PEFT writes that do not change the forward pass, whatever their value.
_HARMLESS_FOREIGN_KEYS = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
                          "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying"}


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig (arXiv 2310.08659): pass it as LoraConfig(init_lora_weights="loftq", loftq_config=...).

    loftq_bits: the base's bits (4: NF4; PEFT's 8-bit variant is not implemented here). loftq_iter: T, the number of
    alternations Q = NF4(W0 − s·B A), s·B A = rank-r SVD of W0 − Q (`minilora.nn.lora.loftq_factors`)."""
    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class LoraConfig:
    """PEFT's LoraConfig: same field names, same defaults, same validation (bad values raise ValueError)."""
    r: int = 8
    lora_alpha: float = 8
    target_modules: list | str | None = None
    exclude_modules: list | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list | None = None
    init_lora_weights: bool | str = True
    loftq_config: LoftQConfig | dict = field(default_factory=dict)
    layers_to_transform: list | int | None = None
    layers_pattern: list | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: str | None = "CAUSAL_LM"
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = "LORA"

    def __post_init__(self):
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)   # PEFT's messages
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.init_lora_weights == "loftq":          # PEFT keeps the sub-config as a dict
            self.loftq_config = check_loftq_config(self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          UserWarning, stacklevel=3)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"Requested bias: {self.bias!r}, is not implemented; choose 'none', 'all' or 'lora_only'")
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type {self.peft_type!r} is not supported: minilora implements only 'LORA'")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type {self.task_type!r} is not one of PEFT's task types {TASK_TYPES}")
        # PEFT stores list targets as a set; we keep a duplicate-free list so adapter_config.json is stable.
        self.target_modules = _dedup(self.target_modules)
        self.exclude_modules = _dedup(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        for name, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pat, dict):
                raise ValueError(f"`{name}` must be a dict of module-name pattern -> value, got {pat!r}")
            kind = "integer" if name == "rank_pattern" else "number"
            for k, v in pat.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf") \
                        or (kind == "integer" and int(v) != v):
                    raise ValueError(f"`{name}[{k!r}]` = {v!r} must be a positive {kind}")
        for name, pattern, used_as in _regexes(self):
            try:
                re.compile(used_as)
            except (re.error, TypeError) as e:
                raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regular expression ({e}); escape "
                                 "literal characters with re.escape") from None

    @property
    def is_prompt_learning(self) -> bool:  # PEFT API; LoRA is never prompt learning
        return False

    # ---- per-module values (PEFT: rank_pattern / alpha_pattern via utils/other.py::get_pattern_key) -------------
    def r_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # ---- adapter_config.json -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """All fields, as PEFT's `PeftConfig.to_dict()`."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_saved_dict(self) -> dict:
        """What `save_pretrained` writes: long-standing keys only, inference_mode true, use_rslora only if true."""
        d = self.to_dict()
        out = {k: d[k] for k in SAVED_KEYS}
        out["inference_mode"] = True
        if self.use_rslora:
            out["use_rslora"] = True
        if self.use_dora:                   # PEFT >= 0.9 reads it; an older PEFT refuses the file, as it should
            out["use_dora"] = True
        if self.init_lora_weights == "loftq":   # PEFT >= 0.7; loading re-runs LoftQ on the float base (deterministic)
            out["loftq_config"] = dict(self.loftq_config)
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> LoraConfig:
        """Build a config from a dict read from adapter_config.json (PEFT's or ours), refusing what we can't honour.

        Missing required keys -> ValueError naming them. Keys a newer PEFT writes are dropped when they are at their
        neutral value (None/False/{}/[]); a key that would change the outputs (use_dora, lora_bias, ...) -> ValueError.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"{source}: adapter config is missing required key(s) {missing}; "
                             f"a LoRA adapter_config.json needs at least {list(REQUIRED_KEYS)}")
        if d["peft_type"] != "LORA":
            raise ValueError(f"{source}: peft_type is {d['peft_type']!r}, but minilora loads only LORA adapters")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k in _HARMLESS_FOREIGN_KEYS or _is_neutral(v):
                continue
            else:
                raise ValueError(f"{source}: {k}={v!r} is a PEFT feature minilora does not implement; loading the "
                                 "adapter without it would give different outputs")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save_pretrained(self, save_directory) -> None:
        save_json(Path(save_directory) / CONFIG_NAME, self.to_saved_dict())

    @classmethod
    def from_pretrained(cls, directory) -> LoraConfig:
        path = Path(directory) / CONFIG_NAME
        return cls.from_dict(load_json(path), source=str(path))


def _regexes(config):
    """(field, pattern, the regex the matching rules build from it) for every pattern a config holds."""
    for name in ("target_modules", "exclude_modules"):
        p = getattr(config, name)
        if isinstance(p, str):
            yield name, p, p
    for name in ("rank_pattern", "alpha_pattern"):
        for p in getattr(config, name):
            yield name, p, rf"(.*\.)?({p})$" if isinstance(p, str) else p
    lp = config.layers_pattern
    for p in [lp] if isinstance(lp, str) else lp or []:
        yield "layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." if isinstance(p, str) else p


def _dedup(x):
    if x is None or isinstance(x, str):
        return x
    if not isinstance(x, (list, tuple, set)):
        raise ValueError(f"target_modules/exclude_modules must be a list of names, a regex str or None; got {x!r}")
    seen = []
    for t in x:
        if not isinstance(t, str):
            raise ValueError(f"module names must be str, got {t!r} in {x!r}")
        if t not in seen:
            seen.append(t)
    return sorted(seen) if isinstance(x, set) else seen


def _copy(v):
    return list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v


def _is_neutral(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def _pattern_key(patterns: dict, module_name: str):
    """The first pattern p with re.match(r"(.*\\.)?(p)$", module_name), as PEFT's get_pattern_key; else None."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module_name):
            return p
    return None


# ---- target-module matching --------------------------------------------------------------------------------------
def module_name_matches(key: str, spec) -> bool:
    """PEFT's rule for one full dotted module name: a str is a full regex match, a list (or set, tuple) matches
    exactly or by the suffix "." + item ("c_attn" matches "transformer.h.0.attn.c_attn")."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + s) for s in spec)


def check_exclude(config: LoraConfig, key: str) -> bool:
    """True when `key` (a full dotted module name) is excluded by exclude_modules or modules_to_save."""
    if config.exclude_modules and module_name_matches(key, config.exclude_modules):
        return True
    # never put an adapter inside a module that is trained and saved whole (PEFT: conflicting behaviour)
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in (config.modules_to_save or []))


def check_target_module_exists(config: LoraConfig, key: str) -> bool:
    """PEFT's matching rule for one full dotted module name (rules 1-4 of the module docstring)."""
    if check_exclude(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str) or key in targets:
        return module_name_matches(key, targets)
    if not module_name_matches(key, targets):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    # the layer index is the first number segment after `layers_pattern` (or after any first segment)
    patterns = config.layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    if m is None:
        return False
    idx = int(m.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def resolve_target_modules(config: LoraConfig, model, module_names, linear_names, output_layer="lm_head"):
    """Turn None / "all-linear" into an explicit list, as PEFT does before injecting (and before saving).

    module_names: every full dotted module name of the model; linear_names: the ones that are Linear/Linear4bit."""
    t = config.target_modules
    if t is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None) \
            or MODEL_TYPE_OF_CLASS.get(type(model).__name__)
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError("Please specify `target_modules` in `peft_config` "
                             f"(no default targets known for model type {model_type!r})")
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    if isinstance(t, str) and t.lower() == "all-linear":
        names = sorted({n.rsplit(".", 1)[-1] for n in linear_names if n.rsplit(".", 1)[-1] != output_layer})
        if not names:
            raise ValueError("target_modules='all-linear' found no Linear layer other than the output layer")
        return names
    return t


def find_targets(config: LoraConfig, module_names) -> list:
    """Full dotted names of the modules the config adapts; raises PEFT's error when a target list matches nothing."""
    hits = [n for n in module_names if n and check_target_module_exists(config, n)]
    if not hits:
        excluded = [n for n in module_names if n and check_exclude(config, n)]
        if excluded and any(_matches_ignoring_exclude(config, n) for n in excluded):
            raise ValueError("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                             "`exclude_modules` and `modules_to_save` configuration.")
        some = ", ".join(n for n in list(module_names)[:12] if n)
        msg = (f"Target modules {config.target_modules} not found in the base model. "
               "Please check the target modules and try again.")
        if config.layers_to_transform is not None:
            msg += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
        if config.layers_pattern is not None:
            msg += f" You also specified 'layers_pattern': {config.layers_pattern}."
        raise ValueError(msg + f" (module names in this model include: {some}, ...)")
    return hits


def _matches_ignoring_exclude(config, key):
    return check_target_module_exists(dataclasses.replace(config, exclude_modules=None, modules_to_save=None), key)


def warn_fan_in_fan_out(config: LoraConfig) -> None:
    """Our Linear stores W as (out, in) like torch.nn.Linear, so fan_in_fan_out=True is wrong; PEFT warns and resets."""
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `Linear`, which stores W as "
                      "(out_features, in_features). Setting fan_in_fan_out to False.", UserWarning, stacklevel=3)
        config.fan_in_fan_out = False
