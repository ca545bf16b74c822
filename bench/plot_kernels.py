"""Plot a ``bench/kernels.py`` result: time vs batch M per layer shape, ours vs fp16, with the memory floor.

The floor is what streaming the compressed weights alone would cost: m·n·K/8 bytes at the card's measured
device-to-device copy bandwidth (``--bandwidth``, default 3.0 TB/s read+write as measured on the H100, see
the project's PERF notes). A kernel on the floor is memory bound; the gap above it is decode work.

    python bench/plot_kernels.py bench/results/h100-80gb-hbm3-2026-11-28-run2.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

H100_COPY_BYTES_PER_S = 3.0e12


def floor_us(m: int, n: int, K: int, bandwidth: float) -> float:
    return m * n * K / 8 / bandwidth * 1e6


def series(rows: list[dict]) -> dict[tuple[int, int], dict[int, list[dict]]]:
    """rows grouped by (m, n) then K, each list sorted by M (rows with errors dropped)."""
    out: dict[tuple[int, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "error" in r or not math.isfinite(r.get("kernel_us", float("nan"))):
            continue
        out[(r["m"], r["n"])][r["K"]].append(r)
    for by_k in out.values():
        for lst in by_k.values():
            lst.sort(key=lambda r: r["M"])
    return out


def plot(payload: dict, png: Path, bandwidth: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = series(payload["rows"])
    if not groups:
        raise ValueError("no successful rows to plot")
    cols = min(3, len(groups))
    rows_n = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.0 * rows_n), squeeze=False)
    for ax, ((m, n), by_k) in zip(axes.flat, sorted(groups.items()), strict=False):
        fp16: dict[int, float] = {}
        for K, lst in sorted(by_k.items()):
            Ms = [r["M"] for r in lst]
            line = ax.plot(Ms, [r.get("linear_us", r["kernel_us"]) for r in lst], "o-", label=f"ours K={K} (forward)")
            ax.plot(Ms, [r["kernel_us"] for r in lst], "x--", color=line[0].get_color(), alpha=0.6,
                    label=f"ours K={K} (decode-matmul)")
            ax.axhline(floor_us(m, n, K, bandwidth), color=line[0].get_color(), ls=":", lw=1,
                       label=f"memory floor K={K}")
            for r in lst:
                fp16.setdefault(r["M"], r["fp16_us"])
        Ms = sorted(fp16)
        ax.plot(Ms, [fp16[M] for M in Ms], "ks-", label="fp16 torch.matmul")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{m}x{n}")
        ax.set_xlabel("batch M")
        ax.set_ylabel("µs (median, L2 flushed)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    env = payload.get("env", {})
    fig.suptitle(f"qtip-triton kernels vs fp16 — {env.get('card', '?')}, triton {env.get('triton', '?')}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def summary(payload: dict, bandwidth: float) -> str:
    """Markdown: per shape and K, the best ratio to fp16 and how far M=1 sits above the memory floor."""
    lines = ["| out x in | K | fp16/forward at M=1 | fp16/forward best (M) | M=1 forward / memory floor |",
             "|---|---|---|---|---|"]
    for (m, n), by_k in sorted(series(payload["rows"]).items()):
        for K, lst in sorted(by_k.items()):
            ratio = [(r["fp16_us"] / r.get("linear_us", r["kernel_us"]), r["M"]) for r in lst]
            at1 = next((x for x, M in ratio if M == 1), float("nan"))
            best = max(ratio)
            one = next((r for r in lst if r["M"] == 1), None)
            gap = (one.get("linear_us", one["kernel_us"]) / floor_us(m, n, K, bandwidth)) if one else float("nan")
            lines.append(f"| {m}x{n} | {K} | {at1:.2f} | {best[0]:.2f} ({best[1]}) | {gap:.1f}x |")
    return "\n".join(lines) + "\n"


LARGE_M_NOTE = ("From the measured fp16 time and two memory floors at the bandwidth above: the two transforms "
                "read and write every activation once (M·(n+m)·4 bytes of fp16), and decompress writes Ŵ that "
                "the matmul reads back (2·m·n·2 bytes). The best ratios assume everything else is free: with "
                "Ŵ through memory (decompress + matmul, what M >= 256 runs) and with a fused decode-matmul as "
                "fast as fp16's (transforms only).")


def large_m_floors(payload: dict, bandwidth: float, min_m: int = 256) -> str:
    """Markdown table of why M >= ``min_m`` cannot reach fp16 speed with a decompress + matmul forward
    (see ``LARGE_M_NOTE``): the target "never below 0.9x at M >= 256" needs more than faster kernels."""
    lines = ["| out x in | K | M | fp16 µs | forward µs | transforms µs (forward - kernel) | transforms floor µs "
             "| Ŵ round trip µs | best fp16/forward, decompress + matmul | best, fused decode + matmul |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(payload["rows"], key=lambda r: (r["m"], r["n"], r["K"], r["M"])):
        if r["M"] < min_m or not all(math.isfinite(r.get(k, float("nan"))) for k in ("fp16_us", "kernel_us")):
            continue
        m, n, M, f = r["m"], r["n"], r["M"], r["fp16_us"]
        fwd = r.get("linear_us", float("nan"))
        tf = M * (n + m) * 4 / bandwidth * 1e6
        rt = 2 * m * n * 2 / bandwidth * 1e6
        lines.append(f"| {m}x{n} | {r['K']} | {M} | {f:.1f} | {fwd:.1f} | {fwd - r['kernel_us']:.1f} | {tf:.1f} "
                     f"| {rt:.1f} | {f / (f + tf + rt):.2f} | {f / (f + tf):.2f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a JSON written by bench/kernels.py")
    ap.add_argument("--bandwidth", type=float, default=H100_COPY_BYTES_PER_S,
                    help="bytes/s for the memory floor (default: the H100's measured 3.0e12)")
    args = ap.parse_args(argv)
    path = Path(args.result)
    try:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_kernels: {path} is not a bench/kernels.py result ({e})", file=sys.stderr)
        return 2
    if not isinstance(rows, list):
        print(f"plot_kernels: {path} has no rows list", file=sys.stderr)
        return 2
    png = plot(payload, path.with_suffix(".png"), args.bandwidth)
    md = path.with_name(path.stem + "-summary.md")
    md.write_text(f"# Summary of {path.name}\n\nMemory floor: m·n·K/8 bytes at {args.bandwidth / 1e12:.1f} TB/s.\n\n"
                  + summary(payload, args.bandwidth))
    floors = large_m_floors(payload, args.bandwidth)
    if floors:
        with md.open("a") as f:
            f.write("\n## Large batches: the floors of a decompress + matmul forward\n\n" + LARGE_M_NOTE + "\n\n" + floors)
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
