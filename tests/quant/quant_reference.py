"""Test helper for minilora.quant: the two error measures the golden numbers are stated in."""
import numpy as np


def errors(x, y):
    """(mean |x − y|, mean |x − y| / (|x| + 1e-8)) in float64: bitsandbytes' test metrics for a quantizer."""
    e = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return e.mean(), (e / (np.abs(x) + 1e-8)).mean()
