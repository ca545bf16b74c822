"""Counting the Triton compiles of a block (:mod:`qtip_triton.compile_watch`), on CPU.

The interpreter compiles nothing, so these call the installed listener the way ``triton.compile`` does
(keyword arguments, ``CompileTimes`` in microseconds); the GPU test
``tests/gpu/test_warmup_coverage_gpu.py`` watches real compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qtip_triton import compile_watch as cw

knobs = pytest.importorskip("triton.knobs")
pytestmark = pytest.mark.skipif(not hasattr(knobs.compilation, "listener"), reason="Triton without a listener")


def fire(name: str, micros: int, cache_hit: bool, **extra) -> None:
    """What ``triton.compile`` does for one kernel, through whatever listener is installed."""
    knobs.compilation.listener(src=SimpleNamespace(name=f"src_{name}"), metadata={"name": name},
                               metadata_group={}, times=SimpleNamespace(total=micros), cache_hit=cache_hit, **extra)


def test_counts_builds_and_loads_apart():
    with cw.watch_compiles() as watch:
        fire("_had2_kernel", 1_500_000, False)
        fire("_had2_kernel", 2_000_000, False)
        fire("_gemv_kernel", 500_000, False)
        fire("_wgmma_kernel", 3_000, True)
    assert watch.available
    assert [e.name for e in watch.compiled] == ["_had2_kernel", "_had2_kernel", "_gemv_kernel"]
    assert [e.name for e in watch.loaded] == ["_wgmma_kernel"]
    assert watch.compiled_seconds() == pytest.approx(4.0)
    assert watch.loaded_seconds() == pytest.approx(0.003)
    assert watch.summary() == ("3 compiled here (4.0 s: _had2_kernel x2, _gemv_kernel), 1 loaded from the cache "
                               "(0.0 s)")


def test_summary_lists_the_most_frequent_names_first_and_counts_the_rest():
    with cw.watch_compiles() as watch:
        for i in range(8):
            for _ in range(8 - i):
                fire(f"k{i}", 0, False)
    text = watch.summary(most=2)
    assert text.startswith("36 compiled here (0.0 s: k0 x8, k1 x7, 6 more)")


def test_nothing_compiled_reads_so():
    with cw.watch_compiles() as watch:
        fire("k", 10, True)
    assert watch.compiled == [] and watch.summary() == "0 compiled here, 1 loaded from the cache (0.0 s)"
    with cw.watch_compiles() as nothing:
        pass
    assert nothing.summary() == "0 compiled here, 0 loaded from the cache"


def test_a_previous_listener_keeps_being_called_and_comes_back():
    calls = []

    def theirs(**kw):
        calls.append((kw["metadata"]["name"], kw["cache_hit"], kw.get("future")))

    knobs.compilation.listener = theirs
    try:
        with cw.watch_compiles() as outer:
            with cw.watch_compiles() as inner:
                fire("a", 1, False, future="kept")  # an argument a later Triton may add reaches theirs too
            fire("b", 1, True)
            assert knobs.compilation.listener is not theirs
        assert knobs.compilation.listener is theirs
    finally:
        knobs.compilation.listener = None
    assert calls == [("a", False, "kept"), ("b", True, None)]
    assert [e.name for e in inner.events] == ["a"] and [e.name for e in outer.events] == ["a", "b"]


def test_restored_after_an_exception():
    before = knobs.compilation.listener
    with pytest.raises(RuntimeError), cw.watch_compiles():
        raise RuntimeError("boom")
    assert knobs.compilation.listener is before


def test_names_and_times_missing_from_the_call_fall_back():
    with cw.watch_compiles() as watch:
        knobs.compilation.listener(src=SimpleNamespace(fn=SimpleNamespace(__name__="from_fn")), metadata={},
                                   metadata_group={}, times=None, cache_hit=False)
        knobs.compilation.listener(src=object(), metadata=None, metadata_group={}, times=None, cache_hit=False)
    assert [(e.name, e.seconds) for e in watch.events] == [("from_fn", 0.0), ("?", 0.0)]


def test_a_triton_without_the_knob_gives_an_empty_unavailable_watch(monkeypatch):
    monkeypatch.setattr(cw, "_compilation_knobs", lambda: None)
    with cw.watch_compiles() as watch:
        pass
    assert not watch.available and watch.events == []
    assert "not counted" in watch.summary()


_REAL_COMPILE = r"""
import json, sys
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qtip_triton.compile_watch import watch_compiles


@triton.jit
def _watched_copy(x, y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n), mask=i < n)


knobs.cache.dir = sys.argv[1]
src = ASTSource(fn=_watched_copy, signature={"x": "*fp16", "y": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                constexprs={(3,): 128})
with watch_compiles() as watch:
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
print(json.dumps([[e.name, e.cache_hit, e.seconds] for e in watch.events]))
"""


@pytest.mark.slow
def test_a_real_sm90_compile_is_counted_then_loaded_from_the_disk_cache(tmp_path):
    """The contract with the installed Triton, not a fake call: ``triton.compile`` for sm_90 (no GPU needed) into an
    empty cache dir builds the kernel once, and the same compile again loads it from disk. In its own process,
    without TRITON_INTERPRET (the suite runs interpreted, and compiling needs the real ``triton.jit``)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    script = tmp_path / "compile_twice.py"  # a file: @triton.jit reads its kernel's source
    script.write_text(_REAL_COMPILE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    events = json.loads(out.stdout.strip().splitlines()[-1])
    assert [e[:2] for e in events] == [["_watched_copy", False], ["_watched_copy", True]]
    assert events[0][2] > 0
