"""bench/floors.py: the floors under a kernel table's cells and the verdict against the PERF.md bars, on
made-up rows and counts (the arithmetic and the three verdicts), and once through the real sm_90 compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.bench_scripts import load_script

floors = load_script("floors")
H200 = floors.CARDS["h200"]


def _row(**kw) -> dict:
    row = {"m": 8192, "n": 8192, "spec": "L16K2V2-hyb9", "K": 2, "M": 1, "kind": "gemv",
           "config": {"table": "shared16"}, "kernel_us": 20.0, "fp16_us": 50.0}
    return {**row, **kw}


def test_floors_are_the_instruction_table_and_byte_bounds():
    f = floors.floors(_row(), {"per_state": 10.0, "lds_per_state": 1.0}, H200)
    states = 8192 * 8192 / 2
    clock = 1.98e9
    assert f["issue_us"] == pytest.approx(states * 10 / 32 / (4 * 132 * clock) * 1e6)
    assert f["table_us"] == pytest.approx(states * 1.0 / 32 * 2.0 / (132 * clock) * 1e6)  # 16 copies: 2 wavefronts
    assert f["dram_us"] == pytest.approx(8192 * 8192 * 2 / 8 / 4.8e12 * 1e6)
    assert f["bound"] == "issue" and f["floor_us"] == f["issue_us"] and f["of_floor"] == pytest.approx(20 / f["issue_us"])
    one_copy = floors.floors(_row(config={"table": "shared"}), {"per_state": 10.0, "lds_per_state": 1.0}, H200)
    assert one_copy["table_us"] == pytest.approx(f["table_us"] * 3.34 / 2.0) and one_copy["bound"] == "table"
    dec = floors.floors(_row(kind="decompress", M=256, kernel_us=100.0), None, H200)  # cuBLAS: bytes only
    assert "issue_us" not in dec and "what_us" not in f
    assert dec["what_us"] == pytest.approx(50.0 + 8192 * 8192 * 2 / 4.8e12 * 1e6)  # fp16's matmul + writing Ŵ
    assert dec["bound"] == "Ŵ round trip" and dec["floor_us"] == dec["what_us"]
    assert dec["verdict"].startswith("below the Ŵ round trip floor: the bar needs 55.6 µs")  # 50 / 0.9


def test_the_verdict_sets_the_bar_against_the_largest_floor():
    counts = {"per_state": 10.0, "lds_per_state": 1.0}  # issue floor ~10.0 µs at 8192^2
    assert floors.floors(_row(kernel_us=12.0), counts, H200)["verdict"] == "met"  # 50 / 12 >= 4.0
    reachable = floors.floors(_row(kernel_us=20.0), counts, H200)["verdict"]  # bar 12.5 µs, above the floor
    assert reachable.startswith("needs 1.60x faster (12.5 µs") and "issue floor" in reachable
    below = floors.floors(_row(fp16_us=30.0), counts, H200)["verdict"]  # bar 7.5 µs, under the floor
    assert below.startswith("below the issue floor: the bar needs 7.5 µs")
    assert floors.floors(_row(M=2), counts, H200)["verdict"] == "no bar at this M"
    assert [floors.bar_for(16, k) for k in (2, 3, 4)] == [2.5, 2.2, 2.0] and floors.bar_for(8, 2) is None
    assert floors.bar_for(512, 3) == floors.bar_for(4096, 2) == 0.9 and floors.bar_for(128, 2) is None


def test_wgmma_cells_count_a_decode_per_token_tile_and_the_tensor_cores():
    """The wgmma kind decodes each weight once per BLOCK_M tokens (issue and table floors x ceil(M / BLOCK_M)) and
    runs the matmul's multiply-adds on the tensor cores: that floor is 2 m n M flops at the data-sheet rate."""
    counts = {"per_state": 12.0, "lds_per_state": 1.0}
    H100 = {k: v for k, v in floors.CARDS["h100"].items() if k != "mma_tflops"}  # the data-sheet floor alone
    one = floors.floors(_row(kind="wgmma", M=256, config={"BLOCK_M": 256}, kernel_us=72.5, fp16_us=65.2), counts, H100)
    two = floors.floors(_row(kind="wgmma", M=512, config={"BLOCK_M": 256}, kernel_us=115.4, fp16_us=97.7), counts, H100)
    assert two["issue_us"] == pytest.approx(2 * one["issue_us"]) and two["table_us"] == pytest.approx(2 * one["table_us"])
    assert one["tc_us"] == pytest.approx(2 * 8192 * 8192 * 256 / 989e12 * 1e6) and two["bound"] == "tensor core"
    assert one["verdict"].startswith("needs 1.00x faster (72.4 µs")  # 65.2 / 72.5 = 0.899, just under 0.9
    assert floors.floors(_row(kind="wgmma", M=256, config={"BLOCK_M": 256}, kernel_us=72.0, fp16_us=65.2), counts,
                         H100)["verdict"] == "met"
    assert two["verdict"].startswith("needs 1.06x faster (108.6 µs") and "tensor core floor" in two["verdict"]
    gemv = floors.floors(_row(M=256, kernel_us=72.5, fp16_us=65.2), counts, H100)
    assert "tc_us" not in gemv  # other kinds: their floors as before


