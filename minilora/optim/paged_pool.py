"""A paged device/host memory pool: bitsandbytes' paged optimizer state, made visible.

What bitsandbytes does (`bitsandbytes/functional.py::get_paged`, `optim/optimizer.py`):
    - an optimizer-state tensor of at least 1e5 elements is allocated with `cudaMallocManaged` (CUDA unified memory):
      one address range the GPU and the CPU share, backed page by page by either GPU memory or CPU RAM;
    - when the GPU runs out of memory (a long sequence makes the activations spike) the driver evicts
      least-recently-used pages to CPU RAM instead of failing the allocation;
    - before each parameter's update, `prefetch_state(p)` calls `cudaMemPrefetchAsync`, which moves all of that
      parameter's state pages back in bulk (at 2 MiB granularity); without the prefetch the kernel page-faults
      them in one by one (the driver's fault granularity is a few KB);
    - smaller state tensors are ordinary device tensors, and nothing moves while everything fits.

What this module models, and what is real:
    - one device budget in bytes, shared by `allocate(name, nbytes, kind)` requests (weights, gradients,
      activations, small optimizer states) and by the device-resident pages of paged tensors, so pressure is real:
      device_bytes = Σ allocations + Σ resident pages ≤ budget, always;
    - a page holds `page_size` bytes of one tensor (the last page of a tensor may be shorter and costs only its
      own bytes); every page lives in exactly one tier, device or host;
    - eviction is least-recently-used over unpinned device pages, and happens only when a request does not fit;
    - data is real: on NumPy both tiers are host arrays and a transfer is a copy we account for (the strict
      backend keeps the device tier in its own arrays, so a page that skips a transfer fails); on CuPy the
      device tier is CuPy arrays, the host tier is pinned host memory (`cupyx.empty_pinned`) and a transfer is a
      real `cudaMemcpy`. A tensor created with data=False keeps only the bookkeeping (used by the simulator to
      replay 7B / 65B models whose states would not fit in this machine's RAM);
    - time is modelled, not measured: bytes / (PCIe bandwidth × efficiency), plus a fixed latency per page fault.

Simplifications (said out loud): new paged tensors start on the device (bnb zero-fills them on the host and the
first prefetch migrates them; we leave that one-time move out, so a run that fits moves zero bytes); a request
that cannot fit even after evicting every unpinned page raises OutOfMemoryError (a real driver would thrash).

Bandwidth model (bnb `docs/source/explanations/optimizers.mdx`): "expect at most about 50 % of PCIe bandwidth",
and 1 GB evicted per step on PCIe 3.0 x16 costs 1 / (16 · 0.5) s = 125 ms. We use the docs' units:
GB = 1e9 bytes and PCIe 3.0 x16 = 16 GB/s per direction (1 GB/s per lane; each generation doubles it).
`transfer_seconds()` of a pool adds up both directions (evictions and the prefetches/faults that undo them).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

from minilora.backend import to_numpy, xp_current
from minilora.units import GB, MiB, fmt_bytes

DEFAULT_PAGE_SIZE = 2 * MiB          # cudaMemPrefetchAsync's granularity (Dettmers, bnb #962)
PAGED_THRESHOLD = 100_000            # bnb get_state_buffer: page only state tensors with numel >= 1e5
KINDS = ("weights", "gradients", "optimizer_state", "activations")
PCIE_GB_PER_LANE = {1: 0.25, 2: 0.5, 3: 1.0, 4: 2.0, 5: 4.0, 6: 8.0}   # GB/s per lane, one direction, round
MAX_EFFICIENCY = 0.5                 # bnb docs: at most about 50 % of the PCIe bandwidth
FAULT_LATENCY_S = 20e-6              # assumed cost of servicing one GPU page fault (an order of magnitude; not bnb's)


def pcie_bandwidth(gen: int = 3, lanes: int = 16) -> float:
    """Peak one-direction PCIe bandwidth in bytes/s: 1 GB/s per lane for gen 3, doubling each generation."""
    if gen not in PCIE_GB_PER_LANE:
        raise ValueError(f"unknown PCIe generation {gen!r}; choose one of {sorted(PCIE_GB_PER_LANE)}")
    if lanes not in (1, 2, 4, 8, 16):
        raise ValueError(f"PCIe lanes must be 1, 2, 4, 8 or 16, got {lanes!r}")
    return PCIE_GB_PER_LANE[gen] * lanes * GB


def transfer_seconds(nbytes: float, gen: int = 3, lanes: int = 16, efficiency: float = MAX_EFFICIENCY) -> float:
    """Seconds to move nbytes one way: nbytes / (bandwidth · efficiency). transfer_seconds(1e9) == 0.125."""
    if not 0.0 < efficiency <= MAX_EFFICIENCY:
        raise ValueError(f"efficiency must be in (0, {MAX_EFFICIENCY}] (bnb: at most ~50 % of PCIe), got {efficiency}")
    return nbytes / (pcie_bandwidth(gen, lanes) * efficiency)


class OutOfMemoryError(MemoryError):
    """A device request that cannot fit even after evicting every evictable page. Names the step, the request and
    what occupied the device (by kind), like PyTorch's "CUDA out of memory. Tried to allocate ..."."""

    def __init__(self, step, name, nbytes, kind, occupied: dict, budget, paging: bool):
        self.step, self.name, self.nbytes, self.kind = step, name, nbytes, kind
        self.occupied, self.budget = dict(occupied), budget
        where = "setup" if step is None else f"step {step}"
        held = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in occupied.items() if v)
        free = budget - sum(occupied.values())
        hint = ("even after evicting every unpinned optimizer-state page to the host" if paging else
                "paging is off, so nothing could be moved to the host")
        super().__init__(f"{where}: out of device memory: tried to allocate {name!r} ({fmt_bytes(nbytes)}, {kind}) "
                         f"but the {fmt_bytes(budget)} device holds {held or 'nothing'} with {fmt_bytes(free)} free, "
                         f"{hint}")


