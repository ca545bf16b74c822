"""Timing helpers shared by the benchmarks (GPU only).

``time_us(fn)`` is the one way we time: warm up (compiles and allocator growth stay out), capture
``fn`` in a CUDA graph (launch gaps and Python overhead stay out, as in serving with graphs), then
``triton.testing.do_bench`` on the replay, which zeroes a 256 MB buffer before every call so each
call starts with a cold L2 (decode-size weights fit in the 50 MB L2; without the flush the number
would be fiction). The median is reported in microseconds.

``time_rotated_us(fns)`` is the second, serving-like way: one CUDA graph of back-to-back calls that
cycle over several weight copies, together at least three times the L2, so every call reads its
weights from DRAM, as a layer does after the previous layers' weights went through the L2. Why a
second method: the flush zeroes 256 MB before each call, which leaves the L2 full of dirty lines
that the timed kernel then writes back while it reads, and each call also pays a graph launch. Both
cost a small kernel (a 16.8 MB 2-bit matrix) a larger share of its time than they cost fp16, so the
flushed ratio is the conservative one; issue and PERF targets accept "L2 flushed or weights rotated".
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_us(fn: Callable[[], Any], *, graph: bool = True, warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median time of one call of ``fn`` in µs (CUDA graph replay, L2 flushed before each call)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    run = _capture([fn], 1).replay if graph else fn
    ms = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return float(ms) * 1000.0


def _capture(fns: list[Callable[[], Any]], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back calls cycling over ``fns`` (each run once on the capture stream
    first, so that allocator growth stays out of the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()  # warm the allocator on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return g


def rotation_copies(nbytes: int, *, l2_multiple: int = 3, minimum: int = 2) -> int:
    """How many copies of an ``nbytes`` weight make a rotation that no L2 can hold between two uses."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20
    return max(minimum, -(-l2_multiple * l2 // max(1, nbytes)))


def time_rotated_us(fns: list[Callable[[], Any]], *, min_calls: int = 24, reps: int = 15) -> float:
    """Median time per call (µs) of back-to-back calls cycling over ``fns`` in one CUDA graph.

    ``fns[i]`` must read weight copy i (see ``rotation_copies``); inputs may stay in the L2, as
    activations do in serving. Each replay is timed by events around it and divided by its calls.
    """
    if not fns:
        raise ValueError("time_rotated_us needs at least one callable")
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    calls = len(fns) * -(-min_calls // len(fns))
    g = _capture(fns, calls)
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1000.0 / calls)
    per_call.sort()
    return float(per_call[len(per_call) // 2])


def source_rev() -> str:
    """Which package source produced a result: ``git describe`` plus a digest of qtip_triton/*.py.

    The digest is what identifies the code: a copied checkout (the GPU machine's) can carry a stale
    or missing .git, and uncommitted edits change the digest but not the commit.
    """
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted((root / "qtip_triton").rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=root,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{rev or 'no-git'} src:{h.hexdigest()[:10]}"


def card_slug() -> str:
    """Short file-name-safe GPU name, e.g. 'h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    name = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def environment() -> dict[str, str]:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "qtip_triton_rev": source_rev()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(card=torch.cuda.get_device_name(), sms=str(p.multi_processor_count),
                   memory_gib=f"{p.total_memory / 2**30:.1f}")
    return env


def write_results(out_dir: str | Path, stem_prefix: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<card>-<date>[-prefix].{json,md}``; returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    stem = f"{card_slug()}-{date}" + (f"-{stem_prefix}" if stem_prefix else "")
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    jp.write_text(json.dumps(payload, indent=1))
    mp.write_text(markdown)
    return jp, mp
