"""Floors under each cell of a kernel table: what the decode's instructions, its table reads and the weights'
bytes allow on the card that ran it, beside the measured time, and whether the PERF.md bar fits above them.

Why: issue 7 asks, for every cell whose target is not met, for the instruction/bandwidth floor that explains
it and the gap left. Three floors, each a lower bound on the decode-matmul kernel alone (no transforms):

* issue: the compiled k loop's SASS instructions per decoded state (``bench/sass_count.py``, sm_90, the very
  config the table ran) x states / (32 lanes x 4 schedulers x SMs x clock);
* table reads: ``ld.shared`` per state x the shared-memory wavefronts one warp-wide random read costs
  (Nsight Compute, NOTES session 9: 3.34 for one copy of the table, 2.00 with 16 lane copies; other modes
  are counted at 1, a lower bound) x states / 32 / (SMs x clock), one wavefront per SM per cycle;
* DRAM: the packed weights, m x n x K / 8 bytes, at the card's bandwidth;
* Ŵ round trip (the decompress kind only): its cuBLAS matmul is the fp16 column's own (same shapes, same fp16
  operand), and before it the whole fp16 Ŵ is written once, m x n x 2 bytes at the card's bandwidth. A floor
  of the path to within the matmul's run-to-run spread (~5 % at M = 2048) and the tail of Ŵ that the matmul
  finds still in the L2: a measurement can sit a few % under it where the matmul dominates.
* tensor core (the wgmma kind only): the matmul's 2 m n M flops at the card's dense fp16 rate (data sheet). The
  kind decodes each weight once per BLOCK_M tokens, so its issue and table floors count ceil(M / BLOCK_M) decodes.
* measured MMA rate (the wgmma kind, where the card has the figure): the same flops at the fastest rate the kind's
  MMAs reached alone on that card, with x streamed and no decode (``bench/wgmma_probe.py --ablate``; H100, session
  26: 93.2 µs at 8192^2 M = 512, 737 TFLOP/s, where cuBLAS's fp16 matmul of the same product took 96.5). Not a law
  of the hardware like the others, but the rate this MMA structure (and cuBLAS) sustains: with the decode fully
  hidden the kind runs at about fp16's time, so at M >= 256 the 0.9x bar leaves the decode ~10 % of the MMA time.

The bar is met when fp16 / measured >= the PERF.md ratio. When it is not, the bar's time (fp16 / ratio) is set
against the largest floor: above it the bar is reachable in principle (the verdict gives how much faster the
kernel must get and how close to the floor that is); below it the bar cannot be met with this decode's
instruction count. x loads, latency and occupancy are not floors: they are what the gap is made of.

    python bench/floors.py --results bench/results/h200-2026-11-30-session12-kernels.json
    python bench/floors.py --rotated --results bench/results/h100-80gb-hbm3-2026-12-05-session19-tuned-k2.json
    python bench/floors.py --timeline --results bench/results/h100-80gb-hbm3-2026-12-05-session20-tl3-base.json

``--timeline`` reads a ``bench/forward_timeline.py`` JSON instead and sets the bar against the whole forward: its
decode kernel's work (the decode's end minus the later of its start and the input transform's end, from the
GPU's own records) has the floors above, and the rest of the forward's span is what the two Hadamard transforms
add to the critical path, as measured. Their sum is the best forward this three-launch structure allows with
the transforms as they run; a bar under it cannot be met by a faster decode alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sass_count, a sibling script

from qtip_triton.spec import TrellisSpec  # noqa: E402

# per card: SMs, SM clock (GHz, boost), DRAM bandwidth (TB/s) and where that figure comes from
# and dense fp16 tensor-core TFLOP/s (data sheet, SXM; fp32 accumulate)
CARDS: dict[str, dict[str, Any]] = {
    "h100": {"sms": 132, "ghz": 1.98, "tbs": 3.0, "tbs_source": "device copy measured (PERF.md)", "tc_tflops": 989.0,
             "mma_tflops": 737.0, "mma_source": "wgmma MMAs alone, 8192^2 M = 512 (session 26)"},
    "h200": {"sms": 132, "ghz": 1.98, "tbs": 4.8, "tbs_source": "data sheet", "tc_tflops": 989.0},
}
# kinds whose programs each take BLOCK_M tokens and decode their weights once per program: a weight is decoded
# ceil(M / BLOCK_M) times
TILED_KINDS = ("wgmma",)
# PERF.md targets: batch M -> ratio against fp16 for K = 2, 3, 4
BARS: dict[int, tuple[float, float, float]] = {1: (4.0, 3.5, 3.0), 4: (3.5, 3.0, 2.5), 16: (2.5, 2.2, 2.0),
                                               64: (1.3, 1.2, 1.1), 256: (0.9, 0.9, 0.9), 2048: (0.9, 0.9, 0.9)}
# shared-memory wavefronts per warp-wide random table read, by table mode (measured, NOTES session 9)
WAVEFRONTS = {"shared": 3.34, "shared16": 2.0}


def card_key(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``; a clear error for a card without figures here."""
    for key in CARDS:
        if key in name.lower():
            return key
    raise ValueError(f"no floor figures for card {name!r}; known: {', '.join(CARDS)} (pass --card)")


