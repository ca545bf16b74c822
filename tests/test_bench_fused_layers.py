"""bench/fused_layers.py --timeline: traced kernel records -> one layer forward's kernels, durations and gaps, as a
table with their sums (the tracing itself needs a GPU)."""

from __future__ import annotations

from tests.bench_scripts import load_script

fl = load_script("fused_layers")
ft = load_script("forward_timeline")


def _records(calls: int, replays: int, durs: list[float], gaps: list[float]) -> list[dict]:
    recs, ts = [], 0.0
    names = [f"k{j}" for j in range(len(durs))]
    for _ in range(replays):
        for _ in range(calls):
            for name, d, g in zip(names, durs, gaps, strict=True):
                recs.append({"name": name, "ts": ts, "dur": d})
                ts += d + g
        ts += 100.0  # between replays: the graph launch
    return recs


def test_timeline_table_lists_each_kernel_and_the_sums():
    durs, gaps = [10.0, 2.5, 30.0], [1.0, -0.5, 4.0]
    stats = ft.sequence_stats(_records(6, 3, durs, gaps), 6, 3)
    assert stats["kernels"] == ["k0", "k1", "k2"] and stats["dur_us"] == durs and stats["gap_after_us"] == gaps
    assert stats["span_us"] == sum(durs) + sum(gaps)
    fp16 = ft.sequence_stats(_records(6, 3, [20.0], [2.0]), 6, 3)
    lines = fl.timeline_markdown({"M": 64, "calls": 6, "replays": 3, "ours": stats, "fp16": fp16})
    text = "\n".join(lines)
    assert "M = 64" in text and "| ours | 1 | `k1` | 2.50 | -0.50 |" in text
    assert "| ours | sum | 3 kernels | 42.5 | 4.5 (span 47.0) |" in text
    assert "| fp16 | sum | 1 kernel | 20.0 | 2.0 (span 22.0) |" in text


def test_timeline_table_shows_a_trace_that_does_not_split_into_forwards():
    bad = ft.sequence_stats(_records(6, 3, [1.0, 2.0], [0.0, 0.0])[:-1], 6, 3)
    lines = fl.timeline_markdown({"M": 8, "calls": 6, "replays": 3, "ours": bad, "fp16": bad})
    assert any("not a whole number per forward" in line for line in lines)
