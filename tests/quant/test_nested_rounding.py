"""Double quantization's nested rounding, per bitsandbytes backend (docs/quantization.md, "Three ways to round").

* "bnb-cpu" equals bitsandbytes 0.50.2 on CPU byte for byte: packed codes, nested uint8 codes, nested absmax and
  the float32 offset (torch's own summation order, minilora.quant.reduction), on the shipped base's 16 weights and
  on every parity case. The one exception is named: a "huge" case whose float32 absmax sum overflows, where bnb
  stores an infinite offset and minilora refuses.
* "bnb-cuda" follows bnb's CUDA search (emulated: no GPU here); a second, element-by-element reading of the rule
  below checks the vectorized one, and on the shipped base it equals "exact" on all 12,288 nested codes because
  none of them lies on a float32 midpoint.
"""
import numpy as np
import pytest

from minilora.pretrained import load_base
from minilora.quant import create_dynamic_map, quantize_4bit, quantize_blockwise
from minilora.quant.blockwise import cuda_search_code, quantize_blockwise_cuda
from minilora.quant.codebooks import midpoints
from minilora.quant.reduction import torch_cpu_mean32, torch_cpu_sum32

SHIPPED_NESTED_CODES = 12_288


def shipped_weights():
    """The 16 weights quantize_model quantizes: the four Conv1D kinds of each of the 4 blocks, (out, in) float32."""
    model, _ = load_base()
    return [(k, np.asarray(v, dtype=np.float32)) for k, v in model.state_dict().items()
            if k.endswith(".weight") and np.ndim(v) == 2 and (".attn." in k or ".mlp." in k)]


def bits32(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------------- the CUDA search, read element by element
def dquantize_scalar(x: float, code) -> int:
    """bnb's CUDA dQuantize for one float32 value, step by step: probe at 127, halve the step 7 times moving up when
    x is above the probe's value, remember the last probe passed on each side, then compare x with the float32
    midpoint between the final probe and the neighbour on x's side; on the midpoint itself the probe wins."""
    c = [np.float32(v) for v in code]
    x = np.float32(x)
    probe, below, above = 127, 0, 255
    below_val, above_val = np.float32(-1), np.float32(1)
    for step in (64, 32, 16, 8, 4, 2, 1):
        if x > c[probe]:
            below, below_val = probe, c[probe]
            probe += step
        else:
            above, above_val = probe, c[probe]
            probe -= step
    if above == 255:
        above_val = c[255]
    if below == 0:
        below_val = c[0]
    v = c[probe]
    if x > v:
        return above if x > np.float32((above_val + v) * np.float32(0.5)) else probe
    return below if x < np.float32((below_val + v) * np.float32(0.5)) else probe


def test_cuda_search_vectorized_equals_the_scalar_rule():
    dyn = create_dynamic_map()
    mid, _ = midpoints(dyn)
    rng = np.random.default_rng(0)
    xs = np.concatenate([mid, dyn, rng.uniform(-1, 1, 3000), [-1.0, 1.0, 0.0, -0.0]]).astype(np.float32)
    want = np.array([dquantize_scalar(x, dyn) for x in xs], dtype=np.uint8)
    assert np.array_equal(cuda_search_code(xs, dyn), want)


def test_cuda_search_differs_from_exact_only_on_midpoints():
    dyn = create_dynamic_map()
    mid, _ = midpoints(dyn)
    exact, _ = quantize_blockwise(np.concatenate([mid, [1.0]]).astype(np.float32), blocksize=256)
    cuda, _ = quantize_blockwise_cuda(np.concatenate([mid, [1.0]]).astype(np.float32), blocksize=256)
    moved = exact[:-1] != cuda[:-1]
    # exact sends a midpoint to the lower entry; the search keeps its probe, which is the upper entry for 127 of
    # the 255 midpoints (one step apart either way)
    assert int(moved.sum()) == 127
    assert np.all(cuda[:-1][moved].astype(int) - exact[:-1][moved].astype(int) == 1)
    off = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32)      # nowhere near a tie
    assert np.array_equal(quantize_blockwise(off, blocksize=256)[0], quantize_blockwise_cuda(off, blocksize=256)[0])


def test_cuda_equals_exact_on_the_shipped_base():
    """All 12,288 nested codes agree: counted ties (a scaled value exactly on a float32 midpoint) are 0."""
    dyn = create_dynamic_map()
    mid, _ = midpoints(dyn)
    codes = differ = ties = 0
    for name, w in shipped_weights():
        _, ex = quantize_4bit(w, 64, "nf4", compress_statistics=True, nested_rounding="exact")
        _, cu = quantize_4bit(w, 64, "nf4", compress_statistics=True, nested_rounding="bnb-cuda")
        assert bits32(ex.offset) == bits32(cu.offset) and np.array_equal(ex.state2.absmax, cu.state2.absmax), name
        _, plain = quantize_4bit(w, 64, "nf4")
        centred = plain.absmax - np.float32(ex.offset)                                # (n_blocks,)
        inv = np.float32(1) / ex.state2.absmax                                        # (n_blocks / 256,)
        scaled = (centred.reshape(-1, 256) * inv[:, None]).reshape(-1)
        ties += int(np.isin(scaled, mid).sum())
        codes += ex.absmax.size
        differ += int((ex.absmax != cu.absmax).sum())
    assert codes == SHIPPED_NESTED_CODES
    assert ties == 0 and differ == 0


