"""minilora: LoRA and QLoRA from scratch in NumPy (and CuPy), bit for bit with bitsandbytes, file for file with PEFT.

Switch the array backend with `minilora.set_backend("cupy")`, `with minilora.use_backend("cupy"): ...` or the
environment variable MINILORA_BACKEND=cupy. Limit NumPy's BLAS threads with `minilora.set_num_threads(1)` or
`with minilora.limit_threads(1): ...` (the `minilora` commands run on one thread unless given --threads N).

`model, meta = minilora.load_base()` loads the shipped pretrained base (the tiny GPT every demo and notebook
fine-tunes; `GPTConfig()` alone builds a different, untrained model). It is imported on first use, so
`import minilora` stays light.
"""
from minilora.backend import get_backend, set_backend, use_backend
from minilora.threads import get_num_threads, limit_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["set_backend", "get_backend", "use_backend", "set_num_threads", "get_num_threads", "limit_threads",
           "load_base", "__version__"]


def __getattr__(name):
    """minilora.load_base, imported on first use (it pulls in the model, the data and the training code)."""
    if name == "load_base":
        from minilora.pretrained import load_base
        return load_base
    raise AttributeError(f"module 'minilora' has no attribute {name!r}")
