"""Rotated timing: back-to-back calls that cycle over weight copies which together exceed the L2 several times.

Why: a served model runs its layers back to back, so each layer's weights come from DRAM (the layers before
went through the L2) while its activations were just written and sit in the L2. Timing one call after an L2
flush gets the weights right but not the rest: the flush leaves the L2 full of dirty lines that the timed
kernel writes back while it reads, and each call pays a graph launch of its own. Both cost a small decode
kernel (a 16.8 MB 2-bit matrix) a larger share of its time than they cost fp16 (bench/NOTES.md, session 18),
and they can rank two configs differently from how serving would (session 19: 28672x8192 at M = 1).

Used by ``qtip-triton autotune --timer rotated`` and by the benchmarks (``bench/common.py``). GPU only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

L2_MULTIPLE = 3  # the copies of a rotation together hold at least this many L2s
DEFAULT_L2_BYTES = 50 * 2**20  # an H100's, when the device does not say


def capture_calls(fns: list[Callable[[], Any]], calls: int):
    """A CUDA graph of ``calls`` back-to-back calls cycling over ``fns`` (each run once on the capture stream
    first, so that allocator growth stays out of the graph)."""
    import torch

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


def rotation_copies(nbytes: int, *, l2_multiple: int = L2_MULTIPLE, minimum: int = 2) -> int:
    """How many copies of an ``nbytes`` weight make a rotation that no L2 can hold between two uses
    (never fewer than ``minimum``: with one copy, the next call would find its own tail in the L2)."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(minimum, -(-l2_multiple * l2 // max(1, nbytes)))


def time_rotated_us(fns: list[Callable[[], Any]], *, min_calls: int = 24, reps: int = 15) -> float:
    """Median time per call (µs) of back-to-back calls cycling over ``fns`` in one CUDA graph.

    ``fns[i]`` must read weight copy i (see :func:`rotation_copies`); inputs may stay in the L2, as
    activations do in serving. Each replay is timed by events around it and divided by its calls.
    """
    import torch

    if not fns:
        raise ValueError("time_rotated_us needs at least one callable")
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    calls = len(fns) * -(-min_calls // len(fns))
    g = capture_calls(fns, calls)
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
