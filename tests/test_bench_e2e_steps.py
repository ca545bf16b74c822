"""bench/e2e_vllm.py's decode-step scoring (no vLLM needed): a stalled short run must not make a batch look
faster, and a saved report can be scored again from the runs it kept."""

from __future__ import annotations

import json

import pytest

from tests.bench_scripts import load_script


@pytest.fixture(scope="module")
def e2e():
    return load_script("e2e_vllm")


def test_stalled_short_run_does_not_shorten_the_step(e2e):
    steady = [{"short_s": 0.20, "long_s": 1.90}, {"short_s": 0.17, "long_s": 1.88}]
    stalled = steady + [{"short_s": 0.75, "long_s": 1.96}]  # a JIT in the short run of one rep
    want = (1.88 - 0.17) / 256
    assert e2e.decode_step_s(steady, 256) == pytest.approx(want)
    assert e2e.decode_step_s(stalled, 256) == pytest.approx(want)
    # the best of each rep's own difference would have picked the stalled rep
    assert min((r["long_s"] - r["short_s"]) / 256 for r in stalled) < 0.75 * want


def test_bad_runs_are_refused(e2e):
    with pytest.raises(ValueError, match="no runs"):
        e2e.decode_step_s([], 256)
    with pytest.raises(ValueError, match="not slower"):
        e2e.decode_step_s([{"short_s": 1.0, "long_s": 0.9}], 256)


def test_rescore_rewrites_cells_from_runs(e2e, tmp_path):
    settings = dict(batches=[1, 16], eager=False, attn="TRITON_ATTN", prompt_len=128, short=16, decode_tokens=256,
                    reps=2)
    runs16 = [{"short_s": 0.2, "long_s": 1.9}, {"short_s": 0.75, "long_s": 1.95}]
    results = [{"shape": "llama2-7b", "format": fmt, "init_s": 1.0,
                "b1": e2e.step_cell([{"short_s": 0.1, "long_s": 1.6 * scale}], 1, 256),
                "b16": {"ms_per_step": 4.688, "tok_s_per_seq": 1.0, "tok_s_total": 1.0, "runs": runs16}}
               for fmt, scale in (("fp16", 1.0), ("2", 0.7))]
    src = tmp_path / "e2e_vllm-h100-2026-12-05.json"
    src.write_text(json.dumps({"environment": {"date": "2026-12-05", "card": "H100"}, "settings": settings,
                               "results": results, "skipped": []}))
    before = e2e.markdown(results, {"date": "2026-12-05", "card": "H100"},
                          e2e.argparse.Namespace(**settings, skipped=[]))
    assert "**Suspect:**" in before  # 4.688 ms at batch 16 against batch 1's 5.859
    out = e2e.rescore(src)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["results"][0]["b16"]["ms_per_step"] == pytest.approx((1.9 - 0.2) / 256 * 1e3, abs=1e-3)
    md = out.with_suffix(".md").read_text()
    assert "Rescored from the saved runs" in md and "**Suspect:**" not in md
    assert f"| {(1.9 - 0.2) / 256 * 1e3:.3f} |" in md


def test_unsteady_and_single_run_cells_are_named(e2e):
    """A cell whose long runs differ by more than 15 % (a stall in some of them) is listed, and a report of one run
    per cell says it cannot be checked; steady cells of several runs add neither note."""
    steady = [{"short_s": 0.26, "long_s": 1.15}, {"short_s": 0.47, "long_s": 1.18}]
    stalled = [{"short_s": 0.26, "long_s": 1.15}, {"short_s": 0.30, "long_s": 1.81}]
    results = [{"shape": "llama2-7b", "format": "2", "init_s": 1.0, "b16": e2e.step_cell(steady, 16, 128),
                "b64": e2e.step_cell(stalled, 64, 128)}]
    assert e2e.unsteady_cells(results, [16, 64]) == ["llama2-7b QTIP K=2 batch 64: long runs 1.15-1.81 s"]
    settings = dict(batches=[16, 64], eager=False, attn="TRITON_ATTN", prompt_len=128, short=16, decode_tokens=128,
                    skipped=[])
    md = e2e.markdown(results, {"date": "2026-12-06", "card": "H100"}, e2e.argparse.Namespace(**settings, reps=2))
    assert "**Unsteady:** llama2-7b QTIP K=2 batch 64" in md and "**One run per cell:**" not in md
    results[0]["b64"] = e2e.step_cell(steady, 64, 128)
    md = e2e.markdown(results, {"date": "2026-12-06", "card": "H100"}, e2e.argparse.Namespace(**settings, reps=2))
    assert "**Unsteady:**" not in md and "**One run per cell:**" not in md
    one = [{"shape": "llama2-7b", "format": "2", "init_s": 1.0, "b16": e2e.step_cell(steady[:1], 16, 128)}]
    md = e2e.markdown(one, {"date": "2026-12-06", "card": "H100"},
                      e2e.argparse.Namespace(**{**settings, "batches": [16]}, reps=1))
    assert "**One run per cell:**" in md and "128-step cell" in md
