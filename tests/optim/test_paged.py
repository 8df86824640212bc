"""PagedPool and PagedAdamW: the budget is never exceeded, evicted bytes come back identical, no page is lost or
duplicated, and paged AdamW is bit-identical to AdamW however often its pages were evicted."""
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from minilora.backend import to_numpy
from minilora.nn.parameter import Parameter
from minilora.optim.adamw import AdamW
from minilora.optim.paged import GB, MiB, OutOfMemoryError, PagedAdamW, PagedPool, PagedTensor, transfer_seconds
from minilora.optim.paged_pool import pcie_bandwidth


# ----------------------------------------------------------------------------------------------- bandwidth model
def test_one_gb_on_pcie3_x16_costs_125_ms():
    # bnb docs: 1 GB evicted per step on PCIe 3.0 x16 (16 GB/s) at ~50 % efficiency = 1 / (16 * 0.5) s
    assert pcie_bandwidth(3, 16) == 16e9
    assert transfer_seconds(1e9, gen=3, lanes=16) == 0.125
    assert transfer_seconds(1e9, gen=4, lanes=16) == 0.0625          # each generation doubles the lanes' speed
    assert transfer_seconds(1e9, gen=3, lanes=8) == 0.25
    pool = PagedPool(budget_bytes=None)
    pool.stats.bytes_evicted = GB
    assert pool.transfer_seconds() == 0.125


@pytest.mark.parametrize("kw", [{"efficiency": 0.8}, {"efficiency": 0.0}, {"gen": 7}, {"lanes": 3}])
def test_bandwidth_model_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        transfer_seconds(1e9, **kw)


# ------------------------------------------------------------------------------------------------------ the pool
def test_oom_inside_optimizer_step_is_labelled_by_the_step_not_setup():
    from minilora.nn.parameter import Parameter
    p = Parameter(np.zeros(200_000, np.float32))
    p.grad = np.ones_like(p.data)
    pool = PagedPool(budget_bytes=100_000, page_size=64 * 1024, paging=True)
    opt = PagedAdamW([("w", p)], pool=pool)
    with pytest.raises(OutOfMemoryError) as e:
        opt.step()
    assert "step 1 (optimizer step)" in str(e.value) and "setup" not in str(e.value)
    assert pool.step is None                                          # the label does not outlive the step


def test_allocations_share_the_budget_and_oom_names_step_request_and_occupants():
    pool = PagedPool(budget_bytes=1000, page_size=64, paging=False)
    pool.allocate("w", 600, "weights")
    pool.allocate("g", 100, "gradients")
    pool.step = 7
    with pytest.raises(OutOfMemoryError) as e:
        pool.allocate("activations", 400, "activations")
    msg = str(e.value)
    assert isinstance(e.value, MemoryError)
    assert "step 7" in msg and "'activations'" in msg and "400 B" in msg
    assert "weights 600 B" in msg and "gradients 100 B" in msg and "300 B free" in msg
    assert e.value.step == 7 and e.value.nbytes == 400 and e.value.occupied["weights"] == 600
    pool.free("g")
    pool.allocate("activations", 400, "activations")                  # fits now
    assert pool.device_bytes == 1000 and pool.usage()["free"] == 0


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_page_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="page_size"):
        PagedPool(budget_bytes=100, page_size=bad)


def test_page_size_must_be_a_multiple_of_the_element_size():
    pool = PagedPool(budget_bytes=None, page_size=6)
    with pytest.raises(ValueError, match="not a multiple of the element size"):
        pool.paged_zeros("m", 1000, "float32")
    with pytest.raises(ValueError, match="not a multiple of the element size"):
        PagedAdamW([Parameter(np.zeros(200_000, np.float32))], pool=pool)


