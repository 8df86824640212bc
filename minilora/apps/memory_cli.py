"""`minilora memory`: the memory calculator (minilora.memory) on the command line.

    minilora memory --model llama-65b --method qlora          the breakdown, category by category
    minilora memory --model llama-7b --method lora --json     one JSON object
    minilora memory --explain                                 every assumption the estimate makes, then the estimate
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from minilora import memory
from minilora.apps.common import add_threads_option, apply_threads
from minilora.memory import METHOD_DEFAULTS, MODELS, estimate, get_shape, param_counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minilora memory",
                                description="Memory of full / LoRA / QLoRA fine-tuning, category by category.")
    p.add_argument("--model", default="llama-7b", help=f"one of {', '.join(MODELS)} (default llama-7b)")
    p.add_argument("--method", default="qlora", choices=list(METHOD_DEFAULTS))
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default: lora 8, qlora 64)")
    p.add_argument("--targets", default=None,
                   help="'q,v', 'q,k,v,o', 'all-linear' (default: lora q,v; qlora all-linear)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for qlora (qlora.py), off otherwise")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--optim-bits", type=int, choices=(8, 32), default=32,
                   help="Adam state bits: 32 (AdamW, 8 B/param) or 8 (bnb AdamW8bit, 2.03 B/param)")
    p.add_argument("--master-weights", action="store_true", help="full: add an fp32 master copy (4 B/param)")
    p.add_argument("--upcast-non-quantized", action="store_true",
                   help="qlora: embeddings/norms/lm_head in fp32 (PEFT prepare_model_for_kbit_training)")
    for f in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"override the model's {f}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", action="store_true", help="print every assumption, then the estimate")
    p.add_argument("--list-models", action="store_true", help="the known shapes (one JSON object with --json)")
    add_threads_option(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)

    if args.list_models and args.json:
        print(json.dumps({name: {**dataclasses.asdict(sh), "params": param_counts(sh)["total"]}
                          for name, sh in MODELS.items()}))
        return 0
    if args.list_models:
        for name, sh in MODELS.items():
            print(f"{name:<10} n_layer={sh.n_layer:<3} d_model={sh.d_model:<6} n_head={sh.n_head:<3} "
                  f"d_ff={sh.d_ff:<6} vocab={sh.vocab_size:<6} params={param_counts(sh)['total']:,}")
        return 0
    try:
        shape = get_shape(args.model)
    except KeyError as e:
        print(f"minilora memory: error: {e.args[0]}", file=sys.stderr)
        return 2
    overrides = {f: getattr(args, f) for f in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size")
                 if getattr(args, f) is not None}
    try:
        if overrides:
            shape = dataclasses.replace(shape, name=shape.name + "(custom)", **overrides)
        est = estimate(shape, args.method, r=args.r, targets=args.targets, seq_len=args.seq_len,
                       batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
                       double_quant=args.double_quant, master_weights=args.master_weights,
                       upcast_non_quantized=args.upcast_non_quantized, optim_bits=args.optim_bits)
    except ValueError as e:        # the calculator names the value and its bound (rank, shape, lengths)
        print(f"minilora memory: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict()))
        return 0
    if args.explain:
        print(memory.__doc__)
    print(est)
    return 0

