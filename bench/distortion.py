"""Distortion of the tail-biting trellis encoder on i.i.d. N(0,1) data vs the format spec's table (§6).

For each code and K: search the best data scale on a small fixed sample (golden section), then
measure the MSE on fresh tiles, and the MSE of a free-ends (not tail-biting) search on the same
tiles for the price of tail-biting. Writes bench/results/distortion-<device>-<date>.{json,md}.

    python bench/distortion.py                      # L=16, K=2,3,4, hyb9/1mad/3inst (a few minutes on CPU)
    python bench/distortion.py --K 2 --tiles 32     # quicker
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qtip_triton.codes import all_state_values
from qtip_triton.encode import best_data_scale, gaussian_mse
from qtip_triton.spec import TrellisSpec
from qtip_triton.tables import default_table
from qtip_triton.viterbi import viterbi

# Measured by the reference implementation (format spec §6), L=16, tail-biting, best data scale.
SPEC_TABLE = {
    ("hyb9", 2): 0.0705, ("hyb9", 3): 0.0189, ("hyb9", 4): 0.00550,
    ("1mad", 2): 0.0688, ("1mad", 3): 0.0176, ("1mad", 4): 0.00452,
    ("3inst", 2): 0.0688, ("3inst", 3): 0.0178, ("3inst", 4): 0.00461,
}
CODE_V = {"hyb": 2, "1mad": 1, "3inst": 1, "lut": 2}


def spec_for(code: str, L: int, K: int) -> TrellisSpec:
    base = code.rstrip("0123456789")
    q = code[len(base):]
    return TrellisSpec.parse(f"L{L}K{K}V{CODE_V.get(base, 1)}-{base}{q}")


def free_end_mse(spec: TrellisSpec, table: torch.Tensor | None, scale: float, tiles: int, seed: int, device: str) -> float:
    """The same tiles searched without the tail-biting constraint (not storable; the lower reference)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tiles, 256, generator=gen).to(device) * scale
    values = all_state_values(spec, table).to(device)
    total = 0.0
    for lo in range(0, tiles, 16):
        _, err = viterbi(x[lo : lo + 16].reshape(-1, spec.steps_per_tile, spec.V), values, spec.bits_per_step)
        total += float(err.double().sum())
    return total / (scale * scale * x.numel())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=16)
    p.add_argument("--K", default="2,3,4", help="comma-separated bits per weight")
    p.add_argument("--codes", default="hyb9,1mad,3inst")
    p.add_argument("--tiles", type=int, default=128, help="fresh 16x16 tiles measured per point")
    p.add_argument("--search-tiles", type=int, default=32, help="tiles of the data-scale search sample")
    p.add_argument("--evals", type=int, default=8, help="golden-section evaluations of the scale search")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    Ks = [int(k) for k in args.K.split(",")]
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    rows = []
    points = [(c, k) for c in codes for k in Ks]
    for code, K in tqdm(points, desc="distortion", unit="point"):
        spec = spec_for(code, args.L, K)
        table = default_table(spec)
        t0 = time.perf_counter()
        alpha, search_mse = best_data_scale(spec, table, tiles=args.search_tiles, evals=args.evals, seed=1,
                                            device=args.device)
        mse = gaussian_mse(spec, table, alpha, tiles=args.tiles, seed=2, device=args.device)
        free = free_end_mse(spec, table, alpha, args.tiles, 2, args.device)
        ref = SPEC_TABLE.get((code, K)) if args.L == 16 else None
        rows.append({
            "spec": spec.name, "code": code, "L": args.L, "K": K, "V": spec.V,
            "data_scale": alpha, "mse": mse, "mse_free_ends": free,
            "tail_biting_cost_pct": 100.0 * (mse / free - 1.0),
            "spec_table": ref, "ratio_to_spec": None if ref is None else mse / ref,
            "bound": 2.0 ** (-2 * K), "seconds": time.perf_counter() - t0,
        })

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    tag = "cpu" if device_name == "cpu" else device_name.lower().replace(" ", "-")
    date = dt.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": date, "device": device_name, "torch": torch.__version__, "python": platform.python_version(),
        "tiles": args.tiles, "search_tiles": args.search_tiles, "evals": args.evals,
        "samples_per_point": args.tiles * 256,
        "note": "MSE of N(0,1) data reconstructed as code values / data_scale; tail-biting two-pass Viterbi",
    }
    (out / f"distortion-{tag}-{date}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Trellis distortion on i.i.d. N(0,1) ({device_name}, {date})",
        "",
        f"{args.tiles} tiles ({args.tiles * 256} samples) per point; best data scale searched on "
        f"{args.search_tiles} other tiles ({args.evals} golden-section evaluations). "
        "Spec = the reference implementation's numbers (format spec §6).",
        "",
        "| spec | data scale | MSE | spec table | ratio | free ends | tail-biting cost | bound 2^-2K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = "—" if r["spec_table"] is None else f"{r['spec_table']:.5f}"
        ratio = "—" if r["ratio_to_spec"] is None else f"{r['ratio_to_spec']:.3f}"
        lines.append(
            f"| {r['spec']} | {r['data_scale']:.4f} | {r['mse']:.5f} | {ref} | {ratio} | "
            f"{r['mse_free_ends']:.5f} | {r['tail_biting_cost_pct']:+.1f}% | {r['bound']:.5f} |"
        )
    stderr = math.sqrt(2.0 / (args.tiles * 256))
    lines += ["", f"Sampling noise of one MSE: roughly ±{100 * stderr:.1f}% (one standard error)."]
    (out / f"distortion-{tag}-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
