"""minilora.plotting, headless: each plot on a user's array (every backend of the `xp` fixture, the strict one
included), on a layer (Linear, Linear4bit, LoRA wrapper), into a given Axes, with the artists it promises, and a clear
TypeError / ValueError for bad input."""
import os

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from minilora import backend, plotting  # noqa: E402
from minilora.nn import Linear, Linear4bit, LoRALinear  # noqa: E402
from minilora.quant.report import roundtrip  # noqa: E402
from minilora.train import TrainResult  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plotting.pyplot().close("all")


def user_array(xp, shape=(64, 128), seed=0):
    """A Gaussian weight on the current backend (`xp.asarray` is the way onto the device)."""
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def steps(ax):
    return [p for p in ax.patches if isinstance(p, StepPatch)]


def by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


# ------------------------------------------------------------------------------------------------ quant_error_hist
def test_quant_error_hist_on_a_user_array(xp):
    x = user_array(xp)
    ax = plotting.quant_error_hist(x)
    assert len(steps(ax)) == len(plotting.DEFAULT_SCHEMES) == 4          # one histogram series per scheme
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.split(":")[0] for t in labels] == ["int8 block-wise/64", "NF4/64", "FP4/64", "NF4/64 + DQ"]
    assert "4.500 bits" in labels[1] and float(labels[3].split(", ")[-1].split()[0]) < 4.2   # DQ saves ~0.37 bit
    assert ax.get_yscale() == "log"
    total = sum(float(np.asarray(s.get_data().values).clip(min=1).sum()) for s in steps(ax))
    assert total >= x.size                                                # every error lands in a bin


def test_quant_error_is_the_quantize_report_round_trip(xp):
    x = user_array(xp)
    e, bits = plotting.quant_error(x, "nf4")
    y, bits_ref = roundtrip(x, "NF4/64")
    assert np.array_equal(backend.to_numpy(e), backend.to_numpy(y - x)) and bits == bits_ref
    e128, bits128 = plotting.quant_error(x, "int8-block", blocksize=128)  # int8 block-wise at another block size
    assert bits128 == 8 + 32 * (x.size // 128) / x.size
    assert float(np.abs(backend.to_numpy(e128)).max()) <= float(np.abs(backend.to_numpy(x)).max()) / 127


def test_quant_error_hist_on_layers_and_into_a_given_ax():
    plt = plotting.pyplot()
    lin = Linear(128, 64, rng=np.random.default_rng(0))
    fig, (a1, a2, a3) = plt.subplots(1, 3)
    assert plotting.quant_error_hist(lin, schemes=("nf4", "int4"), ax=a1) is a1
    assert plotting.quant_error_hist(Linear4bit.from_linear(lin), schemes="fp4", ax=a2) is a2   # dequantized
    assert plotting.quant_error_hist(LoRALinear(lin, r=4), schemes=["int8-row"], ax=a3) is a3
    assert [len(steps(a)) for a in (a1, a2, a3)] == [2, 1, 1]
    assert len(fig.axes) == 3


@pytest.mark.parametrize("x, schemes, error, match", [
    ("not an array", ("nf4",), TypeError, "expects an array"),
    (np.arange(128), ("nf4",), TypeError, "floating-point"),
    (np.zeros(0, np.float32), ("nf4",), ValueError, "empty"),
    (np.full(128, np.nan, np.float32), ("nf4",), ValueError, "NaN"),
    (np.ones(128, np.float32), ("nf5",), ValueError, "unknown scheme 'nf5'"),
    (np.ones(128, np.float32), (), ValueError, "at least one scheme"),
    (np.ones(128, np.float32), (4,), TypeError, "a scheme is a name"),
])
def test_quant_error_hist_bad_input(x, schemes, error, match):
    with pytest.raises(error, match=match):
        plotting.quant_error_hist(x, schemes=schemes)


def test_a_bad_ax_is_a_type_error():
    with pytest.raises(TypeError, match="matplotlib Axes"):
        plotting.quant_error_hist(np.ones(128, np.float32), ax="left")


# ------------------------------------------------------------------------------------------------ codebook_plot
def test_codebook_plot_nf4_has_16_levels_and_the_measured_entropy(xp):
    ax = plotting.codebook_plot("nf4")
    (levels,) = by_gid(ax, "levels")
    assert isinstance(levels, LineCollection) and len(levels.get_segments()) == 16
    heights = [p.get_height() for p in by_gid(ax, "usage")]                # share of values per code
    assert len(heights) == 16 and abs(sum(heights) - 1) < 1e-9
    assert "3.884" in ax.get_title()                                     # N(0,1), blocks of 64: not 3.996
    assert "absmax" in ax.get_xlabel()


def test_codebook_plot_other_tables_user_data_and_given_ax():
    plt = plotting.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2)
    assert plotting.codebook_plot("fp4", ax=a1) is a1
    assert len(by_gid(a1, "levels")[0].get_segments()) == 15            # FP4's +0 and -0 are one level
    lin = Linear(128, 64, rng=np.random.default_rng(0))
    assert plotting.codebook_plot("nf4", ax=a2, x=lin) is a2             # usage measured on a layer's weight
    assert "share of x values" in a2.get_ylabel()
    with pytest.raises(ValueError, match="quant_type"):
        plotting.codebook_plot("nf8")


