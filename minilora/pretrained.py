"""The shipped base model: `load_base()` returns the tiny GPT that every demo and notebook fine-tunes.

    minilora/checkpoints/base.safetensors   float32 weights under Hugging Face GPT-2 parameter names
    minilora/checkpoints/base.json          its GPTConfig, the recipe that trained it, the corpus's sha256, val loss

`minilora pretrain` (minilora/apps/pretrain.py) rebuilds it from a seed. The evaluation set is fixed: n evenly
spaced windows of a corpus split, so losses are comparable across models, in bits per byte (= nats / ln 2).

Mirrors transformers' `GPT2LMHeadModel.from_pretrained(folder)`: a config plus a safetensors file, no pickle.
"""
from __future__ import annotations

from pathlib import Path

from minilora.data import LN2
from minilora.io import CorruptFileError, load_json, load_safetensors
from minilora.nn import GPT, GPTConfig
from minilora.train import evaluate

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
BASE_WEIGHTS, BASE_META = "base.safetensors", "base.json"
EVAL_CHUNK = 16                      # windows per eval forward pass


def load_base(directory=None):
    """(model, meta): the GPT saved by `minilora pretrain` (default: the checkpoint shipped with minilora).

    A base.json or base.safetensors that does not describe a GPT raises CorruptFileError naming the file."""
    d = Path(directory) if directory is not None else CHECKPOINT_DIR
    meta = load_json(d / BASE_META)
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{d / BASE_META}: no 'config' object (is this a `minilora pretrain` folder?)")
    try:
        model = GPT(GPTConfig(**config))
    except (TypeError, ValueError) as e:                      # unknown fields, wrong types, impossible sizes
        raise CorruptFileError(f"{d / BASE_META}: its config does not describe a GPT: {e}") from e
    tensors, _ = load_safetensors(d / BASE_WEIGHTS)
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as e:                       # missing/unexpected keys, shapes that disagree
        raise CorruptFileError(f"{d / BASE_WEIGHTS} does not match the config in {BASE_META}: {e}") from e
    return model, meta


def eval_batches(corpus, block_size: int, n_windows: int, split: str = "val"):
    """The fixed evaluation set: n_windows evenly spaced windows of the split, in chunks of EVAL_CHUNK."""
    x, y = corpus.eval_windows(split, block_size, n_windows)                 # (n, T) each
    return [(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]) for i in range(0, n_windows, EVAL_CHUNK)]


def val_bits(model, corpus, block_size: int = 128, n_windows: int = 64, split: str = "val") -> float:
    """Mean validation loss of `model` on `corpus` in bits per byte (fixed windows: comparable across models)."""
    return evaluate(model, eval_batches(corpus, block_size, n_windows, split)) / LN2
