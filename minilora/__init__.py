"""minilora: LoRA and QLoRA from scratch in NumPy (and CuPy), bit for bit with bitsandbytes, file for file with PEFT.

Switch the array backend with `minilora.set_backend("cupy")`, `with minilora.use_backend("cupy"): ...` or the
environment variable MINILORA_BACKEND=cupy. Limit NumPy's BLAS threads with `minilora.set_num_threads(1)` or
`with minilora.limit_threads(1): ...` (the `minilora` commands run on one thread unless given --threads N).
"""
from minilora.backend import get_backend, set_backend, use_backend
from minilora.threads import get_num_threads, limit_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["set_backend", "get_backend", "use_backend", "set_num_threads", "get_num_threads", "limit_threads",
           "__version__"]
