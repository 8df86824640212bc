"""The shipped base model: it loads, reproduces its recorded validation loss, and `minilora pretrain` still trains
the same way (a 20-step run lands on the recorded short-run loss)."""
import json

import numpy as np
import pytest

from minilora import pretrained
from minilora.apps import pretrain
from minilora.data import load_corpus
from minilora.io import load_json

META = load_json(pretrained.CHECKPOINT_DIR / pretrained.BASE_META)


def _same_corpus_or_skip():
    sha = load_corpus("pydoc").sha256
    if sha != META["corpus"]["sha256"]:
        pytest.skip(f"this Python ships different documentation topics (sha256 {sha[:12]}... vs recorded "
                    f"{META['corpus']['sha256'][:12]}... from Python {META['machine']['python']}): recorded losses "
                    "do not apply")


def test_shipped_checkpoint_is_small_and_complete():
    size = (pretrained.CHECKPOINT_DIR / pretrained.BASE_WEIGHTS).stat().st_size
    assert size < 5 * 2**20
    for key in ("config", "training", "corpus", "val_bits_per_byte", "short_run", "train_time_s", "eval_curve_bits"):
        assert key in META, key
    model, meta = pretrained.load_base()
    assert model.get_num_params() == meta["n_params"]
    assert meta["val_bits_per_byte"] < 3.0          # a real language model: far below 8 bits (uniform bytes)


def test_shipped_checkpoint_reproduces_its_validation_loss():
    _same_corpus_or_skip()
    model, meta = pretrained.load_base()
    t = meta["training"]
    got = pretrained.val_bits(model, load_corpus("pydoc"), t["block_size"], t["eval_windows"])
    assert abs(got - meta["val_bits_per_byte"]) < 1e-3, (got, meta["val_bits_per_byte"])


def test_short_pretrain_run_matches_recorded_loss(tmp_path):
    _same_corpus_or_skip()
    short = META["short_run"]
    assert pretrain.main(short["argv"] + ["--out", str(tmp_path), "--no-progress"]) == 0
    meta = json.loads((tmp_path / pretrained.BASE_META).read_text())
    assert meta["corpus"]["sha256"] == short["corpus_sha256"]
    assert meta["training"]["max_steps"] == 20
    # same seed, same batches: only BLAS summation order differs between machines
    assert abs(meta["val_bits_per_byte"] - short["val_bits_per_byte"]) < 0.05
    assert meta["val_bits_per_byte"] < meta["eval_curve_bits"][0][1] - 1.0        # it learned something
    model, _ = pretrained.load_base(tmp_path)                                        # and the files load back
    assert np.isfinite(pretrained.val_bits(model, load_corpus("pydoc"), 128, 16))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--n-embd", "130"], "divisible by --n-head"),
    (["--eval-every", "-5"], "must be >= 0"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_cli_input_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config", [None, [], {"n_layer": "four"}, {"no_such_field": 1}, {"n_embd": 10, "n_head": 3}])
def test_a_tampered_base_json_is_a_clear_error(tmp_path, config):
    import shutil

    from minilora.io import CorruptFileError
    shutil.copy(pretrained.CHECKPOINT_DIR / pretrained.BASE_WEIGHTS, tmp_path / pretrained.BASE_WEIGHTS)
    meta = dict(META, config=config) if config is not None else {k: v for k, v in META.items() if k != "config"}
    (tmp_path / pretrained.BASE_META).write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match="base"):
        pretrained.load_base(tmp_path)


def test_weights_that_do_not_match_the_config_are_a_clear_error(tmp_path):
    import shutil

    from minilora.io import CorruptFileError
    shutil.copy(pretrained.CHECKPOINT_DIR / pretrained.BASE_WEIGHTS, tmp_path / pretrained.BASE_WEIGHTS)
    meta = dict(META, config=dict(META["config"], n_layer=META["config"]["n_layer"] + 1))
    (tmp_path / pretrained.BASE_META).write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match="does not match"):
        pretrained.load_base(tmp_path)
