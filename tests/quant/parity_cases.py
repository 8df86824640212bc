"""Test helper for minilora.quant: the inputs of the parity cases, shared by the bnb parity tests and the reference.

`awkward` probes the edges (huge, subnormal, exactly-on-a-midpoint, all-zero blocks, mixed scales); `parity_cases`
walks kinds x SHAPES x BLOCKSIZES in a fixed order from one seeded generator, the odd kinds on a subset."""
import numpy as np

from minilora.quant import get_4bit_type
from minilora.quant.codebooks import midpoints

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPES = [(1,), (2,), (3,), (31,), (64,), (65,), (127,), (1000,), (4097,), (5001,), (33, 17), (8, 64),
          (2, 3, 5), (3, 7, 129), (4, 1024)]
KINDS = ("plain", "huge", "tiny", "midpoints", "zeros", "mixed")


def awkward(shape, dtype, rng, kind):
    """Inputs that probe the edges: plain, huge, tiny/subnormal, exact midpoints, zero blocks, ties, mixed scales."""
    n = int(np.prod(shape))
    x = rng.standard_normal(n)
    if kind == "huge":
        x *= 1e4 if dtype == np.float16 else 1e36
    elif kind == "tiny":
        x *= 1e-6 if dtype == np.float16 else 1e-39      # float32 subnormals (and fp16 subnormals)
    elif kind == "midpoints":                            # every value exactly on a decision threshold (absmax 1)
        mid = np.concatenate([midpoints(get_4bit_type("nf4"))[0], midpoints(get_4bit_type("fp4"))[0]])
        x = rng.choice(np.concatenate([mid, [1.0, -1.0, 0.0]]), n)
        x[::64] = 1.0
    elif kind == "zeros":
        x[: n // 2] = 0.0                                # whole all-zero blocks (and a zero partial block)
        x[rng.random(n) < 0.2] = 0.0
    elif kind == "mixed":
        x *= 10.0 ** rng.uniform(-20, 20, n) if dtype != np.float16 else 10.0 ** rng.uniform(-3, 3, n)
        x[rng.random(n) < 0.1] *= -1
    return x.astype(dtype).reshape(shape)


def parity_cases(dtype, seed=7):
    """Yield (kind, shape, blocksize, x): every plain case, the odd kinds on a subset (keeps bnb's run under ~10 s)."""
    rng = np.random.default_rng(seed)
    for kind in KINDS:
        for shape in SHAPES:
            for bs in BLOCKSIZES:
                if kind != "plain" and bs not in (32, 64, 4096) and shape not in [(65,), (4097,), (3, 7, 129)]:
                    continue
                yield kind, shape, bs, awkward(shape, dtype, rng, kind)
