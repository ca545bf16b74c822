"""Kernel benchmark: our decode-matmul vs fp16 torch.matmul on Llama layer shapes (GPU).

For each layer shape (out x in), K in {2, 3, 4} (L16 V2 hyb9, QTIP layout, random weights) and batch M:

* ``kernel``: the decode-matmul alone (gemv/gemm kernel on a pre-transformed input; for
  ``decompress``, the decompress kernel plus torch.matmul) -- what upstream's 15.6 µs measures;
* ``linear``: the whole forward y = x W_effᵀ (input Hadamard, decode-matmul, output Hadamard);
* ``fp16``: torch.matmul(x, W.t()) with a dense fp16 W of the same shape, in the same run;
* ratios fp16 / ours.

Every number is the median of CUDA-graph replays with L2 flushed before each call (bench/common.py).
``--rotate`` also times each of the three as back-to-back calls over weight copies that together
exceed the L2 three times (``*_rot_us``, ``ratio_*_rot``; bench/common.py says why both).
Writes ``<out>/<card>-<date>.{json,md}`` and prints the table. ``--explore`` also times a set of
configs per kind at a few (shape, M) points, to pick better heuristics.

    python bench/kernels.py --out bench/results            # full table
    python bench/kernels.py --quick                          # 2 shapes, M in {1, 16}
    python bench/kernels.py --exl3 mcg,mul1 --K 2,3,4,5,6    # EXL3 rows (L16 V1, exl3 layout, 128-blocks)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, rotation_copies, time_rotated_us, time_us, write_results  # noqa: E402

from qtip_triton import QuantizedWeight, TrellisSpec, kernels  # noqa: E402
from qtip_triton.bitstream import get_layout  # noqa: E402
from qtip_triton.kernels import prepare  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 2048]
KS = [2, 3, 4]


def random_weight(m: int, n: int, K: int, device: str = "cuda", seed: int = 0, exl3_code: str | None = None
                  ) -> QuantizedWeight:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    spec = TrellisSpec(16, K, 2, "hyb", 9) if exl3_code is None else TrellisSpec(16, K, 1, exl3_code)
    words = torch.randint(0, 1 << 32, (m // 16, n // 16, spec.words_per_tile), generator=g, device=device,
                          dtype=torch.int64)
    if exl3_code is not None:  # EXL3: computed code, fp16 scales, 128-wide block Hadamards on both sides
        trellis = get_layout("exl3").pack(words, spec)
        suh = (torch.randn(n, generator=g, device=device).sign() * 0.02).half()
        svh = (torch.rand(m, generator=g, device=device) + 0.5).half()
        return QuantizedWeight(spec, m, n, trellis, suh, svh, None, layout="exl3", had_block=128)
    trellis = get_layout("qtip").pack(words, spec)
    table = (torch.randn(512, 2, generator=g, device=device) * 0.7).half()
    SU = torch.randn(n, generator=g, device=device).sign()
    SV = torch.rand(m, generator=g, device=device) + 0.5
    return QuantizedWeight(spec, m, n, trellis, SU, SV, table, layout="qtip")


def kernel_input(kind: str, pw, x: torch.Tensor, config: dict) -> torch.Tensor:
    """h = the input transform of ``x`` in the dtype and order the ``kind`` kernel with ``config`` reads (the mma
    gemv's h in its own layout, the wgmma kernel's in its order, as the layers write them)."""
    return kernels.kernel_input(kind, pw, x, config)


def kernel_fn(kind: str, pw, x: torch.Tensor, config: dict, h: torch.Tensor | None = None):
    """The decode-matmul part alone, on an already transformed input (``h``: that input, made from ``pw`` if None).

    The rotated timing passes every weight copy the same ``h``: in a served model the decode reads an h that the
    input transform has just written, so it sits in the L2 while the weights stream from DRAM. An h per copy
    would be evicted by the rotation and read from DRAM at every call (measured on the H100, session 19: 8192^2
    M = 1, 64x2048 tiles, 18.4 against 14.9 µs)."""
    if h is None:
        h = kernel_input(kind, pw, x, config)
    return lambda: kernels.kernel_partials(kind, pw, h, config)


TUNED = False  # --tuned: kind and config from the registry (the shipped autotune file), else the heuristic


def bench_point(qw, pw, M: int, w16: torch.Tensor, kind: str | None = None, config: dict | None = None,
                full: bool = True, rotation: tuple[list, list[torch.Tensor]] | None = None) -> dict:
    """One (shape, K, M) cell; ``rotation`` = (prepared weight copies, fp16 weight copies) adds the
    rotated times, each copy list starting with ``pw`` / ``w16``."""
    m, n = qw.out_features, qw.in_features
    if kind is None and TUNED:
        from qtip_triton.registry import lookup_config

        kind, config = lookup_config(qw.spec, m, n, M)
        config = dict(config)
    kind = kind or kernels.default_kind(qw.spec, m, n, M)
    config = config or kernels.default_config(kind, qw.spec, m, n, M)
    x = torch.randn(M, n, device="cuda").half()
    rec = {"m": m, "n": n, "spec": qw.spec.name, "layout": qw.layout, "K": qw.spec.K, "M": M, "kind": kind,
           "config": config}
    rec["kernel_us"] = time_us(kernel_fn(kind, pw, x, config))
    if full:
        rec["linear_us"] = time_us(lambda: kernels.launch(kind, x, pw, config))
    rec["fp16_us"] = time_us(lambda: torch.matmul(x, w16.t()))
    rec["ratio_kernel"] = rec["fp16_us"] / rec["kernel_us"]
    if full:
        rec["ratio_linear"] = rec["fp16_us"] / rec["linear_us"]
    if rotation is not None:
        pws, w16s = rotation
        rec["copies"] = [len(pws), len(w16s)]
        h = kernel_input(kind, pw, x, config)  # one h for every copy, hot like a layer's
        rec["kernel_rot_us"] = time_rotated_us([kernel_fn(kind, p, x, config, h) for p in pws])
        if full:
            rec["linear_rot_us"] = time_rotated_us([lambda p=p: kernels.launch(kind, x, p, config) for p in pws])
        rec["fp16_rot_us"] = time_rotated_us([lambda w=w: torch.matmul(x, w.t()) for w in w16s])
        rec["ratio_kernel_rot"] = rec["fp16_rot_us"] / rec["kernel_rot_us"]
        if full:
            rec["ratio_linear_rot"] = rec["fp16_rot_us"] / rec["linear_rot_us"]
    return rec


def weight_copies(qw: QuantizedWeight, pw, w16: torch.Tensor, exl3_code: str | None = None
                  ) -> tuple[list, list[torch.Tensor]]:
    """The rotated timing's weights (bench/common.py ``rotation_copies`` of each): prepared copies of a layer like
    ``qw`` starting with ``pw``, and fp16 ones starting with ``w16``."""
    m, n, K = qw.out_features, qw.in_features, qw.spec.K
    pws = [pw] + [prepare(random_weight(m, n, K, seed=i, exl3_code=exl3_code))
                  for i in range(1, rotation_copies(qw.trellis.nbytes))]
    w16s = [w16] + [torch.randn(m, n, device="cuda").half() for _ in range(1, rotation_copies(w16.nbytes))]
    return pws, w16s


def explore_configs(kind: str, m: int, n: int, M: int, spec, small: bool = False) -> list[dict]:
    default = kernels.default_config(kind, spec, m, n, M)
    base = kernels.default_config(kind, spec, m, n, M, mma=False)  # the variations below are the plain gemv's
    out = [default] if default == base else [default, base]
    if small and kind == "gemv":
        out += [{**base, "prefetch": True}, {**base, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8},
                {**base, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "prefetch": True},
                {**base, "SPLIT_K": base["SPLIT_K"] * 2}, {**base, "BLOCK_N": 128, "BLOCK_K": 256, "num_warps": 8}]
    elif small:
        out += [{**base, "BLOCK_N": 64}, {**base, "SPLIT_K": max(1, base["SPLIT_K"] // 2)}]
    elif kind == "gemv":
        for bn, bk, nw in ((128, 256, 8), (64, 256, 4), (64, 128, 4), (256, 128, 8), (128, 128, 4), (256, 256, 8)):
            for mult in (0.5, 1, 2):
                split = max(1, int(base["SPLIT_K"] * mult))
                out.append({**base, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "SPLIT_K": split})
        out.append({**base, "table": "gather4"})
        out.append({**base, "SPLIT_K": max(1, base["SPLIT_K"] // 2)})
        out.append({**base, "SPLIT_K": base["SPLIT_K"] * 2})
    elif kind == "gemm":
        for bn, bk, nw in ((64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 64, 4)):
            for mult in (0.5, 1, 2):
                split = max(1, int(base["SPLIT_K"] * mult))
                out.append({**base, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "SPLIT_K": split})
        if M <= 16:
            out.append({**base, "BLOCK_M": 16})
    else:
        for bn, bk, nw in ((32, 256, 4), (128, 128, 8), (64, 128, 4)):
            out.append({**base, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw})
    seen, uniq = set(), []
    for c in out:
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def markdown(env: dict, rows: list[dict], explore: list[dict]) -> str:
    lines = [f"# Kernel benchmark — {env.get('card', '?')} — {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"torch {env['torch']}, triton {env['triton']}. Times: median µs of CUDA-graph replays, L2 flushed "
             "before each call. `kernel` = decode-matmul only (gemv/gemm on a pre-transformed input; "
             "decompress + torch.matmul); `linear` = whole forward incl. both Hadamard transforms. "
             "Ratio = fp16 torch.matmul time / ours (higher is better). "
             f"Configs: {env.get('configs', 'heuristic defaults')}.", "",
             "| out x in | spec | K | M | kind | kernel µs | linear µs | fp16 µs | fp16/kernel | fp16/linear |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['m']}x{r['n']} | {r.get('spec', '')} | {r['K']} | {r['M']} | {r['kind']} | "
                     f"{r['kernel_us']:.1f} | "
                     f"{r.get('linear_us', float('nan')):.1f} | {r['fp16_us']:.1f} | {r['ratio_kernel']:.2f} | "
                     f"{r.get('ratio_linear', float('nan')):.2f} |")
    rotated = [r for r in rows if "kernel_rot_us" in r]
    if rotated:
        lines += ["", "## Rotated weights (back-to-back calls in one graph, copies > 3x L2)", "",
                  "Each call reads its own weight copy from DRAM; the L2 is not flushed, so no dirty lines "
                  "are written back during the call and no graph launch falls between calls (as layers run "
                  "in a served model). Copies: ours / fp16.", "",
                  "| out x in | K | M | kind | copies | kernel µs | linear µs | fp16 µs | fp16/kernel | fp16/linear |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rotated:
            lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | {r['kind']} | {r['copies'][0]} / "
                         f"{r['copies'][1]} | {r['kernel_rot_us']:.1f} | {r.get('linear_rot_us', float('nan')):.1f} | "
                         f"{r['fp16_rot_us']:.1f} | {r['ratio_kernel_rot']:.2f} | "
                         f"{r.get('ratio_linear_rot', float('nan')):.2f} |")
    if explore:
        lines += ["", "## Config exploration (kernel only)", "",
                  "| out x in | K | M | kind | config | kernel µs | fp16/kernel |", "|---|---|---|---|---|---|---|"]
        for r in explore:
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | {r['kind']} | {cfg} | {r['kernel_us']:.1f} | "
                         f"{r['ratio_kernel']:.2f} |")
    return "\n".join(lines) + "\n"


def pinned_configs(items: list[str]) -> dict[tuple[int, int], tuple[str, dict]]:
    """``--config OUTxIN=JSON`` values: (out, in) -> (kind, config); a clear error for a malformed one."""
    pinned = {}
    for item in items:
        shape, sep, text = item.partition("=")
        try:
            m, n = (int(v) for v in shape.lower().split("x"))
            cfg = json.loads(text)
        except ValueError as e:
            raise SystemExit(f"--config {item!r}: expected OUTxIN=JSON ({e})") from None
        if not sep or not isinstance(cfg, dict):
            raise SystemExit(f"--config {item!r}: expected OUTxIN=JSON with a JSON object")
        pinned[(m, n)] = (cfg.pop("kind", "gemv"), cfg)
    return pinned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="2 shapes, M in {1, 16}, K=2 only")
    ap.add_argument("--tuned", action="store_true", help="kinds and configs from the registry (autotune file)")
    ap.add_argument("--explore", action="store_true", help="also time alternative configs at a few points")
    ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,28672x8192")
    ap.add_argument("--M", default=None, help="e.g. 1,16,256")
    ap.add_argument("--K", default=None, help="e.g. 2,4")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds; stop adding points after this")
    ap.add_argument("--explore-M", default="1,4,16,256", help="batch sizes explored with --explore")
    ap.add_argument("--small-explore", action="store_true", help="a handful of alternative configs only")
    ap.add_argument("--explore-K", default="2", help="K values explored with --explore")
    ap.add_argument("--rotate", action="store_true",
                    help="also time back-to-back calls over weight copies > 3x L2 (no flush; bench/common.py)")
    ap.add_argument("--config", action="append", default=[], metavar="OUTxIN=JSON",
                    help="time this config at every M of that shape instead of the registry's or the heuristic's "
                         '(repeatable; the JSON may name its "kind", gemv if not), e.g. '
                         '8192x8192=\'{"BLOCK_N": 64, "BLOCK_K": 2048, "num_warps": 8, "SPLIT_K": 1, "BLOCK_M": 1}\'')
    ap.add_argument("--exl3", default=None,
                    help="EXL3 codes (e.g. mcg,mul1): time L16 V1 exl3-layout weights instead of QTIP's hyb9")
    args = ap.parse_args(argv)
    pinned = pinned_configs(args.config)
    global TUNED
    TUNED = args.tuned
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from tqdm import tqdm

    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    Ms = MS if not args.M else [int(v) for v in args.M.split(",")]
    Ks = KS if not args.K else [int(v) for v in args.K.split(",")]
    if args.quick:
        shapes, Ms, Ks = [(8192, 8192), (28672, 8192)], [1, 16], [2]
    t0 = time.time()
    env = environment()
    env["configs"] = "registry (autotune file)" if TUNED else "heuristic defaults"
    if pinned:
        env["configs"] += "; pinned by --config: " + ", ".join(f"{m}x{n} {k} {c}" for (m, n), (k, c) in pinned.items())
    rows: list[dict] = []
    explore: list[dict] = []
    codes = [None] if not args.exl3 else args.exl3.split(",")
    points = [(s, K, code) for code in codes for K in Ks for s in shapes]
    for (m, n), K, code in tqdm(points, desc="shapes", file=sys.stderr):
        if time.time() - t0 > args.time_limit:
            print(f"time limit reached; skipping {m}x{n} K={K}", file=sys.stderr)
            continue
        qw = random_weight(m, n, K, exl3_code=code)
        pw = prepare(qw)
        w16 = torch.randn(m, n, device="cuda").half()
        rotation = weight_copies(qw, pw, w16, code) if args.rotate else None
        for M in Ms:
            try:
                kind, cfg = pinned.get((m, n), (None, None))
                rows.append(bench_point(qw, pw, M, w16, kind, cfg, rotation=rotation))
            except Exception as e:  # keep the rest of the table; the failure is recorded
                rows.append({"m": m, "n": n, "K": K, "M": M, "kind": "?", "error": repr(e)[:300],
                             "kernel_us": float("nan"), "fp16_us": float("nan"), "ratio_kernel": float("nan")})
            r = rows[-1]
            print(f"{m}x{n} K={K} M={M} {r['kind']}: kernel {r['kernel_us']:.1f} linear {r.get('linear_us', 0):.1f} "
                  f"fp16 {r['fp16_us']:.1f} -> {r['ratio_kernel']:.2f}x / {r.get('ratio_linear', 0):.2f}x"
                  + (f"; rotated {r['ratio_kernel_rot']:.2f}x / {r.get('ratio_linear_rot', 0):.2f}x"
                     if "ratio_kernel_rot" in r else ""), file=sys.stderr, flush=True)
        explore_k = [int(v) for v in args.explore_K.split(",")]
        if args.explore and (m, n) == (8192, 8192) and K in explore_k:
            for M in [int(v) for v in args.explore_M.split(",")]:
                kinds = {1: ["gemv", "gemm"], 4: ["gemv", "gemm"], 16: ["gemm", "gemv"], 256: ["gemm", "decompress"]}[M]
                if args.small_explore:
                    kinds = kinds[:1]
                for kind in kinds:
                    for cfg in explore_configs(kind, m, n, M, qw.spec, small=args.small_explore):
                        if time.time() - t0 > args.time_limit:
                            break
                        try:
                            explore.append(bench_point(qw, pw, M, w16, kind, cfg, full=False))
                        except Exception as e:
                            explore.append({"m": m, "n": n, "K": K, "M": M, "kind": kind, "config": cfg,
                                            "error": repr(e)[:300], "kernel_us": float("nan"),
                                            "ratio_kernel": float("nan")})
        del qw, pw, w16, rotation
        torch.cuda.empty_cache()
    payload = {"env": env, "rows": rows, "explore": explore, "seconds": time.time() - t0}
    md = markdown(env, rows, explore)
    jp, mp = write_results(args.out, os.environ.get("BENCH_TAG", ""), payload, md)
    print(md)
    print(f"wrote {jp} and {mp}", file=sys.stderr)
    try:  # the plot and summary are extras: matplotlib may be absent on the GPU machine
        import plot_kernels

        plot_kernels.main([str(jp)])
    except ImportError as e:
        print(f"no plot ({e}); run bench/plot_kernels.py {jp} where matplotlib is installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
