"""get_peft_model and PeftModel: freeze a base model, swap its target Linear layers for LoRA wrappers, train, save.

Injection is one loop over the model's dotted module names (PEFT `tuners_utils.py::BaseTuner.inject_adapter`):

    for name in targets:                       # chosen by config.check_target_module_exists
        base = model.get_submodule(name)       # Linear (out, in) or Linear4bit (NF4)
        model.set_submodule(name, LoRALinear(base, ...))   # or QLoRALinear around a Linear4bit

after which every base parameter has requires_grad=False and only the active adapter's A (r, in) and B (out, r) are
trainable. Because GPT calls its children through attributes in forward *and* backward, the swap changes both
passes. The wrapper tree matches PEFT's, so parameter names match too:

    PeftModel.base_model (LoraModel) .model (the user's model) .transformer.h.0.attn.c_attn.base_layer.weight
                                                              ...c_attn.lora_A.default.weight   (r, in)

Mirrors PEFT `src/peft/mapping_func.py::get_peft_model`, `src/peft/peft_model.py::PeftModel`,
`src/peft/tuners/lora/model.py::LoraModel` and `src/peft/utils/other.py::ModulesToSaveWrapper`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings

from minilora.backend import default_rng
from minilora.nn.layers import Linear
from minilora.nn.linear4bit import Linear4bit
from minilora.nn.lora import LoRALinear, QLoRALinear, check_adapter_name
from minilora.nn.module import Module, ModuleDict
from minilora.peft import save_and_load as sl
from minilora.peft.config import (
    LoraConfig,
    find_targets,
    module_name_matches,
    resolve_target_modules,
    warn_fan_in_fan_out,
)

LORA_PREFIX = "lora_"                                # PEFT_TYPE_TO_PREFIX_MAPPING[LORA]: the parameter-name prefix


class ModulesToSaveWrapper(Module):
    """A module trained and saved whole (PEFT's `modules_to_save`, e.g. a classifier head): the original is kept
    frozen and each adapter trains its own copy, so disabling or switching adapters restores the original."""

    def __init__(self, module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = ModuleDict()
        self.active_adapter = None
        self.disable_adapters = False
        self.update(adapter_name)

    def __getattr__(self, name):                   # `wrapper.weight` etc. read the module in use, as in PEFT
        if name.startswith("_") or "original_module" not in vars(self):
            raise AttributeError(name)
        return getattr(self._active(), name)

    def update(self, adapter_name: str):
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad, p.grad = True, None
        self.modules_to_save[adapter_name] = copy_
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def _active(self):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        self._used = (self._active(),)             # backward must go through the module the forward used
        return self._used[0](*args, **kwargs)       # (a tuple, so it is not registered as a child module)

    def backward(self, dout):
        return self._used[0].backward(dout)


class LoraModel(Module):
    """The tuner: holds the wrapped model (`.model`), the configs by adapter name, and injects/merges/unloads."""

    def __init__(self, model, config: LoraConfig, adapter_name: str = "default", rng=None):
        super().__init__()
        self.model = model
        self.peft_config = {}
        self.active_adapter = adapter_name
        self.inject_adapter(config, adapter_name, rng)
        self._mark_trainable()

    # ---- injection --------------------------------------------------------------------------------------------
    def lora_layers(self):
        """(dotted name in .model, LoRA wrapper) for every adapted layer."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoRALinear)]

    def inject_adapter(self, config: LoraConfig, adapter_name: str, rng=None) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"expected a LoraConfig, got {type(config).__name__}")
        _check_new_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        # modules inside a wrapper (a LoRA layer's base_layer, a saved module's copies) are never targets themselves
        wrappers = [n for n, m in self.model.named_modules() if isinstance(m, (LoRALinear, ModulesToSaveWrapper))]
        names = [n for n, _ in self.model.named_modules() if n and not any(n.startswith(w + ".") for w in wrappers)]
        mods = {n: self.model.get_submodule(n) for n in names}
        # layers LoRA can wrap (PEFT: torch.nn.Linear, Conv1D, bnb.nn.Linear4bit, ...) and ones it already wraps
        linear = [n for n in names if isinstance(mods[n], (Linear, Linear4bit, LoRALinear))]
        config = dataclasses.replace(config, target_modules=resolve_target_modules(config, self.model, names, linear))
        warn_fan_in_fan_out(config)
        targets = find_targets(config, names)
        bad = [n for n in targets if n not in linear]
        if bad:
            raise ValueError(f"Target module {bad[0]!r} ({type(mods[bad[0]]).__name__}) is not supported. "
                             "Currently, only Linear and Linear4bit layers can get a LoRA adapter "
                             f"({len(bad)} unsupported match(es): {bad[:5]})")
        for name in targets:                           # check every layer before changing any
            base = mods[name].base_layer if isinstance(mods[name], LoRALinear) else mods[name]
            r, lim = config.r_for(name), min(base.in_features, base.out_features)
            if r > lim:
                raise ValueError(f"r={r} is larger than min(in_features, out_features) = "
                                 f"min({base.in_features}, {base.out_features}) for {name!r}: B A would have rank "
                                 f"at most {lim}, so the extra rank is wasted")
        quantized = [n for n in targets if isinstance(getattr(mods[n], "base_layer", mods[n]), Linear4bit)]
        if config.init_lora_weights == "loftq" and quantized:   # LoftQ needs W0, which a 4-bit layer no longer has
            raise TypeError(f"init_lora_weights='loftq' quantizes the float model itself, but {quantized[0]!r} is "
                            "already 4-bit: call get_peft_model on the float model, without quantize_model (PEFT: "
                            "\"you should not pass a quantized model in this case\")")
        saved = [n for n in names if module_name_matches(n, list(config.modules_to_save or []))]
        four = [n for n in saved if isinstance(mods[n], Linear4bit)]
        if four:
            raise ValueError(f"modules_to_save cannot train a 4-bit layer ({four[0]!r}: its codes are frozen); keep "
                             "that module in float (quantize_model's skip_modules) or target it with LoRA instead")
        explicit_rng = rng is not None
        rng = default_rng(0) if rng is None else rng       # one seeded stream for all new layers: reproducible
        for name in targets:
            m = mods[name]
            kwargs = dict(r=config.r_for(name), lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
                          init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                          use_dora=config.use_dora, loftq_config=config.loftq_config)
            if isinstance(m, LoRALinear):
                if explicit_rng:
                    m.rng = rng                            # the layer draws A (and dropout masks) from it
                m.update_layer(adapter_name, **kwargs)
            else:
                cls = QLoRALinear if isinstance(m, Linear4bit) else LoRALinear
                self.model.set_submodule(name, cls(m, adapter_name=adapter_name, rng=rng, **kwargs))
        for path in saved:
            m = mods[path]
            if isinstance(m, ModulesToSaveWrapper):
                m.update(adapter_name)
            else:
                self.model.set_submodule(path, ModulesToSaveWrapper(m, adapter_name))
        self.peft_config[adapter_name] = config

    def _mark_trainable(self) -> None:
        """Freeze everything but the active adapter (PEFT `_mark_only_adapters_as_trainable`), bias per config."""
        for p in self.model.parameters():
            p.requires_grad = False
        name = self.active_adapter
        config = self.peft_config.get(name)
        if config is None or config.inference_mode:
            return
        for _, m in self.lora_layers():
            if name in m.lora_A:
                m.lora_A[name].weight.requires_grad = m.lora_B[name].weight.requires_grad = True
                if name in m.lora_magnitude_vector:                 # DoRA's m trains with A and B (PEFT)
                    m.lora_magnitude_vector[name].weight.requires_grad = True
        for _, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save:
                for p in m.modules_to_save[name].parameters():
                    p.requires_grad = True
        if config.bias == "all":
            for n, p in self.model.named_parameters():
                if n == "bias" or n.endswith(".bias"):
                    p.requires_grad = True
        elif config.bias == "lora_only":
            for _, m in self.lora_layers():
                if getattr(m.base_layer, "bias", None) is not None:
                    m.base_layer.bias.requires_grad = True

    # ---- adapters -------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        for _, m in self.lora_layers():
            if adapter_name in m.lora_A:
                m.set_adapter(adapter_name)
            else:                                   # this layer lacks the adapter: it runs its base alone (PEFT)
                if m.merged_adapters:
                    m.unmerge()
                m.active_adapters = [adapter_name]
        for _, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper):
                m.active_adapter = adapter_name
        self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if self.active_adapter == adapter_name:           # switch first, so no layer deletes its active adapter
            remaining = [n for n in self.peft_config if n != adapter_name]
            if remaining:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.", UserWarning, stacklevel=3)
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = None
        for _, m in self.lora_layers():
            if adapter_name in m.lora_A:
                if adapter_name in m.merged_adapters:
                    m.unmerge()
                m.delete_adapter(adapter_name)
        for _, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
                del m.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        self._mark_trainable()

    def _enable_adapter_layers(self, enabled: bool) -> None:
        for _, m in self.model.named_modules():
            if isinstance(m, LoRALinear):
                if not enabled and m.merged_adapters:
                    m.unmerge()                    # a merged layer must unmerge to run the base alone (PEFT)
                m.disable_adapters = not enabled
            elif isinstance(m, ModulesToSaveWrapper):
                m.disable_adapters = not enabled

    # ---- unloading ------------------------------------------------------------------------------------------
    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None):
        for name, m in list(self.model.named_modules()):
            if isinstance(m, LoRALinear):
                if merge:
                    names = [self.active_adapter] if adapter_names is None else list(adapter_names)
                    todo = [n for n in names if n in m.lora_A and n not in m.merged_adapters]
                    if todo:
                        m.merge(safe_merge=safe_merge, adapter_names=todo)
                elif m.merged_adapters:
                    m.unmerge()
                self.model.set_submodule(name, m.base_layer)
            elif isinstance(m, ModulesToSaveWrapper):
                self.model.set_submodule(name, m._active() if merge else m.original_module)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """Merge W += s·B A into every base layer and return the plain model (LoRA wrappers removed).

        A 4-bit base is dequantized, added to and re-quantized, which changes outputs slightly (QLoRALinear warns)."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self):
        """Remove every LoRA wrapper without merging (unmerging merged layers first): the original base model."""
        return self._unload(merge=False)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return self.model.backward(*args, **kwargs)


class PeftModel(Module):
    """What `get_peft_model` returns: call it like the base model; train, switch, merge and save its adapters."""

    def __init__(self, model, peft_config: LoraConfig, adapter_name: str = "default", rng=None):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("the model is already a PeftModel; use add_adapter to add another adapter")
        self.base_model = LoraModel(model, peft_config, adapter_name, rng)
        self.training = model.training
        self._load_results = {}

    # forward everything we don't define to the wrapped model (PEFT does the same)
    def __getattr__(self, name):
        if name in ("base_model", "__setstate__", "__deepcopy__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base_model.model, name)

    @property
    def peft_config(self) -> dict:
        return self.base_model.peft_config

    @property
    def active_adapter(self):
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self):
        return self.base_model.model

    # ---- the passes -------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """`logits, loss = peft_model(idx, targets)`: the base model's forward, LoRA layers included."""
        return self.base_model.model(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return self.base_model.model.backward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    # ---- counting ---------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a 4-bit weight counts as its logical out·in parameters, as PEFT does."""
        trainable = total = 0
        for m in self.modules():
            for _, p in m._named_local_parameters():
                n = p.numel()
                if isinstance(m, Linear4bit) and p is m.weight:
                    n = m.in_features * m.out_features         # packed: 2 codes per byte
                total += n
                trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ---- adapters ---------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, rng=None) -> None:
        """Inject a second adapter next to the first; it stays inactive (and frozen) until set_adapter."""
        self.base_model.inject_adapter(peft_config, adapter_name, rng)
        self.base_model.set_adapter(self.active_adapter)   # re-activate the current one in every layer

    def set_adapter(self, adapter_name: str) -> None:
        """Make one adapter active; only its weights are trainable (unless loaded with is_trainable=False)."""
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """`with model.disable_adapter(): ...` runs the frozen base model alone (merged layers unmerge first)."""
        self.base_model._enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model._enable_adapter_layers(True)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self):
        return self.base_model.unload()

    # ---- files ------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters=None, **_ignored) -> None:
        """Write PEFT's adapter folder(s): "default" at the top, other adapters in sub-folders named after them.

        Every name and target folder is checked before the first file is written."""
        if isinstance(selected_adapters, str):
            raise TypeError(f"selected_adapters must be a list of adapter names, got the str {selected_adapters!r}; "
                            f"pass [{selected_adapters!r}]")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ValueError("no adapter to save: this model has none left (deleted?) or selected_adapters is empty; "
                             "add_adapter or load_adapter one first")
        for name in names:
            check_adapter_name(name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                             f"are {list(self.peft_config)} - got {unknown}.")
        for name in names:
            sl.save_target(save_directory, name)
        for name in names:
            sl.save_adapter(self.base_model.model, self.peft_config[name], save_directory, name)

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        strict: bool = False, rng=None) -> PeftModel:
        """Wrap `model` with the adapter saved in folder `model_id` (ours or PEFT's).

        is_trainable=False (PEFT's default) freezes the adapter and puts the model in eval mode. strict=True turns
        PEFT's missing-keys warning into a ValueError."""
        _check_new_adapter_name(adapter_name)
        config, tensors = sl.read_adapter(model_id)
        config.inference_mode = not is_trainable
        with _unchanged_on_failure(model):             # a failed load leaves the caller's model as it was
            pm = cls(model, config, adapter_name, rng=rng)
            pm._load_results[adapter_name] = sl.set_peft_model_state_dict(pm.base_model.model, tensors,
                                                                          adapter_name, config, strict=strict)
        if not is_trainable:
            pm.eval()
        return pm

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, strict: bool = False, rng=None):
        """Load another adapter folder under `adapter_name` (inactive until set_adapter); returns the load result
        (missing_keys, unexpected_keys)."""
        _check_new_adapter_name(adapter_name)
        config, tensors = sl.read_adapter(model_id)
        config.inference_mode = not is_trainable
        try:
            with _unchanged_on_failure(self.base_model.model):   # no wrapper left on newly targeted layers
                self.add_adapter(adapter_name, config, rng=rng)
                res = sl.set_peft_model_state_dict(self.base_model.model, tensors, adapter_name, config,
                                                   strict=strict)
        except Exception:
            if adapter_name in self.peft_config:            # leave the model as it was before the failed load
                self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()
        self._load_results[adapter_name] = res
        return res


