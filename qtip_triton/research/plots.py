"""Sweep plots (matplotlib, Agg backend: works headless): distortion vs bits, speed vs distortion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = {"hyb": "o", "1mad": "s", "3inst": "^", "lut": "D", "mcg": "v", "mul1": "P"}


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported: the sweep still writes its tables, and says how to get the plots."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(
            f"plots skipped: matplotlib is not importable ({e}); `pip install matplotlib` and re-run the "
            "same command (finished points are reused) to draw them"
        ) from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any]) -> str:
    q = "" if row.get("Q") in (None, "") else row["Q"]
    return f"L{row['L']} {row['code']}{q} V{row['V']}"


def distortion_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """MSE vs bits per weight on a log scale, one marker per code (filled: Gaussian, hollow: real weights)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)
    n = len(groups)
    for i, (label, rs) in enumerate(sorted(groups.items())):
        marker = MARKERS.get(rs[0]["code"], "x")
        dodge = 0.04 * (i - (n - 1) / 2)  # series side by side at each K, not on top of each other
        xs = [r["bits_per_weight"] + dodge for r in rs]
        pts = ax.scatter(xs, [r["gauss_mse"] for r in rs], marker=marker, label=f"{label}")
        real = [(x, r["real_rel_mse"]) for x, r in zip(xs, rs, strict=True) if r.get("real_rel_mse") not in (None, "")]
        if real:
            ax.scatter([p[0] for p in real], [p[1] for p in real], marker=marker, facecolors="none",
                       edgecolors=pts.get_facecolor())
    ks = sorted({r["bits_per_weight"] for r in rows})
    grid = [ks[0] - 0.3 + j * (ks[-1] - ks[0] + 0.6) / 50 for j in range(51)]
    ax.plot(grid, [2.0 ** (-2 * k) for k in grid], "k--", lw=1, label="bound 2^-2K")
    ax.set_xticks(ks)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (K)")
    ax.set_ylabel("MSE (unit-variance data)")
    ax.set_title("Trellis distortion vs rate (filled: N(0,1), hollow: real weights after RHT)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speed_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Speed-up over fp16 vs Gaussian MSE at M=1 (filled) and M=16 (hollow); None when no speeds."""
    have = [r for r in rows if r.get("speedup_1") not in (None, "")]
    if not have:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in have:
        marker = MARKERS.get(r["code"], "x")
        pt = ax.scatter([r["gauss_mse"]], [r["speedup_1"]], marker=marker)
        if r.get("speedup_16") not in (None, ""):
            ax.scatter([r["gauss_mse"]], [r["speedup_16"]], marker=marker, facecolors="none",
                       edgecolors=pt.get_facecolor())
        ax.annotate(r["spec"], (r["gauss_mse"], r["speedup_1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("MSE on N(0,1)")
    ax.set_ylabel("speed-up vs fp16 (filled M=1, hollow M=16)")
    ax.set_title(f"Speed vs distortion ({have[0].get('speed_shape', '')})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