def test_bad_allocation_requests():
    pool = PagedPool(budget_bytes=100)
    with pytest.raises(ValueError, match="kind"):
        pool.allocate("x", 10, "cache")
    with pytest.raises(ValueError, match="nbytes"):
        pool.allocate("x", -1, "activations")
    pool.allocate("x", 10, "activations")
    with pytest.raises(ValueError, match="already exists"):
        pool.allocate("x", 10, "activations")
    with pytest.raises(KeyError, match="no such allocation"):
        pool.free("y")
    with pytest.raises(ValueError, match="budget"):
        PagedPool(budget_bytes=-1)


def test_only_states_of_at_least_1e5_elements_are_paged():
    pool = PagedPool(budget_bytes=None)
    params = [Parameter(np.ones(99_999, np.float32)), Parameter(np.ones(100_000, np.float32))]
    opt = PagedAdamW(params, pool=pool)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    assert not isinstance(opt.state["0"]["exp_avg"], PagedTensor)
    assert isinstance(opt.state["1"]["exp_avg"], PagedTensor)
    assert pool.allocations["0.exp_avg"] == (399_996, "optimizer_state")
    assert pool.stats.bytes_evicted == pool.stats.bytes_prefetched == 0     # it fits: paging costs nothing


def test_lru_evicts_least_recently_used_and_prefetch_brings_back_in_bulk(xp):
    pool = PagedPool(budget_bytes=4 * 64, page_size=64)               # room for 4 pages of 16 float32
    a = pool.paged_zeros("a", 32, xp.float32)                          # 2 pages
    b = pool.paged_zeros("b", 32, xp.float32)                          # 2 pages: the device is full
    pool.prefetch_tensors([a])                                         # a is now the most recently used
    pool.allocate("act", 64, "activations")                            # one page must go: b[0], the LRU one
    assert [p.where for p in b.pages] == ["host", "device"] and all(p.where == "device" for p in a.pages)
    pool.free("act")
    pool.prefetch_tensors([b])
    assert pool.stats.evictions == 1 and pool.stats.prefetches == 1 and pool.stats.page_faults == 0
    pool.check()


def test_faults_page_by_page_without_prefetch(xp):
    pool = PagedPool(budget_bytes=None, page_size=64, prefetch=False)
    m, v = pool.paged_zeros("m", 40, xp.float32), pool.paged_zeros("v", 40, xp.float32)   # 3 pages each
    pool.evict_all()
    spans = [(a, b) for a, b, _ in pool.iter_pages(m, v)]
    assert spans == [(0, 16), (16, 32), (32, 40)]                     # the last page is short
    assert pool.stats.page_faults == 6 and pool.stats.prefetches == 0
    assert pool.stats.bytes_faulted == 2 * 160
    assert pool.transfer_seconds() == pytest.approx(2 * (320 / 8e9) + 6 * pool.fault_latency_s)


def test_request_that_cannot_fit_even_after_evicting_everything_is_an_oom_and_evicts_nothing(xp):
    pool = PagedPool(budget_bytes=1000, page_size=64)
    pool.allocate("w", 500, "weights")
    t = pool.paged_zeros("m", 100, xp.float32)                        # 400 B in 7 pages
    with pytest.raises(OutOfMemoryError, match="even after evicting"):
        pool.allocate("act", 600, "activations")
    assert pool.stats.evictions == 0 and all(p.where == "device" for p in t.pages)
    pool.allocate("act", 500, "activations")                          # fits once all 400 B are evicted
    assert pool.stats.bytes_evicted == 400 and pool.device_bytes == 1000


# ------------------------------------------------------------------------------ invariants under random traces
ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "use", "evict"]), st.integers(0, 3000)),
               min_size=1, max_size=25)


@settings(max_examples=50, deadline=None)
@given(page_elems=st.integers(1, 64), budget=st.integers(0, 8_000),
       sizes=st.lists(st.integers(1, 600), min_size=1, max_size=4),
       prefetch=st.booleans(), program=ops, seed=st.integers(0, 2**16))
