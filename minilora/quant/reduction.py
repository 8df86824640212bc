"""PyTorch's CPU float32 sum and mean, in PyTorch's own addition order: the offset of bitsandbytes' double quantization.

bitsandbytes stores `offset = absmax.mean()` (a torch float32 mean). On CPU, torch computes mean as sum / n:
    mean = float32(sum(x) / float32(n))                  one float32 division (ATen's mean_out: sum_out().div_(n))
and sums float32 in float32 with a fixed, vectorized "cascade" order (ATen's cpu/SumKernel.cpp, cascade_sum):
    lanes      L float32 values per vector (8 on the x86 builds measured: torch 2.13 CPU, AVX-512 machine)
    n >= L:    the first v = n // L vectors are summed as `row_sum` over vectors (below), giving L lane sums;
               the n - v*L tail elements are added one by one to a scalar 0, then the L lane sums in lane order
    n < L:     the scalar `row_sum` of the n values
    row_sum(r_0 .. r_{m-1}):  4 interleaved accumulators (r_i goes to accumulator i % 4, for i < 4*(m//4)) summed
               by `cascade`; the leftover r_i (i >= 4*(m//4)) are added to accumulator 0, then 1, 2, 3 added to it
    cascade(rows, m rows):    4 levels; p = max(4, ceil_log2(m) // 4), step = 2^p. Level 0 adds `step` rows at a
               time; then level j adds level j-1 into itself and clears it, moving up while the row count is a
               multiple of step^j. Leftover rows go to level 0; at the end levels 1, 2, 3 are added to level 0.
Above 32,767 elements with more than one torch thread, torch splits the range into T' = min(T, ceil(n / 32768))
equal chunks of ceil(n / T') elements, sums each as above into slot t of a T-slot buffer, then sums the buffer
(with the same rule). `threads` is that T.

Measured against torch 2.13 CPU: 0 differences in sum and mean over n = 1 .. 299 and sizes up to 262,144, for
threads 1, 2 and 4 (tests/quant/test_nested_rounding.py re-checks 1 .. 129 and sizes up to 70,001). Other CPUs
may use another lane count (`lanes`): ARM builds, or a torch built without AVX. Everything here is exact float32
arithmetic on the array module of the input.
"""
from __future__ import annotations

from minilora.backend import get_array_module

GRAIN = 32768        # at::internal::GRAIN_SIZE: below it a reduction runs on one thread
LANES = 8            # float32 lanes of torch's CPU sum kernel as measured (x86, torch 2.13)
_ILP = 4             # row_sum's interleaved accumulators
_LEVELS = 4          # cascade levels


def _ceil_log2(m: int) -> int:
    return 1 if m <= 2 else int(m - 1).bit_length()


def _cascade(rows, xp):
    """(m, k) float32 -> (k,): the k columns summed in torch's cascade order (see the module docstring)."""
    m = rows.shape[0]
    power = max(4, _ceil_log2(m) // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    acc = xp.zeros((_LEVELS, rows.shape[1]), dtype=xp.float32)           # (4, k)
    i = 0
    while i + step <= m:
        for _ in range(step):
            acc[0] += rows[i]
            i += 1
        for j in range(1, _LEVELS):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * power)):
                break
    while i < m:
        acc[0] += rows[i]
        i += 1
    for j in range(1, _LEVELS):
        acc[0] += acc[j]
    return acc[0]                                                        # (k,)


def _row_sum(rows, xp):
    """(m, k) float32 -> (k,): torch's row_sum over the m rows (4 interleaved accumulators, then cascade)."""
    m, k = rows.shape
    mi = m // _ILP
    part = _cascade(rows[:mi * _ILP].reshape(mi, _ILP * k), xp).reshape(_ILP, k)   # (4, k)
    total = part[0].copy()                                               # (k,)
    for i in range(mi * _ILP, m):
        total += rows[i]
    for j in range(1, _ILP):
        total += part[j]
    return total


def _serial_sum(x, lanes: int, xp):
    """Flat float32 (n,) -> float32 scalar, one thread. Overflow gives inf, as in torch (no warning)."""
    with xp.errstate(over="ignore", invalid="ignore"):
        return _serial_sum_body(x, lanes, xp)


def _serial_sum_body(x, lanes: int, xp):
    n = x.size
    f32 = xp.float32
    if n < lanes:
        return f32(0) + _row_sum(x.reshape(n, 1), xp)[0]
    v = n // lanes
    lane_sums = _row_sum(x[:v * lanes].reshape(v, lanes), xp)           # (lanes,)
    total = f32(0)
    for t in x[v * lanes:]:                                              # the tail, one by one
        total = f32(total + t)
    for t in lane_sums:
        total = f32(total + t)
    return f32(0) + total


def torch_cpu_sum32(x, threads: int = 1, lanes: int = LANES):
    """torch.sum of a contiguous float32 array on CPU, bit for bit (module docstring), as a float32 scalar."""
    xp = get_array_module(x)
    flat = x.reshape(-1).astype(xp.float32, copy=False)                  # (n,)
    n = flat.size
    if n < GRAIN or threads <= 1:
        return _serial_sum(flat, lanes, xp)
    used = min(threads, -(-n // GRAIN))
    chunk = -(-n // used)
    buffer = xp.zeros(threads, dtype=xp.float32)                         # (threads,) one slot per thread
    for t, s in enumerate(range(0, n, chunk)):
        buffer[t] = _serial_sum(flat[s:s + chunk], lanes, xp)
    return _serial_sum(buffer, lanes, xp)


def torch_cpu_mean32(x, threads: int = 1, lanes: int = LANES):
    """torch.mean of a contiguous float32 array on CPU, bit for bit: torch_cpu_sum32(x) / float32(n) in float32."""
    xp = get_array_module(x)
    if x.size == 0:
        return xp.float32("nan")
    return xp.float32(torch_cpu_sum32(x, threads, lanes) / xp.float32(x.size))