def bar_for(M: int, K: int) -> float | None:
    """The PERF.md ratio for this batch and K, or None where the table sets none."""
    ratios = BARS.get(M, BARS[256] if M >= 256 else None)  # issue 7: never worse than 0.9x at M >= 256
    return ratios[K - 2] if ratios and 2 <= K <= 4 else None


def floors(row: Mapping[str, Any], counts: Mapping[str, float] | None, card: Mapping[str, Any]) -> dict[str, Any]:
    """The floors (µs) and verdict of one table row; ``counts`` are its loop's SASS per state and LDS per state
    (None for kinds without a decode loop to count, e.g. decompress + cuBLAS)."""
    m, n, K, M = row["m"], row["n"], row["K"], row["M"]
    states = m * n / TrellisSpec.parse(row["spec"]).V
    if row["kind"] in TILED_KINDS:
        states *= -(-M // int(row.get("config", {}).get("BLOCK_M", M)))
    clock = card["ghz"] * 1e9
    out: dict[str, Any] = {"dram_us": m * n * K / 8 / (card["tbs"] * 1e12) * 1e6}
    if row["kind"] in TILED_KINDS:
        # the same multiply-adds as the fp16 matmul, on the tensor cores at their data-sheet rate
        out["tc_us"] = 2 * m * n * M / (card["tc_tflops"] * 1e12) * 1e6
        if "mma_tflops" in card:  # and at the rate the kind's MMAs reached alone on this card
            out["mma_us"] = 2 * m * n * M / (card["mma_tflops"] * 1e12) * 1e6
    if counts is not None:
        out["issue_us"] = states * counts["per_state"] / 32 / (4 * card["sms"] * clock) * 1e6
        wf = WAVEFRONTS.get(str(row.get("config", {}).get("table", "")), 1.0)
        out["table_us"] = states * counts["lds_per_state"] / 32 * wf / (card["sms"] * clock) * 1e6
    if row["kind"] == "decompress":
        # Ŵ through memory: the same fp16 cuBLAS matmul as the fp16 column (measured in the same run) plus one
        # write of the fp16 Ŵ at the DRAM bandwidth (writes run slower: a lower bound)
        out["what_us"] = row["fp16_us"] + m * n * 2 / (card["tbs"] * 1e12) * 1e6
    named = {k: v for k, v in out.items() if k in ("issue_us", "table_us", "dram_us", "what_us", "tc_us", "mma_us")}
    bound = max(named, key=named.get)
    out["bound"] = {"what_us": "Ŵ round trip", "tc_us": "tensor core", "mma_us": "measured MMA"}.get(bound, bound[:-3])
    out["floor_us"] = named[bound]
    kernel = row["kernel_us"]
    out["of_floor"] = kernel / out["floor_us"]
    bar = bar_for(M, K)
    out["bar"] = bar
    if bar is None:
        out["verdict"] = "no bar at this M"
    elif row["fp16_us"] / kernel >= bar:
        out["verdict"] = "met"
    else:
        bar_us = row["fp16_us"] / bar
        if bar_us < out["floor_us"]:
            out["verdict"] = (f"below the {out['bound']} floor: the bar needs {bar_us:.1f} µs, the floor is "
                              f"{out['floor_us']:.1f} (at most {row['fp16_us'] / out['floor_us']:.2f}x)")
        else:
            out["verdict"] = (f"needs {kernel / bar_us:.2f}x faster ({bar_us:.1f} µs = "
                              f"{bar_us / out['floor_us']:.2f}x the {out['bound']} floor)")
    return out


def loop_counts(row: Mapping[str, Any]) -> dict[str, float] | None:
    """SASS per state and LDS per state of the row's kernel, compiled for sm_90 (None for decompress)."""
    if row["kind"] not in ("gemv", "gemm", "wgmma"):
        return None
    import sass_count

    r = sass_count.count(row["spec"], row["kind"], dict(row["config"]), row["m"], row["n"], row["M"])
    return {"per_state": r["per_state"], "lds_per_state": r["opcodes"].get("LDS", 0) / r["states_per_thread_iter"]}


def rotated_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The row with its rotated times in place of the flushed ones (None when it has none): the floors are the
    same, the measured kernel and fp16 are what layers see in serving (bench/common.py says why)."""
    if "kernel_rot_us" not in row or "fp16_rot_us" not in row:
        return None
    return {**row, "kernel_us": row["kernel_rot_us"], "fp16_us": row["fp16_rot_us"]}


def critical_path(trace: Mapping[str, Any]) -> dict[str, float]:
    """A traced forward [input transform, decode, output transform] (``bench/forward_timeline.py``'s per-position
    medians) split into the decode kernel's work and the rest of the span, which the transforms add."""
    d, g = trace["dur_us"], trace["gap_after_us"]
    if len(d) != 3:
        raise ValueError(f"expected a forward of 3 kernels (input transform, decode, output transform), got {len(d)}")
    start = d[0] + g[0]  # the decode's start, counted from the input transform's
    decode = start + d[1] - max(start, d[0])  # it waits for the input transform before its work
    return {"decode_us": decode, "transforms_us": trace["span_us"] - decode, "span_us": trace["span_us"]}


def forward_floors(row: Mapping[str, Any], counts: Mapping[str, float] | None,
                   card: Mapping[str, Any]) -> dict[str, Any]:
    """The bar against one traced forward (a ``bench/forward_timeline.py`` row): the decode's floors, the
    transforms' measured share and the verdict."""
    cp = critical_path(row["ours"])
    fp16 = row["fp16"]["span_us"]
    spec = row.get("spec") or f"L16K{row['K']}V2-hyb9"  # what forward_timeline's random weights are
    kern = floors({**row, "spec": spec, "kernel_us": cp["decode_us"], "fp16_us": fp16}, counts, card)
    out = {**cp, "fp16_us": fp16, "kernel_floor_us": kern["floor_us"], "bound": kern["bound"],
           "best_us": cp["transforms_us"] + kern["floor_us"], "bar": kern["bar"]}
    bar = kern["bar"]
    if bar is None:
        out["verdict"] = "no bar at this M"
    elif fp16 / cp["span_us"] >= bar:
        out["verdict"] = "met"
    else:
        bar_us = fp16 / bar
        if bar_us < out["best_us"]:
            out["verdict"] = (f"below this structure's floor: the bar needs {bar_us:.1f} µs, transforms "
                              f"{cp['transforms_us']:.1f} + decode {kern['bound']} floor {kern['floor_us']:.1f} = "
                              f"{out['best_us']:.1f} (at most {fp16 / out['best_us']:.2f}x)")
        else:
            need = bar_us - cp["transforms_us"]
            out["verdict"] = (f"needs the decode {cp['decode_us'] / need:.2f}x faster ({need:.1f} µs = "
                              f"{need / kern['floor_us']:.2f}x its {kern['bound']} floor)")
    return out


def forward_table(rows: list[dict[str, Any]], card_name: str, card: Mapping[str, Any]) -> str:
    lines = [f"# Floors under the traced forwards — {card_name}", "",
             "Rotated forwards back to back in one CUDA graph (bench/forward_timeline.py). decode = the decode "
             "kernel's work after the input transform is done; transforms = the rest of the span (both Hadamard "
             "launches on the critical path, as measured); best = transforms + the decode's largest floor "
             f"({card['sms']} SMs at {card['ghz']} GHz, DRAM {card['tbs']} TB/s).", "",
             "| out x in | K | M | span µs | decode µs | transforms µs | decode floor µs | best µs | fp16 µs "
             "| ratio | best ratio | bar | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["forward"]
        bar = f"{f['bar']:.1f}x" if f["bar"] else "—"
        lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | {f['span_us']:.1f} | {f['decode_us']:.1f} "
                     f"| {f['transforms_us']:.1f} | {f['kernel_floor_us']:.1f} ({f['bound']}) | {f['best_us']:.1f} "
                     f"| {f['fp16_us']:.1f} | {f['fp16_us'] / f['span_us']:.2f} | {f['fp16_us'] / f['best_us']:.2f} "
                     f"| {bar} | {f['verdict']} |")
    return "\n".join(lines) + "\n"


def run_timeline(results: Path, card_name: str | None,
                 counter: Callable[[Mapping[str, Any]], dict[str, float] | None]) -> tuple[list[dict[str, Any]], str, str]:
    """Rows of a ``bench/forward_timeline.py`` JSON with their decode counts and forward floors."""
    data = json.loads(results.read_text())
    name = card_name or data.get("env", {}).get("card", "")
    card = CARDS[card_key(name)]
    rows, skipped = [], []
    for r in data.get("rows", []):
        if "error" in r.get("ours", {}) or "error" in r.get("fp16", {"error": 1}):
            continue
        if len(r["ours"].get("dur_us", [])) != 3:  # e.g. decompress + cuBLAS at M >= 256: no decode kernel to floor
            skipped.append(f"{r['m']}x{r['n']} K={r['K']} M={r['M']} ({len(r['ours'].get('dur_us', []))} kernels)")
            continue
        r = {**r, "spec": r.get("spec") or f"L16K{r['K']}V2-hyb9"}
        counts = counter(r)
        rows.append({**r, "counts": counts, "forward": forward_floors(r, counts, card)})
    if not rows:
        raise ValueError(f"{results}: no traced three-kernel forward (bench/forward_timeline.py JSON expected)")
    md = forward_table(rows, name, card)
    if skipped:
        md += "\nNot three-kernel forwards (input transform, decode, output transform), left out: " + ", ".join(skipped) + "\n"
    return rows, name, md


def table(rows: list[dict[str, Any]], card_name: str, card: Mapping[str, Any], rotated: bool = False) -> str:
    timing = ("Times: rotated (back-to-back calls over weight copies > 3x L2, no flush), kernel and fp16 alike. "
              if rotated else "Times: L2 flushed before each call. ")
    lines = [f"# Floors under the kernel table — {card_name}", "",
             timing + f"{card['sms']} SMs at {card['ghz']} GHz, DRAM {card['tbs']} TB/s ({card['tbs_source']}). Kernel alone "
             "(decode-matmul, no transforms); floors are lower bounds: issue = loop SASS per state, table = "
             "shared-memory wavefronts of the code-table reads, DRAM = packed weights, Ŵ round trip (decompress + "
             "cuBLAS only) = the fp16 matmul of the same run + one write of the fp16 Ŵ at the DRAM bandwidth, tensor "
             f"core (wgmma only) = the matmul's multiply-adds at {card['tc_tflops']:g} dense fp16 TFLOP/s (data "
             "sheet); wgmma decodes each weight once per BLOCK_M tokens, and its issue floor counts every decode. "
             + (f"Measured MMA (wgmma only) = the same multiply-adds at {card['mma_tflops']:g} TFLOP/s, the rate the "
                f"kind's MMAs reached alone on this card ({card['mma_source']}; cuBLAS's fp16 matmul runs about as "
                "fast): not a hardware bound, the rate this MMA structure sustains. " if "mma_tflops" in card else "")
             + "`x floor` = measured / largest floor.", "",
             "| out x in | K | M | kind | SASS/state | µs | fp16 µs | ratio | issue µs | table µs | DRAM µs "
             "| Ŵ round trip µs | tensor core µs | measured MMA µs | x floor | bar | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["floors"]
        per = f"{r['counts']['per_state']:.1f}" if r.get("counts") else "—"

        def us(key: str, f=f) -> str:
            return f"{f[key]:.1f}" if key in f else "—"
        bar = f"{f['bar']:.1f}x" if f["bar"] else "—"
        lines.append(f"| {r['m']}x{r['n']} | {r['K']} | {r['M']} | {r['kind']} | {per} | {r['kernel_us']:.1f} "
                     f"| {r['fp16_us']:.1f} | {r['fp16_us'] / r['kernel_us']:.2f} | {us('issue_us')} | {us('table_us')} "
                     f"| {us('dram_us')} | {us('what_us')} | {us('tc_us')} | {us('mma_us')} | {f['of_floor']:.1f} | {bar} "
                     f"| {f['verdict']} |")
    return "\n".join(lines) + "\n"


def run(results: Path, card_name: str | None, counter: Callable[[Mapping[str, Any]], dict[str, float] | None],
        progress: bool = True, rotated: bool = False) -> tuple[list[dict[str, Any]], str, str]:
    """Rows of ``results`` with their counts and floors, the card's name and the markdown table (``rotated``: the
    rows' rotated times, rows without them left out)."""
    data = json.loads(results.read_text())
    name = card_name or data.get("env", {}).get("card", "")
    card = CARDS[card_key(name)]
    rows, cache = [], {}
    todo = [r for r in data["rows"] if "kernel_us" in r]
    if rotated:
        todo = [r for r in map(rotated_row, todo) if r is not None]
        if not todo:
            raise ValueError(f"{results}: no row has rotated times (bench/kernels.py --rotate)")
    for i, r in enumerate(todo):
        key = json.dumps([r["spec"], r["kind"], r["config"], r["m"], r["n"], r["M"]], sort_keys=True)
        if key not in cache:
            if progress:
                print(f"[{i + 1}/{len(todo)}] compiling {r['spec']} {r['kind']} {r['m']}x{r['n']} M={r['M']}",
                      file=sys.stderr, flush=True)
            cache[key] = counter(r)
        rows.append({**r, "counts": cache[key], "floors": floors(r, cache[key], card)})
    return rows, name, table(rows, name, card, rotated)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True, help="a bench/kernels.py JSON")
    ap.add_argument("--card", default=None, help=f"card figures to use ({', '.join(CARDS)}; default: the results' card)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write <results stem>-floors.{json,md} into this folder (default: print the table)")
    ap.add_argument("--rotated", action="store_true",
                    help="measure the cells by their rotated times (bench/kernels.py --rotate) instead of the flushed")
    ap.add_argument("--timeline", action="store_true",
                    help="--results is a bench/forward_timeline.py JSON: the bar against the whole traced forward")
    a = ap.parse_args(argv)
    if not a.results.is_file():
        ap.error(f"--results {a.results}: no such file")
    if a.timeline and a.rotated:
        ap.error("--timeline forwards are rotated already: no --rotated")
    try:
        if a.timeline:
            rows, name, md = run_timeline(a.results, a.card, loop_counts)
        else:
            rows, name, md = run(a.results, a.card, loop_counts, rotated=a.rotated)
    except ValueError as e:
        ap.error(str(e))
    if a.out is None:
        print(md)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.results.stem + ("-forward-floors" if a.timeline else "-floors-rotated" if a.rotated else "-floors")
    (a.out / f"{stem}.json").write_text(json.dumps({"card": name, "card_figures": CARDS[card_key(name)],
                                                    "rows": rows}, indent=1))
    (a.out / f"{stem}.md").write_text(md)
    print(f"wrote {a.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
