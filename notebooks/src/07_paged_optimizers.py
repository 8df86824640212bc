# %% [markdown]
# # 07 · Paged optimizers: surviving a long-sequence memory spike
#
# **The idea in one sentence:** keep the optimizer states in memory that the driver may move to the CPU, so that a
# rare long sequence pushes them out for a moment instead of crashing the run.
#
# **After this notebook you can**
# - explain eviction and prefetch of optimizer-state pages, and when paging costs nothing;
# - estimate the transfer time of a page-out from the bytes and the PCIe bandwidth;
# - show that paging never changes AdamW's results (bit-identical parameters);
# - read a memory timeline of QLoRA on a 48 GB GPU and find the step where plain AdamW runs out of memory.
#
# **Prerequisites:** notebook 06 (what QLoRA trains), AdamW's two state tensors $m$ and $v$; notebook 08's memory
# calculator helps but is not required. **Time:** about 40 minutes.
#
# > **This notebook is a simulation.** No GPU is used: the "device" is a byte budget kept by a Python object, page
# > transfers are counted and timed with a bandwidth model, and the 7B/65B runs replay a trace whose sizes come from
# > the memory calculator (notebook 08). The assumptions are printed with each scenario. The mechanism and the
# > bit-identity check are real; the times are model outputs, not measurements.
#
# QLoRA's third ingredient (Dettmers et al., 2023, arXiv 2305.14314, §3). Fine-tuning memory is mostly flat from
# step to step, but a mini-batch with a long sequence makes the **activations** spike, and a GPU that was 90 % full
# runs out of memory. bitsandbytes' paged optimizers put the AdamW states ($m$, $v$) in CUDA unified memory: under
# pressure the driver **evicts** their pages to CPU RAM instead of failing, and before each parameter's update
# `cudaMemPrefetchAsync` **brings them back**.
# When everything fits, nothing moves and paging costs nothing.
#
# minilora models this with a `PagedPool` (a device budget, pages, two tiers) and `PagedAdamW`. On NumPy the transfers
# are accounted copies; on CuPy they are real device↔pinned-host copies. This notebook shows the mechanism on a few
# kilobytes, checks that paging never changes the numbers, and then replays QLoRA on LLaMA-7B (24 GB) and LLaMA-65B
# (48 GB) through a spike, with and without paging.

# %%
# %matplotlib inline
import platform
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Image, display

import minilora
from minilora.apps import paged_sim
from minilora.backend import asarray, to_numpy
from minilora.nn.parameter import Parameter
from minilora.optim.adamw import AdamW
from minilora.optim.paged import PagedAdamW
from minilora.optim.paged_pool import GB, OutOfMemoryError, PagedPool, transfer_seconds

print(f"python {platform.python_version()} | numpy {np.__version__} | minilora {minilora.__version__} "
      f"| backend {minilora.get_backend()}")
FIG_DIR = Path(tempfile.mkdtemp(prefix="minilora_nb07_"))   # figures of this notebook go here, never into figures/

# %% [markdown]
# ## 1. What a page transfer costs
#
# bitsandbytes' documentation: expect at most about **50 % of the PCIe bandwidth**; 1 GB evicted per step on
# PCIe 3.0 x16 (16 GB/s) costs $1/(16\cdot 0.5)$ s = **125 ms**. The pool uses exactly that model:
#
# $$t = \frac{\text{bytes moved}}{\text{lanes}\cdot\text{GB/s per lane}\cdot 0.5}.$$

# %%
for gen in (3, 4, 5):
    print(f"PCIe {gen}.0 x16: 1 GB costs {transfer_seconds(1 * GB, gen=gen, lanes=16) * 1e3:6.2f} ms")
assert round(transfer_seconds(1 * GB, gen=3, lanes=16) * 1e3, 6) == 125

