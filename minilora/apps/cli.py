"""The `minilora` command: one subcommand per piece of the course, each implemented by its own module's main(argv).

    minilora [--threads N] <command> [options]

    minilora demo [--quick] [--sweep-rank]   pretrained base -> full / LoRA / QLoRA fine-tunes, one table
    minilora pretrain                        train the tiny base model on CPython's docs
    minilora sample                          text from the base and from a fine-tuned adapter
    minilora quantize-report                 error and bits/param of every quantization scheme
    minilora memory --model llama-65b ...    memory calculator (LoRA and QLoRA papers' numbers)
    minilora paged-sim [--json]              paged optimizer surviving a long-sequence memory spike
    minilora figures                         regenerate every figure in figures/ (the only command that writes there)

Every command runs NumPy's BLAS on one thread unless told otherwise: `--threads N` before the command or among its
options (minilora.threads explains why). Subcommand modules are imported only when used, so `minilora memory`
starts fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from minilora.apps.common import threads_value

COMMANDS = {
    "demo": ("minilora.apps.demo", "main", "fine-tune the shipped base full / LoRA / QLoRA and print the comparison"),
    "pretrain": ("minilora.apps.pretrain", "main", "pretrain the tiny base GPT on CPython's documentation"),
    "sample": ("minilora.apps.demo", "sample_main", "generate text from the base and from a fine-tuned adapter"),
    "quantize-report": ("minilora.apps.quantize_report", "main", "quantization error and bits/param per scheme"),
    "memory": ("minilora.apps.memory_cli", "main", "memory calculator for LoRA / QLoRA at real model sizes"),
    "paged-sim": ("minilora.apps.paged_sim", "main", "simulate a long-sequence spike with and without paging"),
    "figures": ("minilora.apps.figures", "main", "regenerate figures/ (the only command that writes there)"),
    "export-hf": ("minilora.apps.export_hf", "main", "the base (+ adapters, 4-bit) as a transformers + PEFT folder"),
    "import-hf": ("minilora.apps.export_hf", "import_main", "a transformers GPT-2 folder as a minilora base folder"),
}


def usage() -> str:
    lines = ["usage: minilora [--threads N] <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "--threads N   BLAS/OpenMP threads for the command (default 1; 0: the BLAS library's own default)",
              "`minilora <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = []                                      # a global --threads N goes to the command's own --threads
    while argv and (argv[0] == "--threads" or argv[0].startswith("--threads=")):
        value = argv[0].partition("=")[2] if "=" in argv[0] else (argv[1] if len(argv) > 1 else None)
        argv = argv[1:] if "=" in argv[0] else argv[2:]
        try:
            threads = ["--threads", str(threads_value(value if value is not None else ""))]
        except argparse.ArgumentTypeError as e:
            print(f"minilora: error: argument --threads: {e}", file=sys.stderr)
            return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minilora: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    rc = getattr(importlib.import_module(module), func)(threads + rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