# ------------------------------------------------------------------------------------------------ qq_plot
def test_qq_plot_points_and_reference_line(xp):
    x = user_array(xp)
    ax = plotting.qq_plot(x, blocksize=64)
    (pts,) = by_gid(ax, "qq-points")
    assert len(pts.get_xdata()) == 400                                   # 400 quantiles of 8,192 values
    z = pts.get_ydata()
    assert np.all(np.diff(z) >= 0) and abs(float(np.median(z))) < 0.1   # sorted, centered
    plotting.qq_plot(user_array(xp, seed=1), blocksize=32, ax=ax, points=50, label="second")
    assert [len(line.get_xdata()) for line in by_gid(ax, "qq-points")] == [400, 50]
    assert len(by_gid(ax, "qq-reference")) == 1                          # the diagonal is drawn once
    assert ax.get_legend().get_texts()[-1].get_text() == "N(0, 1)"


def test_qq_plot_on_layers():
    lin = Linear(128, 64, rng=np.random.default_rng(0))
    for layer in (lin, Linear4bit.from_linear(lin), lin.weight):
        ax = plotting.qq_plot(layer, points=100)
        assert len(by_gid(ax, "qq-points")[0].get_xdata()) == 100


def test_qq_plot_bad_input():
    with pytest.raises(ValueError, match="at least one full block"):
        plotting.qq_plot(np.ones(10, np.float32), blocksize=64)
    with pytest.raises(ValueError, match="blocksize"):
        plotting.qq_plot(np.ones(128, np.float32), blocksize=1)
    with pytest.raises(TypeError, match="expects an array"):
        plotting.qq_plot({"w": 1})


# ------------------------------------------------------------------------------------------------ loss_curves
def test_loss_curves_on_a_train_result():
    r = TrainResult(step=20, train_loss=list(np.linspace(3, 2, 20)), eval_loss=[(0, 3.1), (10, 2.6), (20, 2.1)])
    ax = plotting.loss_curves(r)
    train, ev = ax.get_lines()
    assert len(train.get_xdata()) == 20 and list(ev.get_xdata()) == [0, 10, 20]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "train loss (eval)"]


def test_loss_curves_dict_and_list_are_distinguishable_without_colour():
    plt = plotting.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2)
    same = list(np.linspace(3, 2, 40))
    ax = plotting.loss_curves({"lora": same, "qlora": same, "arr": np.asarray(same)}, ax=a1, ema=0.9)
    assert ax is a1 and len(ax.get_lines()) == 3
    looks = {(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}
    assert len(looks) == 3                                               # identical curves still tell apart
    assert plotting.loss_curves(same, ax=a2, styles={"loss": 1}).get_lines()[0].get_linestyle() == "--"


@pytest.mark.parametrize("history, kwargs, error, match", [
    (42, {}, TypeError, "expects a TrainResult"),
    ({"a": "text"}, {}, TypeError, "give a TrainResult or a list"),
    ([], {}, ValueError, "no losses"),
    ([1.0, 2.0], {"ema": 1.0}, ValueError, "ema"),
])
def test_loss_curves_bad_input(history, kwargs, error, match):
    with pytest.raises(error, match=match):
        plotting.loss_curves(history, **kwargs)


# ------------------------------------------------------------------------------------------------ one name, one thing
def test_the_demo_figures_use_the_quantize_report_round_trip():
    from minilora.apps import demo_plots
    assert not hasattr(demo_plots, "roundtrip")                          # one round trip: quant/report.py's
    assert demo_plots.block_zscores is plotting.block_zscores


def test_save_png_writes_a_png_of_an_api_plot(tmp_path):
    ax = plotting.quant_error_hist(np.random.default_rng(0).standard_normal(4096).astype(np.float32), schemes="nf4")
    path = plotting.save_png(ax.figure, tmp_path / "mine.png")
    assert path.read_bytes().startswith(b"\x89PNG")
