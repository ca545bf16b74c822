"""The wgmma decode-matmul (Gluon, codegen/wgmma.py) against fp16 and the shipped kind, per config (GPU only).

Why: the kernel is new, so before it enters the tuned space each config is checked against the float64
reference on fresh random data (‖out-ref‖/‖ref‖) and timed with fp16 ``torch.matmul`` and the registry's shipped
kernel in the same run, L2 flushed (and rotated with ``--rotate``). A config that fails to compile or launch is
recorded with its error, not fatal.

    python bench/wgmma_probe.py --points 8192x8192:256,28672x8192:256 \
        --configs '[{"E": 1, "BLOCK_M": 256, "num_warps": 8, "STAGES": 4, "SPLIT_K": 2}]'
    python bench/wgmma_probe.py --ablate ...   # + each config's MMAs, x stream and decode alone (same grid)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kbench  # noqa: E402
from common import environment, time_rotated_us, time_us, write_results  # noqa: E402

from qtip_triton.kernels import prepare, wgmma  # noqa: E402

DEFAULT_POINTS = "8192x8192:256,28672x8192:256,4096x11008:256,8192x8192:64,8192x8192:16"


def default_configs(M: int) -> list[dict]:
    """A small grid around what the kernel was built for (N = tokens per program up to 256): the word prefetch off
    once per M to see what it buys, and the table written once to shared memory (R copies) against gl.gather."""
    def c(E, bm, nw, st, split, wpf=1, table="gather", pipe=0):
        return {"E": E, "BLOCK_M": bm, "num_warps": nw, "STAGES": st, "SPLIT_K": split, "WPF": wpf, "table": table,
                "PIPE": pipe}
    if M > 64:
        return [c(1, 256, 8, 4, 1), c(1, 256, 8, 4, 2), c(2, 256, 8, 3, 2), c(1, 256, 8, 4, 2, table="shared32"),
                c(1, 256, 8, 4, 1, pipe=1), c(1, 256, 8, 4, 2, pipe=1), c(1, 256, 8, 4, 2, table="shared32", pipe=1),
                c(2, 256, 8, 3, 2, pipe=1), c(1, 128, 8, 4, 2, table="shared16"), c(1, 256, 4, 4, 2, table="shared16")]
    bm = max(16, 1 << (M - 1).bit_length())
    return [c(2, bm, 4, 3, 2), c(2, bm, 8, 3, 2), c(4, bm, 8, 2, 4), c(2, bm, 4, 3, 4, table="shared16"),
            c(4, bm, 8, 2, 4, table="shared32"), c(4, bm, 8, 2, 4, table="shared32", pipe=1),
            c(4, bm, 8, 2, 2, table="shared32", pipe=1), c(2, bm, 4, 3, 2, table="shared32", pipe=1),
            c(4, bm, 8, 2, 1, table="shared32"), c(2, bm, 4, 3, 1, table="shared16")]


def _failure(e: Exception, limit: int) -> str:
    """A recorded failure: the exception's type and the first ``limit`` characters of its first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"


def run_config(pw, hw: torch.Tensor, ref: torch.Tensor, cfg: dict, rotation) -> dict:
    rec: dict = {"config": cfg}

    def product(p):
        """Ŵ hᵀ of weight ``p``: the kernel's partials, summed when split (the sum is part of the timed work)."""
        y = wgmma.decode_matmul(p, hw, cfg)
        return y[0] if y.shape[0] == 1 else y.sum(0)

    try:
        y = product(pw)
        torch.cuda.synchronize()
        rec["rel_err"] = float((y.double() - ref).norm() / ref.norm())
        rec["us"] = time_us(lambda: product(pw))
        if rotation is not None:
            rec["rot_us"] = time_rotated_us([lambda p=p: product(p) for p in rotation[0]])
    except Exception as e:  # noqa: BLE001 - a probe records every failure and goes on
        rec["error"] = _failure(e, 300)
    return rec


