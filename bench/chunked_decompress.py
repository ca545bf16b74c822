"""Prefill by slabs: decode Ŵ a slab of rows (or columns) at a time into one buffer that stays in the L2, and
multiply each slab with cuBLAS, against decoding the whole Ŵ and multiplying it (the shipped ``decompress`` kind).

Why: at M >= 256 the shipped path writes the whole fp16 Ŵ to DRAM (8192^2: 134 MB, ~45 µs at 3 TB/s) and
cuBLAS reads it back, so the kernel costs about fp16's matmul plus a full write of Ŵ (bench/NOTES.md, session
21). A slab of a few MB written into a reused buffer is read back from the L2 and, being overwritten by the
next slab, need never reach DRAM: the decode's own work (~15 µs for 8192^2) would be what is left on top of the
matmul. Row slabs keep each output element's whole dot in one cuBLAS call (the same numerics); column slabs
keep cuBLAS's grid as wide as the whole matmul's but add each slab's partial in fp32 (``addmm(out_dtype=)``),
and are emulated here by separate weights of the slab's width (the decompress kernel reads whole word rows).

Outcome on the H100 (bench/NOTES.md, session 21): slabs lost at every M (narrow cuBLAS calls), and the decompress
kernel alone turned out bound by its writes of Ŵ (8192^2: 58 µs), not by its decode.

Rotated timing (bench/common.py) over weight copies > 3x L2; fp16 ``torch.matmul`` in the same run. GPU only.

    python bench/chunked_decompress.py --shapes 8192x8192,4096x11008 --M 64,256,2048 --rows 1024,2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, int_list, rotation_copies, time_rotated_us, write_results  # noqa: E402
from kernels import kernel_fn, kernel_input, random_weight  # noqa: E402

from qtip_triton.kernels import default_config, prepare  # noqa: E402
from qtip_triton.kernels.runners import decompress  # noqa: E402
from qtip_triton.registry import lookup_config  # noqa: E402


def _shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]  # type: ignore[misc]


def row_slabs(pws, h: torch.Tensor, cfg: dict, nc: int, transposed: bool) -> tuple[list, torch.Tensor]:
    """(one callable per weight copy, the result they write): row slabs of ``nc`` rows into one shared buffer, each
    multiplied at once (``transposed``: Ŵ_slab · hᵀ into rows of an (out, M) result; else h · Ŵ_slabᵀ into columns
    of (M, out))."""
    m, n = pws[0].out_features, pws[0].in_features
    buf = torch.empty(nc, n, dtype=h.dtype, device=h.device)
    y = torch.empty((m, h.shape[0]) if transposed else (h.shape[0], m), dtype=h.dtype, device=h.device)
    ht = h.t()

    def run(pw) -> None:
        for r0 in range(0, m, nc):
            r1 = min(m, r0 + nc)
            b = buf[:r1 - r0]
            decompress(pw, cfg, h.dtype, rows=(r0, r1), out=b)
            if transposed:
                torch.mm(b, ht, out=y[r0:r1])
            else:
                torch.mm(h, b.t(), out=y[:, r0:r1])

    return [lambda p=p: run(p) for p in pws], y


def col_slabs(m: int, n: int, K: int, copies: int, h: torch.Tensor, cfg: dict, kc: int) -> list:
    """One callable per weight copy: ``n // kc`` weights of (m, kc) stand for column slabs of one (m, n) weight
    (same words, same decode work), each decoded into one buffer and added in fp32."""
    slabs = [[prepare(random_weight(m, kc, K, seed=1000 * c + j)) for j in range(n // kc)] for c in range(copies)]
    buf = torch.empty(m, kc, dtype=h.dtype, device=h.device)
    y = torch.zeros(h.shape[0], m, dtype=torch.float32, device=h.device)

    def run(pws) -> None:
        for j, pw in enumerate(pws):
            decompress(pw, cfg, h.dtype, out=buf)
            part = h[:, j * kc:(j + 1) * kc]
            if j == 0:
                torch.mm(part, buf.t(), out_dtype=torch.float32, out=y)
            else:
                torch.addmm(y, part, buf.t(), out_dtype=torch.float32, out=y)

    return [lambda s=s: run(s) for s in slabs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x8192,4096x11008,28672x8192")
    ap.add_argument("--M", default="64,256,2048")
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--rows", default="512,1024,2048,4096", help="row slab heights")
    ap.add_argument("--cols", default="1024,2048", help="column slab widths (emulated)")
    ap.add_argument("--tag", default="chunked-decompress")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    rows: list[dict] = []
    for m, n in _shapes(args.shapes):
        copies_16 = rotation_copies(m * n * 2)
        w16s = [torch.randn(m, n, device="cuda").half() for _ in range(copies_16)]
        qw = random_weight(m, n, args.K)
        pws = [prepare(qw)] + [prepare(random_weight(m, n, args.K, seed=i))
                               for i in range(1, rotation_copies(qw.trellis.nbytes))]
        full = torch.empty(m, n, dtype=torch.float16, device="cuda")
        dcfg = default_config("decompress", qw.spec, m, n, 256)
        rec = {"m": m, "n": n, "K": args.K, "M": 0, "copies": [len(pws), copies_16], "us": {}}
        # the decode alone into one reused buffer: every write reaches DRAM, so this is its write-bound floor
        rec["us"]["decode only"] = time_rotated_us([lambda p=p, o=full, c=dcfg: decompress(p, c, torch.float16, out=o)
                                                    for p in pws])
        rows.append(rec)
        for M in int_list(args.M):
            x = torch.randn(M, n, device="cuda").half()
            cfg = default_config("decompress", qw.spec, m, n, M)
            h = kernel_input("decompress", pws[0], x, cfg)
            rec = {"m": m, "n": n, "K": args.K, "M": M, "copies": [len(pws), copies_16], "us": {}}
            rec["us"]["fp16"] = time_rotated_us([lambda w=w, x=x: torch.matmul(x, w.t()) for w in w16s])
            rec["us"]["whole"] = time_rotated_us([kernel_fn("decompress", p, x, cfg, h) for p in pws])
            kind, tcfg = lookup_config(qw.spec, m, n, M)
            if kind != "decompress":
                hk = kernel_input(kind, pws[0], x, dict(tcfg))
                rec["us"][f"shipped {kind}"] = time_rotated_us([kernel_fn(kind, p, x, dict(tcfg), hk) for p in pws])
            for nc in int_list(args.rows):
                if nc < m:
                    for tr in (False, True):
                        key = f"rows {nc}{' T' if tr else ''}"
                        try:
                            rec["us"][key] = time_rotated_us(row_slabs(pws, h, cfg, nc, tr)[0])
                        except Exception as e:  # noqa: BLE001  (a probe: record and go on)
                            rec["us"][key] = f"{type(e).__name__}: {str(e)[:120]}"
            for kc in int_list(args.cols):
                if kc < n and n % kc == 0:
                    try:
                        rec["us"][f"cols {kc}"] = time_rotated_us(col_slabs(m, n, args.K, len(pws), h, cfg, kc))
                    except Exception as e:  # noqa: BLE001
                        rec["us"][f"cols {kc}"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(m, n, M, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec["us"].items()}, flush=True)
            rows.append(rec)
    env = environment()
    lines = [f"# Prefill by slabs — {env.get('card', '?')}", "",
             f"torch {env['torch']}, triton {env['triton']}, rev {env['qtip_triton_rev']}. Rotated µs per call (weight "
             "copies > 3x L2, h hot); `whole` = decompress Ŵ + torch.matmul (the shipped decompress kind); `rows N` = "
             "N-row slabs into one buffer, each multiplied at once (`T`: into an (out, M) result); `cols N` = N-column "
             "slabs (emulated), added in fp32; `decode only` = the decompress kernel alone (M 0). Ratio = fp16 / ours.", "",
             "| out x in | K | M | variant | µs | fp16 µs | fp16 / ours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f16 = r["us"].get("fp16")
        for k, v in r["us"].items():
            if k == "fp16":
                continue
            if not isinstance(v, float):
                cell = f"{v} | — | —"
            elif f16 is None:
                cell = f"{v:.1f} | — | —"
            else:
                cell = f"{v:.1f} | {f16:.1f} | {f16 / v:.2f}"
            lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | {k} | {cell} |")
    js, md = write_results(args.out, args.tag, {"env": env, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
