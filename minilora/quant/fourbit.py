"""Blockwise 4-bit quantization (NF4, FP4, Int4) with optional double quantization: QLoRA's storage format.

This is the fast path. Read minilora/quant/reference.py first: the same quantizer in the shape of its math, which
tests/quant/test_reference.py proves byte-equal to this one.

    code_i  = nearest table value to x_i / absmax(block)    (blockwise.scale_blocks; exact ties -> lower code)
    byte_j  = (code_{2j} << 4) | code_{2j+1}                 the EVEN element goes in the HIGH nibble; odd n is
                                                             padded with one 0.0 after scaling (NF4 code 7, FP4 0)
    x'_i    = table[code_i] * absmax(block)                  float32, then cast to the input dtype
Double quantization (compress_statistics=True, QLoRA §3):
    offset  = mean(absmax)                                   one float32 per tensor
    absmax  ~ dyn[qa] * absmax2[block of 256] + offset      qa = 8-bit dynamic codes of absmax - offset
    nested_rounding picks how qa is rounded (bitsandbytes rounds it differently per backend):
      "exact"     nearest dynamic-map entry, ties to the lower one; offset = the float64 mean rounded once
                  (= bnb's pure-PyTorch default kernel, given the same offset)
      "bnb-cpu"   bnb's CPU C++ lookup-table kernel (blockwise.quantize_blockwise_lut), offset = torch's float32
                  CPU mean in torch's own summation order (reduction.torch_cpu_mean32): bnb on CPU byte for byte
      "bnb-cuda"  bnb's CUDA binary search (blockwise.quantize_blockwise_cuda), offset as "exact" (the CUDA
                  mean's order is not emulated); emulated, not measured against a GPU

Mirrors `bitsandbytes/functional.py` quantize_4bit / dequantize_4bit and the default backend's kernels
(`bitsandbytes/backends/default/ops.py`, 0.50.x): same packed bytes and absmax, bit for bit. One difference in the
signature: our quant_type defaults to "nf4" (what QLoRA uses); bnb's function default is "fp4".

Properties the tests check (tests/quant/test_properties.py): |x - x'| <= half the widest table gap * absmax; the
largest |x| of each block comes back exactly (code +-1 times absmax) - except with DQ (absmax is approximated), in
blocks whose absmax is below bnb's 1e-38 clamp, and for float64 input (it comes back as its float32 rounding);
DQ codes absmax - mean(absmax) with one 8-bit step per 256 blocks, so a block whose absmax is far below the others'
(a nearly dead row) can come back with an absmax several times its own (bnb's format; rows scaled by 1e-3 among
N(0, 0.02) ones: error up to ~4.5x their max |w|); quantize without DQ where such rows matter.
Re-quantizing the dequantized tensor gives the same bytes, once FP4's/Int4's second zero code (8) is read as the
first (0 resp. 7).

quant_type "int4" is minilora's own (bnb 0.50.2 refuses it): bnb's int4 table [7..0, 0, -1..-7]/7 with the same
rule as FP4 (midpoints of the stable-sorted table, ties to the lower code). So 0 -> code 7 and values in (0, 1/14]
-> code 8 (also 0.0): the same "two zeros" quirk as FP4's +0/-0 codes.

Speed: the nearest-code search is a 32,769-bin lookup table on x/absmax (blockwise.nearest_code: the bin is the
rounding of scaled + 513.0, read from the float's low mantissa bits), exact because any bin that could hold a
midpoint is marked and those few values are re-done with an exact searchsorted. No n x 16 temporary is ever built
(torchao's 38 GB spike, ao #315).
Dequantization gathers two float32 values per packed byte from a 256-entry pair table, in chunks that stay in L2;
large tensors split their chunks over threads (dequantize_4bit's `threads`), same bytes either way.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from minilora.backend import get_array_module, to_numpy
from minilora.quant.blockwise import (
    chunk_size,
    dequantize_blockwise,
    nearest_code,
    quantize_blockwise,
    quantize_blockwise_cuda,
    quantize_blockwise_lut,
    scale_blocks,
)
from minilora.quant.checks import ALLOWED_BLOCKSIZES, check_blocksize, check_quant_input
from minilora.quant.codebooks import create_dynamic_map, get_4bit_type
from minilora.quant.reduction import torch_cpu_mean32
from minilora.quant.state import VALID_QUANT_TYPES, QuantState, check_dequantize_args, round_to_bfloat16
from minilora.threads import get_num_threads

NESTED_BLOCKSIZE = 256   # bnb's matmul refuses any other nested blocksize
NESTED_ROUNDINGS = ("exact", "bnb-cpu", "bnb-cuda")


def pack_4bit(q, out=None):
    """(2m,) codes -> (m,) bytes, even element in the high nibble."""
    xp = get_array_module(q)
    out = xp.empty(q.size // 2, dtype=xp.uint8) if out is None else out
    xp.left_shift(q[0::2], 4, out=out)
    xp.bitwise_or(out, q[1::2], out=out)
    return out


def quantize_4bit(A, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False,
                  nested_rounding: str = "exact"):
    """A (any shape, float16/32/64) -> (packed uint8 ((n+1)//2, 1), QuantState). See the module docstring.

    nested_rounding ("exact", "bnb-cpu", "bnb-cuda") only matters with compress_statistics=True: see
    `double_quantize`. ValueError for NaN/Inf, for float64 values beyond the float32 range, an unknown quant_type,
    block size or nested_rounding."""
    check_nested_rounding(nested_rounding)
    xp = check_quant_input(A)
    blocksize = check_blocksize(blocksize, ALLOWED_BLOCKSIZES)
    if quant_type not in VALID_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {VALID_QUANT_TYPES}, got {quant_type!r}")
    n = A.size
    packed = xp.empty((n + 1) // 2, dtype=xp.uint8)                      # (ceil(n/2),)
    absmax = xp.empty(-(-n // blocksize), dtype=xp.float32)              # (n_blocks,)
    code = get_4bit_type(quant_type, xp=xp)
    chunk = chunk_size(xp, blocksize)
    q = xp.empty(min(chunk, n) + 1, dtype=xp.uint8)                      # (chunk,) codes, reused
    work = {}                                                            # nearest_code's scratch buffers
    for s, e, sc in scale_blocks(A, blocksize, absmax, chunk):
        if (e - s) % 2:                                                  # odd n: pad one 0.0 after scaling
            sc = xp.concatenate([sc, xp.zeros(1, dtype=xp.float32)])
        qc = nearest_code(sc, code, out=q[:sc.size], work=work)
        pack_4bit(qc, out=packed[s // 2:(s + sc.size) // 2])
    state = QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type,
                       dtype=A.dtype)
    if compress_statistics:
        state = double_quantize(state, inplace=True, nested_rounding=nested_rounding)
    return packed.reshape(-1, 1), state


def check_nested_rounding(nested_rounding):
    if nested_rounding not in NESTED_ROUNDINGS:
        raise ValueError(f"nested_rounding must be one of {NESTED_ROUNDINGS}, got {nested_rounding!r}")
    return nested_rounding


def double_quantize(state: QuantState, inplace: bool = False, nested_rounding: str = "exact",
                    threads: int = 1) -> QuantState:
    """Replace float32 absmax by 8-bit dynamic codes of (absmax - mean) in blocks of 256 (+ one float32 offset).

    nested_rounding:
      "exact"     offset = the float64 mean rounded once to float32; codes = the nearest dynamic-map entry (ties to
                  the lower entry), as bnb's pure-PyTorch default kernel rounds.
      "bnb-cpu"   what bitsandbytes computes on CPU, byte for byte: offset = torch's float32 mean in torch's CPU
                  summation order (reduction.torch_cpu_mean32), codes from bnb's C++ lookup-table kernel
                  (blockwise.quantize_blockwise_lut). Above 32,767 blocks torch splits the mean across its threads:
                  `threads` is torch.get_num_threads() of the bnb run being matched (quantize_4bit uses 1).
      "bnb-cuda"  codes from bnb's CUDA binary search (blockwise.quantize_blockwise_cuda); offset as "exact". It
                  equals "exact" except for values exactly on a float32 midpoint (none among the shipped model's
                  12,288 nested codes). Emulated from the kernel's rule, not measured on a GPU.
    inplace=True reuses state.absmax as scratch (quantize_4bit does, as it owns that array)."""
    check_nested_rounding(nested_rounding)
    xp = get_array_module(state.absmax)
    a = state.absmax
    if nested_rounding == "bnb-cpu":
        offset = torch_cpu_mean32(a, threads=threads) if a.size else xp.float32(0)
        if not bool(xp.isfinite(offset)):   # bnb's own state would hold inf/NaN here
            raise ValueError("nested_rounding='bnb-cpu': the float32 sum of the absmax overflows (as torch's does, "
                             "which leaves bitsandbytes with an infinite offset); use nested_rounding='exact'")
    else:
        offset = xp.float32(a.mean(dtype=xp.float64)) if a.size else xp.float32(0)
    centred = a if inplace else a.copy()
    centred -= offset                                                    # (n_blocks,) roughly symmetric around 0
    dyn = create_dynamic_map(signed=True, xp=xp)                         # (256,)
    nested = {"exact": quantize_blockwise, "bnb-cpu": quantize_blockwise_lut,
              "bnb-cuda": quantize_blockwise_cuda}[nested_rounding]
    qa, state2 = nested(centred, code=dyn, blocksize=NESTED_BLOCKSIZE)
    return QuantState(absmax=qa, shape=state.shape, code=state.code, blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=state.dtype, offset=xp.asarray(offset, dtype=xp.float32),
                      state2=state2)


def dequantize_absmax(quant_state: QuantState):
    """The float32 absmax a dequantization uses: stored as is, or rebuilt as dyn[qa] * absmax2 + offset."""
    if not quant_state.nested:
        return quant_state.absmax
    return dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset


_pair_cache: dict = {}


def pair_table(code, xp):
    """(256,) uint64 whose bytes are the float32 pair (code[b >> 4], code[b & 15]): one gather per packed byte."""
    key = (xp.__name__, to_numpy(code).tobytes())
    if key not in _pair_cache:
        if len(_pair_cache) > 32:
            _pair_cache.clear()
        c = code.astype(xp.float32)
        pairs = xp.stack([xp.repeat(c, 16), xp.tile(c, 16)], axis=1)    # (256, 2) float32, row b = byte b
        _pair_cache[key] = xp.ascontiguousarray(pairs).view(xp.uint64).reshape(256)
    return _pair_cache[key]


def dequantize_4bit(A, quant_state: QuantState, out=None, threads: int | None = None):
    """packed bytes + QuantState -> array of quant_state.shape and dtype. ValueError if they do not match.

    A state read from a bitsandbytes file of a bfloat16 model (dtype "bfloat16", which NumPy lacks) dequantizes to
    float32 holding bnb's bfloat16 values: code[q] * absmax in float32, rounded to bfloat16 (nearest, ties to even).
    out: an optional array of that shape and dtype to write into (bnb has the same keyword). A QLoRA layer that
    dequantizes on every forward and backward can reuse one buffer and skip the page faults of a fresh one.
    threads: how many threads share the chunks (NumPy releases the GIL in copyto, take and multiply). None: one
    below PARALLEL_MIN values, else minilora.threads.get_num_threads() (the BLAS limit, which `minilora
    --threads` and `set_num_threads` set). The bytes do not depend on it: each chunk is computed the same way."""
    xp = get_array_module(A)
    check_dequantize_args(A, quant_state, four_bit=True)
    qs, bs, n = quant_state, quant_state.blocksize, quant_state.numel
    absmax = dequantize_absmax(qs)                                       # (n_blocks,) float32
    lut = pair_table(qs.code, xp)                                        # (256,)
    src = A.reshape(-1)                                                  # (m,) m = ceil(n/2)
    result = out
    if result is not None and (tuple(result.shape) != qs.shape or result.dtype != qs.dtype
                               or not result.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous {qs.dtype} array of shape {qs.shape}, "
                         f"got {result.dtype} {tuple(result.shape)}")
    if result is not None and n % 2 == 0:  # noqa: SIM108 - two cases, each with its own shape comment
        out = result.reshape(-1)                                         # (n,) write straight into the caller's
    else:
        out = xp.empty(2 * src.size, dtype=qs.dtype)                     # (2m,) the one full-size allocation
    threads = dequantize_threads(threads, 2 * src.size, xp)
    chunk = chunk_size(xp, bs) * (THREAD_CHUNK_FACTOR if threads > 1 else 1)
    args = (src, out, absmax, lut, bs, n - n % bs, chunk, xp)
    if threads == 1:
        dequantize_span(0, 2 * src.size, *args)
    else:   # one contiguous run per thread: NumPy releases the GIL inside each call, but the Python between calls
        spans = thread_spans(2 * src.size, chunk, threads)  # holds it, so fewer, larger chunks scale better
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda span: dequantize_span(*span, *args), spans))
    if qs.bfloat16:
        round_to_bfloat16(out)
    if result is not None:
        if n % 2:                                                        # odd n: the pad slot needed a copy
            result.reshape(-1)[...] = out[:n]
        return result
    return out[:n].reshape(qs.shape)


PARALLEL_MIN = 1 << 21   # values; below, a thread pool (and get_num_threads' ~1 ms) costs more than it saves
THREAD_CHUNK_FACTOR = 2  # threaded chunks are twice the single-thread chunk (still within a 1-2 MiB L2 per core)


def dequantize_threads(threads, size, xp) -> int:
    """The thread count for `size` values: an explicit `threads`, else 1 below PARALLEL_MIN or off NumPy, else the
    BLAS thread limit."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        return threads
    if size < PARALLEL_MIN or xp.__name__ != "numpy":
        return 1
    return get_num_threads() or 1


def thread_spans(size: int, chunk: int, pieces: int) -> list:
    """[(start, stop), ...]: `size` values split into at most `pieces` contiguous runs of whole chunks."""
    n_chunks = max(1, -(-size // chunk))
    per = -(-n_chunks // max(1, min(pieces, n_chunks)))                  # chunks per piece
    return [(s, min(s + per * chunk, size)) for s in range(0, max(size, 1), per * chunk)]


def dequantize_span(start, stop, src, out, absmax, lut, bs, full, chunk, xp):
    """Dequantize values [start, stop) of the padded output (start: a multiple of chunk) in cache-sized chunks."""
    out32 = out.dtype == xp.float32
    buf = None if out32 else xp.empty(min(chunk, stop - start), dtype=xp.float32)
    # take() converts indices to intp anyway: doing it into a reused buffer, with mode="wrap" (a no-op for bytes
    # indexing a 256-entry table) to skip the bounds checks, makes it 1.2-1.5x faster on NumPy. (A 65,536-entry
    # table gathering 4 values per 2 bytes was tried on two CPU kinds: no faster; its 1 MiB crowds the L2 cache.)
    idx = xp.empty(max(1, min(chunk, stop - start) // 2), dtype=xp.intp)
    wrap = {"mode": "wrap"} if xp.__name__ == "numpy" else {}
    for s in range(start, stop, chunk):                                  # s: a multiple of 2 * blocksize
        e = min(s + chunk, stop)
        dst = out[s:e] if out32 else buf[:e - s]                         # (e - s,) float32
        i = idx[:(e - s) // 2]
        xp.copyto(i, src[s // 2:e // 2], casting="unsafe")
        xp.take(lut, i, out=dst.view(xp.uint64), **wrap)                # each byte -> its two table values
        fe = min(e, full)
        if fe > s:
            head = dst[:fe - s].reshape(-1, bs)                          # (nb, bs) view
            head *= absmax[s // bs:fe // bs, None]
        if e > full:                                                     # the partial last block (+ the pad)
            dst[max(full, s) - s:] *= absmax[-1]
        if not out32:
            out[s:e] = dst
