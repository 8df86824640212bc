"""What every `minilora` command shares: the --threads option, and checking its outputs before any work starts.

A command's arguments are checked before the first model trains or the first figure is drawn: a value that makes
no sense, an output folder that is a file, cannot be created or written, or already holds an earlier run, all end
in one line naming the option and what to do, with exit status 2 (argparse's convention), never in a traceback
minutes later.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from minilora.threads import DEFAULT_NUM_THREADS, set_num_threads


# ------------------------------------------------------------------------------------------------------ threads
def threads_value(text: str) -> int:
    """argparse type of --threads: an int >= 0 (0 leaves the BLAS library's own default, usually every core)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 0 for the BLAS library's default), got {n}")
    return n


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_value, default=None, metavar="N",
                   help=f"BLAS/OpenMP threads (default {DEFAULT_NUM_THREADS}: minilora's matrices are small, more "
                        "threads only fight other processes for the cores; 0: the BLAS library's own default)")


def apply_threads(n: int | None) -> None:
    """Set the process's BLAS threads for a command: None -> the project default, 0 -> leave the library default."""
    n = DEFAULT_NUM_THREADS if n is None else n
    set_num_threads(None if n == 0 else n)


# ------------------------------------------------------------------------------------------------------- values
def check_positive(p: argparse.ArgumentParser, option: str, value, *, allow_zero: bool = False) -> None:
    """p.error unless `value` is a finite number > 0 (>= 0 with allow_zero); None (not given) passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        p.error(f"{option} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


# ------------------------------------------------------------------------------------------------------ outputs
def _writable(p, option: str, folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".minilora-write-check-", suffix=".tmp")
    except OSError as e:
        p.error(f"{option} {folder}: cannot write there ({e.strerror}); name a folder you can write to")
    os.close(fd)
    os.unlink(probe)


def check_out_dir(p: argparse.ArgumentParser, option: str, path, *, earlier: tuple = (), overwrite: bool = False,
                  how_to_replace: str = "pass --overwrite to replace it") -> Path:
    """Create the output folder `path` if needed and make sure it can be written, before any work starts.

    earlier: names (files or folders) that an earlier run of the command left there; if any exists the folder is
    refused unless `overwrite`, so that a second run never replaces a first one's results without being asked."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        p.error(f"{option} {path} is a file, not a folder; name a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"{option} {path}: cannot create the folder ({e.strerror}); name a folder you can write to")
    _writable(p, option, path)
    found = [n for n in earlier if (path / n).exists()]
    if found and not overwrite:
        p.error(f"{option} {path} already holds an earlier run ({', '.join(found)}); {how_to_replace}, or name a "
                "new folder")
    return path


def check_out_file(p: argparse.ArgumentParser, option: str, path) -> Path:
    """The file `path` can be written (its folder exists and is writable, and it is not a folder itself)."""
    path = Path(path)
    if path.is_dir():
        p.error(f"{option} {path} is a folder; name a file, e.g. {path / 'figure.png'}")
    folder = path.parent
    if not folder.is_dir():
        p.error(f"{option} {path}: the folder {folder} does not exist (or is a file); create it first")
    _writable(p, option, folder)
    return path
