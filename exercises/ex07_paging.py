"""Notebook 07, paged optimizers: pages, least-recently-used eviction and what a transfer costs.

bitsandbytes' paged optimizers keep the AdamW states in CUDA unified memory: when a memory spike needs room, the
driver moves the least-recently-used pages to CPU RAM, and a prefetch brings them back before the update. These
functions are the pieces of minilora's simulated pool (minilora.optim.paged_pool.PagedPool), written stand-alone.

Your task: replace each `raise NotImplementedError` below with code that does what the docstring says.
Grade it with `python3 -m pytest exercises/test_ex07_paging.py` (add `-x` to stop at the first failure).
"""
from __future__ import annotations


def page_sizes(nbytes: int, page_size: int) -> list[int]:
    """The bytes of each page of a tensor of nbytes: full pages of page_size, the last one shorter if needed.

    page_sizes(10, 4) == [4, 4, 2]; page_sizes(8, 4) == [4, 4]; page_sizes(0, 4) == [].
    """
    raise NotImplementedError("exercise: implement page_sizes (see its docstring)")


def lru_victims(lru_order, page_bytes, other_bytes, budget, request, pinned=frozenset()):
    """The pages to evict so that a new device allocation of `request` bytes fits, in eviction order.

    lru_order: names of the device-resident pages, least recently used first; page_bytes: name -> bytes;
    other_bytes: device bytes held by everything that is not a page; budget: the device's capacity in bytes.
    The device holds other_bytes + the pages. If request fits already, return []. Otherwise evict unpinned pages,
    least recently used first, until device bytes + request <= budget, and return their names. If even evicting
    every unpinned page cannot make room, raise MemoryError (and evict nothing).
    """
    raise NotImplementedError("exercise: implement lru_victims (see its docstring)")


def transfer_seconds(nbytes: float, gen: int = 3, lanes: int = 16, efficiency: float = 0.5) -> float:
    """Modelled time to move nbytes one way over PCIe: nbytes / (lanes · GB/s per lane · efficiency).

    GB = 1e9 bytes. A PCIe 3.0 lane carries 1 GB/s; each generation doubles it (gen 1: 0.25, ..., gen 6: 8).
    transfer_seconds(1e9) == 0.125: 1 GB at half of PCIe 3.0 x16's 16 GB/s.
    """
    raise NotImplementedError("exercise: implement transfer_seconds (see its docstring)")