def test_unknown_cards_are_a_clear_error():
    assert floors.card_key("NVIDIA H100 80GB HBM3") == "h100"
    with pytest.raises(ValueError, match="no floor figures for card 'Tesla T4'"):
        floors.card_key("Tesla T4")


def test_a_table_counts_each_kernel_once(tmp_path):
    rows = [_row(), _row(), _row(M=16, kernel_us=40.0)]
    res = tmp_path / "h200-kernels.json"
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"}, "rows": rows + [{"m": 1, "status": "error"}]}))
    seen = []

    def counter(r):
        seen.append(r["M"])
        return {"per_state": 8.0, "lds_per_state": 1.0}
    out, card, md = floors.run(res, None, counter, progress=False)
    assert seen == [1, 16] and card == "NVIDIA H200" and len(out) == 3
    assert md.count("\n| 8192x8192 |") == 3 and "4.8 TB/s (data sheet)" in md


def test_rotated_times_replace_the_flushed_ones(tmp_path):
    rows = [_row(kernel_rot_us=15.0, fp16_rot_us=48.0), _row(M=16)]  # the second was not timed rotated
    res = tmp_path / "h200-kernels.json"
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"}, "rows": rows}))
    counts = {"per_state": 8.0, "lds_per_state": 1.0}
    out, _, md = floors.run(res, None, lambda r: counts, progress=False, rotated=True)
    assert len(out) == 1 and out[0]["kernel_us"] == 15.0 and out[0]["fp16_us"] == 48.0
    assert out[0]["floors"]["of_floor"] == pytest.approx(15.0 / out[0]["floors"]["floor_us"])
    assert md.count("\n| 8192x8192 |") == 1 and "Times: rotated" in md and "| 15.0 | 48.0 | 3.20 |" in md
    flushed = floors.run(res, None, lambda r: counts, progress=False)[2]
    assert "Times: L2 flushed" in flushed and flushed.count("\n| 8192x8192 |") == 2
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"}, "rows": [_row()]}))
    with pytest.raises(ValueError, match="no row has rotated times"):
        floors.run(res, None, lambda r: counts, progress=False, rotated=True)


def _traced(M: int = 1, ours=((7.0, 20.0, 18.0), (-4.0, -16.0, -2.0), 24.0), fp16_span: float = 45.0) -> dict:
    """A forward_timeline row: per-position durations and gaps of [input transform, decode, output transform]."""
    (d, g, span) = ours
    return {"m": 8192, "n": 8192, "spec": "L16K2V2-hyb9", "K": 2, "M": M, "kind": "gemv",
            "config": {"table": "shared16"}, "ours": {"dur_us": list(d), "gap_after_us": list(g), "span_us": span},
            "fp16": {"dur_us": [fp16_span - 0.3], "gap_after_us": [0.3], "span_us": fp16_span}}


def test_the_critical_path_splits_a_forward_into_decode_and_transforms():
    # PDL early: the decode starts 3 µs into the 7 µs input transform and ends at 23; its work is 23 - 7 = 16
    cp = floors.critical_path(_traced()["ours"])
    assert cp["decode_us"] == pytest.approx(16.0) and cp["transforms_us"] == pytest.approx(8.0)
    # serial (exit): the decode starts after the input transform, all of its duration is work
    serial = floors.critical_path({"dur_us": [7.0, 26.0, 6.5], "gap_after_us": [0.2, 0.2, 0.2], "span_us": 40.3})
    assert serial["decode_us"] == pytest.approx(26.0) and serial["transforms_us"] == pytest.approx(14.3)
    with pytest.raises(ValueError, match="3 kernels"):
        floors.critical_path({"dur_us": [1.0, 2.0], "gap_after_us": [0.0, 0.0], "span_us": 3.0})


