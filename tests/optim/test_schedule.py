"""Learning-rate schedules equal transformers' formulas (warmup from 0, cosine to 0 at the last step)."""
import math

import pytest

from minilora.optim import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup


def test_constant_with_warmup():
    f = get_constant_schedule_with_warmup(4)
    assert [f(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert get_constant_schedule_with_warmup(0)(0) == 1.0


def test_cosine_with_warmup():
    f = get_cosine_schedule_with_warmup(2, 12)
    assert f(0) == 0.0 and f(1) == 0.5 and f(2) == 1.0
    assert f(7) == pytest.approx(0.5)                      # half way through the decay
    assert f(12) == pytest.approx(0.0, abs=1e-15) and f(20) >= 0.0
    assert all(f(t) >= f(t + 1) for t in range(2, 15))
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_bad_steps():
    with pytest.raises(ValueError, match="num_warmup_steps"):
        get_constant_schedule_with_warmup(-1)
    with pytest.raises(ValueError, match="num_training_steps"):
        get_cosine_schedule_with_warmup(0, 2.5)
