"""`minilora paged-sim`: replay a training trace with and without paged optimizer states, and watch a long-sequence
activation spike kill the unpaged run and be survived by the paged one (QLoRA paper §3, "Paged Optimizers").

One training step, as the simulator replays it on a PagedPool (minilora.optim.paged_pool):

    allocate activations(seq_len)     the forward pass; a long sequence makes this spike. Under pressure the pool
                                      evicts least-recently-used optimizer-state pages to the host (cudaMallocManaged)
    free activations                  the backward pass is done; the LoRA gradients stay allocated
    optimizer step                    before each parameter's update its state pages come back (cudaMemPrefetchAsync
                                      in 2 MiB chunks, or page faults with --no-prefetch), then AdamW runs on them

--optim picks the states (per parameter of n elements, m and v together; B = 256):
    adamw       paged_adamw_32bit: float32 m and v                               8·n bytes, all of it pageable
    adamw8bit   paged_adamw_8bit: uint8 codes + one float32 absmax per block     2·n pageable + 8·ceil(n/B) on the
                (n ≥ min_8bit_size = 4096; smaller parameters keep float32)      device (bnb pages only state1/state2)

The unpaged baseline is the same trace on the same budget with every state an ordinary device allocation: the
spike step raises OutOfMemoryError naming the step, the request and what held the device.

Scenarios (the numbers come from minilora.memory, the memory calculator):
    7b     QLoRA LLaMA-7B on a 24 GB GPU: NF4 + double-quant base, LoRA r=64 on every linear layer (qlora.py's
           recipe), bf16 adapters and gradients, fp32 AdamW m and v (paged_adamw_32bit), micro-batch 16.
    65b    QLoRA LLaMA-65B on a 48 GB GPU, same recipe, micro-batch 2.
    tiny   a few MB of real float32 arrays: the real PagedAdamW (or PagedAdamW8bit) updates real parameters with
           seeded random gradients, and the result is checked bit for bit against plain AdamW (or AdamW8bit: the
           parameters and every state byte).
For 7b and 65b the optimizer states are bookkeeping only (no values: 1.3 GB and 6.4 GB would not fit here), driven
through exactly the page loop PagedAdamW and PagedAdamW8bit use. Activations follow the calculator's Korthikanti et
al. formula (with the 5·a·s² attention term, so they grow a little faster than linearly in the sequence length).

The trace is sized to the budget so the story is visible: typical steps are drawn from [c/4, c/2] tokens, where c is
the longest sequence that fits with every state on the device, and the occasional spike sits halfway between c and
the longest sequence that fits once the paged states are evicted, exactly the band where paging decides the outcome.
--seq-len and --spike-len override both. Budgets are in GB = 1e9 bytes (a "24 GB" card has 24 GiB = 25.8e9 bytes,
part of it taken by the CUDA context, so 24e9 is a fair usable figure).

Transfer time is modelled (bnb's docs: ≤ 50 % of PCIe bandwidth; PCIe 3.0 x16 = 16 GB/s, so 1 GB costs 125 ms).
Both directions are counted: a spike that evicts 1 GB costs 125 ms going out and 125 ms coming back before the
optimizer step. The docs' "125 ms per step" counts only the eviction.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import sys

from minilora import memory
from minilora.apps.common import add_threads_option, apply_threads, check_out_file, check_positive
from minilora.backend import default_rng, xp_current
from minilora.nn.parameter import Parameter
from minilora.optim.adamw import AdamW
from minilora.optim.adamw8bit import BLOCKSIZE, MIN_8BIT_SIZE, AdamW8bit, n_blocks
from minilora.optim.paged import PagedAdamW
from minilora.optim.paged8bit import PagedAdamW8bit
from minilora.optim.paged_pool import (
    DEFAULT_PAGE_SIZE,
    GB,
    KINDS,
    OutOfMemoryError,
    PagedPool,
    PagedTensor,
    PagingStats,
    fmt_bytes,
    pcie_bandwidth,
)

# ----------------------------------------------------------------------------------------------------- optimizers
OPTIMIZERS = {   # --optim: (paged optimizer, its unpaged twin, bitsandbytes / Hugging Face name)
    "adamw": (PagedAdamW, AdamW, "paged_adamw_32bit"),
    "adamw8bit": (PagedAdamW8bit, AdamW8bit, "paged_adamw_8bit"),
}


def check_optim(optim: str) -> str:
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}; choose one of {', '.join(OPTIMIZERS)}")
    return optim


def is_8bit(optim: str, numel: int) -> bool:
    """Whether this parameter's states are 8-bit codes (bnb: only from min_8bit_size elements on)."""
    return optim == "adamw8bit" and numel >= MIN_8BIT_SIZE