def test_the_forward_verdict_counts_the_transforms():
    counts = {"per_state": 10.0, "lds_per_state": 1.0}  # issue floor ~10.0 µs at 8192^2 on the H200 figures
    below = floors.forward_floors(_traced(), counts, H200)  # bar 45 / 4 = 11.25 µs < 8 + 10.0
    assert below["best_us"] == pytest.approx(8.0 + below["kernel_floor_us"])
    assert below["verdict"].startswith("below this structure's floor: the bar needs 11.2 µs, transforms 8.0")
    fast = _traced(ours=((3.0, 9.0, 3.0), (-1.0, -1.0, -1.0), 11.0), fp16_span=60.0)  # decode 9 - 1 = 8 µs
    assert floors.forward_floors(fast, counts, H200)["verdict"] == "met"  # 60 / 11 >= 4.0
    reachable = floors.forward_floors(_traced(fp16_span=90.0), counts, H200)["verdict"]  # bar 22.5: decode 14.5
    assert reachable.startswith("needs the decode 1.10x faster (14.5 µs")
    assert floors.forward_floors(_traced(M=8), counts, H200)["verdict"] == "no bar at this M"


def test_a_timeline_file_gets_a_forward_table(tmp_path):
    res = tmp_path / "h200-timeline.json"
    prefill = _traced(M=256, ours=((9.0, 60.0, 1.5, 9.0), (0.2, 0.2, 0.2, 0.2), 80.0))  # decompress + cuBLAS
    rows = [_traced(), _traced(M=16), {**_traced(), "ours": {"error": "not a whole number per forward"}}, prefill]
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"}, "rows": rows}))
    out, card, md = floors.run_timeline(res, None, lambda r: {"per_state": 8.0, "lds_per_state": 1.0})
    assert len(out) == 2 and card == "NVIDIA H200" and md.count("\n| 8192x8192 |") == 2
    assert "left out: 8192x8192 K=2 M=256 (4 kernels)" in md
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"}, "rows": rows[2:]}))
    with pytest.raises(ValueError, match="no traced three-kernel forward"):
        floors.run_timeline(res, None, lambda r: None)


BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="the Triton wheel has no NVIDIA tools")
def test_the_script_compiles_the_rows_kernels(tmp_path):
    """End to end on one small row: its gemv compiled for sm_90 (bench/sass_count.py), floors written."""
    res = tmp_path / "h200-2026-11-30.json"
    cfg = {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4, "table": "shared16"}
    res.write_text(json.dumps({"env": {"card": "NVIDIA H200"},
                               "rows": [_row(m=1024, n=1024, config=cfg, kernel_us=5.0, fp16_us=6.0)]}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "bench" / "floors.py"
    out = subprocess.run([sys.executable, str(script), "--results", str(res), "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "h200-2026-11-30-floors.json").read_text())["rows"][0]
    assert 5 < got["counts"]["per_state"] < 20 and got["counts"]["lds_per_state"] == pytest.approx(1.0, abs=0.1)
    assert got["floors"]["bound"] in ("issue", "table") and "needs" in got["floors"]["verdict"]


def test_wgmma_cells_have_the_measured_mma_rate_as_a_floor_where_the_card_has_it():
    """Where the card has a measured MMA rate (the kind's MMAs alone), it is a floor of its own, above the data-sheet
    one: at 8192^2 M = 512 the 0.9x bar's time (fp16 96.5 µs / 0.9 = 107.2) sits 1.15x above it (93.2 µs)."""
    counts = {"per_state": 9.4, "lds_per_state": 1.0}
    H100 = floors.CARDS["h100"]
    f = floors.floors(_row(kind="wgmma", M=512, config={"BLOCK_M": 256}, kernel_us=108.6, fp16_us=96.5), counts, H100)
    assert f["mma_us"] == pytest.approx(2 * 8192 * 8192 * 512 / (H100["mma_tflops"] * 1e12) * 1e6)
    assert f["mma_us"] > f["tc_us"] and f["bound"] == "measured MMA" and f["floor_us"] == f["mma_us"]
    assert f["verdict"].startswith("needs 1.01x faster (107.2 µs") and "measured MMA floor" in f["verdict"]
    assert "mma_us" not in floors.floors(_row(kind="wgmma", M=512, config={"BLOCK_M": 256}), counts, H200)
    assert "mma_us" not in floors.floors(_row(M=512), counts, H100)  # other kinds: none
    md = floors.table([{**_row(kind="wgmma", M=512, config={"BLOCK_M": 256}, kernel_us=108.6, fp16_us=96.5),
                        "floors": f, "counts": counts}], "NVIDIA H100 80GB HBM3", H100)
    assert "measured MMA µs" in md and "737 TFLOP/s" in md and f"| {f['mma_us']:.1f} |" in md
