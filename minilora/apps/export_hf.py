"""`minilora export-hf` and `minilora import-hf`: the base and its adapters to the transformers + PEFT stack and back.

    minilora export-hf OUT [--adapter DIR ...] [--quantize nf4 [--nested-rounding bnb-cpu]] [--base DIR] [--overwrite]
        OUT/config.json + OUT/model.safetensors     GPT2LMHeadModel.from_pretrained(OUT)
        OUT/<adapter folder name>/                  peft.PeftModel.from_pretrained(model, OUT/<name>)
    minilora import-hf FOLDER OUT [--overwrite]
        OUT/base.json + OUT/base.safetensors        minilora.load_base(OUT), `minilora demo --base OUT`
        OUT/<name>/ for each adapter sub-folder of FOLDER

The conversion itself is `minilora.hf` (export_hf, import_hf, import_adapter); this module checks the arguments
and the folders first (exit 2 naming the option) and reports what it wrote. Mirrors transformers'
`save_pretrained` / `from_pretrained` folders and PEFT's adapter folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from minilora.apps.common import add_threads_option, apply_threads
from minilora.hf import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    QUANT_TYPES,
    WEIGHTS_FILE,
    UnsupportedModelError,
    export_hf,
    import_adapter,
    import_hf,
)
from minilora.io import CorruptFileError, save_json, save_safetensors
from minilora.nn.linear4bit import Linear4bit
from minilora.pretrained import BASE_META, BASE_WEIGHTS, load_base
from minilora.quant.fourbit import NESTED_ROUNDINGS

CONVERSION_ERRORS = (UnsupportedModelError, CorruptFileError, FileNotFoundError, ValueError, TypeError)


def _check_out(p: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        p.error(f"OUT {out} is a file, not a folder; name a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        p.error(f"OUT {out} is not empty; pass --overwrite to replace the exported files in it, or name a new folder")


def build_export_parser():
    p = argparse.ArgumentParser(prog="minilora export-hf", description=__doc__.split("\n")[0])
    p.add_argument("out", metavar="OUT", help="folder to write (config.json, model.safetensors, adapter sub-folders)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter folder (adapter_config.json + adapter_model.safetensors) to convert; repeatable; "
                        "written to OUT/<folder name>")
    p.add_argument("--quantize", choices=QUANT_TYPES, default=None,
                   help="write bitsandbytes' pre-quantized 4-bit base (double quantization, blocksize 64)")
    p.add_argument("--nested-rounding", choices=NESTED_ROUNDINGS, default="exact",
                   help="with --quantize: how the nested absmax codes are rounded: exact nearest (default), bnb-cpu "
                        "(bitsandbytes' CPU bytes, byte for byte) or bnb-cuda (bitsandbytes' CUDA search, emulated)")
    p.add_argument("--base", default=None, help="folder with base.safetensors + base.json (default: shipped base)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (replaces the exported files)")
    add_threads_option(p)
    return p


def main(argv=None) -> int:
    p = build_export_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    apply_threads(args.threads)
    out = Path(args.out)
    _check_out(p, out, args.overwrite)
    if args.base is not None and not (Path(args.base) / BASE_WEIGHTS).is_file():
        p.error(f"--base {args.base}: no {BASE_WEIGHTS} there (make one with `minilora pretrain --out DIR`)")
    for a in args.adapter:
        if not (Path(a) / ADAPTER_CONFIG).is_file():
            p.error(f"--adapter {a}: no {ADAPTER_CONFIG} there; name a folder written by save_pretrained")
    try:
        model, _ = load_base(args.base)
        export_hf(model, out, adapters=args.adapter, quantize=args.quantize, overwrite=args.overwrite,
                  nested_rounding=args.nested_rounding)
    except CONVERSION_ERRORS as e:
        print(f"minilora export-hf: error: {e}", file=sys.stderr)
        return 2
    names = [Path(a).resolve().name for a in args.adapter]
    print(f"wrote {out}/{CONFIG_FILE} + {WEIGHTS_FILE}" + (f" ({args.quantize} 4-bit)" if args.quantize else "")
          + "".join(f", {out}/{n}/" for n in names))
    print(f"load it with: GPT2LMHeadModel.from_pretrained({str(out)!r})"
          + (f" then PeftModel.from_pretrained(model, {str(out / names[0])!r})" if names else ""))
    return 0


def build_import_parser():
    p = argparse.ArgumentParser(prog="minilora import-hf", description="a transformers GPT-2 folder (and its PEFT "
                                "adapter sub-folders) as a minilora base folder")
    p.add_argument("folder", metavar="FOLDER", help="transformers folder: config.json + model.safetensors")
    p.add_argument("out", metavar="OUT", help="folder to write: base.json + base.safetensors (+ adapters)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (replaces those files)")
    add_threads_option(p)
    return p


def import_main(argv=None) -> int:
    p = build_import_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    apply_threads(args.threads)
    folder, out = Path(args.folder), Path(args.out)
    if not (folder / CONFIG_FILE).is_file():
        p.error(f"FOLDER {folder}: no {CONFIG_FILE} there; name a folder written by save_pretrained")
    _check_out(p, out, args.overwrite)
    adapters = sorted(d for d in folder.iterdir() if (d / ADAPTER_CONFIG).is_file())
    try:
        model = import_hf(folder)
        if any(isinstance(m, Linear4bit) for m in model.modules()):
            print("minilora import-hf: error: a 4-bit folder imports through the Python API "
                  "(minilora.hf.import_hf returns a GPT with Linear4bit layers); a base folder holds float weights",
                  file=sys.stderr)
            return 2
        save_safetensors(out / BASE_WEIGHTS, model.state_dict())
        save_json(out / BASE_META, {"config": dataclasses.asdict(model.config), "n_params": model.get_num_params(),
                                    "val_bits_per_byte": None, "imported_from": f"transformers GPT-2 {folder.name}"})
        for d in adapters:
            import_adapter(d, out / d.name, model=model)
    except CONVERSION_ERRORS as e:
        print(f"minilora import-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/{BASE_META} + {BASE_WEIGHTS}" + "".join(f", {out}/{d.name}/" for d in adapters))
    print(f"load it with: minilora.load_base({str(out)!r})")
    return 0
