"""The cost of one kernel boundary: a chain of trivial dependent kernels in one CUDA graph, per PDL mode (GPU).

Why: a QTIP forward is three dependent launches (input transform, decode, output transform), and at one token
each transform adds ~3.5 µs to the forward's critical path on the H100 (bench/forward_timeline.py, session 20).
How much of that is the boundary itself (the dependent kernel's start, its wait, its memory made visible to
the next) and how much the transform's own work decides what fusing or speeding the transforms can gain.
Here each kernel of the chain waits for the previous one (``griddepcontrol.wait`` with PDL), reads the
activations it wrote, adds one and writes them for the next: no work but the boundary. Timed by CUDA events
over the graph (per kernel) and traced by torch.profiler like the forwards.

    python bench/pdl_chain.py --elements 8192,131072 --tag pdl-chain
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402
from forward_timeline import sequence_stats, trace_calls  # noqa: E402

from qtip_triton.autotune.rotation import time_rotated_us  # noqa: E402
from qtip_triton.kernels.pdl import grid_dependency_sync, triton_supports_pdl  # noqa: E402

MODES = {"off": 0, "exit": 1, "early": 2}


@triton.jit
def _step_kernel(X, Y, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y = x + 1 after the previous kernel of the stream is done: a dependent kernel with no work of its own."""
    grid_dependency_sync(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok, other=0.0) + 1.0, mask=ok)


def chain(elements: int, mode: int, block: int = 1024):
    """Two callables alternating between two fp16 buffers of ``elements`` values: each reads what the other wrote."""
    bufs = [torch.zeros(elements, device="cuda", dtype=torch.float16) for _ in range(2)]
    grid = (triton.cdiv(elements, block),)
    extra = {"PDL": mode, "launch_pdl": True} if mode else {"PDL": 0}

    def step(i: int):
        return lambda: _step_kernel[grid](bufs[i], bufs[1 - i], elements, BLOCK=block, num_warps=4, **extra)

    return [step(0), step(1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--elements", default="8192,131072", help="fp16 values each kernel reads and writes")
    ap.add_argument("--modes", default="off,exit,early")
    ap.add_argument("--calls", type=int, default=48)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--tag", default=os.environ.get("BENCH_TAG", "pdl-chain"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/pdl_chain.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if not triton_supports_pdl():
        print("this Triton has no launch_pdl: only mode off is measured", file=sys.stderr)
    env = environment()
    rows = []
    for elements in (int(v) for v in args.elements.split(",")):
        for name in args.modes.split(","):
            mode = MODES[name]
            if mode and not triton_supports_pdl():
                continue
            fns = chain(elements, mode)
            per = time_rotated_us(fns, min_calls=args.calls)
            stats = sequence_stats(trace_calls(fns, args.calls, args.replays), args.calls, args.replays)
            rows.append({"elements": elements, "mode": name, "per_kernel_us": per, "trace": stats})
            print(f"{elements} values, PDL {name}: {per:.2f} µs per kernel; {stats}", file=sys.stderr, flush=True)
    lines = [f"# Kernel boundary cost — {env.get('card', '?')} — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"torch {env['torch']}, triton {env['triton']}, rev {env.get('qtip_triton_rev', '?')}. A chain of "
             f"{args.calls} dependent trivial kernels (wait, read what the previous one wrote, add one, write) in one "
             "CUDA graph: CUDA-event time per kernel, and from the profiler's trace each kernel's median duration and "
             "the gap to the next.", "",
             "| values | PDL | µs per kernel (events) | traced duration µs | gap after µs | traced span µs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["trace"]
        if "error" in t:
            lines.append(f"| {r['elements']} | {r['mode']} | {r['per_kernel_us']:.2f} | {t['error']} | | |")
            continue
        lines.append(f"| {r['elements']} | {r['mode']} | {r['per_kernel_us']:.2f} | {t['dur_us'][0]:.2f} | "
                     f"{t['gap_after_us'][0]:.2f} | {t['span_us']:.2f} |")
    md = "\n".join(lines) + "\n"
    jp, mp = write_results(args.out, args.tag, {"env": env, "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
