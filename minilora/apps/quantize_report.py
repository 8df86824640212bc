"""`minilora quantize-report`: every quantization scheme's round-trip error and bits/param on one seeded tensor.

The rows come from minilora.quant.report.scheme_errors; this module only parses the options and prints the table.
"""
from __future__ import annotations

import argparse

from minilora.apps.common import add_threads_option, apply_threads
from minilora.quant.report import pinned_input, scheme_errors

MAX_VALUES = 4096 * 4096      # 64 MB per float32 copy of the input, and every scheme makes several copies


def format_table(rows) -> str:
    lines = [f"{'scheme':<20} {'mean abs err':>12} {'mean rel err':>12} {'max abs err':>11} {'bits/param':>10}"]
    lines += [f"{r['scheme']:<20} {r['mean_abs_err']:>12.6f} {r['mean_rel_err']:>12.6f} {r['max_abs_err']:>11.5f} "
              f"{r['bits_per_param']:>10.4f}" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="minilora quantize-report",
                                 description="round-trip error and bits/param of every quantization scheme")
    ap.add_argument("--seed", type=int, default=0, help="seeds NumPy's default_rng (>= 0)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    add_threads_option(ap)
    args = ap.parse_args(argv)
    for name in ("rows", "cols"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.rows * args.cols > MAX_VALUES:
        ap.error(f"--rows {args.rows} x --cols {args.cols} is {args.rows * args.cols:,} values; at most "
                 f"{MAX_VALUES:,} (e.g. 4096 x 4096): every scheme keeps several copies of the input in memory")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0 (NumPy seeds are non-negative), got {args.seed}")
    apply_threads(args.threads)
    x = pinned_input(args.seed, (args.rows, args.cols))
    print(f"input: default_rng({args.seed}).standard_normal(({args.rows}, {args.cols})) as float32")
    print(format_table(scheme_errors(x)))
    return 0
