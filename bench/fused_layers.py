"""Where a decoder layer's QTIP time goes at decoding batch sizes (GPU): the op vs its parts vs fp16.

For Llama-2-7B's layers (fused q/k/v 3 x 4096x4096, o, fused gate/up 2 x 11008x4096, down) and M in
{1, 8, 16}, times with CUDA-graph replay and L2 flushed (bench/common.py):

* ``op``: the custom op as vLLM calls it (fused shards: grouped transforms and one decode launch; each shard has
  its own code table, as in QTIP checkpoints and vLLM's dummy fill, since 2026-12-05: earlier runs shared one);
* ``op_shard_decode``: ``QTIP_TRITON_NO_FUSED_DECODE=1`` (grouped transforms, one decode launch per shard);
* ``op_per_shard``: ``QTIP_TRITON_NO_SHARED_INPUT=1`` (every shard on its own: three launches each);
* ``kernels``: only the decode kernels of the shards (the registry's kind and config, h given);
* ``kernels_mma`` (M <= 16): the same decodes by the gemv's tensor-core variant (codegen/mma.py), one
  fixed config (64 x 256 tiles, 4 warps, SPLIT_K 4), untuned;
* ``fp16``: ``torch.matmul`` on the fused fp16 weight.

So op - kernels is what the transforms (and the launches around them) cost. The "whole layer" rows time
the four ops back to back in one graph (as a decode step runs them), without and with programmatic
dependent launch (``QTIP_TRITON_PDL=exit|early|auto``, kernels/pdl.py), against the four fp16 matmuls. Writes
``<out>/<card>-<date>-fused-layers.{json,md}``.

``--timeline 64``: also trace the whole layer at those M under ``torch.profiler`` (bench/forward_timeline.py's
tracer): every kernel of one layer forward with its median duration and the gap to the next, so that the time
the ops spend beyond their decode kernels (at 64 tokens, 94 µs of 238 on the H100 in session 28) splits into
transforms, gathers, launch gaps and the rest. Weights are not rotated there (the four ops' 2-bit words, ~50 MB,
are about one H100 L2), so it attributes time; the timed rows above are the totals.

    PYTHONPATH=. python bench/fused_layers.py --out bench/results
    PYTHONPATH=. python bench/fused_layers.py --M 64 --timeline 32,64 --tag timeline
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, int_list, time_us, write_results  # noqa: E402

LAYERS = {"qkv": [(4096, 4096)] * 3, "o": [(4096, 4096)], "gate_up": [(11008, 4096)] * 2, "down": [(4096, 11008)]}

PDL_MODES = ("off", "exit", "early", "auto")  # whole-layer columns (kernels/pdl.py)


def _h(M: int, n: int, kind: str, config: dict) -> torch.Tensor:
    """A random h in the dtype and order the layers' input transform writes for this decode config."""
    from qtip_triton import kernels
    from qtip_triton.kernels import mma_layout

    h = torch.randn(M, n, device="cuda", dtype=kernels.h_dtype(kind, [config], torch.float16))
    return mma_layout.from_kernel_order(h) if kernels.h_order(kind, [config]) == "mma" else h


def layer_timeline(layer_ops: list, M: int, calls: int, replays: int) -> dict:
    """The whole layer's kernels at ``M`` tokens, QTIP and fp16, traced (forward_timeline's ``trace_calls``):
    per position in one layer forward, the median duration and gap to the next kernel."""
    from forward_timeline import sequence_stats, trace_calls

    from qtip_triton.ops import qtip_linear

    xs = [torch.randn(M, p.in_features, device="cuda", dtype=torch.float16) for p, _ in layer_ops]
    ours = [lambda: [qtip_linear(x, p) for x, (p, _) in zip(xs, layer_ops, strict=True)]]
    fp16 = [lambda: [torch.matmul(x, w.t()) for x, (_, w) in zip(xs, layer_ops, strict=True)]]
    rec: dict = {"M": M, "calls": calls, "replays": replays}
    for label, fns in (("ours", ours), ("fp16", fp16)):
        rec[label] = sequence_stats(trace_calls(fns, calls, replays), calls, replays)
        s = rec[label]
        if "error" not in s:
            print(f"timeline M={M} {label}: {len(s['kernels'])} kernels, busy {sum(s['dur_us']):.1f} us, "
                  f"gaps {sum(s['gap_after_us']):.1f} us, span {s['span_us']:.1f} us", flush=True)
    return rec