def test_budget_never_exceeded_bytes_come_back_identical_no_page_lost(page_elems, budget, sizes, prefetch, program,
                                                                      seed):
    rng = np.random.default_rng(seed)
    pool = PagedPool(budget_bytes=budget, page_size=4 * page_elems, paged_threshold=0, prefetch=prefetch)
    tensors, truth = [], []
    for i, n in enumerate(sizes):
        t = pool.paged_zeros(f"t{i}", n, np.float32)
        values = rng.standard_normal(n).astype(np.float32)
        for p in t.pages:                                              # real data, written where each page lives
            (p.device if p.where == "device" else p.host)[...] = values[p.start:p.stop]
        tensors.append(t)
        truth.append(values)
    live = []
    for i, (op, arg) in enumerate(program):
        try:
            if op == "alloc":
                pool.allocate(f"act{i}", arg, "activations")
                live.append(f"act{i}")
            elif op == "free" and live:
                pool.free(live.pop(arg % len(live)))
            elif op == "use":
                t = tensors[arg % len(tensors)]
                for _, _, (arr,) in pool.iter_pages(t):                 # a kernel touching every page, in place
                    arr *= np.float32(1.0)
            elif op == "evict":
                pool.evict_all()
        except OutOfMemoryError:
            pass                                                       # a request that cannot fit is refused whole
        assert pool.device_bytes <= budget
        pool.check()                                                   # one tier per page, books balance
        n_pages = sum(len(t.pages) for t in tensors)
        assert sum(p.where == "device" for t in tensors for p in t.pages) + \
            sum(p.where == "host" for t in tensors for p in t.pages) == n_pages
        for t, values in zip(tensors, truth, strict=True):
            np.testing.assert_array_equal(to_numpy(pool.gather(t)), values)
    assert pool.peak_device_bytes <= budget
    back = pool.stats.prefetches + pool.stats.page_faults > 0
    event(f"pages evicted: {pool.stats.evictions > 0}, brought back: {back}")
    assert pool.stats.bytes_evicted >= 0 and pool.stats.evictions * 4 * page_elems >= pool.stats.bytes_evicted


# -------------------------------------------------------------------------------- PagedAdamW == AdamW, bit for bit
def _twin_runs(xp, shapes, steps, pool, seed, between=None):
    rng = np.random.default_rng(seed)
    a = [Parameter(xp.asarray(rng.standard_normal(s).astype(np.float32))) for s in shapes]
    b = [Parameter(p.data.copy()) for p in a]
    ref, paged = AdamW(a, lr=1e-2, weight_decay=0.1), PagedAdamW(b, lr=1e-2, weight_decay=0.1, pool=pool)
    for t in range(steps):
        for p, q in zip(a, b, strict=True):
            p.grad = xp.asarray(rng.standard_normal(p.shape).astype(np.float32))
            q.grad = p.grad.copy()
        ref.step()
        paged.step()
        if between is not None:
            between(pool, t)
    return a, b, ref, paged


@settings(max_examples=25, deadline=None)
@given(page_elems=st.integers(3, 2048), prefetch=st.booleans(), steps=st.integers(1, 5), seed=st.integers(0, 999),
       spike=st.integers(0, 30_000))
def test_paged_adamw_matches_adamw_bit_for_bit_under_evictions(page_elems, prefetch, steps, seed, spike):
    shapes = [(32, 50), (7,), (3, 600)]
    # budget: all states fit, but an activation "spike" between steps pushes some of them out
    pool = PagedPool(budget_bytes=40_000, page_size=4 * page_elems, paged_threshold=100, prefetch=prefetch)

    def spike_then_free(pool, t):
        try:
            pool.allocate("act", spike, "activations")
            pool.free("act")
        except OutOfMemoryError:
            pool.evict_all()
        pool.check()

    a, b, _, _ = _twin_runs(np, shapes, steps, pool, seed, spike_then_free)
    for p, q in zip(a, b, strict=True):
        assert np.array_equal(p.data, q.data)
    assert pool.peak_device_bytes <= 40_000


