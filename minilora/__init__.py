"""minilora: LoRA and QLoRA from scratch in NumPy (and CuPy), bit for bit with bitsandbytes, file for file with PEFT.

Switch the array backend with `minilora.set_backend("cupy")`, `with minilora.use_backend("cupy"): ...` or the
environment variable MINILORA_BACKEND=cupy.
"""
from minilora.backend import get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["set_backend", "get_backend", "use_backend", "__version__"]
