"""Code generator: readable Triton source per (trellis spec, tile order, kernel kind), cached on disk.

``emit(spec, kind, config)`` returns the source; ``load(spec, kind, config)`` writes it to the user
cache (content-hashed file name, temp file + atomic rename under a file lock, safe across processes)
and imports it. ``qtip-triton codegen --spec L16K2V2-hyb9 --kind gemv`` prints one.
"""

from qtip_triton.codegen.cache import cache_dir, load, load_source
from qtip_triton.codegen.emit import KINDS, SOURCE_KEYS, default_layout, emit, source_options

__all__ = ["KINDS", "SOURCE_KEYS", "cache_dir", "default_layout", "emit", "load", "load_source", "source_options"]