def state_bytes(optim: str, numel: int) -> tuple:
    """(pageable, device-only) bytes of one parameter's two optimizer states: m and v (float32), or their uint8
    codes (pageable) plus one float32 absmax per block of 256 each (kept on the device, as bnb does)."""
    if is_8bit(optim, numel):
        return 2 * numel, 2 * 4 * n_blocks(numel)
    return 2 * 4 * numel, 0


# ------------------------------------------------------------------------------------------------------ scenarios
@dataclasses.dataclass
class Scenario:
    name: str
    title: str
    weights_bytes: int            # frozen base on the device
    adapter_shapes: list          # trainable tensors (LoRA A (r, D_in), B (D_out, r), ...)
    adapter_itemsize: int         # bytes per adapter value (bf16: 2; the tiny model's float32: 4)
    grad_itemsize: int
    batch_size: int
    budget_bytes: int
    page_size: int
    activation_fn: object         # (seq_len, batch_size, gradient_checkpointing) -> bytes
    real: bool                    # run real arrays through the real paged optimizer
    source: str

    @property
    def numels(self):
        return [_numel(s) for s in self.adapter_shapes]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _llama_numbers(model: str, r: int = 64):
    """(weights_bytes, adapter_shapes, activation_fn, source) for QLoRA on `model`, from the memory calculator."""
    shape = memory.get_shape(model)
    weights = memory.estimate(shape, "qlora", r=r, targets="all-linear", include_activations=False)
    weights = weights.breakdown["weights"]
    lin = memory.block_linears(shape)
    names = memory.resolve_targets(shape, "all-linear")
    shapes = [s for _ in range(shape.n_layer) for n in names for s in ((r, lin[n][0]), (lin[n][1], r))]

    def act(s, b, gc):
        return memory.activation_bytes(shape, s, b, gc)["total"]
    return weights, shapes, act, "minilora.memory"


def get_scenario(model: str) -> Scenario:
    if model == "7b":
        w, shapes, act, src = _llama_numbers("llama-7b")
        return Scenario("7b", "QLoRA LLaMA-7B (NF4+DQ, LoRA r=64 on all linear layers)", w, shapes, 2, 2, 16,
                        24 * GB, DEFAULT_PAGE_SIZE, act, False, src)
    if model == "65b":
        w, shapes, act, src = _llama_numbers("llama-65b")
        return Scenario("65b", "QLoRA LLaMA-65B (NF4+DQ, LoRA r=64 on all linear layers)", w, shapes, 2, 2, 2,
                        48 * GB, DEFAULT_PAGE_SIZE, act, False, src)
    if model == "tiny":
        # 4 matrices of 131,072 float32 values (≥ 1e5: paged) and 4 biases of 512 (stay on the device); 64 KiB pages
        # so each 512 KB state spans 8 pages. Activations: 4 KB per token with checkpointing, 16 KB without.
        act = lambda s, b, gc: s * b * (4096 if gc else 16384)   # noqa: E731
        return Scenario("tiny", "tiny real-array model (4 x 256x512 + 4 x 512 float32)", 1_000_000,
                        [(256, 512)] * 4 + [(512,)] * 4, 4, 4, 8, 12_000_000, 64 * 1024, act, True,
                        "paged_sim.py (a teaching configuration)")
    raise ValueError(f"unknown model {model!r}; choose 7b, 65b or tiny")


