"""``qtip-triton export CACHE.tar.gz``: pack Triton's binary cache with a manifest of this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", type=Path, help="archive to write (.tar.gz)")
    p.add_argument("--cache-dir", type=Path, default=None, help="Triton cache to pack (default: Triton's)")


def run(args: argparse.Namespace) -> int:
    from qtip_triton.autotune.triton_cache import current_machine, export_cache, triton_cache_dir

    try:
        n = export_cache(args.archive, current_machine(), args.cache_dir)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        print(f"qtip-triton export: {e}", file=sys.stderr)
        return 2
    print(f"exported {n} files from {args.cache_dir or triton_cache_dir()} to {args.archive}")
    return 0
