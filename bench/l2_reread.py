"""How fast the SMs can re-read h (the transformed input) from the L2, with the wgmma kind's grid (GPU only).

Why: each wgmma program decodes its 128 weight rows and reads the h tile of its tokens over its k range by TMA,
so every row block re-reads h: (out / 128) x M x in x 2 bytes cross the L2 per call (8192^2 at M = 512: 512 MB,
4.4 TB/s at the measured 115 µs). If that is near what the L2 can deliver, the re-reads, not the decode or the
tensor cores, bound the kind at large M, and sharing h between programs (a cluster multicasting its tiles) is
the lever. This kernel does only those reads, on the same grid (row blocks x splits x token tiles), with the
same tile (BLOCK_M tokens x 64 columns per k step), summing them so none is dropped; the time gives the L2
read floor for the kind's h traffic, beside fp16 ``torch.matmul`` in the same run.

Outcome (H100, session 24, ``*-session24-l2-reread.md``): these plain loads took 114-410 µs for reads the real kernel
does by TMA, with its decode and MMAs, in 65-212 µs. So this is a lower bound on nothing: it times load latency of an
unpipelined loop. Kept as the record of that check; ``wgmma_probe.py --ablate`` gives the kind's measured floors.

    python bench/l2_reread.py --points 8192x8192:256:2,8192x8192:512:1,28672x8192:256:1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_us, write_results  # noqa: E402

ROWS_PER_PROGRAM = 128  # the wgmma kind's 8-warp programs: 2 x 8 x num_warps weight rows


@triton.jit
def _reread(H, OUT, M, n, STEPS, BLOCK_M: tl.constexpr, BK: tl.constexpr):
    """Program (r, s, t): the h tile of token tile t over k steps [s STEPS, (s + 1) STEPS), summed."""
    s = tl.program_id(1)
    t = tl.program_id(2)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BK)
    acc = tl.zeros([BLOCK_M, BK], tl.float32)
    for i in range(STEPS):
        k0 = (s * STEPS + i) * BK
        acc += tl.load(H + rows[:, None] * n + k0 + cols[None, :], mask=rows[:, None] < M, other=0.0)
    pid = (tl.program_id(0) * tl.num_programs(1) + s) * tl.num_programs(2) + t
    tl.store(OUT + pid, tl.sum(acc))


def reread_us(m: int, n: int, M: int, block_m: int, split: int) -> tuple[float, int]:
    """(µs per call, bytes read from the L2 per call) for the kind's grid on an ``m x n`` layer at ``M`` tokens."""
    bk = 64
    if n % (bk * split):
        raise ValueError(f"in={n} is not a whole number of {bk}-column steps per split {split}")
    h = torch.randn(M, n, device="cuda", dtype=torch.float16)
    grid = (m // ROWS_PER_PROGRAM, split, triton.cdiv(M, block_m))
    out = torch.empty(grid[0] * grid[1] * grid[2], device="cuda", dtype=torch.float32)

    def call():
        _reread[grid](h, out, M, n, n // bk // split, BLOCK_M=block_m, BK=bk, num_warps=8)

    us = time_us(call)
    return us, grid[0] * M * n * 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="8192x8192:128:2,8192x8192:256:2,8192x8192:512:1,28672x8192:256:1,"
                    "4096x11008:256:2", help="OUTxIN:M:SPLIT,... (the split the kind's best config used)")
    ap.add_argument("--block-m", type=int, default=256, help="tokens per program (default 256)")
    ap.add_argument("--tag", default="l2-reread")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows = []
    for p in a.points.split(","):
        shape, M, split = p.split(":")
        m, n = (int(v) for v in shape.lower().split("x"))
        M, split = int(M), int(split)
        bm = min(a.block_m, max(16, 1 << (M - 1).bit_length()))
        us, nbytes = reread_us(m, n, M, bm, split)
        w = torch.randn(m, n, device="cuda", dtype=torch.float16)
        x = torch.randn(M, n, device="cuda", dtype=torch.float16)
        fp16 = time_us(lambda w=w, x=x: torch.matmul(x, w.t()))
        rows.append({"m": m, "n": n, "M": M, "BLOCK_M": bm, "SPLIT_K": split, "reread_us": us, "bytes": nbytes,
                     "tbs": nbytes / us / 1e6, "fp16_us": fp16})
        print(f"{m}x{n} M={M} split {split}: {nbytes / 1e6:.0f} MB of h in {us:.1f} µs = {nbytes / us / 1e6:.2f} TB/s "
              f"(fp16 matmul {fp16:.1f} µs)", flush=True)
        del w, x
    env = environment()
    md = [f"# h re-read from the L2 with the wgmma grid — {env.get('card', '?')}", "",
          f"{ROWS_PER_PROGRAM} weight rows per program; each reads its token tile's h over its k range in "
          "BLOCK_M x 64 tiles (plain loads), L2 flushed before each call (the first read of h comes from DRAM). "
          "fp16 `torch.matmul` in the same run.", "",
          "| out x in | M | BLOCK_M | split | h bytes read | re-read µs | TB/s | fp16 µs |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['m']}x{r['n']} | {r['M']} | {r['BLOCK_M']} | {r['SPLIT_K']} | {r['bytes'] / 1e6:.0f} MB "
           f"| {r['reread_us']:.1f} | {r['tbs']:.2f} | {r['fp16_us']:.1f} |" for r in rows]
    write_results(a.out, a.tag, {"env": env, "rows": rows}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