# %% [markdown]
# ## 2. The mechanism on a toy device
#
# A 64 KB "device" with 4 KB pages (KB = 1,000 bytes in this notebook's prints; the pool's own messages use
# KiB = 1,024 bytes, so the same 28 KB request reads 27.34 KiB there). Weights take 24 KB; the AdamW states of
# one parameter with 4,000 float32 values ($m$ and $v$, 16 KB each) are paged tensors. Then the forward pass asks for
# 28 KB of activations: that only fits if state pages leave the device. Least-recently-used pages go first.

# %%
pool = PagedPool(budget_bytes=64_000, page_size=4_000, paged_threshold=1000)
pool.allocate("weights", 24_000, "weights")
m = pool.paged_zeros("w.exp_avg", 4_000)                              # 16 KB = 4 pages
v = pool.paged_zeros("w.exp_avg_sq", 4_000)                           # 16 KB = 4 pages


def show(label):
    u = pool.usage()
    print(f"{label:<34} device: weights {u['weights'] // 1000:2d} KB, states {u['optimizer_state'] // 1000:2d} KB, "
          f"activations {u['activations'] // 1000:2d} KB, free {u['free'] // 1000:2d} KB | states on host "
          f"{u['optimizer_state_host'] // 1000:2d} KB")


show("after allocating the states")
pool.allocate("activations", 28_000, "activations")                    # the spike
show("during the long-sequence forward")
pool.free("activations")
show("after the backward")
for _start, _stop, (_m_page, _v_page) in pool.iter_pages(m, v):           # the optimizer step: prefetch, then update
    pass
show("after the prefetch for the update")
s = pool.stats
print(f"evicted {s.bytes_evicted:,} B in {s.evictions} pages, prefetched {s.bytes_prefetched:,} B; modelled transfer "
      f"time {pool.transfer_seconds() * 1e6:.1f} us")

# %% [markdown]
# Without paging the states are ordinary device allocations (what `PagedAdamW` does for tensors below the threshold,
# and plain AdamW for all of them), so the same request is an out-of-memory error that names the request and what
# held the device (a real GPU says much less):

# %%
plain = PagedPool(budget_bytes=64_000, page_size=4_000, paged_threshold=1000, paging=False)
plain.allocate("weights", 24_000, "weights")
plain.allocate("w.exp_avg", 16_000, "optimizer_state")
plain.allocate("w.exp_avg_sq", 16_000, "optimizer_state")
try:
    plain.allocate("activations", 28_000, "activations")
except OutOfMemoryError as e:
    print("OutOfMemoryError:", e)

# %% [markdown]
# ## 3. Paging never changes the numbers
#
# AdamW's update is elementwise, so running it page by page on slices gives the same bits as running it on whole
# arrays. We train the same parameters with `AdamW` and with `PagedAdamW` on a pool so small that every step evicts
# the states, and compare the bytes after 20 steps. The values are drawn on the host and moved with `asarray` to the
# backend the pool lives on (a copy on CuPy and on `numpy-strict`, none on NumPy, hence the `.copy()`: the two
# optimizers must not share one array); `to_numpy` brings them back for the comparison.

# %%
rng = np.random.default_rng(0)
init = [rng.standard_normal((256, 512)).astype(np.float32) for _ in range(3)]      # 3 x 131,072 values: paged
grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in init] for _ in range(20)]
p_ref = [Parameter(asarray(w.copy())) for w in init]
p_pag = [Parameter(asarray(w.copy())) for w in init]
opt_ref = AdamW(p_ref, lr=1e-2)
tight = PagedPool(budget_bytes=4 * 2**20, page_size=64 * 1024)
opt_pag = PagedAdamW(p_pag, lr=1e-2, pool=tight)
for g_step in grads:
    for p, q, g in zip(p_ref, p_pag, g_step, strict=True):
        p.grad, q.grad = asarray(g.copy()), asarray(g.copy())
    opt_ref.step()
    opt_pag.step()
    tight.evict_all()                                                 # a spike between every two steps