def test_nested_rounding_is_checked():
    x = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="nested_rounding"):
        quantize_4bit(x, compress_statistics=True, nested_rounding="cpu")


# ------------------------------------------------------------------------------------- bitsandbytes on CPU itself
@pytest.fixture(scope="module")
def bnb():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True            # bnb compiles its default dequant kernel per shape otherwise
    yield torch, F
    torch._dynamo.config.disable = old


def test_torch_cpu_sum_and_mean_order(bnb):
    """torch's CPU float32 sum and mean, reproduced bit for bit, with 1, 2 and 4 torch threads."""
    torch, _ = bnb
    rng = np.random.default_rng(5)
    before = torch.get_num_threads()
    sizes = list(range(1, 130)) + [255, 256, 768, 1024, 4097, 16384, 32767, 32768, 40000, 70001]
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            for n in sizes:
                x = (rng.random(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
                t = torch.from_numpy(x)
                assert bits32(torch_cpu_sum32(x, threads)) == bits32(t.sum().item()), (threads, n)
                assert bits32(torch_cpu_mean32(x, threads)) == bits32(t.mean().item()), (threads, n)
    finally:
        torch.set_num_threads(before)


def assert_same_as_bnb(ours, theirs, where):
    (pk, st), (tp, ts) = ours, theirs
    assert np.array_equal(pk, tp.numpy()), where
    assert np.array_equal(st.absmax, ts.absmax.numpy()), where                      # the nested uint8 codes
    assert np.array_equal(bits32(st.state2.absmax), bits32(ts.state2.absmax.numpy())), where
    assert bits32(st.offset) == bits32(ts.offset.item()), where


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_cpu_equals_bitsandbytes_on_the_shipped_base(bnb, quant_type):
    torch, F = bnb
    moved = codes = 0
    for name, w in shipped_weights():
        theirs = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert_same_as_bnb(quantize_4bit(w, 64, quant_type, True, nested_rounding="bnb-cpu"), theirs, name)
        _, exact = quantize_4bit(w, 64, quant_type, True)
        moved += int((exact.absmax != theirs[1].absmax.numpy()).sum())
        codes += exact.absmax.size
    assert codes == SHIPPED_NESTED_CODES and moved == 21            # what "exact" would have differed by


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_cpu_equals_bitsandbytes_on_the_parity_cases(bnb, quant_type, dtype):
    from parity_cases import parity_cases
    torch, F = bnb
    checked, refused = 0, []
    for kind, shape, bs, x in parity_cases(dtype):
        where = f"{kind} {shape} bs={bs} {dtype.__name__} {quant_type}"
        theirs = F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(x)), blocksize=bs, quant_type=quant_type,
                                 compress_statistics=True)
        if not np.isfinite(theirs[1].offset.item()):             # torch's float32 absmax sum overflowed
            with pytest.raises(ValueError, match="overflows"):
                quantize_4bit(x, bs, quant_type, True, nested_rounding="bnb-cpu")
            refused.append(where)
            continue
        assert_same_as_bnb(quantize_4bit(x, bs, quant_type, True, nested_rounding="bnb-cpu"), theirs, where)
        checked += 1
    assert checked >= 400
    assert len(refused) <= (1 if dtype == np.float32 else 0), refused


def test_quantize_model_and_export_carry_bnb_cpu(bnb, tmp_path):
    """quantize_model(..., "bnb-cpu") and export_hf(..., "bnb-cpu") hold bnb's CPU state byte for byte, including
    the quant_state JSON blob (whose nested_offset used to differ in its last ulp)."""
    torch, F = bnb
    from minilora.hf import to_hf_state_dict
    from minilora.peft import quantize_model
    model, _ = load_base()
    weights = dict(shipped_weights())
    tensors, _ = to_hf_state_dict(model, quantize="nf4", nested_rounding="bnb-cpu")
    quantize_model(model, nested_rounding="bnb-cpu")
    mods = dict(model.named_modules())
    for key, w in weights.items():
        tp, ts = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
        layer = mods[key.rsplit(".weight", 1)[0]]
        assert_same_as_bnb((layer.weight.data, layer.quant_state), (tp, ts), key)
        for k, v in ts.as_dict(packed=True).items():
            assert np.array_equal(np.asarray(tensors[f"{key}.{k}"]), v.numpy()), (key, k)