def ablation_us(pw, h: torch.Tensor, cfg: dict) -> dict:
    """What each half of the kernel costs alone, on the same grid: ``mma_only_us`` the config with ``ABLATE=1`` (the
    k loop multiplies without decoding: MMAs, x by TMA, epilogue), ``x_only_us`` with ``ABLATE=2`` (x streamed
    through the ring alone: if about ``mma_only_us``, x's re-reads from the L2, not the tensor cores, set the MMAs'
    pace), ``decode_only_us`` the config with 16-token programs on as many 16-token tiles as the config has token
    tiles (every weight decoded as often, the MMAs 16x smaller). Why: if the kernel takes about its MMA-only time, the tensor-core work (as this structure issues it)
    is its floor; if about its decode-only time, the decode is."""
    E, bm, M = cfg.get("E", 1), cfg["BLOCK_M"], h.shape[0]
    out: dict = {}

    def timed(key: str, c: dict, hh: torch.Tensor) -> None:
        try:
            hw = wgmma.to_wgmma_order(pw, hh, E)
            out[key] = time_us(lambda: wgmma.decode_matmul(pw, hw, c))
        except Exception as e:  # noqa: BLE001 - a probe records every failure and goes on
            out[key.replace("_us", "_error")] = _failure(e, 200)

    timed("mma_only_us", {**cfg, "ABLATE": 1}, h)
    timed("x_only_us", {**cfg, "ABLATE": 2}, h)
    tiles = -(-M // bm)
    timed("decode_only_us", {**cfg, "BLOCK_M": 16}, torch.randn(16 * tiles, h.shape[1], device=h.device).half())
    return out


def occupancy(rec: dict) -> str:
    """The record's registers, shared KB, programs an SM and waves as table cells (empty when not launched)."""
    if "registers" not in rec:
        return " | | | "
    return f"{rec['registers']} | {rec['shared_bytes'] / 1024:.0f} | {rec['per_sm']} | {rec['waves']:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=DEFAULT_POINTS, help="OUTxIN:M,...")
    ap.add_argument("--configs", default=None, help="JSON list of configs (default: a grid per M)")
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--rotate", action="store_true", help="also time rotated over weight copies")
    ap.add_argument("--ablate", action="store_true",
                    help="also time each config's MMAs alone (ABLATE=1), x streamed alone (ABLATE=2) and its decode "
                         "alone (16-token programs)")
    ap.add_argument("--tag", default="wgmma-probe")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not wgmma.available():
        print("wgmma_probe: needs a Hopper GPU (sm_90) and Triton with Gluon", file=sys.stderr)
        return 2
    kbench.TUNED = True
    rows = []
    t0 = time.time()
    for point in args.points.split(","):
        shape, M = point.split(":")
        m, n = (int(v) for v in shape.split("x"))
        M = int(M)
        qw = kbench.random_weight(m, n, args.K)
        pw = prepare(qw)
        w64 = qw.decode().double()
        w16 = w64.half()
        rotation = kbench.weight_copies(qw, pw, w16) if args.rotate else None
        shipped = kbench.bench_point(qw, pw, M, w16, full=False, rotation=rotation)
        h = torch.randn(M, n, device="cuda").half()
        ref = h.double() @ w64.t()
        configs = json.loads(args.configs) if args.configs else default_configs(M)
        for cfg in configs:
            E = cfg.get("E", 1)
            hw = wgmma.to_wgmma_order(pw, h, E)
            rec = run_config(pw, hw, ref, cfg, rotation)
            stats = wgmma.last_launch(cfg) if "us" in rec else None
            if stats is not None:  # occupancy: programs an SM and the grid in waves (session 31's 64-token jump)
                rec.update(registers=stats.registers, shared_bytes=stats.shared_bytes, per_sm=stats.per_sm(),
                           waves=stats.waves(torch.cuda.get_device_properties(0).multi_processor_count))
            if args.ablate and "us" in rec:
                rec.update(ablation_us(pw, h, cfg))
            rec.update(m=m, n=n, M=M, K=args.K, fp16_us=shipped["fp16_us"], shipped_kind=shipped["kind"],
                       shipped_us=shipped["kernel_us"], fp16_rot_us=shipped.get("fp16_rot_us"),
                       shipped_rot_us=shipped.get("kernel_rot_us"))
            if "us" in rec:
                rec["ratio"] = rec["fp16_us"] / rec["us"]
            if rec.get("rot_us") and rec.get("fp16_rot_us"):
                rec["ratio_rot"] = rec["fp16_rot_us"] / rec["rot_us"]
            rows.append(rec)
            msg = rec.get("error") or (f"{rec['us']:.1f} us ({rec['ratio']:.2f}x fp16; shipped {shipped['kind']} "
                                       f"{shipped['kernel_us']:.1f}) err {rec['rel_err']:.1e}"
                                       + (f" rot {rec['ratio_rot']:.2f}x" if "ratio_rot" in rec else "")
                                       + (f" | mma only {rec['mma_only_us']:.1f}" if "mma_only_us" in rec else "")
                                       + (f" | x only {rec['x_only_us']:.1f}" if "x_only_us" in rec else "")
                                       + (f" | decode only {rec['decode_only_us']:.1f}" if "decode_only_us" in rec else "")
                                       + (f" | {rec['per_sm']} an SM, {rec['waves']:.2f} waves" if "waves" in rec else ""))
            print(f"[{time.time() - t0:6.1f}s] {m}x{n} M={M} {cfg}: {msg}", flush=True)
        del pw, qw, w64, w16, rotation
        torch.cuda.empty_cache()
    md = ["| shape | M | config | µs | fp16 µs | ratio | rotated ratio | shipped kind | shipped µs | rel err "
          "| MMA only µs | x only µs | decode only µs | registers | shared KB | programs an SM | waves |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        cs = (f"E{c.get('E', 1)} {c.get('BLOCK_M')}tok w{c.get('num_warps')} st{c.get('STAGES')} "
              f"s{c.get('SPLIT_K', 1)} wpf{c.get('WPF', 1)} pipe{c.get('PIPE', 0)} {c.get('table', 'gather')}"
              + (" ws" if c.get("WS") else "") + (" out16" if c.get("OUT16") else ""))
        if "error" in r:
            md.append(f"| {r['m']}x{r['n']} | {r['M']} | {cs} | error: {r['error'][:80]} | | | | | | | | | | | | | |")
            continue
        rot = f"{r['ratio_rot']:.2f}" if "ratio_rot" in r else ""
        abl = " | ".join(f"{r[k]:.1f}" if k in r else r.get(k.replace("_us", "_error"), "")[:60]
                         for k in ("mma_only_us", "x_only_us", "decode_only_us"))
        md.append(f"| {r['m']}x{r['n']} | {r['M']} | {cs} | {r['us']:.1f} | {r['fp16_us']:.1f} | {r['ratio']:.2f} | "
                  f"{rot} | {r['shipped_kind']} | {r['shipped_us']:.1f} | {r['rel_err']:.1e} | {abl} | {occupancy(r)} |")
    jp, mp = write_results(args.out, args.tag, {"env": environment(), "rows": rows}, "\n".join(md) + "\n")
    print("\n".join(md))
    print(jp, mp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
