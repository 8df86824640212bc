"""`minilora pretrain`: train the tiny base GPT on CPython's documentation topics, reproducibly, from a seed.

The base model every demo starts from. Byte-level (vocab 256) next-token prediction, loss in bits per byte
(= nats / ln 2; the text is 99.6 % ASCII, so ≈ bits per character):

    for step in 0..max_steps-1:   x, y = 16 random 128-byte windows of the training topics
                                  loss = cross_entropy(GPT(x), y);  AdamW with warmup + cosine decay, clip 1.0

Defaults are the settings of the checkpoint shipped in `minilora/checkpoints/` (`minilora.pretrained.load_base`:
4 layers, 4 heads, 128 wide, 128
context, ~0.88 M parameters; nanoGPT's `shakespeare_char` recipe scaled down to fit ~10 minutes of 1 CPU core).
The run writes `base.safetensors` (Hugging Face GPT-2 parameter names, float32) and `base.json` (config, training
settings, the corpus's sha256, the validation loss reached, the eval curve, wall time), so a student can rebuild
the shipped base and compare. Training goes through `minilora.train.train`, so `--resume` continues bit for bit.

Mirrors karpathy/nanoGPT `train.py` with `config/train_shakespeare_char.py`.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from minilora.apps.common import add_threads_option, apply_threads, check_out_dir
from minilora.data import LN2, load_corpus
from minilora.io import load_json, save_json, save_safetensors
from minilora.nn import GPT, GPTConfig
from minilora.optim import AdamW, get_cosine_schedule_with_warmup
from minilora.pretrained import BASE_META, BASE_WEIGHTS, eval_batches
from minilora.train import train

# The shipped base's recipe (`minilora pretrain` with no options reproduces it).
DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, seed=0,
                max_steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, weight_decay=0.01, betas=(0.9, 0.99),
                max_grad_norm=1.0, eval_windows=64, eval_every=100)
# A few-second run with the same recipe; its loss is recorded next to the shipped base so a test can check that
# `minilora pretrain` still trains the same way (the full 10-minute run is too long for CI).
SHORT_RUN = ["--steps", "20", "--batch-size", "8", "--eval-every", "0"]
EARLIER_RUN = (BASE_WEIGHTS, BASE_META, "checkpoint")   # what a run leaves in its --out folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minilora pretrain", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    D = DEFAULTS
    p.add_argument("--out", default=None, help="output folder (default runs/pretrain-<timestamp>)")
    p.add_argument("--steps", type=int, default=D["max_steps"], help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=D["batch_size"])
    p.add_argument("--lr", type=float, default=D["lr"], help="peak learning rate (cosine decay to 0)")
    p.add_argument("--warmup-steps", type=int, default=D["warmup_steps"], help="capped at steps // 10")
    p.add_argument("--seed", type=int, default=D["seed"], help="seeds the weights and the batch order")
    p.add_argument("--n-layer", type=int, default=D["n_layer"])
    p.add_argument("--n-head", type=int, default=D["n_head"])
    p.add_argument("--n-embd", type=int, default=D["n_embd"])
    p.add_argument("--block-size", type=int, default=D["block_size"])
    p.add_argument("--eval-every", type=int, default=D["eval_every"], help="0: only at the start and the end")
    p.add_argument("--eval-windows", type=int, default=D["eval_windows"], help="fixed validation windows")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint if it exists (without it, an --out holding a run is refused)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--record-short-run", action="store_true",
                   help=f"afterwards also run `pretrain {' '.join(SHORT_RUN)}` and record its loss in base.json")
    add_threads_option(p)
    return p


def _positive(p, args, names):
    for n in names:
        v = getattr(args, n)
        if v < 1:
            p.error(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def run(args) -> dict:
    """Pretrain with parsed arguments; returns the meta dict also written to OUT/base.json."""
    corpus = load_corpus("pydoc")
    cfg = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, seed=args.seed)
    model = GPT(cfg)
    opt = AdamW(model.named_parameters(), lr=args.lr, betas=DEFAULTS["betas"], weight_decay=DEFAULTS["weight_decay"])
    warmup = min(args.warmup_steps, args.steps // 10)
    T, B = args.block_size, args.batch_size
    settings = {"corpus": "pydoc", "max_steps": args.steps, "batch_size": B, "block_size": T, "lr": args.lr,
                "schedule": "cosine_with_warmup", "warmup_steps": warmup, "weight_decay": DEFAULTS["weight_decay"],
                "betas": list(DEFAULTS["betas"]), "max_grad_norm": DEFAULTS["max_grad_norm"], "seed": args.seed,
                "eval_windows": args.eval_windows, "eval_every": args.eval_every, "optimizer": "AdamW"}
    out = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(model, opt, lambda rng: corpus.get_batch("train", B, T, rng), max_steps=args.steps,
                max_grad_norm=DEFAULTS["max_grad_norm"],
                lr_schedule=get_cosine_schedule_with_warmup(warmup, args.steps),
                eval_every=args.eval_every, eval_batches=eval_batches(corpus, T, args.eval_windows),
                checkpoint_dir=out / "checkpoint", checkpoint_every=max(args.eval_every, 100), resume=args.resume,
                seed=args.seed, config=settings, progress=not args.no_progress, desc="pretrain")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = res.final_eval_loss
    meta = {
        "config": asdict(cfg), "training": settings, "n_params": model.get_num_params(),
        "corpus": corpus.stats(),
        "val_loss_nats": final, "val_bits_per_byte": final / LN2,
        "train_loss_last50_bits": sum(res.train_loss[-50:]) / len(res.train_loss[-50:]) / LN2,
        "eval_curve_bits": [[s, v / LN2] for s, v in res.eval_loss],
        "train_time_s": wall, "train_cpu_time_s": cpu,
        "step_time_median_s": sorted(res.step_time)[len(res.step_time) // 2],
        "resumed_from": res.resumed_from,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    save_safetensors(out / BASE_WEIGHTS, model.state_dict(), metadata={"format": "pt", "minilora": "gpt-base"})
    save_json(out / BASE_META, meta)
    return meta


def record_short_run(out) -> dict:
    """Run SHORT_RUN (same recipe, 20 steps) in OUT/short_run and record its result in OUT/base.json."""
    out = Path(out)
    args = build_parser().parse_args(SHORT_RUN + ["--out", str(out / "short_run"), "--no-progress"])
    short = run(args)
    meta = load_json(out / BASE_META)
    meta["short_run"] = {"argv": SHORT_RUN, "val_bits_per_byte": short["val_bits_per_byte"],
                         "corpus_sha256": short["corpus"]["sha256"], "train_time_s": short["train_time_s"]}
    save_json(out / BASE_META, meta)
    return meta["short_run"]


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    _positive(p, args, ["steps", "batch_size", "n_layer", "n_head", "n_embd", "block_size", "eval_windows"])
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.eval_every < 0 or args.warmup_steps < 0:
        p.error("--eval-every and --warmup-steps must be >= 0")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    corpus = load_corpus("pydoc")
    longest = min(len(corpus.train), len(corpus.val)) - 1            # a window needs block_size + 1 bytes
    if args.block_size > longest:
        p.error(f"--block-size {args.block_size} is longer than the corpus allows ({longest} bytes: its validation "
                f"split has {len(corpus.val):,} bytes)")
    if args.out is None:
        args.out = os.path.join("runs", time.strftime("pretrain-%Y%m%d-%H%M%S"))
    check_out_dir(p, "--out", args.out, earlier=EARLIER_RUN, overwrite=args.resume,
                  how_to_replace="pass --resume to continue it")
    apply_threads(args.threads)
    meta = run(args)
    print(f"pretrained {meta['n_params']:,} parameters for {args.steps} steps in {meta['train_time_s']:.0f} s: "
          f"val {meta['val_bits_per_byte']:.3f} bits/byte on {meta['corpus']['name']} "
          f"(corpus sha256 {meta['corpus']['sha256'][:12]}...)")
    if args.record_short_run:
        short = record_short_run(args.out)
        print(f"short run `pretrain {' '.join(SHORT_RUN)}`: val {short['val_bits_per_byte']:.3f} bits/byte")
    print(f"wrote {Path(args.out) / BASE_WEIGHTS} and {Path(args.out) / BASE_META}")
    return 0