def test_paged_adamw_matches_adamw_with_every_page_evicted_every_step(xp):
    pool = PagedPool(budget_bytes=None, page_size=4096)
    a, b, ref, paged = _twin_runs(xp, [(300, 400), (512,), (100_000,)], 5, pool, 0, lambda pool, t: pool.evict_all())
    assert pool.stats.bytes_evicted == 5 * 2 * 4 * (120_000 + 100_000)
    assert pool.stats.bytes_prefetched == 4 * 2 * 4 * (120_000 + 100_000)   # steps 2..5 bring everything back
    for p, q in zip(a, b, strict=True):
        assert bool(xp.array_equal(p.data, q.data))
    sd = paged.state_dict()                                            # paged buffers come out as plain arrays
    ref_sd = ref.state_dict()
    for name in ref_sd["state"]:
        for buf in ("exp_avg", "exp_avg_sq"):
            assert bool(xp.array_equal(sd["state"][name][buf], ref_sd["state"][name][buf]))
    paged.load_state_dict(sd)                                          # and go back into pages
    assert isinstance(paged.state["0"]["exp_avg"], PagedTensor)
    pool.check()
    assert bool(xp.array_equal(pool.gather(paged.state["0"]["exp_avg"]).reshape(300, 400), sd["state"]["0"]["exp_avg"]))


def test_paged_adamw_keeps_adamw_constructor_and_validation():
    p = [Parameter(np.zeros(3, np.float32))]
    opt = PagedAdamW(p)
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    assert opt.pool.budget_bytes is None and opt.pool.page_size == 2 * MiB
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(p, lr=-1.0)


def test_tiny_gpt_trains_bit_identically_with_paged_adamw_under_evictions():
    nn = pytest.importorskip("minilora.nn")
    # n_embd 160 makes mlp.c_fc and mlp.c_proj 102,400 elements: paged by bnb's >= 1e5 rule, the rest stays put
    cfg = nn.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=160, seed=3)
    ref_model, paged_model = nn.GPT(cfg), nn.GPT(cfg)
    state_bytes = 2 * 4 * ref_model.get_num_params()
    pool = PagedPool(budget_bytes=state_bytes + 64_000, page_size=16 * 1024)
    ref_opt = AdamW(ref_model.named_parameters(), lr=3e-3)
    paged_opt = PagedAdamW(paged_model.named_parameters(), lr=3e-3, pool=pool)
    rng = np.random.default_rng(0)
    for step in range(1, 7):
        idx = rng.integers(0, cfg.vocab_size, size=(4, cfg.block_size))
        losses = []
        for model, opt in ((ref_model, ref_opt), (paged_model, paged_opt)):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            model.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss)
        assert losses[0] == losses[1]                                   # same bits in, same loss out
        for (name, p), (_, q) in zip(ref_model.named_parameters(), paged_model.named_parameters(), strict=True):
            assert np.array_equal(p.data, q.data), (step, name)        # the whole trajectory, not just the end
        pool.step = step
        pool.allocate("activations", 900_000, "activations")          # a spike evicts ~0.9 MB of state pages
        pool.free("activations")
        pool.check()
    paged = [s["exp_avg"] for s in paged_opt.state.values() if isinstance(s["exp_avg"], PagedTensor)]
    assert len(paged) == 2 and pool.stats.bytes_evicted > 5 * 800_000 and pool.stats.bytes_prefetched > 0
    assert pool.peak_device_bytes <= pool.budget_bytes
    for (name, p), (_, q) in zip(ref_model.named_parameters(), paged_model.named_parameters(), strict=True):
        assert np.array_equal(p.data, q.data), name


def test_pool_and_parameters_must_share_a_backend():
    class FakeXp:                                                      # stands in for cupy on a machine without one
        __name__ = "cupy"
    with pytest.raises(TypeError, match="backend"):
        PagedAdamW([Parameter(np.zeros(3, np.float32))], pool=PagedPool(budget_bytes=None, xp=FakeXp()))