same = all(np.array_equal(to_numpy(p.data), to_numpy(q.data)) for p, q in zip(p_ref, p_pag, strict=True))
print(f"after 20 steps: parameters bit-identical: {same}; states moved {tight.stats.bytes_evicted / 2**20:.1f} MiB out "
      f"and {tight.stats.bytes_prefetched / 2**20:.1f} MiB back")
assert same

# %% [markdown]
# ## 4. QLoRA LLaMA-7B on a 24 GB GPU
#
# `paged_sim.run_scenario` replays a 40-step training trace. The numbers come from the memory calculator (notebook 08):
# NF4 + double-quantized base, LoRA $r = 64$ on every linear layer, bf16 adapters and gradients, fp32 AdamW states
# (`paged_adamw_32bit`), micro-batch 16, gradient checkpointing. Typical steps use short sequences; occasional long
# ones push the activations over the edge. For 7B and 65B the optimizer states are bookkeeping only (no values:
# 1.3 GB and 6.4 GB would not fit in this notebook), driven through exactly the page loop `PagedAdamW` uses.

# %%
r7 = paged_sim.run_scenario("7b", seed=0, steps=40)
print(paged_sim.summary(r7))

# %% [markdown]
# ## 5. QLoRA LLaMA-65B on a 48 GB GPU: the memory timeline
#
# The paper's headline setting. Top: plain AdamW, which stops at the first long sequence. Bottom: `PagedAdamW`; at
# each spike (▼) state pages leave the device, and before the next update (▲) they come back.

# %%
r65 = paged_sim.run_scenario("65b", seed=0, steps=40)
print(paged_sim.summary(r65))
assert r65["unpaged"]["oom_step"] == 15 and r65["paged"]["completed"]
paged_sim.plot_timeline(r65, FIG_DIR / "paged_65b.png")
display(Image(filename=str(FIG_DIR / "paged_65b.png"), width=800))

# %% [markdown]
# ## 6. Prefetch or page faults?
#
# bitsandbytes prefetches each parameter's state in bulk (2 MiB chunks) before its update. Without the prefetch the
# kernel touches evicted pages one by one and each access faults them in (a fixed latency per fault on top of the
# bytes). Same bytes, more events:

# %%
r7_faults = paged_sim.run_scenario("7b", seed=0, steps=40, prefetch=False)
for label, r in [("prefetch", r7), ("page faults", r7_faults)]:
    p = r["paged"]
    moved = (p["bytes_prefetched"] + p["bytes_faulted"]) / GB
    print(f"{label:<12} completed {p['completed']}: moved in {moved:.2f} GB, "
          f"{p['prefetch_calls']:,} prefetch calls, {p['page_faults']:,} faults, "
          f"transfer {p['transfer_seconds'] * 1e3:.0f} ms in total")

# %% [markdown]
# ## Recap
#
# - Paged optimizers put AdamW's $m$ and $v$ in memory the driver can evict to the CPU under pressure and prefetch
#   back before each update; when everything fits, nothing moves.
# - The cost is PCIe traffic on the rare steps that need it: 125 ms per GB on PCIe 3.0 x16 at half the bandwidth.
# - Paging is elementwise bookkeeping: the parameters stay bit-identical to plain AdamW's.
# - In the simulated 65B run on 48 GB, plain AdamW stops at the first long sequence while the paged optimizer
#   completes all 40 steps (the times are model outputs, see the box at the top).
#
# ## Exercises
#
# 1. Implement the eviction rule of a small page pool: when an allocation does not fit, evict least-recently-used
#    state pages to the host until it does, or raise if nothing evictable is left. Check it on the toy device of §2.
# 2. How long does a 2.98 GB page-out and page-in take on PCIe 4.0 x16 under the same model? On PCIe 5.0?
# 3. Use `paged_sim.run_scenario` with a longer spike (or a smaller device) and find the first sequence length at
#    which the paged 65B run also fails. What is still on the device at that point?
# 4. Why does paging the *weights* not help in the same way? Think about how often each is touched per step.
#
# The graded versions are in `exercises/ex07_*.py`; check your work with `python3 -m pytest exercises/test_ex07_*.py`.
