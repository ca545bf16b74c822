"""GPU time per kernel of a profiled region, and of one decode step as the difference of two regions.

Why: the layer benchmark put one Llama-2-7B layer at 1.19x fp16 at batch 1 (H200, session 10) while vLLM
end to end ran 0.97x (session 13): about 0.7 ms of each 4.4 ms step is not explained by the linears'
isolated times. A profile of the real engine says which kernels take it. ``torch.profiler`` records every
CUDA kernel (CUDA-graph replays included) of the process it runs in, so the engine must run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``); this module only turns its events into tables.

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ...
    times = kernel_times(prof.events())
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# (group, substrings of a kernel name that put it there), first match wins. Our generated decode kernels
# are all named "kernel"; the Hadamard transforms are the _had* kernels (kernels/hadamard_jit.py).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qtip transforms", ("_had1_kernel", "_had2_kernel", "_had2_tall_kernel", "_had2_stack_kernel")),
    ("attention", ("attn", "attention", "flash", "paged", "unified_attention", "reshape_and_cache")),
    ("gemm (cuBLAS / CUTLASS)", ("gemm", "gemv", "xmma", "cutlass", "cublas", "splitKreduce")),
    ("norm / activation", ("rms_norm", "layer_norm", "silu", "act_and_mul", "rotary", "rope")),
    ("sampling / logits", ("sample", "softmax", "argmax", "topk", "top_k", "sort", "logit")),
)


def group_of(name: str) -> str:
    """The group a kernel name belongs to (``qtip decode`` for our generated kernels, ``other`` if none)."""
    if name == "kernel":  # every generated decode kernel is ``def kernel(...)`` (codegen/emit.py)
        return "qtip decode"
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def kernel_times(events: Iterable[Any]) -> dict[str, tuple[float, int]]:
    """{kernel name: (total GPU µs, launches)} over a profiler's events (CUDA kernels only)."""
    out: dict[str, tuple[float, int]] = {}
    for e in events:
        dev = getattr(e, "device_type", None)
        if dev is None or "CUDA" not in str(dev):
            continue
        span = getattr(e, "time_range", None)  # a kernel event's own duration (device_time_total is 0 for
        if span is not None:                   # some event kinds and versions)
            us = span.elapsed_us()
        else:
            us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        total, calls = out.get(e.name, (0.0, 0))
        out[e.name] = (total + float(us), calls + 1)
    return out


def per_step(long: dict[str, tuple[float, int]], short: dict[str, tuple[float, int]], steps: int,
             top: int = 25) -> dict[str, Any]:
    """GPU µs and launches per decode step: (long region - short region) / ``steps``, by kernel (the ``top``
    largest, the rest summed as one row) and by group, largest first."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rows = []
    for name in set(long) | set(short):
        (lt, lc), (st, sc) = long.get(name, (0.0, 0)), short.get(name, (0.0, 0))
        rows.append({"kernel": name, "group": group_of(name), "us": (lt - st) / steps, "calls": (lc - sc) / steps})
    rows.sort(key=lambda r: -r["us"])
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"us": 0.0, "calls": 0.0})
        g["us"] += r["us"]
        g["calls"] += r["calls"]
    head, tail = rows[:top], rows[top:]
    if tail:
        head.append({"kernel": f"({len(tail)} others)", "group": "", "us": sum(r["us"] for r in tail),
                     "calls": sum(r["calls"] for r in tail)})
    return {"kernels": [{**r, "us": round(r["us"], 2), "calls": round(r["calls"], 2)} for r in head],
            "groups": {g: {"us": round(v["us"], 2), "calls": round(v["calls"], 2)}
                       for g, v in sorted(groups.items(), key=lambda kv: -kv[1]["us"])},
            "total_us": round(sum(r["us"] for r in rows), 2)}


def markdown(title: str, prof: dict[str, Any]) -> list[str]:
    """Lines of a markdown section: groups, then kernels, per decode step."""
    lines = [f"### {title}", "", f"GPU time per decode step: {prof['total_us']:.1f} µs.", "",
             "| group | µs / step | launches / step |", "|---|---|---|"]
    lines += [f"| {g} | {v['us']:.1f} | {v['calls']:g} |" for g, v in prof["groups"].items()]
    lines += ["", "| kernel | group | µs / step | launches / step |", "|---|---|---|---|"]
    lines += [f"| `{r['kernel'][:70]}` | {r['group']} | {r['us']:.1f} | {r['calls']:g} |" for r in prof["kernels"]]
    return lines + [""]
