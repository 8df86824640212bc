"""The reference quantizer (minilora/quant/reference.py) against the fast path (minilora/quant/fourbit.py).

The reference is the one a student reads first; the fast path must give the same packed bytes, the same absmax
bits and the same dequantized bits on every parity case (the inputs the bitsandbytes parity tests use, for NF4,
FP4 and Int4, float16/32/64), and on hypothesis-drawn ones. It stays short and stands alone: at most 30 lines of
code for the pair, importing only the tables and QuantState."""
import ast
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import BLOCKSIZES, parity_cases

from minilora.quant import dequantize_4bit, get_4bit_type, quantize_4bit
from minilora.quant import reference as ref_module
from minilora.quant.codebooks import midpoints
from minilora.quant.reference import dequantize_4bit_reference, quantize_4bit_reference

QUANT_TYPES = ("nf4", "fp4", "int4")
DTYPES = (np.float16, np.float32, np.float64)


def assert_same(x, blocksize, quant_type, where, compress_statistics=False):
    """Bytes, absmax bits and dequantized bits identical between the two paths (both dequantizers on both)."""
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    rpacked, rstate = quantize_4bit_reference(x, blocksize=blocksize, quant_type=quant_type)
    assert rpacked.dtype == np.uint8 and rpacked.shape == packed.shape, where
    assert np.array_equal(rpacked, packed), where
    assert rstate.absmax.dtype == np.float32, where
    assert np.array_equal(rstate.absmax.view(np.uint32), state.absmax.view(np.uint32)), where
    y = dequantize_4bit(packed, state)
    for out in (dequantize_4bit_reference(rpacked, rstate), dequantize_4bit_reference(packed, state),
                dequantize_4bit(rpacked, rstate)):
        assert out.dtype == y.dtype and out.shape == y.shape == x.shape, where
        assert np.array_equal(out.view(np.uint8), y.view(np.uint8)), where


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_fast_path_on_every_parity_case(quant_type, dtype):
    checked = 0
    for kind, shape, bs, x in parity_cases(dtype):
        assert_same(x, bs, quant_type, f"{kind} {shape} bs={bs} {dtype.__name__} {quant_type}")
        checked += 1
    assert checked == 420                                # 120 plain + 60 per odd kind (5 kinds, a subset)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_values_exactly_on_a_midpoint_go_to_the_lower_code(quant_type):
    code = get_4bit_type(quant_type)
    mid, order = midpoints(code)
    x = np.concatenate([[1.0], mid, -mid, [0.0, -0.0]]).astype(np.float32)   # absmax 1: scaled == x
    assert_same(x, 64, quant_type, quant_type)
    packed, _ = quantize_4bit_reference(x, 64, quant_type)
    q = np.stack([packed[:, 0] >> 4, packed[:, 0] & 15], axis=1).reshape(-1)
    assert np.array_equal(q[1:1 + mid.size], order[:-1])  # midpoint k -> sorted position k, the lower neighbour


def test_double_quantized_states_dequantize_identically():
    rng = np.random.default_rng(11)
    for shape, bs, dtype in [((1024, 64), 64, np.float32), ((300, 70), 32, np.float16), ((5001,), 64, np.float32),
                             ((4097,), 4096, np.float64), ((77,), 64, np.float16)]:
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2)).astype(dtype)
        for quant_type in QUANT_TYPES:
            packed, state = quantize_4bit(x, bs, quant_type, compress_statistics=True)
            y, yr = dequantize_4bit(packed, state), dequantize_4bit_reference(packed, state)
            assert np.array_equal(yr.view(np.uint8), y.view(np.uint8)), (shape, bs, quant_type)


def test_empty_input():
    assert_same(np.zeros((0,), np.float32), 64, "nf4", "empty")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
       blocksize=st.sampled_from(BLOCKSIZES), quant_type=st.sampled_from(QUANT_TYPES),
       dtype=st.sampled_from(DTYPES), log_scale=st.floats(-40, 30), seed=st.integers(0, 2**32 - 1),
       zero_fraction=st.sampled_from([0.0, 0.3, 1.0]))
def test_reference_equals_fast_path_on_drawn_inputs(shape, blocksize, quant_type, dtype, log_scale, seed,
                                                     zero_fraction):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** log_scale
    x[rng.random(shape) < zero_fraction] = 0.0
    with np.errstate(over="ignore", under="ignore"):
        x = x.astype(dtype)
    if not np.isfinite(x).all():                         # a float16 overflow: quantizers refuse Inf
        x = np.nan_to_num(x, posinf=0.0, neginf=0.0)
    assert_same(x, blocksize, quant_type, f"{shape} bs={blocksize} {quant_type} {dtype.__name__}")


# --- the reference stays a reference -----------------------------------------------------------------------------

REFERENCE = pathlib.Path(ref_module.__file__)
ALLOWED_IMPORTS = {"__future__", "minilora.backend", "minilora.quant.codebooks", "minilora.quant.state"}
FUNCTIONS = ("quantize_4bit_reference", "dequantize_4bit_reference")


def code_lines(func: ast.FunctionDef, source_lines) -> int:
    """Lines of a function that hold code: not blank, not a comment, not the docstring."""
    doc = func.body[0] if isinstance(func.body[0], ast.Expr) and isinstance(func.body[0].value, ast.Constant) else None
    skip = set(range(doc.lineno, doc.end_lineno + 1)) if doc else set()
    return sum(1 for i in range(func.lineno, func.end_lineno + 1)
               if i not in skip and source_lines[i - 1].strip() and not source_lines[i - 1].strip().startswith("#"))


def test_reference_imports_no_fast_path_helper_and_is_at_most_30_lines():
    source = REFERENCE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= ALLOWED_IMPORTS, f"the reference imports {sorted(imported - ALLOWED_IMPORTS)}"
    from_codebooks = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                      and n.module == "minilora.quant.codebooks" for a in n.names}
    assert "midpoints" not in from_codebooks                  # the reference computes its own thresholds
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(FUNCTIONS) <= set(funcs)
    total = sum(code_lines(funcs[f], source.splitlines()) for f in FUNCTIONS)
    assert total <= 30, f"the reference pair has {total} lines of code; keep it at most 30"


def test_line_counter_sees_code_not_comments(tmp_path):
    src = 'def f(x):\n    """doc\n    more"""\n    # a comment\n\n    y = x  # (n,)\n    return y\n'
    (func,) = ast.parse(src).body
    assert code_lines(func, src.splitlines()) == 3              # def, y = x, return
