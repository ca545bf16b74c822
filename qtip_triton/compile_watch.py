"""Which Triton kernels this process compiles itself, and which it only loads from the disk cache, while a block runs.

Why: the load-time warm-up compiles a model's kernel variants in a pool of worker processes first
(:mod:`qtip_triton.autotune.warmup_pool`), so that its serial part only loads binaries. A variant the pool
missed compiles in the serving process instead, one at a time, 1-3 s each, and shows only as a slower
engine start (H100, 2026-12-07: the warm-up after the pool took 30 s where it had taken 15). Counting the
process's own compiles turns such a gap into a log line and a failing GPU test instead of a guess.

It listens through Triton's compilation listener (``triton.knobs.compilation.listener``), which
``triton.compile`` calls once per kernel it builds or loads from the disk cache; launches served from a
kernel's in-memory cache call nothing and are not counted. A Triton without that knob gives a watch
whose ``available`` is False and which records nothing. Any listener already installed keeps being
called, and is restored on exit.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileEvent:
    """One kernel that ``triton.compile`` produced: built here (``cache_hit`` False) or loaded from disk."""

    name: str
    seconds: float
    cache_hit: bool


@dataclass
class CompileWatch:
    """What a :func:`watch_compiles` block saw."""

    available: bool
    events: list[CompileEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, event: CompileEvent) -> None:
        with self._lock:
            self.events.append(event)

    @property
    def compiled(self) -> list[CompileEvent]:
        """Kernels built in this process (the ones a warm-up pool should have built)."""
        return [e for e in self.events if not e.cache_hit]

    @property
    def loaded(self) -> list[CompileEvent]:
        """Kernels loaded from Triton's disk cache."""
        return [e for e in self.events if e.cache_hit]

    def compiled_seconds(self) -> float:
        return sum(e.seconds for e in self.compiled)

    def loaded_seconds(self) -> float:
        """Time ``triton.compile`` took to find and read the cached kernels (the binary's load onto the GPU comes at
        its first launch and is not in it)."""
        return sum(e.seconds for e in self.loaded)

    def summary(self, most: int = 6) -> str:
        """``"2 compiled here (3.1 s: _had2_kernel x2), 40 loaded from the cache (0.8 s)"``; names by count, ``most``
        of them."""
        if not self.available:
            return "compiles not counted (this Triton has no compilation listener)"
        built = self.compiled
        text = f"{len(built)} compiled here"
        if built:
            counts = Counter(e.name for e in built).most_common()
            names = ", ".join(n if c == 1 else f"{n} x{c}" for n, c in counts[:most])
            more = f", {len(counts) - most} more" if len(counts) > most else ""
            text += f" ({self.compiled_seconds():.1f} s: {names}{more})"
        loaded = self.loaded
        return f"{text}, {len(loaded)} loaded from the cache" + (f" ({self.loaded_seconds():.1f} s)" if loaded else "")


def _compilation_knobs() -> Any | None:
    """Triton's ``knobs.compilation`` if it has a ``listener`` slot (Triton >= 3.4), else None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    comp = getattr(knobs, "compilation", None)
    return comp if comp is not None and hasattr(comp, "listener") else None


def _seconds(times: Any) -> float:
    """``CompileTimes.total`` is in microseconds; anything else counts as unknown (0)."""
    total = getattr(times, "total", None)
    return float(total) / 1e6 if isinstance(total, (int, float)) else 0.0


def _kernel_name(src: Any, metadata: Any) -> str:
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not name:
        name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", None)
    return str(name or "?")


@contextlib.contextmanager
def watch_compiles() -> Iterator[CompileWatch]:
    """Record every kernel ``triton.compile`` builds or loads inside the block (see the module docstring)."""
    comp = _compilation_knobs()
    watch = CompileWatch(available=comp is not None)
    if comp is None:
        yield watch
        return
    previous = comp.listener

    def listener(*, src: Any, metadata: Any, times: Any = None, cache_hit: bool = False, **rest: Any) -> None:
        watch.record(CompileEvent(_kernel_name(src, metadata), _seconds(times), bool(cache_hit)))
        if previous is not None:
            previous(src=src, metadata=metadata, times=times, cache_hit=cache_hit, **rest)

    comp.listener = listener
    try:
        yield watch
    finally:
        comp.listener = previous
