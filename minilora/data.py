"""Text that ships with every Python, as byte tokens: three corpora, deterministic splits, seeded batches.

Tokenizer: UTF-8 bytes, vocab 256, so there are no unknown tokens and no merges to learn; a loss of L nats per token
is L / ln 2 bits per byte. The texts are > 99 % ASCII, so bits per byte is (almost) bits per character.

Corpora (nothing is downloaded; all three are read from the running interpreter's standard library):

    pydoc    CPython's documentation topics, `pydoc_data.topics.topics` (what `help("with")` prints): English prose
             with code examples. The base model is pretrained on it. Split by topic: every 10th topic (sorted by
             name) is validation.
    stdlib   Python source code of a fixed list of standard-library modules (the fine-tuning domain). Whole modules
             are held out for validation, so validation code was never seen, not even in part.
    idle     The HTML of IDLE's help page, `idlelib/help.html` (the second domain, for adapter swapping): markup,
             attributes and entities, far from both prose and Python. One document, split 90/10 at a line break.

Each Python version ships slightly different text, so every corpus records the sha256 of its bytes; tests that pin
numbers skip when the hash differs from the recorded one.

Batches are sampled on the host, as nanoGPT's `get_batch` does: random windows of block_size+1 bytes, x = the first
block_size, y = the same shifted by one. The numpy Generator's state is a plain dict of ints, so a training run can
save it in JSON and resume bit for bit (minilora.train's checkpoints do).

Host-only module: it may import numpy (text -> token ids happens before arrays move to the device).
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from minilora.backend import to_numpy

VOCAB_SIZE = 256
LN2 = math.log(2.0)

# The fine-tuning domain. Plain top-level modules present from Python 3.10 to 3.13; sorted; whole modules held out.
STDLIB_TRAIN_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "code", "colorsys", "contextlib", "copy", "csv",
    "dataclasses", "fnmatch", "fractions", "functools", "getopt", "glob", "gzip", "heapq", "hmac", "linecache",
    "numbers", "operator", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "shlex", "string",
    "textwrap", "timeit", "tokenize", "types", "warnings", "weakref", "zipapp",
)
STDLIB_VAL_MODULES = ("selectors", "statistics", "traceback")

CORPORA = ("pydoc", "stdlib", "idle")
DESCRIPTIONS = {
    "pydoc": "CPython documentation topics (pydoc_data.topics), English prose",
    "stdlib": "Python source of standard-library modules (held-out modules for validation)",
    "idle": "HTML of IDLE's help page (idlelib/help.html), markup",
}


def encode(text: str) -> np.ndarray:
    """str -> token ids: its UTF-8 bytes as uint8, shape (n_bytes,)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids) -> str:
    """token ids (host or device) -> str; a multi-byte character cut in half (possible when sampling) becomes U+FFFD."""
    return bytes(int(i) for i in to_numpy(ids).reshape(-1)).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """One text corpus: train/val token arrays (uint8), where they came from, and the sha256 of all its bytes."""
    name: str
    train: np.ndarray
    val: np.ndarray
    sha256: str
    description: str
    sources: dict = field(default_factory=dict)   # {"train": [...], "val": [...]}: topic names, modules or files

    def split(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def get_batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        """Random windows of the split: x, y int64 of shape (batch_size, block_size), y = x shifted by one."""
        return get_batch(self.split(split), batch_size, block_size, rng)

    def eval_windows(self, split: str, block_size: int, n_windows: int):
        """n_windows fixed windows spread evenly over the split (no randomness), so every evaluation of every
        model sees exactly the same bytes: x, y int64 (n_windows, block_size)."""
        if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
            raise ValueError(f"n_windows must be an integer >= 1, got {n_windows!r} (an empty evaluation set has "
                             "no mean loss)")
        data = self.split(split)
        last = len(data) - block_size - 1
        if last < 0:
            raise ValueError(f"{self.name}/{split} has {len(data)} bytes, fewer than block_size+1={block_size + 1}")
        starts = np.linspace(0, last, num=n_windows).round().astype(np.int64)        # (n_windows,)
        return _windows(data, starts, block_size)

    def stats(self) -> dict:
        allb = np.concatenate([self.train, self.val])
        return {"name": self.name, "description": self.description, "sha256": self.sha256,
                "train_bytes": int(self.train.size), "val_bytes": int(self.val.size),
                "ascii_fraction": float((allb < 128).mean())}


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int):
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]                     # (B, T+1)
    chunk = data[idx].astype(np.int64)                                             # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]                                             # x (B, T), y (B, T)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator):
    """nanoGPT's get_batch on the host: batch_size random windows of data -> x, y int64 (batch_size, block_size)."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)              # (B,)
    return _windows(data, starts, block_size)


# ----------------------------------------------------------------------------------------------------------- corpora

def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; this corpus is read from the Python standard library, "
                                "which looks incomplete on this installation")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _texts_pydoc():
    from pydoc_data.topics import topics  # imported here: ships with CPython (what help() prints)
    names = sorted(topics)
    val = [n for i, n in enumerate(names) if i % 10 == 5]     # every 10th topic, deterministically
    train = [n for n in names if n not in set(val)]
    return [topics[n] for n in train], [topics[n] for n in val], {"train": train, "val": val}


def _texts_stdlib():
    d = stdlib_dir()
    train = [_read(os.path.join(d, m + ".py")) for m in STDLIB_TRAIN_MODULES]
    val = [_read(os.path.join(d, m + ".py")) for m in STDLIB_VAL_MODULES]
    return train, val, {"train": [m + ".py" for m in STDLIB_TRAIN_MODULES],
                        "val": [m + ".py" for m in STDLIB_VAL_MODULES]}


def _texts_idle():
    path = os.path.join(stdlib_dir(), "idlelib", "help.html")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; the 'idle' corpus needs idlelib (on Debian/Ubuntu it is the "
                                "separate package idle-python3.x)")
    text = _read(path)
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1       # 90/10 at a line break
    return [text[:cut]], [text[cut:]], {"train": ["idlelib/help.html[:90%]"], "val": ["idlelib/help.html[90%:]"]}


_LOADERS = {"pydoc": _texts_pydoc, "stdlib": _texts_stdlib, "idle": _texts_idle}
_cache: dict = {}


def load_corpus(name: str) -> Corpus:
    """Load one of CORPORA ("pydoc", "stdlib", "idle") from this interpreter's standard library (cached)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    if name not in _cache:
        train_docs, val_docs, sources = _LOADERS[name]()
        train_text = "\n\n".join(train_docs)
        val_text = "\n\n".join(val_docs)
        h = hashlib.sha256()
        h.update(train_text.encode("utf-8"))
        h.update(b"\x00--val--\x00")
        h.update(val_text.encode("utf-8"))
        train_ids, val_ids = encode(train_text), encode(val_text)
        train_ids.flags.writeable = val_ids.flags.writeable = False   # shared by every caller: nobody may edit it
        _cache[name] = Corpus(name, train_ids, val_ids, h.hexdigest(), DESCRIPTIONS[name], sources)
    return _cache[name]


def bits_per_byte(loss_nats: float) -> float:
    """Mean cross-entropy in nats per byte token -> bits per byte (≈ bits per character for ASCII text)."""
    return float(loss_nats) / LN2
