"""bench/plot_kernels.py: the kernel benchmark's plot and summary from a result JSON (CPU, synthetic rows)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import plot_kernels  # noqa: E402


def payload():
    rows = []
    for K in (2, 4):
        for M in (1, 16, 256):
            rows.append({"m": 256, "n": 512, "K": K, "M": M, "kind": "gemv", "kernel_us": 10.0 * K + M,
                         "linear_us": 12.0 * K + M, "fp16_us": 30.0 + M})
    rows.append({"m": 256, "n": 512, "K": 2, "M": 64, "kind": "?", "error": "boom", "kernel_us": float("nan"),
                 "fp16_us": float("nan")})
    return {"env": {"card": "test card", "triton": "x"}, "rows": rows}


def test_plot_and_summary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload()))
    assert plot_kernels.main([str(path)]) == 0
    png = tmp_path / "r.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "r-summary.md").read_text()
    # K=2 at M=1: fp16 31 / forward 25 = 1.24; best at M=1 too; floor = 256*512*2/8 B at 3 TB/s
    assert "| 256x512 | 2 | 1.24 | 1.24 (1) |" in md
    floor = plot_kernels.floor_us(256, 512, 2, 3.0e12)
    assert f"{25 / floor:.1f}x" in md
    assert "| 256x512 | 4 |" in md


def test_rejects_foreign_json(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"something": 1}))
    assert plot_kernels.main([str(path)]) == 2
    assert "is not a bench/kernels.py result" in capsys.readouterr().err


def test_large_m_floors(tmp_path):
    """The large-batch table: fp16 time against the transform and Ŵ round-trip floors (M >= 256 rows only)."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload()))
    assert plot_kernels.main([str(path)]) == 0
    md = (tmp_path / "r-summary.md").read_text()
    assert "## Large batches" in md
    # M=256, 256x512, K=2: fp16 286, transforms 256*(512+256)*4 B, round trip 2*256*512*2 B, at 3 TB/s
    tf, rt = 256 * 768 * 4 / 3e12 * 1e6, 2 * 256 * 512 * 2 / 3e12 * 1e6
    assert f"| 256x512 | 2 | 256 | 286.0 | 280.0 | 4.0 | {tf:.1f} | {rt:.1f} | {286 / (286 + tf + rt):.2f} |" in md
    assert "| 256x512 | 2 | 16 |" not in md.split("## Large batches")[1]
