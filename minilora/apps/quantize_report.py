"""`minilora quantize-report`: every quantization scheme's round-trip error and bits/param on one seeded tensor.

The rows come from minilora.quant.report.scheme_errors; this module only parses the options and prints the table.
"""
from __future__ import annotations

import argparse

from minilora.quant.report import pinned_input, scheme_errors


def format_table(rows) -> str:
    lines = [f"{'scheme':<20} {'mean abs err':>12} {'mean rel err':>12} {'max abs err':>11} {'bits/param':>10}"]
    lines += [f"{r['scheme']:<20} {r['mean_abs_err']:>12.6f} {r['mean_rel_err']:>12.6f} {r['max_abs_err']:>11.5f} "
              f"{r['bits_per_param']:>10.4f}" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="minilora quantize-report",
                                 description="round-trip error and bits/param of every quantization scheme")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args(argv)
    x = pinned_input(args.seed, (args.rows, args.cols))
    print(f"input: default_rng({args.seed}).standard_normal(({args.rows}, {args.cols})) as float32")
    print(format_table(scheme_errors(x)))
    return 0
