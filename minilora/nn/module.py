"""Module: a tiny `torch.nn.Module` (parameters, children, dotted names, train/eval, state_dict) without autograd.

There is no graph. Each layer's `forward` stores what its `backward` needs (the llm.c "cache") and `backward(dout)`
returns the gradient for its input while accumulating into its Parameters' `.grad`, then frees the cache (one
backward per forward, as autograd frees its saved tensors). A parent calls its children
*through the attribute* (`self.attn.backward(...)`) in both directions, so replacing a child with
`set_submodule("transformer.h.0.attn.c_attn", LoRALinear(...))` (what PEFT's injection does) changes the forward
and the backward at once.

Names follow PyTorch: children are plain attributes, `named_modules()` yields ("", self) first, parameter names are
dotted paths (`transformer.h.0.attn.c_attn.weight`), `ModuleList` children are called "0", "1", ..., and
`state_dict()` maps those names to arrays. Mirrors `torch/nn/modules/module.py` and `container.py`.
"""
from __future__ import annotations

from collections import namedtuple

from minilora.backend import get_array_module
from minilora.nn.parameter import Parameter

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class: subclasses set Parameters and child Modules as attributes and write forward/backward."""

    def __init__(self):
        self.training = True

    # ---- the two passes -------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- tree walking ---------------------------------------------------------------------------------------
    def _named_children(self):
        """(name, child) for the direct children; attributes in assignment order, as PyTorch registers them."""
        for k, v in vars(self).items():
            if isinstance(v, Module):
                yield k, v

    def _named_local_parameters(self):
        """(name, Parameter) owned directly by this module (not by its children)."""
        for k, v in vars(self).items():
            if isinstance(v, Parameter):
                yield k, v

    def named_children(self):
        yield from self._named_children()

    def children(self):
        for _, m in self._named_children():
            yield m

    def named_modules(self, prefix: str = "", _seen=None):
        """Every module in the tree as (dotted path, module), the root first as ("", self)."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self._named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = ""):
        """Every Parameter as (dotted name, Parameter), each object once (frozen ones included, as in PyTorch)."""
        seen = set()
        for path, mod in self.named_modules(prefix):
            for name, p in mod._named_local_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{path}.{name}" if path else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, target: str) -> Module:
        """The module at a dotted path ("" is self); AttributeError naming the missing part otherwise."""
        if target == "":
            return self
        mod = self
        walked = []
        for part in target.split("."):
            child = dict(mod._named_children()).get(part)
            if child is None:
                where = ".".join(walked) or "the root module"
                raise AttributeError(f"{type(mod).__name__} at {where!r} has no submodule {part!r} "
                                     f"(path {target!r}); its children are {[n for n, _ in mod._named_children()]}")
            mod = child
            walked.append(part)
        return mod

    def set_submodule(self, target: str, module: Module) -> None:
        """Replace the child at a dotted path (it must exist) by `module`, e.g. a Linear by a LoRALinear."""
        if not isinstance(module, Module):
            raise TypeError(f"set_submodule expects a Module, got {type(module).__name__}")
        if target == "":
            raise ValueError("cannot replace the root module with set_submodule")
        parent_path, _, name = target.rpartition(".")
        parent = self.get_submodule(parent_path)
        parent.get_submodule(name)                               # raises a clear error if there is no such child
        parent._set_child(name, module)

    def _set_child(self, name, module):
        setattr(self, name, module)

    # ---- modes and gradients --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        """Drop every gradient (grad = None, PyTorch's set_to_none=True default)."""
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    # ---- state dict -----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        """Arrays a module saves besides its Parameters (Linear4bit: its QuantState, in bitsandbytes' keys)."""
        return {}

    def _check_extra_state(self, state: dict) -> None:
        """Raise ValueError if `_load_extra_state(state)` would; run for every module before anything is written."""

    def _load_extra_state(self, state: dict) -> None:
        """Take back what `_extra_state` gave (same local keys); validate and raise ValueError on a mismatch."""

    def state_dict(self) -> dict:
        """{dotted name: array} for every parameter (the arrays themselves, not copies, as PyTorch), plus any
        extra state (a 4-bit layer's quantization statistics, under bitsandbytes' key names)."""
        sd = {name: p.data for name, p in self.named_parameters()}
        for path, mod in self.named_modules():
            for k, v in mod._extra_state().items():
                sd[f"{path}.{k}" if path else k] = v
        return sd

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the parameters in place (cast to each parameter's dtype).

        strict=True raises ValueError listing missing and unexpected keys; a shape mismatch always raises
        ValueError naming the key and both shapes. Nothing is written unless every check passes."""
        params = dict(self.named_parameters())
        extras = {}                                               # module -> {local key: full key}
        for path, mod in self.named_modules():
            for k in mod._extra_state():
                extras.setdefault(id(mod), (mod, {}))[1][k] = f"{path}.{k}" if path else k
        expected = list(params) + [full for _, keys in extras.values() for full in keys.values()]
        expected_set = set(expected)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected_set]
        if strict and (missing or unexpected):
            raise ValueError(f"error loading state_dict into {type(self).__name__}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        for k, v in state_dict.items():
            if k in params and tuple(v.shape) != tuple(params[k].data.shape):
                raise ValueError(f"size mismatch for {k}: the checkpoint has shape {tuple(v.shape)}, "
                                 f"the model has {tuple(params[k].data.shape)}")
        loadable = [(mod, {k: state_dict[full] for k, full in keys.items()}) for mod, keys in extras.values()
                    if all(full in state_dict for full in keys.values())]
        for mod, extra in loadable:                               # all checked first: a bad one changes nothing
            mod._check_extra_state(extra)
        for mod, extra in loadable:
            mod._load_extra_state(extra)
        for k, v in state_dict.items():
            if k in params:
                p = params[k]
                xp = get_array_module(p.data)
                p.data[...] = xp.asarray(v, dtype=p.data.dtype)   # in place: optimizer state keeps pointing here
        return IncompatibleKeys(missing, unexpected)

    # ---- printing -------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self._named_children())
        if not children:
            return lines[0] + ")"
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules whose children are named "0", "1", ... (torch.nn.ModuleList)."""

    def __init__(self, modules=()):
        super().__init__()
        self._list = []
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._list.append(module)
        return self

    def _named_children(self):
        for i, m in enumerate(self._list):
            yield str(i), m

    def _set_child(self, name, module):
        self._list[int(name)] = module

    def __getitem__(self, i):
        return self._list[i]

    def __setitem__(self, i, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._list[i] = module

    def __len__(self):
        return len(self._list)

    def __iter__(self):
        return iter(self._list)


class ModuleDict(Module):
    """Named children given as keyword arguments, reachable as attributes or by key (torch.nn.ModuleDict):
    `d[name]`, `d[name] = m`, `del d[name]`, `name in d`, `len(d)`, iteration over the names, keys/values/items."""

    def __init__(self, **modules):
        super().__init__()
        for name, m in modules.items():
            self[name] = m

    def __getitem__(self, name):
        return self.get_submodule(name)

    def __setitem__(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict holds Modules, got {type(module).__name__}")
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"module name must be a non-empty string without '.', got {name!r}")
        if hasattr(self, name) and name not in self:            # e.g. "training", "keys" (torch's add_module)
            raise KeyError(f"attribute '{name}' already exists")
        setattr(self, name, module)

    def __delitem__(self, name):
        if name not in self:
            raise KeyError(name)
        delattr(self, name)

    def __contains__(self, name):
        return isinstance(vars(self).get(name), Module)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def keys(self):
        return [n for n, _ in self._named_children()]

    def values(self):
        return [m for _, m in self._named_children()]

    def items(self):
        return list(self._named_children())
