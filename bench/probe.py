"""Config probe: time many configs of one kind at a few (shape, K, M) points, each checked for
correctness first, to choose heuristics and the autotuner's space (GPU).

Every config's output is compared with the decompress kernel's Ŵ times h in float32 (relative
error must be <= 1e-3, else the row says ``wrong`` and is not timed). Timing as bench/kernels.py
(CUDA-graph replay, L2 flushed, fp16 torch.matmul in the same run). Writes
``<out>/<card>-<date>-probe.{json,md}``.

    python bench/probe.py --points 8192x8192:1,28672x8192:1 --K 2 --tables gather,shared,shared4
    python bench/probe.py --points 4096x4096:1,4096x11008:1 --tables shared --fuse-in   # gemv + its input transform
    python bench/probe.py --points 22016x4096:8,4096x11008:16 --tables shared --mma      # + the tensor-core gemv
    python bench/probe.py --points 8192x8192:1 --tables shared16 --blocks 64/1024/4 --hfma --linear  # + fp16x2
    python bench/probe.py --points 8192x8192:16 --tables shared16 --mma-only --maxnreg 96,104   # register caps
    python bench/probe.py --points 8192x8192:1 --tables shared16 --blocks 64/1024/4 --early --rotate  # early words
    python bench/probe.py --points 8192x8192:1 --tables shared16 --blocks 64/1024/4 --l2 1,2 --rotate  # L2 prefetch

``--rotate``: also the rotated time of each config and of fp16 (back-to-back calls over weight copies > 3x L2 in
one CUDA graph, bench/common.py), the timing under which programmatic dependent launch overlaps neighbours.

``--fuse-in`` (gemv): every config also runs with ``fuse_in`` (each program computes its slice of the input
transform), and every time then includes the input transform (the separate launch for the others).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, time_rotated_us, time_us, write_results  # noqa: E402
from kernels import random_weight, weight_copies  # noqa: E402

from qtip_triton import kernels, linear  # noqa: E402
from qtip_triton.codegen.emit import mma_row_groups  # noqa: E402
from qtip_triton.kernels import _transform_in, decode_matmul, decompress, mma_layout, prepare  # noqa: E402
from qtip_triton.kernels.configs import mma_space, mma_supported  # noqa: E402

BLOCKS_GEMV = [(64, 256, 4), (128, 128, 8), (64, 128, 4), (128, 256, 8), (256, 128, 8), (32, 256, 4)]
BLOCKS_GEMM = [(128, 64, 4), (64, 128, 4), (128, 128, 8), (64, 64, 4)]


def candidates(kind: str, spec, m: int, n: int, M: int, tables: list[str], blocks: list[tuple[int, int, int]],
               split_mults: list[float], prefetch: list[int], block_ms: list[int] | None = None,
               stages: list[int] | None = None) -> list[dict]:
    base = kernels.default_config(kind, spec, m, n, M, mma=False)  # the mma family is added by --mma
    out, seen = [], set()
    for table, (bn, bk, nw), mult, pf, bm, ns in itertools.product(tables, blocks, split_mults, prefetch,
                                                                    block_ms or [base["BLOCK_M"]], stages or [0]):
        split = max(1, int(base["SPLIT_K"] * mult))
        if n // bk < split:
            continue
        cfg = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "SPLIT_K": split}
        if table != "gather":
            cfg["table"] = table
        if pf:
            cfg["prefetch"] = pf
        if ns:
            cfg["num_stages"] = ns
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="8192x8192:1", help="comma list of OUTxIN:M")
    ap.add_argument("--K", default="2")
    ap.add_argument("--kind", default="gemv")
    ap.add_argument("--tables", default="gather,shared,shared4")
    ap.add_argument("--blocks", default=None, help="e.g. 64/256/4,128/128/8 (BLOCK_N/BLOCK_K/num_warps)")
    ap.add_argument("--prefetch", default="0", help="gemv prefetch depths, e.g. 0,1,2")
    ap.add_argument("--block-m", default=None, help="row blocks to try, e.g. 128,256 (default: the kind's default)")
    ap.add_argument("--stages", default=None, help="software pipeline depths, e.g. 1,2 (default: Triton's)")
    ap.add_argument("--splits", default="0.5,1,2", help="multiples of the default SPLIT_K")
    ap.add_argument("--fuse-in", action="store_true", help="gemv: also the fused input transform; times include it")
    ap.add_argument("--mma", action="store_true", help="gemv: also the tensor-core variant's configs (codegen/mma.py)")
    ap.add_argument("--linear", action="store_true", help="also time the whole forward (linear(), as the tuner does)")
    ap.add_argument("--split-sum", action="store_true",
                    help="also each split-K config with its partials summed in the kernel (split_sum)")
    ap.add_argument("--hfma", action="store_true", help="gemv: also each config with fp16x2 multiply-adds (hfma)")
    ap.add_argument("--early", action="store_true",
                    help="gemv: also each plain and mma config with its first k step's words loaded before the table fill")
    ap.add_argument("--l2", default=None,
                    help="gemv/gemm: also each config (mma included) with these l2_prefetch depths, e.g. 1,2 "
                         "(k steps of words requested into L2 ahead)")
    ap.add_argument("--rotate", action="store_true", help="also rotated times (weight copies > 3x L2, no flush)")
    ap.add_argument("--mma-only", action="store_true", help="gemv: only the tensor-core variant's configs")
    ap.add_argument("--maxnreg", default=None,
                    help="mma configs: also each with these register caps, e.g. 96,104 (config maxnreg)")
    ap.add_argument("--mma-splits", default=None, help="mma configs: only these SPLIT_K values, e.g. 1,2")
    ap.add_argument("--mma-warps", default=None, help="mma configs: only these num_warps, e.g. 2,4")
    ap.add_argument("--mma-groups", default=None,
                    help="mma configs: only these 8-row word groups per warp (BLOCK_N / 16 / num_warps), e.g. 1,2")
    ap.add_argument("--time-limit", type=float, default=300.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="probe")
    a = ap.parse_args(argv)
    if a.blocks:
        blocks = [tuple(int(v) for v in b.split("/")) for b in a.blocks.split(",")]
    else:
        blocks = BLOCKS_GEMV if a.kind == "gemv" else BLOCKS_GEMM
    tables = a.tables.split(",") if a.kind == "gemv" else ["gather"]
    mults = [float(v) for v in a.splits.split(",")]
    t0 = time.time()
    rows: list[dict] = []
    for point, K in itertools.product(a.points.split(","), [int(k) for k in a.K.split(",")]):
        shape, M = point.split(":")
        m, n = (int(v) for v in shape.split("x"))
        M = int(M)
        qw = random_weight(m, n, K)
        pw = prepare(qw)
        x = torch.randn(M, n, device="cuda").half()
        w16 = torch.randn(m, n, device="cuda").half()
        fp16 = time_us(lambda x=x, w16=w16: torch.matmul(x, w16.t()))
        dtype = kernels.h_dtype(a.kind, [], x.dtype)  # the plain gemv's fp32, else x's dtype
        h = _transform_in(pw, x, dtype, a.kind)
        what = decompress(pw, kernels.default_config("decompress", qw.spec, m, n, M), torch.float32)
        h_nat = torch.empty_like(h)
        h_nat[:, :] = h[:, pw.input_index(a.kind).long()]
        ref = (h_nat.float() @ what.t()).float()
        best = None
        cands = candidates(a.kind, qw.spec, m, n, M, tables, blocks, mults,
                           [int(v) for v in a.prefetch.split(",")] if a.kind == "gemv" else [0],
                           [int(v) for v in a.block_m.split(",")] if a.block_m else None,
                           [int(v) for v in a.stages.split(",")] if a.stages else None)
        if a.fuse_in and a.kind == "gemv":
            cands += [{**c, "fuse_in": True, "num_stages": 1} for c in cands]
        if a.hfma and a.kind == "gemv":  # each plain gemv config also with fp16x2 multiply-adds
            cands += [{**c, "hfma": True} for c in cands if not c.get("fuse_in")]
        if a.early and a.kind == "gemv":  # each plain gemv config also with the first step's words loaded early
            cands += [{**c, "early_words": True} for c in cands
                      if not (c.get("fuse_in") or c.get("prefetch"))]
        if a.split_sum:  # each split config also summed in the kernel (config split_sum)
            cands += [{**c, "split_sum": True} for c in cands if c.get("SPLIT_K", 1) > 1]
        if a.mma_only:
            cands = []
        if (a.mma or a.mma_only) and a.kind == "gemv" and mma_supported(qw.spec):
            mma_c = mma_space(qw.spec, n, M)
            # the --tables list's shared-memory modes (lane copies) for the mma gemv's table too
            shared_tabs = [t for t in tables if t.startswith("shared")]
            if shared_tabs:
                mma_c = [{**c, "table": t} if str(c.get("table", "")).startswith("shared") else c
                         for t in shared_tabs for c in mma_c]
                mma_c = [c for i, c in enumerate(mma_c) if c not in mma_c[:i]]
            if a.mma_splits:
                mma_c = [c for c in mma_c if c["SPLIT_K"] in {int(v) for v in a.mma_splits.split(",")}]
            if a.mma_warps:
                mma_c = [c for c in mma_c if c["num_warps"] in {int(v) for v in a.mma_warps.split(",")}]
            if a.mma_groups:
                mma_c = [c for c in mma_c if mma_row_groups(c) in {int(v) for v in a.mma_groups.split(",")}]
            if a.maxnreg:
                mma_c += [{**c, "maxnreg": int(r)} for r in a.maxnreg.split(",") for c in mma_c]
            if a.early:  # each mma config also with the first step's words loaded early
                mma_c += [{**c, "early_words": True} for c in mma_c]
            cands += mma_c
        if a.l2 and a.kind in ("gemv", "gemm"):  # each config also with its words prefetched into L2 ahead
            cands += [{**c, "l2_prefetch": int(d)} for d in a.l2.split(",") for c in cands if not c.get("fuse_in")]

        # h in each dtype and order the decode configs may ask for, made once so that no cast or copy is timed
        h_in = {(h.dtype, "kernel"): h, (torch.float16, "kernel"): h.half(),
                (torch.float16, "mma"): mma_layout.from_kernel_order(h.half())}

        pws, fp16_rot = [pw], None
        if a.rotate:  # weight copies for the rotated times (the same h: only the weights must miss the L2)
            pws, w16s = weight_copies(qw, pw, w16)
            fp16_rot = time_rotated_us([lambda x=x, w=w: torch.matmul(x, w.t()) for w in w16s])
            del w16s

        def run(cfg, pw=pw, h=h, h_in=h_in, x=x, dtype=dtype):
            if cfg.get("fuse_in"):
                return decode_matmul(a.kind, pw, torch.empty_like(h), cfg, h_order="kernel", fuse_x=x)
            order = kernels.h_order(a.kind, [cfg])
            hh = _transform_in(pw, x, dtype, a.kind) if a.fuse_in else h_in[kernels.h_dtype(a.kind, [cfg], x.dtype), order]
            return decode_matmul(a.kind, pw, hh, cfg, h_order=order)

        for cfg in cands:
            if time.time() - t0 > a.time_limit:
                print("time limit reached", flush=True)
                break
            rec = {"m": m, "n": n, "K": K, "M": M, "kind": a.kind, "config": cfg, "fp16_us": fp16}
            try:
                y = run(cfg).sum(0)
                err = float((y - ref).norm() / ref.norm())
                rec["rel_err"] = err
                if not err <= 1e-3:
                    rec["status"] = "wrong"
                else:
                    rec["us"] = time_us(lambda cfg=cfg: run(cfg))
                    rec["ratio"] = fp16 / rec["us"]
                    if fp16_rot is not None:
                        rec["fp16_rot_us"] = fp16_rot
                        rec["rot_us"] = time_rotated_us([lambda cfg=cfg, p=p: run(cfg, pw=p) for p in pws])
                        rec["ratio_rot"] = fp16_rot / rec["rot_us"]
                    rec["status"] = "ok"
                    if a.linear:  # the whole forward, as the autotuner times it (transforms, PDL, split-K sum)
                        rec["linear_us"] = time_us(lambda cfg=cfg, x=x, qw=qw: linear(x, qw, kind=a.kind, config=cfg))
                        if fp16_rot is not None:  # and rotated, as layers run in a served model
                            rec["linear_rot_us"] = time_rotated_us([lambda cfg=cfg, x=x, p=p: kernels.launch(
                                a.kind, x, p, cfg) for p in pws])
                    if best is None or rec["us"] < best["us"]:
                        best = rec
            except Exception as e:  # a config that fails to compile or launch is a result, not a crash
                rec["status"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            rows.append(rec)
            lin = f", linear {rec['linear_us']:.1f} us" if "linear_us" in rec else ""
            lin += f", rotated {rec['rot_us']:.1f} us ({rec['ratio_rot']:.2f}x)" if "rot_us" in rec else ""
            lin += f", linear rotated {rec['linear_rot_us']:.1f} us" if "linear_rot_us" in rec else ""
            print(f"{m}x{n} K={K} M={M} {cfg} -> {rec.get('us', float('nan')):.1f} us{lin} "
                  f"({rec.get('ratio', 0):.2f}x) {rec['status']}", flush=True)
        if best:
            print(f"BEST {m}x{n} K={K} M={M}: {best['us']:.1f} us = {best['ratio']:.2f}x fp16 "
                  f"({fp16:.1f} us) {best['config']}", flush=True)
    env = environment()
    lines = [f"# Config probe ({a.kind}) on {env.get('card', '?')}", ""]
    rot_cols = any("rot_us" in r for r in rows)
    if rot_cols:
        lines += ["Rotated: back-to-back calls over weight copies > 3x L2 in one CUDA graph (bench/common.py).", ""]
    lines += ["| shape | K | M | config | µs | linear µs | fp16 µs | ratio | status |"
              + (" rotated µs | fp16 rotated µs | rotated ratio | linear rotated µs |" if rot_cols else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if rot_cols else "")]
    for r in sorted(rows, key=lambda r: (r["m"], r["n"], r["K"], r["M"], r.get("us", 1e9))):
        lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | `{r['config']}` | {r.get('us', float('nan')):.1f} "
                     f"| {r.get('linear_us', float('nan')):.1f} "
                     f"| {r['fp16_us']:.1f} | {r.get('ratio', 0):.2f} | {r['status']} |"
                     + (f" {r.get('rot_us', float('nan')):.1f} | {r.get('fp16_rot_us', float('nan')):.1f} | "
                        f"{r.get('ratio_rot', 0):.2f} | {r.get('linear_rot_us', float('nan')):.1f} |" if rot_cols else ""))
    jp, mp = write_results(a.out, a.tag, {"env": env, "rows": rows}, "\n".join(lines) + "\n")
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
