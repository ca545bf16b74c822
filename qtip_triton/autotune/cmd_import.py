"""``qtip-triton import CACHE.tar.gz``: unpack an exported cache, only if made on an identical machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", type=Path, help="archive written by `qtip-triton export`")
    p.add_argument("--cache-dir", type=Path, default=None, help="Triton cache to fill (default: Triton's)")


def run(args: argparse.Namespace) -> int:
    from qtip_triton.autotune.triton_cache import current_machine, import_cache, triton_cache_dir

    try:
        n = import_cache(args.archive, current_machine(), args.cache_dir)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"qtip-triton import: {e}", file=sys.stderr)
        return 2
    print(f"imported {n} new files into {args.cache_dir or triton_cache_dir()}")
    return 0
