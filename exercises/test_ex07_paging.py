"""Grader for ex07_paging.py (notebook 07): compared with minilora.optim.paged_pool (PagedPool, transfer_seconds).

lru_victims is checked by replaying the same situation in a real PagedPool: one single-page tensor per name, created
in LRU order, the other bytes as a plain allocation, then a request under the budget; the pages that end up on the
host are the ones the pool evicted."""
from grading import GRADE, check_value, fail
from hypothesis import example, given
from hypothesis import strategies as st

from minilora.optim.paged_pool import OutOfMemoryError, PagedPool, transfer_seconds

EXERCISE = "ex07_paging"


@GRADE
@given(nbytes=st.integers(0, 100_000), page_size=st.integers(1, 20_000))
@example(nbytes=10, page_size=4)
@example(nbytes=8, page_size=4)
@example(nbytes=2 * 2**20 * 3 + 5, page_size=2 * 2**20)
def test_page_sizes(ex, nbytes, page_size):
    pool = PagedPool(page_size=page_size, paged_threshold=0)
    expected = [p.nbytes for p in pool.paged_zeros("t", nbytes, dtype="uint8", data=False).pages]
    got = ex.page_sizes(nbytes, page_size)
    check_value("page_sizes(nbytes, page_size)", list(got) if isinstance(got, (list, tuple)) else got, expected,
                {"nbytes": nbytes, "page_size": page_size})


def replay(lru_order, page_bytes, other_bytes, budget, request, pinned):
    """What minilora's pool evicts, in order; None if it raises OutOfMemoryError."""
    pool = PagedPool(page_size=max(page_bytes.values(), default=1), paged_threshold=0)
    if other_bytes:
        pool.allocate("other", other_bytes, "weights")
    tensors = {name: pool.paged_zeros(name, page_bytes[name], dtype="uint8", data=False) for name in lru_order}
    pool.budget_bytes = budget
    try:
        with pool.pinned([tensors[n].pages[0] for n in pinned]):
            pool.allocate("request", request, "activations")
    except OutOfMemoryError:
        return None
    return [n for n in lru_order if tensors[n].pages[0].where == "host"]


@st.composite
def situations(draw):
    k = draw(st.integers(1, 8))
    names = [f"p{i}" for i in range(k)]
    lru = draw(st.permutations(names))
    sizes = {n: draw(st.integers(1, 100)) for n in names}
    other = draw(st.integers(0, 200))
    used = other + sum(sizes.values())
    budget = draw(st.integers(used, used + 150))
    request = draw(st.integers(0, 300))
    pinned = frozenset(draw(st.sets(st.sampled_from(names), max_size=2)))
    return list(lru), sizes, other, budget, request, pinned


SIZES = {"a": 40, "b": 10, "c": 30, "d": 20}


@GRADE
@given(s=situations())
@example(s=(["a", "b", "c", "d"], SIZES, 50, 150, 25, frozenset()))            # evict a only
@example(s=(["d", "c", "b", "a"], SIZES, 50, 150, 45, frozenset()))            # d, then c
@example(s=(["a", "b", "c", "d"], SIZES, 50, 150, 45, frozenset({"a"})))       # a is pinned: b, c, d
@example(s=(["a", "b", "c", "d"], SIZES, 50, 150, 10, frozenset()))            # fits: evict nothing
@example(s=(["a", "b", "c", "d"], SIZES, 50, 150, 100, frozenset({"c"})))      # cannot fit: MemoryError
def test_lru_victims(ex, s):
    lru_order, page_bytes, other, budget, request, pinned = s
    inputs = {"lru_order": lru_order, "page_bytes": page_bytes, "other_bytes": other, "budget": budget,
              "request": request, "pinned": set(pinned)}
    expected = replay(lru_order, page_bytes, other, budget, request, pinned)
    what = "lru_victims(lru_order, page_bytes, other_bytes, budget, request, pinned)"
    try:
        got = ex.lru_victims(list(lru_order), dict(page_bytes), other, budget, request, pinned)
    except MemoryError as e:
        if expected is None:
            return
        fail(what, inputs, f"raised MemoryError ({e}) but evicting {expected} makes room")
    if expected is None:
        fail(what, inputs, f"returned {got!r}, but the request cannot fit even after evicting every unpinned page: "
                           "raise MemoryError")
    check_value(what, list(got), expected, inputs)


@GRADE
@given(nbytes=st.integers(0, 10**12), gen=st.integers(1, 6), lanes=st.sampled_from([1, 2, 4, 8, 16]),
       efficiency=st.floats(0.05, 0.5))
@example(nbytes=10**9, gen=3, lanes=16, efficiency=0.5)
@example(nbytes=10**9, gen=4, lanes=8, efficiency=0.25)
def test_transfer_seconds(ex, nbytes, gen, lanes, efficiency):
    check_value("transfer_seconds(nbytes, gen, lanes, efficiency)", ex.transfer_seconds(nbytes, gen, lanes, efficiency),
                transfer_seconds(nbytes, gen, lanes, efficiency),
                {"nbytes": nbytes, "gen": gen, "lanes": lanes, "efficiency": efficiency}, rel=1e-12)