class Page:
    """One page of a PagedTensor: elements [start, stop) living in exactly one tier ("device" or "host")."""
    __slots__ = ("tensor", "index", "start", "stop", "nbytes", "where", "device", "host")

    def __init__(self, tensor, index, start, stop, nbytes):
        self.tensor, self.index, self.start, self.stop, self.nbytes = tensor, index, start, stop, nbytes
        self.where, self.device, self.host = "device", None, None

    def __repr__(self):
        return f"Page({self.tensor.name!r}[{self.index}], {self.nbytes} B on {self.where})"


class PagedTensor:
    """A flat state tensor split into pages of page_size bytes (the last one may be shorter)."""

    def __init__(self, name, numel, dtype, itemsize, page_numel, has_data):
        self.name, self.numel, self.dtype, self.itemsize, self.has_data = name, numel, dtype, itemsize, has_data
        self.pages = [Page(self, k, a, min(a + page_numel, numel), (min(a + page_numel, numel) - a) * itemsize)
                      for k, a in enumerate(range(0, numel, page_numel))]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def __repr__(self):
        on = sum(p.where == "device" for p in self.pages)
        return f"PagedTensor({self.name!r}, numel={self.numel}, pages={len(self.pages)}, on device={on})"


@dataclasses.dataclass
class PagingStats:
    evictions: int = 0              # pages moved device -> host
    prefetches: int = 0             # pages moved host -> device by a bulk prefetch
    prefetch_calls: int = 0         # cudaMemPrefetchAsync calls (one per parameter update)
    page_faults: int = 0            # pages moved host -> device one at a time on first touch
    bytes_evicted: int = 0          # device -> host
    bytes_prefetched: int = 0       # host -> device, bulk
    bytes_faulted: int = 0          # host -> device, on demand

    def copy(self) -> PagingStats:
        return dataclasses.replace(self)


