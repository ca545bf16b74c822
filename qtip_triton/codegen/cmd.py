"""``qtip-triton codegen``: print the generated Triton source of one kernel (and where it is cached)."""

from __future__ import annotations

import argparse
import json
import sys

from qtip_triton.codegen.emit import KINDS, TABLE_MODES, default_layout, emit
from qtip_triton.spec import TrellisSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="trellis spec name, e.g. L16K2V2-hyb9")
    parser.add_argument("--kind", required=True, choices=KINDS + ("wgmma",),
                        help="kernel kind (wgmma: the Gluon decode-matmul on Hopper's warpgroup MMA)")
    parser.add_argument("--layout", default=None, help="stored tile layout (default: qtip for L16 V2, else tile)")
    parser.add_argument("--table", default="gather", choices=TABLE_MODES, help="how a small code table is read")
    parser.add_argument("--config", default=None, help="JSON config dict (only source keys matter)")
    parser.add_argument("--write", action="store_true", help="also write it to the kernel cache and print the path")


def run(args: argparse.Namespace) -> int:
    try:
        spec = TrellisSpec.parse(args.spec)
        config = json.loads(args.config) if args.config else {}
        config.setdefault("table", args.table)
        layout = args.layout or default_layout(spec)
        if args.kind == "wgmma":
            from qtip_triton.codegen.wgmma import emit_wgmma

            text = emit_wgmma(spec, config, layout=layout)
        else:
            text = emit(spec, args.kind, config, layout=layout)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"qtip-triton codegen: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    if args.write:
        from qtip_triton.codegen.cache import load_source

        mod = load_source(text)
        print(f"# cached at {mod.__file__}", file=sys.stderr)
    return 0
