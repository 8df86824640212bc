"""How many threads NumPy's BLAS (OpenBLAS, MKL, BLIS) and OpenMP may use: one, by default, in the `minilora` apps.

minilora's matrices are small (the shipped base is 128 wide), so a matmul split over several threads gains little
and, beside any other busy process, loses a lot: the BLAS threads spin waiting for each other while the neighbour
holds a core. `minilora demo --quick` on 2 cores took 15 s beside one busy-loop process with BLAS's default
threads and 6 s on one thread (benchmarks/bench_threads.py). So every `minilora` command runs on one thread unless
told otherwise (`minilora --threads N ...`), and library users choose for themselves:

    minilora.set_num_threads(1)              # process-wide, until changed
    with minilora.limit_threads(4): ...      # inside the block only
    minilora.set_num_threads(None)           # back to what the libraries used before the first call

Built on threadpoolctl, which changes the limits of the BLAS/OpenMP libraries already loaded into the process (the
environment variables OMP_NUM_THREADS / OPENBLAS_NUM_THREADS only work if set before NumPy is imported).
"""
from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_info, threadpool_limits

DEFAULT_NUM_THREADS = 1          # what the `minilora` apps use unless --threads says otherwise
_original = None                 # the threadpool_limits that undoes every change (the first one made)


def _check(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number of threads must be an int >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    return n


def set_num_threads(n: int | None) -> None:
    """Limit every loaded BLAS and OpenMP library to `n` threads (process-wide); None restores the limits they had
    before minilora first changed them."""
    global _original
    if n is None:
        if _original is not None:
            _original.restore_original_limits()
            _original = None
        return
    limiter = threadpool_limits(limits=_check(n))
    if _original is None:
        _original = limiter


def get_num_threads() -> int | None:
    """The most threads any loaded BLAS library may use now (None if NumPy's BLAS is not visible to threadpoolctl)."""
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else None


@contextlib.contextmanager
def limit_threads(n: int):
    """Run the block with every BLAS and OpenMP library limited to `n` threads; the previous limits come back."""
    with threadpool_limits(limits=_check(n)):
        yield


def blas_info() -> list:
    """One dict per loaded BLAS library: its name, version, threading layer, CPU kernel and thread limit."""
    keys = ("internal_api", "version", "threading_layer", "architecture", "num_threads")
    return [{k: p.get(k) for k in keys} for p in threadpool_info() if p.get("user_api") == "blas"]
