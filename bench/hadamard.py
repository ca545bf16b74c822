"""Hadamard transform launch variants at the batch sizes of decoding (GPU).

The two transforms of a layer's forward cost 20-30 µs at M = 1 whatever the layer's size (run 5,
``bench/NOTES.md``): one token's transform runs on one to eight programs. This times, for Llama
feature sizes and a few token counts, the default launch against the small-batch variants of
``qtip_triton.kernels.hadamard.transform`` (``col_split``: one program per column block as well;
``unroll_splits``: split-K partial loads unrolled), as the input transform (one fp16 input, SU,
kernel-order destination) and as the output transform (SPLIT_K fp32 partials summed, SV, fp16 out).
CUDA-graph replay with L2 flushed (bench/common.py). Writes ``<out>/<card>-<date>-hadamard.{json,md}``.

    python bench/hadamard.py --out bench/results
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, time_rotated_us, time_us, write_results  # noqa: E402

from qtip_triton.kernels.hadamard import transform  # noqa: E402

VARIANTS = {"default": {}, "col_split": {"col_split": True}, "unroll": {"unroll_splits": True},
            "both": {"col_split": True, "unroll_splits": True},
            "both16": {"col_split": True, "unroll_splits": True, "rblk": 16, "cblk": 16},
            "both16_w2": {"col_split": True, "unroll_splits": True, "rblk": 16, "cblk": 16, "num_warps": 2},
            "both_c16": {"col_split": True, "unroll_splits": True, "cblk": 16},
            # more warps per program at one token: its ~1,400 instructions per warp issue one per ~6
            # cycles on one warp per scheduler (ncu, H200, session 10)
            "w8": {"num_warps": 8}, "w8_16": {"num_warps": 8, "rblk": 16, "cblk": 16},
            "w8_c16": {"num_warps": 8, "cblk": 16}, "w16": {"num_warps": 16},
            "per_token": {"tall": False}, "tall": {"tall": True},
            # tall tiles of several tokens at CP = 128 (every Llama size but 4096 runs one token per tile)
            "tall_t2": {"tall": True, "tall_tokens": 2}, "tall_t4_bm32": {"tall": True, "tall_tokens": 4, "tall_bm": 32},
            "tall_t2_bm32": {"tall": True, "tall_tokens": 2, "tall_bm": 32},
            # two fp32 GEMMs through torch/cuBLAS over all (token, block) rows (kernels/hadamard_gemm.py)
            "gemm": {"gemm": True},
            # A · (Z · B_c) under the column split (session 13: sm_90 SASS 1104 -> 848 per warp at 4096 input,
            # 80 instead of 128 HMMA; no fewer at 11008, more tensor work from 28672's 256-row A)
            "zb_first": {"zb_first": True},
            # the column split in the (A · Z) · B_c order (what col_split ran before ZB_FIRST became the default at
            # A of 32 rows, session 16)
            "az_first": {"col_split": True, "zb_first": False},
            # several tokens stacked along the rows of one tile, two full-size products per program
            # (session 14; every Llama size: A pads to at most 256 rows)
            "stacked": {"stacked": True}, "stacked64": {"stacked": True, "stack_rows": 64},
            # one token per tile: a one-token transform as one program of two products (decoding sizes)
            "stacked1": {"stacked": True, "stack_rows": 16},
            # a 32-row tile: one token's A at 4096 features, two tokens' at 1024-2048 (session 35: grids at 256 tokens)
            "stacked32": {"stacked": True, "stack_rows": 32},
            # A of 256 padded rows (11008, 28672: one token a program, 64-row slices): fewer columns of Y a program,
            # so twice or four times the programs with smaller accumulators, and 4 warps (session 40: the 11008-wide
            # transforms took 50 of a layer's 106 µs of transforms at 256 tokens)
            "stacked_c32": {"stacked": True, "stack_cols": 32}, "stacked_c16": {"stacked": True, "stack_cols": 16},
            "stacked_w4": {"stacked": True, "stack_warps": 4}, "stacked_w8": {"stacked": True, "stack_warps": 8},
            "stacked_c32_w4": {"stacked": True, "stack_cols": 32, "stack_warps": 4},
            # session 42: slices of 32 rows instead of 64 there (sm_90 compile: mma.sync instead of wgmma, 4-warp
            # spills 152 -> 32 B on 11008's output, shared memory 48 -> 20 KB)
            "stacked_k32": {"stacked": True, "stack_kc": 32},
            "stacked_w4_k32": {"stacked": True, "stack_warps": 4, "stack_kc": 32},
            # one fp16 dot per product instead of a bf16 hi + lo pair (fp16 outputs only: the fp32 cases fail it)
            "f16": {"f16_dots": True}}
# What each timed transform is: as the decode kernels of small batches use them (kernel-order destination,
# split-K partials) or as the prefill path (decompress + torch.matmul) does: natural order, one fp16 partial.
# input16: the input transform as the mma gemv (2-16 tokens) takes it, fp16 into a scattered destination;
# input16_gathered: the same h in natural order, then gathered into that order by one index_select (the wgmma
# kind's other way, kernels.gather_after_transform).
CASES = ("input", "output", "input_natural", "output_fp16", "input16", "input16_gathered")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="1024,4096,11008,8192,14336,28672", help="feature sizes")
    ap.add_argument("--T", default="1,4,16,64,256", help="token counts")
    ap.add_argument("--splits", type=int, default=4, help="split-K partials summed by the output transform")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants to time (default: all)")
    ap.add_argument("--cases", default="input,output",
                    help=f"transforms to time, of {', '.join(CASES)} (input/output: as the small-batch decode kernels "
                         "use them; input_natural/output_fp16: as the prefill path does)")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. 'tall')")
    ap.add_argument("--timer", choices=("flushed", "chain"), default="flushed",
                    help="flushed: one call per graph replay after an L2 flush (a 4-5 µs floor); chain: 48 calls back "
                         "to back in one graph, each waiting for the one before (PDL as shipped), input hot in L2: "
                         "what one transform adds to a forward's critical path")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    variants = {k: VARIANTS[k] for k in a.variants.split(",")}
    wanted = a.cases.split(",")
    if set(wanted) - set(CASES):
        ap.error(f"unknown cases {sorted(set(wanted) - set(CASES))}; known: {', '.join(CASES)}")
    if not torch.cuda.is_available():
        print("bench/hadamard.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    timer = time_us if a.timer == "flushed" else (lambda fn: time_rotated_us([fn], min_calls=48))
    tiny = torch.zeros(1, device="cuda")
    floor = timer(tiny.zero_)  # one trivial kernel through the same timer: the launch + timing floor
    print(f"floor (one trivial kernel): {floor:.1f} us", flush=True)
    for n, T in itertools.product([int(v) for v in a.n.split(",")], [int(v) for v in a.T.split(",")]):
        su, sv = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        dst = torch.randperm(n, device="cuda").to(torch.int32)
        src = torch.argsort(dst)  # h[:, dst[i]] = natural[:, i]: the gather that gives input16's result
        x = torch.randn(T, n, device="cuda").half()
        parts = torch.randn(a.splits, T, n, device="cuda")
        part16 = parts[:1].half()
        cases = {
            "input": lambda kw, x=x, su=su, dst=dst: transform(x, 1, transpose=True, pre=su, out_dtype=torch.float32,
                                                               dst=dst, **kw),
            "output": lambda kw, p=parts, sv=sv: transform(p, 1, transpose=False, post=sv, out_dtype=torch.float16,
                                                           **kw),
            "input_natural": lambda kw, x=x, su=su: transform(x, 1, transpose=True, pre=su, **kw),
            "output_fp16": lambda kw, p=part16, sv=sv: transform(p, 1, transpose=False, post=sv, **kw),
            "input16": lambda kw, x=x, su=su, dst=dst: transform(x, 1, transpose=True, pre=su, out_dtype=torch.float16,
                                                                 dst=dst, **kw),
            "input16_gathered": lambda kw, x=x, su=su, src=src: transform(
                x, 1, transpose=True, pre=su, out_dtype=torch.float16, **kw).index_select(1, src),
        }
        for which in wanted:
            fn = cases[which]
            ref = fn({})
            rec = {"n": n, "T": T, "transform": which}
            for name, kw in variants.items():
                try:
                    out = fn(kw)
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    rec[name] = timer(lambda fn=fn, kw=kw: fn(kw)) if err < 1e-3 else float("nan")
                    rec[f"{name}_err"] = err
                except Exception as e:  # a failing variant is a result
                    rec[name] = float("nan")
                    rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(rec)
            print(f"n={n} T={T} {which}: " + ", ".join(f"{k} {rec[k]:.1f} us" for k in variants), flush=True)
    env = environment()
    lines = [f"# Hadamard transform launch variants — {env.get('card', '?')}", "",
             ("Median µs of CUDA-graph replays, L2 flushed. " if a.timer == "flushed" else
              "Median µs per call of 48 calls back to back in one CUDA graph (each waits for the one before; PDL as "
              "shipped; input hot in L2). ") +
             "input: fp16 x, SU, kernel-order destination, fp32 out; input16: the same with fp16 out; "
             f"output: {a.splits} fp32 split-K partials summed, SV, fp16 out; input_natural: fp16 x, SU, fp16 out in "
             "natural order; output_fp16: one fp16 partial, SV, fp16 out (the last two as the prefill path runs them); "
             "input16_gathered: input_natural then one index_select into input16's order. "
             "Floor (one trivial kernel "
             f"through the same timer): {floor:.1f} µs. Variants: " + "; ".join(
                 f"{k} = {v or 'as shipped'}" for k, v in variants.items()), "",
             "| n | T | transform | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for r in rows:
        lines.append(f"| {r['n']} | {r['T']} | {r['transform']} | " + " | ".join(f"{r[k]:.1f}" for k in variants) + " |")
    name = "hadamard" + (f"-{a.tag}" if a.tag else "")
    jp, mp = write_results(a.out, name, {"env": env, "floor_us": floor, "variants": variants, "rows": rows},
                           "\n".join(lines) + "\n")
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