def _check_new_adapter_name(name) -> None:
    """A plain folder name (see check_adapter_name); PEFT's warning for a name inside its parameter prefix."""
    check_adapter_name(name)
    if name in LORA_PREFIX:
        warnings.warn(f"Adapter name {name} should not be contained in the prefix {LORA_PREFIX}. PEFT may then "
                      "reinitialize the adapter weights when it loads them (minilora does not).", UserWarning,
                      stacklevel=4)


@contextlib.contextmanager
def _unchanged_on_failure(model):
    """On an exception, put back every module of `model` that was replaced, and each parameter's requires_grad and
    each module's training flag, then re-raise: a failed load changes nothing in the caller's model."""
    modules = list(model.named_modules())              # parents before children
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for _, m in modules]
    try:
        yield
    except BaseException:
        for name, m in modules:
            if name and model.get_submodule(name) is not m:
                model.set_submodule(name, m)
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad = flag
        for m, mode in modes:
            m.training = mode
        raise


def get_peft_model(model, peft_config: LoraConfig, adapter_name: str = "default", rng=None) -> PeftModel:
    """Freeze `model`, wrap its target layers with LoRA, return a PeftModel (PEFT's get_peft_model).

    rng (minilora only): a `minilora.backend.default_rng(seed)` generator for A's initialisation; PEFT uses torch's
    global generator instead."""
    return PeftModel(model, peft_config, adapter_name, rng=rng)
