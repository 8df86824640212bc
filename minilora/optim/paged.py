"""PagedAdamW: AdamW whose large states live in a PagedPool, as bitsandbytes' `PagedAdamW` / `paged_adamw_32bit`.

The arithmetic is AdamW's, unchanged (minilora.optim.adamw.adamw_update, PyTorch's form):

    m ← β1·m + (1−β1)·g      v ← β2·v + (1−β2)·g²      p ← p·(1−lr·wd) − (lr/(1−β1ᵗ))·m / (√v/√(1−β2ᵗ) + eps)

Every line is elementwise, so running it page by page on slices of p and g gives the same bits as running it on the
whole arrays: a paged run and an unpaged run produce bit-identical parameters, however often pages were evicted.

What bitsandbytes does (`bitsandbytes/optim/optimizer.py`, `Optimizer8bit.get_state_buffer` / `prefetch_state`):
    - a state tensor with numel ≥ 1e5 is allocated in CUDA unified memory (cudaMallocManaged); smaller ones are
      ordinary device tensors;
    - before each parameter's update, its state pages are prefetched to the GPU (cudaMemPrefetchAsync, in 2 MiB
      chunks), so the kernel never page-faults; the step synchronizes at the end;
    - the driver evicts pages to CPU RAM only when the GPU runs out of memory, so when everything fits paging is
      free.
Here the pool (minilora.optim.paged_pool) plays the driver: `pool.iter_pages(m, v)` prefetches (or, with
prefetch=False, faults in page by page) and hands the kernel one page of m and v at a time.

    opt = PagedAdamW(model.parameters(), lr=2e-4, pool=PagedPool(budget_bytes=24 * GB))   # qlora.py's optimizer
"""
from __future__ import annotations

from minilora.backend import get_array_module
from minilora.optim.adamw import AdamW, adamw_update
from minilora.optim.paged_pool import GB, MiB, OutOfMemoryError, PagedPool, PagedTensor, PagingStats, transfer_seconds  # noqa: F401


class PagedAdamW(AdamW):
    """AdamW (same constructor, defaults and numerics) with exp_avg / exp_avg_sq of ≥ pool.paged_threshold elements
    in pool pages and the smaller ones as plain device allocations charged to the same pool.

    pool=None gives an unlimited pool: nothing is ever evicted, exactly bnb's behaviour when everything fits."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, pool=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        xp = get_array_module(*[p.data for p in self.params]) if self.params else None
        self.pool = PagedPool(budget_bytes=None, xp=xp) if pool is None else pool
        self._names = {id(p): n for n, p in self.named_params}
        for n, p in self.named_params:
            if get_array_module(p.data) is not self.pool.xp:       # pages must live where the parameter lives
                raise TypeError(f"parameter {n!r} is a {get_array_module(p.data).__name__} array but the pool "
                                f"keeps its device pages in {self.pool.xp.__name__}; build the pool under the same "
                                "backend (PagedPool(..., xp=...) or minilora.use_backend)")
            if self.pool.is_paged(p.numel()) and self.pool.page_size % p.dtype.itemsize:
                raise ValueError(f"page_size {self.pool.page_size} B is not a multiple of the element size "
                                 f"({p.dtype.itemsize} B) of parameter {n!r}")

    def step(self):
        """Optimizer.step with the pool told which step runs, so an OutOfMemoryError raised while the states are
        created or paged back names "optimizer step N", not "setup" (unless the training loop set pool.step)."""
        own = self.pool.step is None
        if own:
            self.pool.step = f"{self.step_count + 1} (optimizer step)"
        try:
            super().step()
        finally:
            if own:
                self.pool.step = None

    def _new_buffer(self, name, p):
        """A zero state buffer for p: paged if big enough (bnb's ≥ 1e5 rule), else a device array in the budget."""
        if self.pool.is_paged(p.numel()):
            if not p.data.flags.c_contiguous:    # the page loop updates p through a flat view
                raise ValueError(f"parameter {name!r} must be C-contiguous for paged updates")
            return self.pool.paged_zeros(name, p.numel(), p.dtype)
        self.pool.allocate(name, int(p.data.nbytes), "optimizer_state")
        return get_array_module(p.data).zeros_like(p.data)                           # (same shape as p)

    def _init_state(self, p) -> dict:
        n = self._names[id(p)]
        return {"step": 0, **{b: self._new_buffer(f"{n}.{b}", p) for b in self.buffers}}

    def update(self, p, g, state):
        b1, b2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not isinstance(m, PagedTensor):
            adamw_update(p, g, m, v, state["step"], self.lr, b1, b2, self.eps, self.weight_decay)
            return
        p_flat, g_flat = p.reshape(-1), g.reshape(-1)                                # (numel,) views of p and g
        for a, b, (m_k, v_k) in self.pool.iter_pages(m, v):                          # m_k, v_k: (b - a,)
            adamw_update(p_flat[a:b], g_flat[a:b], m_k, v_k, state["step"], self.lr, b1, b2, self.eps,
                         self.weight_decay)

    def state_dict(self) -> dict:
        """As AdamW's, with paged buffers gathered into ordinary arrays of the parameter's shape (copies)."""
        sd = super().state_dict()
        params = dict(self.named_params)
        for name, st in sd["state"].items():
            for b in self.buffers:
                if isinstance(st[b], PagedTensor):
                    st[b] = self.pool.gather(st[b]).reshape(params[name].shape)
        return sd

    def load_state_dict(self, sd: dict):
        """As AdamW's; the loaded buffers are then put back into the pool (paged ones page by page)."""
        old = self.state
        super().load_state_dict(sd)
        for name in old:
            for b in self.buffers:
                self.pool.release(f"{name}.{b}")
        params = dict(self.named_params)
        for name, st in self.state.items():
            for b in self.buffers:
                loaded = st[b]
                st[b] = buf = self._new_buffer(f"{name}.{b}", params[name])
                if isinstance(buf, PagedTensor):
                    flat = loaded.reshape(-1)
                    for page in buf.pages:
                        self.pool.page_data(page)[...] = flat[page.start:page.stop]
                else:
                    buf[...] = loaded
