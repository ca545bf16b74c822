"""On-disk cache of generated kernel modules, keyed by the hash of their source.

Why on disk: Triton's ``@jit`` reads a kernel's source through ``inspect``, so a generated kernel must
live in a real file; keying the file by content hash makes the cache self-validating (a changed
generator writes a new file) and lets many processes share it. Writes go to a temporary file in the
same directory and are published with an atomic ``os.replace``, under a file lock when ``filelock`` is
installed, so concurrent processes never import a half-written module.

Location: ``$QTIP_TRITON_CACHE_DIR``, else ``platformdirs.user_cache_dir("qtip-triton")/kernels``, else
``~/.cache/qtip-triton/kernels`` (platformdirs and filelock are optional here: the GPU machines may lack
them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from qtip_triton.codegen.emit import default_layout, emit, source_options
from qtip_triton.fileio import atomic_write_text
from qtip_triton.spec import TrellisSpec

ENV_DIR = "QTIP_TRITON_CACHE_DIR"
_loaded: dict[str, ModuleType] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """Directory holding generated modules (created on demand)."""
    env = os.environ.get(ENV_DIR)
    if env:
        base = Path(env)
    else:
        try:
            from platformdirs import user_cache_dir

            base = Path(user_cache_dir("qtip-triton")) / "kernels"
        except ImportError:
            base = Path.home() / ".cache" / "qtip-triton" / "kernels"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _publish(path: Path, text: str) -> None:
    try:
        from filelock import FileLock
    except ImportError:  # atomic rename alone is still safe: identical content, last writer wins
        FileLock = None  # noqa: N806
    if FileLock is None:
        if not path.exists():
            atomic_write_text(path, text)
        return
    with FileLock(str(path) + ".lock", timeout=60):
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


def load_source(text: str) -> ModuleType:
    """Write ``text`` to the cache (if absent) and import it; the same text imports once per process."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    with _lock:
        mod = _loaded.get(digest)
        if mod is not None:
            return mod
        path = cache_dir() / f"qtip_kernel_{digest}.py"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            _publish(path, text)
        name = f"qtip_triton._generated.k{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _loaded[digest] = mod
        return mod


_by_key: dict[tuple, ModuleType] = {}


def load(spec: TrellisSpec, kind: str, config: Mapping[str, Any] | None = None, *, layout: str | None = None) -> ModuleType:
    """The imported generated module for (spec, layout, kind, source options); memoized in-process."""
    layout = layout or default_layout(spec)
    opts = source_options(spec, config, kind)
    key = (spec, layout, kind, tuple(sorted(opts.items())))
    mod = _by_key.get(key)
    if mod is None:
        mod = load_source(emit(spec, kind, opts, layout=layout))
        _by_key[key] = mod
    return mod
