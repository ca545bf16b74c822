"""Where a whole forward's time goes: each kernel's duration and the gaps between them, rotated (GPU).

Why: the forward of a small batch costs 5-14 µs more than its decode kernel (H100, session 19: 8192^2 at
M = 1 24.1 against 14.9 µs, at M = 16 40.3 against 26.7), and the event-timed totals cannot say whether the
two Hadamard launches, their dependency waits or something else holds that time. Here the forwards of one
layer run back to back over weight copies (as in ``time_rotated_us``) inside one CUDA graph, the graph is
replayed under ``torch.profiler``, and the GPU's own kernel records (CUPTI, start and end of every kernel in
the graph) are split into per-forward sequences: for each position in the sequence the median duration and
the median gap to the next kernel (negative: the next one started before this one ended, as programmatic
dependent launch allows). fp16 ``torch.matmul`` is traced the same way beside it.

Also printed: the event-timed per-forward time of the same graph without the profiler, so the tracing's own
cost is visible.

    python bench/forward_timeline.py --shapes 8192x8192,28672x8192 --M 1,16 --tag timeline
    python bench/forward_timeline.py --config '8192x8192={"BLOCK_M": 1, "BLOCK_N": 64, ...}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402
from kernels import pinned_configs, random_weight, weight_copies  # noqa: E402

from qtip_triton import kernels  # noqa: E402
from qtip_triton.autotune.rotation import capture_calls, time_rotated_us  # noqa: E402
from qtip_triton.kernels import prepare  # noqa: E402

TRACED = ("kernel", "gpu_memset", "gpu_memcpy")


def short_name(name: str) -> str:
    """A kernel's name as a table cell: Triton's names are the jit function's, cuBLAS's are long."""
    if "gemm" in name.lower() and ("sm90" in name or "cutlass" in name or "nvjet" in name or "xmma" in name):
        return "cublas:" + name[:40]
    return name[:60]


def trace_calls(fns: list, calls: int, replays: int) -> list[dict]:
    """GPU records (name, ts, dur in µs) of ``replays`` replays of a graph of ``calls`` calls over ``fns``."""
    from torch.profiler import ProfilerActivity, profile

    g = capture_calls(fns, calls)
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    recs = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0))}
            for e in events if e.get("ph") == "X" and e.get("cat") in TRACED]
    recs.sort(key=lambda r: r["ts"])
    return recs


def sequence_stats(recs: list[dict], calls: int, replays: int) -> dict:
    """Per-position medians over the middle forwards of every replay (the first and last of a replay are left
    out: they border the graph launch)."""
    total = calls * replays
    if not recs or len(recs) % total:
        return {"error": f"{len(recs)} GPU records for {total} forwards: not a whole number per forward"}
    k = len(recs) // total
    per_replay = calls * k
    durs: list[list[float]] = [[] for _ in range(k)]
    gaps: list[list[float]] = [[] for _ in range(k)]
    spans: list[float] = []
    for r in range(replays):
        seq = recs[r * per_replay:(r + 1) * per_replay]
        for c in range(1, calls - 1):
            base = c * k
            for j in range(k):
                e, nxt = seq[base + j], seq[base + j + 1]
                durs[j].append(e["dur"])
                gaps[j].append(nxt["ts"] - (e["ts"] + e["dur"]))
            spans.append(seq[base + k]["ts"] - seq[base]["ts"])
    first = recs[k:2 * k]
    return {"kernels": [short_name(e["name"]) for e in first],
            "dur_us": [statistics.median(d) for d in durs],
            "gap_after_us": [statistics.median(g) for g in gaps],
            "span_us": statistics.median(spans)}


def point(m: int, n: int, K: int, M: int, pinned: dict, calls: int, replays: int) -> dict:
    qw = random_weight(m, n, K)
    pw = prepare(qw)
    w16 = torch.randn(m, n, device="cuda").half()
    pws, w16s = weight_copies(qw, pw, w16)
    kind, config = pinned.get((m, n), (None, None))
    if kind is None:
        from qtip_triton.registry import lookup_config

        kind, config = lookup_config(qw.spec, m, n, M)
    config = dict(config)
    x = torch.randn(M, n, device="cuda").half()
    ours = [lambda p=p: kernels.launch(kind, x, p, config) for p in pws]
    fp16 = [lambda w=w: torch.matmul(x, w.t()) for w in w16s]
    rec: dict = {"m": m, "n": n, "spec": qw.spec.name, "K": K, "M": M, "kind": kind, "config": config,
                 "copies": [len(pws), len(w16s)]}
    for label, fns in (("ours", ours), ("fp16", fp16)):
        n_calls = len(fns) * -(-calls // len(fns))  # the graph time_rotated_us captures (it runs each fn first)
        rec[f"{label}_event_us"] = time_rotated_us(fns, min_calls=calls)
        rec[label] = sequence_stats(trace_calls(fns, n_calls, replays), n_calls, replays)
    del pws, w16s
    torch.cuda.empty_cache()
    return rec


def kernel_rows(side: str, s: dict) -> list[str]:
    """Table rows (side, #, kernel, dur, gap after) of one :func:`sequence_stats` result, or its error."""
    if "error" in s:
        return [f"| {side} | - | {s['error']} | | |"]
    return [f"| {side} | {j} | `{name}` | {d:.2f} | {g:.2f} |"
            for j, (name, d, g) in enumerate(zip(s["kernels"], s["dur_us"], s["gap_after_us"], strict=True))]


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Forward timeline — {env.get('card', '?')} — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"torch {env['torch']}, triton {env['triton']}, rev {env.get('qtip_triton_rev', '?')}. Rotated forwards "
             "(weight copies > 3x L2, one input) back to back in one CUDA graph, traced by torch.profiler (CUPTI). "
             "Per position in a forward: median kernel duration and median gap to the next kernel (µs; negative: "
             "it started before this one ended). span: median start-to-start time of consecutive forwards; events: "
             "the same graph timed by CUDA events without the profiler.", ""]
    for r in rows:
        lines.append(f"## {r['m']}x{r['n']} K={r['K']} M={r['M']} {r['kind']}")
        lines.append("")
        lines.append(f"config: `{json.dumps(r['config'])}`; copies {r['copies'][0]} / {r['copies'][1]}")
        lines.append("")
        lines += ["| side | # | kernel | dur µs | gap after µs |", "|---|---|---|---|---|"]
        for side in ("ours", "fp16"):
            s = r[side]
            lines += kernel_rows(side, s)
            if "error" not in s:
                lines.append(f"| {side} | span | | {s['span_us']:.2f} | events {r[side + '_event_us']:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--shapes", default="8192x8192,28672x8192,4096x4096")
    ap.add_argument("--M", default="1,4,16")
    ap.add_argument("--K", default="2")
    ap.add_argument("--calls", type=int, default=24, help="forwards per graph (at least, rounded up to the copies)")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--config", action="append", default=[], metavar="OUTxIN=JSON",
                    help="as bench/kernels.py --config: this config instead of the registry's")
    ap.add_argument("--tag", default=os.environ.get("BENCH_TAG", "timeline"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/forward_timeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    pinned = pinned_configs(args.config)
    env = environment()
    rows = []
    for K in (int(v) for v in args.K.split(",")):
        for s in args.shapes.split(","):
            m, n = (int(v) for v in s.split("x"))
            for M in (int(v) for v in args.M.split(",")):
                try:
                    rows.append(point(m, n, K, M, pinned, args.calls, args.replays))
                except Exception as e:  # keep the other points
                    print(f"{m}x{n} K={K} M={M}: {e!r}", file=sys.stderr)
                    continue
                r = rows[-1]
                print(f"{m}x{n} K={K} M={M}: events {r['ours_event_us']:.1f} vs fp16 {r['fp16_event_us']:.1f}; "
                      f"{r['ours']}", file=sys.stderr, flush=True)
    md = markdown(env, rows)
    jp, mp = write_results(args.out, args.tag, {"env": env, "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