# ---------------------------------------------------------------------------------------------------------- trace
def check_trace(trace):
    for i, n in enumerate(trace):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"trace step {i + 1}: sequence length {n!r} is not an int >= 0")
    if not trace:
        raise ValueError("trace is empty: give at least one step")
    return list(trace)


def make_trace(steps: int, typical_len: int, spike_len: int, seed: int = 0, spike_prob: float = 0.06) -> list:
    """Sequence lengths per step: uniform in [typical/2, typical], with spike_len at random steps (never step 1,
    when the states do not exist yet; at least one spike)."""
    if steps < 1 or typical_len < 0 or spike_len < 0:
        raise ValueError(f"need steps >= 1 and lengths >= 0, got steps={steps}, typical={typical_len}, "
                         f"spike={spike_len}")
    rnd = random.Random(seed)                                       # host-side: the trace is plain Python ints
    trace = [rnd.randint(typical_len // 2, typical_len) for _ in range(steps)]
    spikes = [t for t in range(1, steps) if rnd.random() < spike_prob] or [steps // 2] * (steps > 1)
    for t in spikes:
        trace[t] = spike_len
    return trace


def _longest_fitting(free, act, batch, gc):
    """The longest sequence whose activations fit in `free` bytes (0 if none); act is monotone in s."""
    lo, hi = 0, 1
    while hi < 1 << 24 and act(hi, batch, gc) <= free:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if act(mid, batch, gc) <= free else (lo, mid)
    return lo


def room(scn: Scenario, budget: int, threshold: int = 100_000, optim: str = "adamw") -> dict:
    """Bytes at rest and the room left for activations with the states resident vs evicted."""
    adapters = sum(scn.numels) * scn.adapter_itemsize
    grads = sum(scn.numels) * scn.grad_itemsize
    parts = [(n, *state_bytes(optim, n)) for n in scn.numels]       # (numel, pageable, device-only)
    states = sum(a + d for _, a, d in parts)
    small = sum(d + (a if n < threshold else 0) for n, a, d in parts)   # what paging cannot move
    fixed = scn.weights_bytes + adapters + grads
    return {"weights": scn.weights_bytes, "adapters": adapters, "gradients": grads, "states": states,
            "unpaged_states": small, "free_resident": budget - fixed - states, "free_evicted": budget - fixed - small}


# -------------------------------------------------------------------------------------------------------- replay
class StateOnlyAdamW:
    """The bookkeeping twin of PagedAdamW / PagedAdamW8bit for models whose states we cannot hold: same lazy
    allocation, same ≥1e5 paging rule, same page loop (pool.iter_pages), no arithmetic. With optim="adamw8bit" the
    states of parameters ≥ min_8bit_size are uint8 codes (paged like the float32 ones) plus absmax1/absmax2 of one
    float32 per block of 256, allocated on the device after them, as PagedAdamW8bit does."""

    def __init__(self, pool: PagedPool, numels, optim: str = "adamw"):
        self.pool, self.numels, self.optim, self.state = pool, list(numels), check_optim(optim), {}

    def step(self):
        for i, n in enumerate(self.numels):
            if i not in self.state:
                eight = is_8bit(self.optim, n)
                dtype, names = ("uint8", ("state1", "state2")) if eight else ("float32", ("exp_avg", "exp_avg_sq"))
                itemsize = 1 if eight else 4
                if self.pool.is_paged(n):
                    self.state[i] = [self.pool.paged_zeros(f"{i}.{b}", n, dtype, data=False) for b in names]
                else:
                    self.state[i] = [self.pool.allocate(f"{i}.{b}", itemsize * n, "optimizer_state") for b in names]
                if eight:
                    for b in ("absmax1", "absmax2"):
                        self.pool.allocate(f"{i}.{b}", 4 * n_blocks(n), "optimizer_state")
            m, v = self.state[i]
            if isinstance(m, PagedTensor):
                for _ in self.pool.iter_pages(m, v):
                    pass                                            # the kernel would run here


def _diff(a: PagingStats, b: PagingStats) -> PagingStats:
    return PagingStats(**{f.name: getattr(a, f.name) - getattr(b, f.name) for f in dataclasses.fields(PagingStats)})


def _check_budget(scn: Scenario, budget: int):
    if budget < scn.weights_bytes:
        raise ValueError(f"device budget {fmt_bytes(budget)} is smaller than the weights alone "
                         f"({fmt_bytes(scn.weights_bytes)} for {scn.title}); no optimizer can help")


def replay(scn: Scenario, trace, budget: int, paging: bool, page_size: int, prefetch: bool = True,
           gradient_checkpointing: bool = True, seed: int = 0, pcie_gen: int = 3, pcie_lanes: int = 16,
           optim: str = "adamw") -> dict:
    """Run the trace once on a fresh pool. Returns totals, per-step paging cost and the memory timeline; an
    OutOfMemoryError is recorded (oom_step, oom_phase: "setup", "forward" or "optimizer step", error), not raised: a
    real run would stop there, and so does this one. For a real scenario, `bit_identical_to_adamw` says whether the
    paged optimizer's parameters (and, 8-bit, its state bytes) equal its unpaged twin's (AdamW or AdamW8bit)."""
    trace = check_trace(trace)
    _check_budget(scn, budget)
    paged_cls, plain_cls, _ = OPTIMIZERS[check_optim(optim)]
    pool = PagedPool(budget, page_size, paging=paging, prefetch=prefetch, pcie_gen=pcie_gen, pcie_lanes=pcie_lanes)
    out = {"optim": optim, "paging": paging, "prefetch": prefetch, "completed": False, "oom_step": None, "error": None,
           "steps_run": 0, "budget_bytes": budget}
    timeline, per_step = [], []
    last = [pool.stats.copy()]

    def sample(step, phase, seq_len):
        d = _diff(pool.stats, last[0])
        last[0] = pool.stats.copy()
        u = pool.usage()
        timeline.append({"step": step, "phase": phase, "seq_len": seq_len, **{k: u[k] for k in (*KINDS, "free")},
                         "bytes_evicted": d.bytes_evicted, "bytes_in": d.bytes_prefetched + d.bytes_faulted})

    params = ref = None
    phase = "setup"                                                   # where an OutOfMemoryError happened
    try:
        r = room(scn, budget, pool.paged_threshold, optim)
        pool.allocate("base_weights", scn.weights_bytes, "weights")
        pool.allocate("lora_weights", r["adapters"], "weights")
        pool.allocate("lora_grads", r["gradients"], "gradients")
        if scn.real:
            xp, rng = xp_current(), default_rng(seed)
            params = [Parameter(rng.standard_normal(s, dtype=xp.float32) * xp.float32(0.02))
                      for s in scn.adapter_shapes]
            ref = [Parameter(p.data.copy()) for p in params]          # plain AdamW twin, for the bit-identity check
            opt, ref_opt = paged_cls(params, pool=pool), plain_cls(ref)
        else:
            opt = StateOnlyAdamW(pool, scn.numels, optim)
        for t, seq_len in enumerate(trace, start=1):
            pool.step, phase = t, "forward"
            before = pool.stats.copy()
            pool.allocate("activations", scn.activation_fn(seq_len, scn.batch_size, gradient_checkpointing),
                          "activations")
            sample(t, "forward", seq_len)
            pool.free("activations")
            if scn.real:
                for p, q in zip(params, ref, strict=True):
                    p.grad = rng.standard_normal(p.shape, dtype=xp.float32)
                    q.grad = p.grad.copy()
                ref_opt.step()
            phase = "optimizer step"
            opt.step()
            sample(t, "optimizer", seq_len)
            d = _diff(pool.stats, before)
            per_step.append({"step": t, "seq_len": seq_len, "bytes_evicted": d.bytes_evicted,
                             "bytes_prefetched": d.bytes_prefetched, "bytes_faulted": d.bytes_faulted,
                             "transfer_seconds": pool.transfer_seconds(d)})
            out["steps_run"] = t
        out["completed"] = True
    except OutOfMemoryError as e:
        out["oom_step"] = 0 if e.step is None else e.step           # 0: the model itself did not fit (setup)
        out["oom_phase"] = phase
        out["error"] = str(e)
        out["oom_request"] = {"name": e.name, "bytes": e.nbytes, "kind": e.kind}
        sample(out["oom_step"], "oom", None)
    s = pool.stats
    out.update(peak_device_bytes=pool.peak_device_bytes, bytes_evicted=s.bytes_evicted,
               bytes_prefetched=s.bytes_prefetched, bytes_faulted=s.bytes_faulted, evictions=s.evictions,
               prefetches=s.prefetches, prefetch_calls=s.prefetch_calls, page_faults=s.page_faults,
               transfer_seconds=pool.transfer_seconds(),
               paged_tensors=len(pool.tensors), state_tensors=2 * len(scn.numels),
               per_step=per_step, timeline=timeline)
    if scn.real and out["completed"]:
        from minilora.backend import get_array_module
        xp = get_array_module(params[0].data)
        same = [bool(xp.array_equal(p.data, q.data)) for p, q in zip(params, ref, strict=True)]
        if optim == "adamw8bit":                                    # every state byte too: codes and absmax
            for name, st in opt.state.items():
                for key in ("state1", "state2", "absmax1", "absmax2"):
                    if key in st:
                        mine = pool.gather(st[key]) if isinstance(st[key], PagedTensor) else st[key].reshape(-1)
                        same.append(bool(xp.array_equal(mine, ref_opt.state[name][key].reshape(-1))))
        out["bit_identical_to_adamw"] = all(same)
    return out


def run_scenario(model: str = "7b", budget_gb=None, page_size=None, prefetch: bool = True,
                 gradient_checkpointing: bool = True, seed: int = 0, steps: int = 40, seq_len=None, spike_len=None,
                 batch_size=None, trace=None, pcie_gen: int = 3, pcie_lanes: int = 16, optim: str = "adamw") -> dict:
    """Build the scenario and trace, replay it without and with paging. Returns {"scenario", "unpaged", "paged"}."""
    check_optim(optim)
    scn = get_scenario(model)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scn.batch_size = batch_size
    budget = scn.budget_bytes if budget_gb is None else int(round(budget_gb * GB))
    page_size = scn.page_size if page_size is None else page_size
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page size must be a positive int number of bytes, got {page_size!r}")
    if page_size % 4:
        raise ValueError(f"page size {page_size} B is not a multiple of the element size (4 B, float32 states)")
    if optim == "adamw8bit" and page_size % BLOCKSIZE:
        raise ValueError(f"page size {page_size} B is not a multiple of {BLOCKSIZE}: a block of {BLOCKSIZE} 8-bit "
                         f"codes would straddle two pages")
    _check_budget(scn, budget)
    r = room(scn, budget, optim=optim)
    gc, b, act = gradient_checkpointing, scn.batch_size, scn.activation_fn
    c_res = _longest_fitting(max(r["free_resident"], 0), act, b, gc)
    c_evi = _longest_fitting(max(r["free_evicted"], 0), act, b, gc)
    if trace is None:
        typical = max(1, c_res // 2) if seq_len is None else seq_len
        spike = max(typical + 1, (c_res + c_evi) // 2) if spike_len is None else spike_len
        trace = make_trace(steps, typical, spike, seed)
    trace = check_trace(trace)
    kw = dict(page_size=page_size, prefetch=prefetch, gradient_checkpointing=gc, seed=seed, pcie_gen=pcie_gen,
              pcie_lanes=pcie_lanes, optim=optim)
    paged_cls, plain_cls, bnb_name = OPTIMIZERS[optim]
    scenario = {"model": scn.name, "title": scn.title, "source": scn.source, "budget_bytes": budget, "optim": optim,
                "optimizer": paged_cls.__name__, "unpaged_optimizer": plain_cls.__name__, "bnb_name": bnb_name,
                "page_size": page_size, "prefetch": prefetch, "gradient_checkpointing": gc, "batch_size": b,
                "seed": seed, "steps": len(trace), "trace": trace, "pcie_gen": pcie_gen, "pcie_lanes": pcie_lanes,
                "longest_seq_states_resident": c_res, "longest_seq_states_evicted": c_evi,
                **{f"{k}_bytes": v for k, v in r.items()}}
    return {"scenario": scenario, "unpaged": replay(scn, trace, budget, paging=False, **kw),
            "paged": replay(scn, trace, budget, paging=True, **kw)}


# ---------------------------------------------------------------------------------------------------------- output
def to_json(result: dict) -> dict:
    """The --json object: everything but the timelines (per-step paging costs are kept)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "timeline"} if k in ("unpaged", "paged") else v)
            for k, v in result.items()}


def _oom_text(run: dict) -> str:
    """Where a replay's OutOfMemoryError happened (setup, or a step's forward / optimizer step) and its message."""
    if run.get("oom_phase", "setup") == "setup":
        where = "during setup, before step 1"
    else:
        where = f"at step {run['oom_step']} ({run['oom_phase']})"
    return f"OutOfMemoryError {where}\n  {run['error']}"


def summary(result: dict) -> str:
    s, u, p = result["scenario"], result["unpaged"], result["paged"]
    bw = pcie_bandwidth(s["pcie_gen"], s["pcie_lanes"]) * 0.5
    spikes = sorted({n for n in s["trace"] if n > s["longest_seq_states_resident"]})
    at = [i + 1 for i, n in enumerate(s["trace"]) if n in spikes]
    eight = s["optim"] == "adamw8bit"
    states = "AdamW 8-bit m+v (codes + absmax)" if eight else "AdamW m+v"
    lines = [f"paged-sim: {s['title']} on a {fmt_bytes(s['budget_bytes'])} device, micro-batch {s['batch_size']}, "
             f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
             f"  optimizer: {s['optimizer']} ({s['bnb_name']}), unpaged baseline {s['unpaged_optimizer']}",
             f"  at rest: weights {fmt_bytes(s['weights_bytes'])}, adapters {fmt_bytes(s['adapters_bytes'])}, "
             f"gradients {fmt_bytes(s['gradients_bytes'])}, {states} {fmt_bytes(s['states_bytes'])} "
             f"({p['paged_tensors']} of {p['state_tensors']} state tensors paged, {s['page_size']:,} B pages)",
             f"  numbers from {s['source']}",
             f"  trace: {s['steps']} steps, longest sequence that fits: {s['longest_seq_states_resident']} tokens "
             f"with the states on the device, {s['longest_seq_states_evicted']} with them evicted; "
             f"spikes of {', '.join(map(str, spikes)) or '-'} tokens at steps {', '.join(map(str, at)) or '-'}",
             ""]
    if u["completed"]:
        lines.append(f"without paging: completed {u['steps_run']} steps, peak {fmt_bytes(u['peak_device_bytes'])}")
    else:
        lines.append(f"without paging: {_oom_text(u)}")
    state = f"completed {p['steps_run']}/{s['steps']} steps" if p["completed"] else _oom_text(p)
    lines += [f"with paging ({s['optimizer']}, prefetch {'on' if s['prefetch'] else 'off'}): {state}, "
              f"peak {fmt_bytes(p['peak_device_bytes'])} of {fmt_bytes(s['budget_bytes'])}",
              f"  evicted {fmt_bytes(p['bytes_evicted'])} ({p['evictions']} pages), prefetched "
              f"{fmt_bytes(p['bytes_prefetched'])} ({p['prefetches']} pages), faulted {fmt_bytes(p['bytes_faulted'])} "
              f"({p['page_faults']} faults); transfer {p['transfer_seconds']:.3f} s in total "
              f"(PCIe {s['pcie_gen']}.0 x{s['pcie_lanes']} at 50 % = {bw / GB:.1f} GB/s)"]
    paged_steps = [d for d in p["per_step"] if d["bytes_evicted"] or d["bytes_prefetched"] or d["bytes_faulted"]]
    for d in paged_steps:
        lines.append(f"  step {d['step']:>3} ({d['seq_len']} tokens): evicted {fmt_bytes(d['bytes_evicted'])}, "
                     f"back in {fmt_bytes(d['bytes_prefetched'] + d['bytes_faulted'])}, {d['transfer_seconds']:.3f} s")
    lines.append(f"  the other {len(p['per_step']) - len(paged_steps)} steps moved 0 bytes: paging only under pressure")
    if "bit_identical_to_adamw" in p:
        what = "parameters and state bytes" if eight else "parameters"
        lines.append(f"  {what} bit-identical to plain {s['unpaged_optimizer']}: {p['bit_identical_to_adamw']}")
    return "\n".join(lines)


def plot_timeline(result: dict, path) -> None:
    """Device memory over the trace, unpaged (top) and paged (bottom): weights, gradients, optimizer states on the
    device, activations, free; evictions (▼) and prefetches (▲) marked. Deterministic PNG written atomically."""
    import matplotlib  # imported here: plotting is optional
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: plotting is optional
    from matplotlib.figure import Figure

    from minilora.io import atomic_write_bytes
    with matplotlib.rc_context():                                  # rcParams of the caller are left alone
        matplotlib.rcdefaults()                                      # and do not leak in: same bytes anywhere
        s = result["scenario"]
        fig = Figure(figsize=(10, 6.8), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 1, sharex=True)
        bands = [("weights", "weights", "#4c72b0"), ("gradients", "gradients", "#8172b2"),
                 ("optimizer_state", "optimizer states on device", "#dd8452"),
                 ("activations", "activations", "#55a868"), ("free", "free", "#e8e8e8")]
        budget = s["budget_bytes"] / GB
        for ax, key, label in ((axes[0], "unpaged", "AdamW, no paging"), (axes[1], "paged", "PagedAdamW")):
            run = result[key]
            tl = [e for e in run["timeline"] if e["phase"] != "oom"]
            x = [e["step"] + (0.0 if e["phase"] == "forward" else 0.5) for e in tl]
            if tl:
                ax.stackplot(x, [[e[k] / GB for e in tl] for k, _, _ in bands], labels=[b[1] for b in bands],
                             colors=[b[2] for b in bands], step="post")
            ax.axhline(budget, color="black", lw=0.8, ls="--")
            top = budget * 1.08
            for e, xi in zip(tl, x, strict=True):
                if e["bytes_evicted"]:
                    ax.plot([xi + 0.25], [budget * 1.02], marker="v", color="#c44e52", ms=7)
                if e["bytes_in"]:
                    ax.plot([xi + 0.25], [budget * 1.02], marker="^", color="#2a7f3f", ms=7)
            if run["oom_step"] is not None:                               # the request that did not fit, outlined
                used = sum(run["timeline"][-1][k] for k in KINDS) / GB
                want = run["oom_request"]["bytes"] / GB
                ax.bar([run["oom_step"]], [want], bottom=[used], width=0.5, align="edge", fill=False, hatch="//",
                       edgecolor="#c44e52", lw=1.2)
                ax.annotate(f"OutOfMemoryError at step {run['oom_step']}:\n{run['oom_request']['name']} needs "
                            f"{want:.2f} GB, {budget - used:.2f} GB free", xy=(run["oom_step"] + 0.5, used + want / 2),
                            xytext=(run["oom_step"] + 2, budget * 0.45), color="#c44e52", fontsize=9,
                            arrowprops={"arrowstyle": "->", "color": "#c44e52"})
                top = max(top, (used + want) * 1.04)
            done = (f"completed, {run['bytes_evicted'] / GB:.2f} GB evicted, {run['transfer_seconds'] * 1e3:.0f} ms "
                    f"of PCIe transfers" if run["completed"] else f"stopped at step {run['oom_step']}")
            ax.set_title(f"{label}: {done}", fontsize=10, loc="left")
            ax.set_ylabel("device memory (GB)")
            ax.set_ylim(0, top)
        axes[1].set_xlabel("training step (forward peak, then optimizer step)")
        axes[1].set_xlim(1, s["steps"] + 1)
        axes[1].plot([], [], "v", color="#c44e52", label="eviction to host")
        axes[1].plot([], [], "^", color="#2a7f3f", label="prefetch to device")
        axes[1].plot([], [], ls="--", color="black", lw=0.8, label="device budget")
        fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", fontsize=9, ncol=4, frameon=False)
        fig.suptitle(f"Simulated paged optimizer (memory bookkeeping, no GPU)\n{s['title']}, "
                     f"{s['budget_bytes'] / GB:g} GB budget", fontsize=11)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})     # no version string: same bytes every run
    atomic_write_bytes(path, buf.getvalue())


FIGURE = {"model": "65b", "seed": 0, "steps": 40}                # the committed figures/paged_memory_timeline.png


def write_figure(path="figures/paged_memory_timeline.png"):
    """Regenerate the committed timeline figure (QLoRA 65B on 48 GB, seed 0); returns the path."""
    plot_timeline(run_scenario(**FIGURE), path)
    return path


# ------------------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="minilora paged-sim", description="Replay a training trace with a "
                                 "long-sequence spike, without paging (AdamW) and with paged AdamW (bitsandbytes).")
    ap.add_argument("--model", choices=("7b", "65b", "tiny"), default="7b")
    ap.add_argument("--optim", choices=tuple(OPTIMIZERS), default="adamw",
                    help="adamw: paged_adamw_32bit (float32 m, v); adamw8bit: paged_adamw_8bit (8-bit codes + absmax)")
    ap.add_argument("--budget-gb", type=float, default=None, help="GB = 1e9 B (default 24 / 48 / 0.012)")
    ap.add_argument("--page-size", type=int, default=None, help="bytes per page (default 2 MiB; 64 KiB for tiny)")
    ap.add_argument("--no-prefetch", action="store_true", help="fault pages in one by one instead of prefetching")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 16 / 2 / 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="typical sequence length (default: sized to budget)")
    ap.add_argument("--spike-len", type=int, default=None, help="long-sequence length (default: sized to budget)")
    ap.add_argument("--pcie-gen", type=int, default=3)
    ap.add_argument("--pcie-lanes", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    ap.add_argument("--figure", default=None, help="write the memory timeline PNG here")
    add_threads_option(ap)
    a = ap.parse_args(argv)
    check_positive(ap, "--budget-gb", a.budget_gb)
    if a.seed < 0:
        ap.error(f"--seed must be >= 0 (NumPy seeds are non-negative), got {a.seed}")
    if a.figure:
        check_out_file(ap, "--figure", a.figure)
    apply_threads(a.threads)
    try:
        result = run_scenario(a.model, a.budget_gb, a.page_size, not a.no_prefetch, a.gradient_checkpointing, a.seed,
                              a.steps, a.seq_len, a.spike_len, a.batch_size, pcie_gen=a.pcie_gen,
                              pcie_lanes=a.pcie_lanes, optim=a.optim)
    except ValueError as e:
        print(f"minilora paged-sim: error: {e}", file=sys.stderr)
        return 2
    if a.figure:
        plot_timeline(result, a.figure)
    print(json.dumps(to_json(result)) if a.json else summary(result))
    return 0