def timeline_markdown(t: dict) -> list[str]:
    """One traced layer as a table: each kernel's median duration and gap after it, and the sums."""
    lines = ["", f"Timeline of one layer forward at M = {t['M']} ({t['calls']} forwards per graph, {t['replays']} "
             "replays, torch.profiler; weights not rotated; gap: to the next kernel's start, negative where PDL "
             "overlaps them):", "", "| side | # | kernel | dur µs | gap after µs |", "|---|---|---|---|---|"]
    from forward_timeline import kernel_rows

    for side in ("ours", "fp16"):
        s = t[side]
        lines += kernel_rows(side, s)
        if "error" in s:
            continue
        n = len(s["kernels"])
        lines.append(f"| {side} | sum | {n} kernel{'s' if n != 1 else ''} | {sum(s['dur_us']):.1f} | "
                     f"{sum(s['gap_after_us']):.1f} (span {s['span_us']:.1f}) |")
    return lines


STACK_MIN_NAMES = {"output": "STACK_MIN_ROWS_OUTPUT", "natural": "STACK_MIN_ROWS_NATURAL",
                   "input": "STACK_MIN_ROWS_INPUT"}


def parse_stack_min(text: str) -> dict[str, int]:
    """``output=32,natural=64`` as the kernels/hadamard.py constants it sets; a clear error for anything else."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in STACK_MIN_NAMES or not value.isdigit():
            raise ValueError(f"--stack-min: {item!r} is not one of {', '.join(k + '=N' for k in STACK_MIN_NAMES)}")
        out[STACK_MIN_NAMES[key]] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--M", default="1,8,16")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. 'zb' for a run with a switch set)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--timeline", default="", help="M values at which to trace the whole layer, kernel by kernel")
    ap.add_argument("--calls", type=int, default=8, help="layer forwards per traced graph (--timeline)")
    ap.add_argument("--replays", type=int, default=5, help="traced graph replays (--timeline)")
    ap.add_argument("--stack-min", default="", metavar="output=N,natural=N,input=N",
                    help="the stacked Hadamard kernel's row thresholds for this run (kernels/hadamard.py's "
                         "STACK_MIN_ROWS_OUTPUT, _NATURAL, _INPUT): to time a layer at thresholds between the "
                         "measured ones without a package change")
    a = ap.parse_args(argv)
    try:
        thresholds = parse_stack_min(a.stack_min)
    except ValueError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        print("bench/fused_layers.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from qtip_triton import dispatch, kernels
    from qtip_triton.encode import default_layout
    from qtip_triton.kernels import hadamard as had
    from qtip_triton.kernels import pdl
    from qtip_triton.kernels.configs import mma_supported
    from qtip_triton.ops import PackedShards, qtip_linear
    from qtip_triton.research.speed import random_weight
    from qtip_triton.spec import TrellisSpec

    for attr, value in thresholds.items():
        setattr(had, attr, value)
    spec = TrellisSpec(16, a.K, 2, "hyb", 9)
    rows, totals, layer_ops = [], {}, []
    for name, shapes in LAYERS.items():
        qws = [random_weight(spec, m, n, default_layout(spec, m, n), seed=i) for i, (m, n) in enumerate(shapes)]
        for i, qw in enumerate(qws):  # each shard its own code table, as QTIP checkpoints (a tlut per linear)
            qw.table = qw.table * (1.0 + 0.01 * i)  # and vLLM's dummy fill have: the fused decode reads table g
        packed = PackedShards.from_qweights(qws, key=f"bench.{name}")
        packed.register()
        w16 = torch.randn(sum(m for m, _ in shapes), shapes[0][1], device="cuda", dtype=torch.float16) * 0.02
        layer_ops.append((packed, w16))
        for M in int_list(a.M):
            x = torch.randn(M, shapes[0][1], device="cuda", dtype=torch.float16)
            rec = {"layer": name, "M": M}
            rec["op"] = time_us(lambda x=x, p=packed: qtip_linear(x, p))
            for col, env in (("op_shard_decode", dispatch.NO_FUSED_DECODE_ENV),
                             ("op_per_shard", dispatch.NO_SHARED_INPUT_ENV)):
                os.environ[env] = "1"
                try:
                    rec[col] = time_us(lambda x=x, p=packed: qtip_linear(x, p))
                finally:
                    del os.environ[env]
            chosen = [dispatch._select(qw, M) for qw in packed.shards()]
            pws = [kernels.prepare(qw) for qw in packed.shards()]
            hs = [_h(M, pw.in_features, k, c) for pw, (k, c) in zip(pws, chosen, strict=True)]

            def decode_only(pws=pws, chosen=chosen, hs=hs):
                for pw, (k, cfg), h in zip(pws, chosen, hs, strict=True):
                    kernels.kernel_partials(k, pw, h, cfg)

            rec["kernels"] = time_us(decode_only)
            if M <= 16 and all(mma_supported(qw.spec) for qw in packed.shards()):
                mma_cfg = {"BLOCK_M": 8 if M <= 8 else 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4,
                           "table": "shared", "mma": True}
                h16 = [_h(M, pw.in_features, "gemv", mma_cfg) for pw in pws]

                def decode_mma(pws=pws, h16=h16, cfg=mma_cfg):
                    for pw, h in zip(pws, h16, strict=True):
                        kernels.decode_matmul("gemv", pw, h, cfg, h_order="mma")

                rec["kernels_mma"] = time_us(decode_mma)
            rec["fp16"] = time_us(lambda x=x, w=w16: torch.matmul(x, w.t()))
            rec["kinds"] = ",".join(k for k, _ in chosen)
            rows.append(rec)
            print(f"{name} M={M}: op {rec['op']:.1f} us, shard decode {rec['op_shard_decode']:.1f}, "
                  f"per-shard {rec['op_per_shard']:.1f}, kernels {rec['kernels']:.1f}, "
                  f"mma kernels {rec.get('kernels_mma', float('nan')):.1f}, fp16 {rec['fp16']:.1f} ({rec['kinds']})",
                  flush=True)
            for k in ("op", "op_shard_decode", "op_per_shard", "kernels", "kernels_mma", "fp16"):
                if k in rec:
                    totals[(M, k)] = totals.get((M, k), 0.0) + rec[k]
    chain = []
    for M in int_list(a.M):
        xs = [torch.randn(M, p.in_features, device="cuda", dtype=torch.float16) for p, _ in layer_ops]

        def layer(xs=xs):
            for x, (p, _) in zip(xs, layer_ops, strict=True):
                qtip_linear(x, p)

        def layer16(xs=xs):
            for x, (_, w) in zip(xs, layer_ops, strict=True):
                torch.matmul(x, w.t())

        rec = {"M": M}
        for mode in PDL_MODES:
            os.environ[pdl.PDL_ENV] = mode
            try:
                rec[f"pdl_{mode}"] = time_us(layer)
            finally:
                del os.environ[pdl.PDL_ENV]
        rec["fp16"] = time_us(layer16)
        chain.append(rec)
        print(f"whole layer M={M}: " + ", ".join(f"PDL {m} {rec[f'pdl_{m}']:.1f} us" for m in PDL_MODES)
              + f", fp16 {rec['fp16']:.1f}", flush=True)
    timelines = [layer_timeline(layer_ops, M, a.calls, a.replays) for M in int_list(a.timeline)]
    floor = time_us(torch.zeros(1, device="cuda").zero_)
    env = environment()
    lines = [f"# One Llama-2-7B decoder layer's linears, QTIP K={a.K} — {env.get('card', '?')}", "",
             f"µs per call, CUDA-graph replay, L2 flushed; timer floor (one trivial kernel) {floor:.1f} µs. "
             "op: the fused custom op; op shard decode: grouped transforms, a decode launch per shard; op per "
             "shard: every shard alone; kernels: the per-shard decode kernels alone; fp16: torch.matmul on the "
             "fused weight.", "",
             "| layer | M | kinds | op | op shard decode | op per shard | kernels only | mma kernels | fp16 | fp16 / op |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in rows:
        lines.append(f"| {r['layer']} | {r['M']} | {r['kinds']} | {r['op']:.1f} | {r['op_shard_decode']:.1f} | "
                     f"{r['op_per_shard']:.1f} | {r['kernels']:.1f} | {cell(r.get('kernels_mma'))} | "
                     f"{r['fp16']:.1f} | {r['fp16'] / r['op']:.2f} |")
    for M in sorted({m for m, _ in totals}):
        lines.append(f"| **layer sum** | {M} | | {totals[(M, 'op')]:.1f} | {totals[(M, 'op_shard_decode')]:.1f} | "
                     f"{totals[(M, 'op_per_shard')]:.1f} | "
                     f"{totals[(M, 'kernels')]:.1f} | {cell(totals.get((M, 'kernels_mma')))} | "
                     f"{totals[(M, 'fp16')]:.1f} | {totals[(M, 'fp16')] / totals[(M, 'op')]:.2f} |")
    lines += ["", "Whole layer (the four ops in one graph, one timer floor) without programmatic dependent launch "
              "and with it (QTIP_TRITON_PDL=" + " / ".join(PDL_MODES[1:]) + ", kernels/pdl.py; auto is the default):",
              "",
              "| M | " + " | ".join(f"PDL {m}" for m in PDL_MODES) + " | fp16 | "
              + " | ".join(f"fp16 / {m}" for m in PDL_MODES) + " |",
              "|---|" + "---|" * (2 * len(PDL_MODES) + 1)]
    for r in chain:
        lines.append(f"| {r['M']} | " + " | ".join(f"{r[f'pdl_{m}']:.1f}" for m in PDL_MODES) + f" | {r['fp16']:.1f} | "
                     + " | ".join(f"{r['fp16'] / r[f'pdl_{m}']:.2f}" for m in PDL_MODES) + " |")
    for t in timelines:
        lines += timeline_markdown(t)
    jp, mp = write_results(a.out, "fused-layers" + (f"-{a.tag}" if a.tag else ""),
                           {"env": env, "K": a.K, "floor_us": floor, "rows": rows, "whole_layer": chain,
                            "timelines": timelines},
                           "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