class PagedPool:
    """Device budget + page size + two tiers. See the module docstring for the mechanism.

    budget_bytes=None means unlimited (nothing is ever evicted). paging=False turns the pool into a plain
    device allocator (the unpaged baseline): state tensors become ordinary allocations and pressure is an OOM."""

    def __init__(self, budget_bytes=None, page_size: int = DEFAULT_PAGE_SIZE, paged_threshold: int = PAGED_THRESHOLD,
                 prefetch: bool = True, paging: bool = True, pcie_gen: int = 3, pcie_lanes: int = 16,
                 efficiency: float = MAX_EFFICIENCY, fault_latency_s: float = FAULT_LATENCY_S, xp=None):
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not budget_bytes >= 0):
            raise ValueError(f"budget_bytes must be a number >= 0 (or None for unlimited), got {budget_bytes!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int number of bytes, got {page_size!r}")
        if not isinstance(paged_threshold, int) or paged_threshold < 0:
            raise ValueError(f"paged_threshold must be an int >= 0 (elements), got {paged_threshold!r}")
        transfer_seconds(0, pcie_gen, pcie_lanes, efficiency)          # validates gen, lanes, efficiency
        self.budget_bytes = budget_bytes
        self.page_size, self.paged_threshold = page_size, paged_threshold
        self.prefetch, self.paging = bool(prefetch), bool(paging)
        self.pcie_gen, self.pcie_lanes, self.efficiency = pcie_gen, pcie_lanes, efficiency
        self.fault_latency_s = fault_latency_s
        self.xp = xp if xp is not None else xp_current()
        self.allocations = {}                        # name -> (nbytes, kind): plain device allocations
        self.tensors = {}                            # name -> PagedTensor
        self._resident = collections.OrderedDict()   # device pages, least recently used first
        self._resident_bytes = 0
        self._pinned = set()                         # pages that must not be evicted right now (being updated)
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self.stats = PagingStats()
        self.step = None                             # set by the training loop, named in OutOfMemoryError

    # ------------------------------------------------------------------ accounting
    def is_paged(self, numel: int) -> bool:
        """bnb's rule: page a state tensor iff paging is on and numel >= paged_threshold (1e5)."""
        return self.paging and numel >= self.paged_threshold

    def usage(self) -> dict:
        """Device bytes by kind (paged state pages count as optimizer_state), plus free and host-resident state."""
        out = dict.fromkeys(KINDS, 0)
        for nbytes, kind in self.allocations.values():
            out[kind] += nbytes
        out["optimizer_state"] += self._resident_bytes
        budget = self.device_bytes if self.budget_bytes is None else self.budget_bytes
        out["free"] = budget - self.device_bytes
        out["optimizer_state_host"] = sum(t.nbytes for t in self.tensors.values()) - self._resident_bytes
        return out

    def transfer_seconds(self, stats: PagingStats | None = None) -> float:
        """Modelled time of the transfers in `stats` (default: all so far): bytes over PCIe, plus fault latency."""
        s = self.stats if stats is None else stats
        moved = s.bytes_evicted + s.bytes_prefetched + s.bytes_faulted
        wire = transfer_seconds(moved, self.pcie_gen, self.pcie_lanes, self.efficiency)
        return wire + s.page_faults * self.fault_latency_s

    def _oom(self, name, nbytes, kind):
        occ = {k: v for k, v in self.usage().items() if k in KINDS}
        return OutOfMemoryError(self.step, name, nbytes, kind, occ, self.budget_bytes, self.paging)

    def _make_room(self, nbytes, name, kind):
        """Evict least-recently-used unpinned pages until nbytes more fit; OutOfMemoryError if they never can."""
        if self.budget_bytes is None or self.device_bytes + nbytes <= self.budget_bytes:
            return
        pinned = sum(p.nbytes for p in self._pinned if p.where == "device")
        if self.device_bytes - (self._resident_bytes - pinned) + nbytes > self.budget_bytes:
            raise self._oom(name, nbytes, kind)      # check first: never evict pages for a request that fails anyway
        victims = (p for p in list(self._resident.values()) if p not in self._pinned)
        while self.device_bytes + nbytes > self.budget_bytes:
            self._evict(next(victims))

    def _charge(self, nbytes):
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def allocate(self, name: str, nbytes: int, kind: str):
        """Reserve nbytes of device memory for `name` (evicting state pages if needed), like cudaMalloc."""
        if kind not in KINDS:
            raise ValueError(f"unknown allocation kind {kind!r}; choose one of {KINDS}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"allocation {name!r}: nbytes must be an int >= 0, got {nbytes!r}")
        if name in self.allocations or name in self.tensors:
            raise ValueError(f"allocation {name!r} already exists; free it first")
        self._make_room(nbytes, name, kind)
        self.allocations[name] = (nbytes, kind)
        self._charge(nbytes)

    def free(self, name: str):
        if name not in self.allocations:
            raise KeyError(f"free({name!r}): no such allocation; live allocations: {sorted(self.allocations)}")
        nbytes, _ = self.allocations.pop(name)
        self.device_bytes -= nbytes

    def release(self, name: str):
        """Free a plain allocation or drop a paged tensor (all its pages, on either tier)."""
        if name in self.allocations:
            return self.free(name)
        t = self.tensors.pop(name, None)
        if t is None:
            raise KeyError(f"release({name!r}): no such allocation or paged tensor")
        for p in t.pages:
            if p.where == "device":
                del self._resident[p]
                self._resident_bytes -= p.nbytes
                self.device_bytes -= p.nbytes
            p.device = p.host = None

    # ------------------------------------------------------------------ paged tensors
    def paged_zeros(self, name: str, numel: int, dtype="float32", data: bool = True) -> PagedTensor:
        """A zero-filled paged state tensor of numel elements; pages start on the device if they fit, else host."""
        itemsize = self.xp.dtype(dtype).itemsize
        if self.page_size % itemsize:
            raise ValueError(f"page_size {self.page_size} B is not a multiple of the element size "
                             f"({itemsize} B for {self.xp.dtype(dtype).name}) of {name!r}")
        if name in self.tensors or name in self.allocations:
            raise ValueError(f"paged tensor {name!r} already exists")
        t = PagedTensor(name, int(numel), self.xp.dtype(dtype), itemsize, self.page_size // itemsize, data)
        self.tensors[name] = t
        for page in t.pages:
            try:
                self._make_room(page.nbytes, name, "optimizer_state")
            except OutOfMemoryError:              # managed memory never fails to allocate: start this page on the host
                page.where = "host"
                if data:
                    page.host = self._host_zeros(page.stop - page.start, t.dtype)
                continue
            if data:
                page.device = self.xp.zeros(page.stop - page.start, dtype=t.dtype)   # (page_numel,)
            self._resident[page] = page
            self._resident_bytes += page.nbytes
            self._charge(page.nbytes)
        return t

    def _host_zeros(self, n, dtype):
        if self.xp.__name__ == "cupy":
            import cupyx  # imported here: only on the GPU path
            out = cupyx.empty_pinned((n,), dtype=dtype)   # page-locked host memory: what DMA transfers need
            out[...] = 0
            return out
        return to_numpy(self.xp.zeros(n, dtype=dtype))   # a host array (a copy on the strict backend)

    def _evict(self, page):
        """device -> host (cudaMemcpy D2H into pinned memory on CuPy, a copy on NumPy)."""
        if page.tensor.has_data:
            if self.xp.__name__ == "cupy":
                import cupyx
                page.host = cupyx.empty_pinned(page.device.shape, dtype=page.device.dtype)
                page.device.get(out=page.host)
            else:
                page.host = to_numpy(page.device.copy())   # the host tier holds host arrays on every backend
            page.device = None                       # the device copy is gone: exactly one tier holds the page
        page.where = "host"
        del self._resident[page]
        self._resident_bytes -= page.nbytes
        self.device_bytes -= page.nbytes
        self.stats.evictions += 1
        self.stats.bytes_evicted += page.nbytes

    def _bring_in(self, page, name, fault: bool):
        """host -> device, making room first (cudaMemcpy H2D on CuPy, a copy on NumPy)."""
        self._make_room(page.nbytes, name, "optimizer_state")
        if page.tensor.has_data:
            if self.xp.__name__ == "cupy":
                page.device = self.xp.empty(page.host.shape, dtype=page.host.dtype)
                page.device.set(page.host)
            else:
                page.device = self.xp.asarray(page.host).copy()
            page.host = None
        page.where = "device"
        self._resident[page] = page
        self._resident_bytes += page.nbytes
        self._charge(page.nbytes)
        if fault:
            self.stats.page_faults += 1
            self.stats.bytes_faulted += page.nbytes
        else:
            self.stats.prefetches += 1
            self.stats.bytes_prefetched += page.nbytes

    @contextlib.contextmanager
    def pinned(self, pages):
        """Keep these pages from being evicted inside the block (the pages a kernel is working on)."""
        pages = [p for p in pages if p not in self._pinned]
        self._pinned.update(pages)
        try:
            yield
        finally:
            self._pinned.difference_update(pages)

    def prefetch_tensors(self, tensors):
        """cudaMemPrefetchAsync: bring every page of these tensors to the device in one bulk transfer."""
        pages = [p for t in tensors for p in t.pages]
        self.stats.prefetch_calls += 1
        missing = [p for p in pages if p.where == "host"]
        label = "prefetch of " + ", ".join(t.name for t in tensors)
        with self.pinned(pages):
            self._make_room(sum(p.nbytes for p in missing), label, "optimizer_state")
            for p in missing:
                self._bring_in(p, label, fault=False)
        for p in pages:
            self._resident.move_to_end(p)            # just used: most recently used

    def page_data(self, page):
        """The device array of one page, page-faulting it in if it lives on the host; marks it recently used."""
        if page.where == "host":
            self._bring_in(page, f"page fault on {page.tensor.name}[{page.index}]", fault=True)
        else:
            self._resident.move_to_end(page)
        return page.device

    def iter_pages(self, *tensors):
        """Yield (start, stop, [device page of each tensor]) for an elementwise kernel over same-length tensors.

        With prefetch on, all their pages are moved in first (bnb's prefetch_state before each parameter's update);
        otherwise each page is faulted in when the loop reaches it. Pages in use are pinned."""
        if self.prefetch:
            self.prefetch_tensors(tensors)
        for k in range(len(tensors[0].pages)):
            pages = [t.pages[k] for t in tensors]
            with self.pinned(pages):
                arrays = [self.page_data(p) for p in pages]
                yield pages[0].start, pages[0].stop, arrays

    def evict_all(self):
        """Evict every unpinned device page (what a big activation spike does); returns the bytes moved."""
        before = self.stats.bytes_evicted
        for p in [p for p in self._resident.values() if p not in self._pinned]:
            self._evict(p)
        return self.stats.bytes_evicted - before

    def gather(self, tensor: PagedTensor):
        """The whole tensor as one device array (for tests and inspection; moves nothing, counts nothing)."""
        if not tensor.has_data:
            raise ValueError(f"{tensor.name!r} was created with data=False: it has no values to gather")
        parts = [p.device if p.where == "device" else self.xp.asarray(p.host) for p in tensor.pages]
        return self.xp.concatenate(parts) if parts else self.xp.zeros(0, dtype=tensor.dtype)   # (numel,)

    def check(self):
        """Assert the pool's invariants: every page in exactly one tier, the books balance, budget respected."""
        resident = 0
        for t in self.tensors.values():
            for p in t.pages:
                assert p.where in ("device", "host"), p
                assert (p in self._resident) == (p.where == "device"), f"{p}: LRU list disagrees"
                if t.has_data:
                    assert (p.device is None) != (p.host is None), f"{p}: held by both tiers or by none"
                    assert (p.device is not None) == (p.where == "device"), p
                resident += p.nbytes if p.where == "device" else 0
        assert resident == self._resident_bytes, (resident, self._resident_bytes)
        assert len(self._resident) == sum(p.where == "device" for t in self.tensors.values() for p in t.pages)
        assert self.device_bytes == resident + sum(n for n, _ in self.allocations.values())
        assert self.budget_bytes is None or self.peak_device_bytes <= self.budget_bytes
