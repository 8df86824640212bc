"""minilora.nn: PyTorch-like layers with hand-written forward/backward pairs, LoRA/QLoRA layers and a tiny GPT.

    from minilora.nn import GPT, GPTConfig, Linear, LoRALinear, QLoRALinear, Linear4bit

The math lives in `functional.py` (`*_forward` / `*_backward` pairs); the classes hold parameters and caches.
"""
from minilora.nn.gpt import GPT, GPTConfig
from minilora.nn.layers import GELU, Embedding, LayerNorm, Linear
from minilora.nn.linear4bit import Linear4bit, Params4bit
from minilora.nn.lora import LoRALinear, QLoRALinear
from minilora.nn.module import Module, ModuleDict, ModuleList
from minilora.nn.parameter import Parameter

__all__ = ["GPT", "GPTConfig", "GELU", "Embedding", "LayerNorm", "Linear", "Module", "ModuleDict", "ModuleList",
           "Parameter", "LoRALinear", "QLoRALinear", "Linear4bit",
           "Params4bit"]
