"""PagedAdamW8bit: AdamW8bit whose 8-bit states live in a PagedPool, as bitsandbytes' `PagedAdamW8bit`
(Hugging Face's `optim="paged_adamw_8bit"`, the optimizer of most QLoRA recipes).

The arithmetic is AdamW8bit's, unchanged (minilora.optim.adamw8bit): per block of 256 elements,

    dequantize (m, v) → m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², p update → requantize (codes, absmax)

Every block is self-contained: its codes, its one absmax, its slice of p and g. So if no block straddles two pages
(the page size is a multiple of 256 bytes of uint8 codes), running the kernel page by page gives the same bits as
running it on the whole parameter: a paged run and an unpaged run are bit-identical however often pages were
evicted. bnb pages `state1`/`state2` (numel ≥ 1e5) and keeps `absmax1`/`absmax2` (n/256 floats) as ordinary device
tensors; so do we: the codes are paged, the absmax arrays are plain allocations charged to the same pool.

What bitsandbytes does (`bitsandbytes/optim/optimizer.py`: get_state_buffer, prefetch_state) and how the pool
plays the CUDA driver: see minilora.optim.paged and minilora.optim.paged_pool. On CPU, bnb warns "Paged optimizers
are not supported on CPU" and does not page at all, so the byte-for-byte reference is AdamW8bit.

    opt = PagedAdamW8bit(model.named_parameters(), lr=2e-4, pool=PagedPool(budget_bytes=24 * GB))
"""
from __future__ import annotations

from minilora.backend import get_array_module
from minilora.optim.adamw8bit import BLOCKSIZE, MIN_8BIT_SIZE, AdamW8bit, adamw8bit_update, adamw32bit_update
from minilora.optim.paged_pool import PagedPool, PagedTensor

PAGED = ("state1", "state2")                 # what bnb allocates with get_state_buffer (paged when large)


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit (same constructor, defaults and numerics) with state1/state2 of ≥ pool.paged_threshold elements in
    pool pages, and everything else (small states, absmax) as device allocations charged to the same pool.

    pool=None gives an unlimited pool: nothing is ever evicted, exactly bnb's behaviour when everything fits."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 min_8bit_size: int = MIN_8BIT_SIZE, pool=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        xp = get_array_module(*[p.data for p in self.params]) if self.params else None
        self.pool = PagedPool(budget_bytes=None, xp=xp) if pool is None else pool
        self._names = {id(p): n for n, p in self.named_params}
        for n, p in self.named_params:
            if get_array_module(p.data) is not self.pool.xp:
                raise TypeError(f"parameter {n!r} is a {get_array_module(p.data).__name__} array but the pool keeps "
                                f"its device pages in {self.pool.xp.__name__}; build the pool under the same backend")
            if not self.pool.is_paged(p.data.size):
                continue
            if not p.data.flags.c_contiguous:
                raise ValueError(f"parameter {n!r} must be C-contiguous for paged updates")
            if self.is_8bit(p.data.size) and self.pool.page_size % BLOCKSIZE:
                raise ValueError(f"page_size {self.pool.page_size} B is not a multiple of {BLOCKSIZE}: a block of "
                                 f"{BLOCKSIZE} 8-bit codes of {n!r} would straddle two pages")
            if not self.is_8bit(p.data.size) and self.pool.page_size % 4:
                raise ValueError(f"page_size {self.pool.page_size} B is not a multiple of 4 B "
                                 f"(the float32 states of {n!r})")

    def _to_pool(self, name: str, st: dict, numel: int) -> dict:
        """Put a state's arrays into the pool: state1/state2 paged if large enough, the rest charged as allocations.
        The qmaps are shared constants (bnb keeps one per optimizer) and are not charged."""
        for key, arr in st.items():
            if key in ("step", "qmap1", "qmap2"):
                continue
            if key in PAGED and self.pool.is_paged(numel):
                paged = self.pool.paged_zeros(f"{name}.{key}", numel, arr.dtype)
                flat = arr.reshape(-1)                                       # (numel,)
                if bool(flat.any()):                                         # zeros need no copy
                    for page in paged.pages:
                        self.pool.page_data(page)[...] = flat[page.start:page.stop]
                st[key] = paged
            else:
                self.pool.allocate(f"{name}.{key}", int(arr.nbytes), "optimizer_state")
        return st

    def _init_state(self, p) -> dict:
        return self._to_pool(self._names[id(p)], super()._init_state(p), p.data.size)

    def update(self, p, g, state):
        if not isinstance(state["state1"], PagedTensor):
            super().update(p, g, state)
            return
        b1, b2 = self.betas
        p_flat, g_flat = p.reshape(-1), g.reshape(-1)                        # (numel,) views of p and g
        for a, b, (s1, s2) in self.pool.iter_pages(state["state1"], state["state2"]):   # s1, s2: (b - a,)
            if "absmax1" in state:
                blocks = slice(a // BLOCKSIZE, -(-b // BLOCKSIZE))               # this page's blocks (aligned)
                adamw8bit_update(p_flat[a:b], g_flat[a:b], s1, s2, state["absmax1"][blocks],
                                 state["absmax2"][blocks], state["qmap1"], state["qmap2"], state["step"], self.lr,
                                 b1, b2, self.eps, self.weight_decay)
            else:
                adamw32bit_update(p_flat[a:b], g_flat[a:b], s1, s2, state["step"], self.lr, b1, b2, self.eps,
                                  self.weight_decay)

    def state_dict(self) -> dict:
        """As AdamW8bit's, with paged states gathered into ordinary arrays of the parameter's shape (copies)."""
        sd = super().state_dict()
        params = dict(self.named_params)
        for name, st in sd["state"].items():
            for key in PAGED:
                if isinstance(st[key], PagedTensor):
                    st[key] = self.pool.gather(st[key]).reshape(params[name].shape)
        return sd

    def load_state_dict(self, sd: dict):
        """As AdamW8bit's; the loaded states then go back into the pool (paged ones page by page)."""
        old = {name: [k for k in st if k not in ("step", "qmap1", "qmap2")] for name, st in self.state.items()}
        super().load_state_dict(sd)
        for name, keys in old.items():
            for key in keys:
                self.pool.release(f"{name}.{key}")
        params = dict(self.named_params)
        for name, st in self.state.items():
            self._to_pool(name, st, params[name].data.size)
