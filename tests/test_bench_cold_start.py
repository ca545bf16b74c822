"""bench/cold_start.py on the CPU: arguments, the cut tuned file, the report (synthetic numbers), the process
plumbing (time-out, dry run, a tiny run in the Triton interpreter). No timing is checked: that is the GPU run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cold_start as cs  # noqa: E402

from qtip_triton import kernels  # noqa: E402
from qtip_triton.autotune import store  # noqa: E402


def test_defaults_are_the_llama2_7b_layers_and_shipped_file():
    a = cs.parse_args([])
    assert a.specs == ["L16K2V2-hyb9", "L16K3V2-hyb9", "L16K4V2-hyb9"] and a.cold_specs == ["L16K2V2-hyb9"]
    assert [(x["layer"], x["out"], x["in"]) for x in cs.layer_list(a, a.cold_specs)] == [
        ("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
    assert len(cs.layer_list(a, a.specs)) == 12
    assert a.max_m == 256 and cs.buckets(a.max_m) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert a.phases == ["precompiled", "cold"]  # the precompiled phase first, the time-boxed JIT phase last
    assert a.file == cs.ROOT / "autotune_configs" / "h200.yaml" and a.out == cs.ROOT / "bench" / "results"
    assert a.budget_s + 10 <= 240 and a.cold_budget_s < a.budget_s  # ~4 minutes on the device
    tiny = cs.parse_args(["--tiny"])
    assert tiny.model == "tiny" and tiny.max_m == 4 and tiny.phases == ["cold"]
    assert cs.parse_args(["--tiny", "--max-m", "2"]).max_m == 2
    assert cs.parse_args(["--specs", "L16K3V2-hyb9", "--layers", "o,down", "--max-m", "100"]).max_m == 100


@pytest.mark.parametrize("argv", [["--layers", "o,lm_head"], ["--specs", "L99K2V2-hyb9"], ["--phases", "warm"],
                                  ["--cold-specs", "nonsense"], ["--max-m", "0"]])
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        cs.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_cut_tune_file_keeps_the_benchmarked_layers(tmp_path):
    a = cs.parse_args([])
    layers = cs.layer_list(a, a.specs)
    wanted = {(x["spec"], x["out"], x["in"]) for x in layers}
    shipped = [k for k in store.load(a.file).entries if (k.spec, k.out_features, k.in_features) in wanted]
    assert len(wanted) == 12 and len(shipped) >= 12  # every benchmarked layer has entries in the shipped file
    assert cs.cut_tune_file(a.file, tmp_path / "t.yaml", layers) == len(shipped)
    tf = store.load(tmp_path / "t.yaml")
    assert {(k.spec, k.out_features, k.in_features) for k in tf.entries} == {(x["spec"], x["out"], x["in"]) for x in layers}
    assert tf.header == store.load(a.file).header  # same GPU and versions: precompile and the registry agree


def test_sources_are_classified():
    assert cs.short_source("user cache /x/h100.yaml (M<=16)") == "user cache M<=16"
    assert cs.short_source("shipped h100.yaml (same family) (M<=4)") == "shipped M<=4"
    assert cs.short_source("heuristic default") == "heuristic"
    assert cs.source_class("shipped h100.yaml (M<=4)", "gemm") == "shipped"
    assert cs.source_class("heuristic default", "reference") == "reference"


def layer(spec, name, prep, fwd, jit=(0, 0), sources=None, plan=None):
    out, inn = cs.MODELS["llama2-7b"][name]
    return {"spec": spec, "layer": name, "out": out, "in": inn, "prepare_s": prep, "forward_s": fwd,
            "new_files_prepare": jit[0], "new_files_forward": jit[1], "sources": sources or {"shipped": 9},
            "plan": plan or {"1": ["gemv", "shipped M<=1"]}}


def synthetic_report():
    a = cs.parse_args([])
    pre = {"phase": "precompiled", "rc": 0, "timed_out": False, "timeout_s": 90, "process_s": 14.2, "done": {},
           "start": {"import_s": 3.1, "autotune_files": ["shipped h100.yaml"]}, "layers_planned": 12,
           "layers": [layer("L16K2V2-hyb9", "qkv", 0.5, 0.01), layer("L16K2V2-hyb9", "o", 0.3, 0.01),
                      layer("L16K4V2-hyb9", "o", 2.5, 0.01, jit=(6, 0), sources={"heuristic": 1, "shipped": 8},
                            plan={"1": ["gemv", "shipped M<=1"], "2": ["gemv", "shipped M<=1"], "4": ["gemm", "heuristic"]})]}
    cold = {"phase": "cold", "rc": -9, "timed_out": True, "timeout_s": 120, "process_s": 120.0, "done": None,
            "start": {"import_s": 3.0}, "layers_planned": 4,
            "layers": [layer("L16K2V2-hyb9", "qkv", 40.0, 0.02, jit=(41, 0)), layer("L16K2V2-hyb9", "o", 30.0, 0.5, jit=(30, 2)),
                       {"spec": "L16K2V2-hyb9", "layer": "gate_up", "out": 22016, "in": 4096, "error": "RuntimeError: boom"}]}
    report = {"environment": {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-28 07:00", "torch": "2.11", "triton": "3.6"},
              "settings": {"model": a.model, "layers": a.layers, "max_m": 256, "buckets": cs.buckets(256)},
              "setup": {"file": "autotune_configs/h100.yaml", "entries": 48,
                        "steps": {"precompile": {"rc": 0, "seconds": 31.0, "what": "precompiled 70 kernel variants"},
                                  "export": {"rc": 0, "seconds": 2.0, "what": "exported 900 files"},
                                  "import": {"rc": 0, "seconds": 1.5, "what": "imported 900 new files"}}},
              "phases": {"precompiled": pre, "cold": cold}}
    for ph in report["phases"].values():
        ph["summary"] = cs.summarize(ph)
    return report


def test_summary_table_and_markdown(tmp_path):
    report = synthetic_report()
    pre, cold = report["phases"]["precompiled"]["summary"], report["phases"]["cold"]["summary"]
    assert pre["status"] == "ok" and pre["jit"] and pre["new_cache_files_prepare"] == 6
    assert pre["prepare_and_forward_s"] == pytest.approx(3.33)
    assert cold["status"] == "time box 120 s reached after 3/4 layers" and cold["layers"] == 2
    assert cold["new_cache_files_prepare"] == 71 and cold["new_cache_files_forward"] == 2
    text = cs.format_table(cs.TOTAL_HEAD, cs.total_rows(report))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["phase", "layers"] and set(lines[1]) == {"-", " "}
    assert any(x.startswith("precompiled") and "6 + 0" in x and "yes" in x for x in lines)
    md = cs.markdown(report)
    assert md.startswith("# Cold start — NVIDIA H100 80GB HBM3 — 2026-11-28 07:00")
    assert "| cold | 2 | 70.52 | 120.0 | 71 + 2 | yes | time box 120 s reached after 3/4 layers |" in md
    assert "| precompiled | L16K4V2-hyb9 | o | 4096x4096 | 2.50 | 0.010 | 6 / 0 | heuristic 1, shipped 8 |" in md
    assert "| cold | L16K2V2-hyb9 | gate_up | 22016x4096 | - | - | - | error: RuntimeError: boom |" in md
    assert "precompile 31.0 s (precompiled 70 kernel variants); export 2.0 s" in md
    assert "JIT despite the cache in L16K4V2-hyb9 o: buckets served by another bucket's entry or the heuristic: " \
           "2: gemv shipped M<=1; 4: gemm heuristic." in md
    assert "Autotune files the registry read: shipped h100.yaml." in md
    # the comparison covers only layers both phases finished: K2 qkv and o
    assert "Same 2 layers (L16K2V2-hyb9 o, L16K2V2-hyb9 qkv): cold JIT 70.5 s vs precompiled cache 0.82 s (86.0x)." in md
    stem = cs.out_stem(tmp_path / "res", "h100-80gb-hbm3", "2026-11-28")
    cs.write_report(report, stem)
    assert stem.name == "cold-start-h100-80gb-hbm3-2026-11-28"
    assert json.loads(stem.with_suffix(".json").read_text())["phases"]["cold"]["summary"]["layers"] == 2
    assert stem.with_suffix(".md").read_text() == md


def test_run_cmd_kills_the_process_group_at_its_time_out(tmp_path):
    res = cs.run_cmd([sys.executable, "-c", "import subprocess, sys, time; print('hi', flush=True); "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                     dict(cs.os.environ), 2.0, tmp_path / "log")
    assert res["timed_out"] and res["rc"] != 0 and res["seconds"] < 20 and "hi" in res["tail"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert cs.main(["--dry-run", "--out", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+ entries of", out) and "qtip_triton.cli precompile --file <work>/tuned.yaml" in out
    assert "cli export <work>/cache.tar.gz" in out and "cli import <work>/cache.tar.gz --cache-dir <work>/precompiled-triton" in out
    assert "--child cold" in out and "time box 120 s" in out
    assert not (tmp_path / "res").exists()


@pytest.mark.skipif(not kernels.kernels_available("cpu")[0], reason="needs TRITON_INTERPRET=1 (make test sets it)")
def test_tiny_run_in_the_interpreter(tmp_path, capsys):
    """The whole plumbing: a fresh child process, its JSON lines, the report files (CPU, cold phase only)."""
    assert cs.main(["--tiny", "--layers", "o,down", "--max-m", "2", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("cold-start-cpu-interpreter-*.json")
    report = json.loads(js.read_text())
    cold = report["phases"]["cold"]
    assert list(report["phases"]) == ["cold"] and cold["summary"]["status"] == "ok"
    assert [(x["layer"], sorted(x["plan"])) for x in cold["layers"]] == [("o", ["1", "2"]), ("down", ["1", "2"])]
    assert all(x["new_files_prepare"] == 0 and x["prepare_s"] >= 0 for x in cold["layers"])  # the interpreter compiles nothing
    assert js.with_suffix(".md").is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.skipif(not kernels.kernels_available("cpu")[0], reason="needs TRITON_INTERPRET=1 (make test sets it)")
def test_precompiled_phase_plumbing(tmp_path, monkeypatch):
    """Setup steps (stand-ins for precompile / export / import, which need a GPU), then the fresh process."""
    a = cs.parse_args(["--tiny", "--layers", "o", "--max-m", "1", "--specs", "L16K3V2-hyb9"])
    said = {"precompile": "precompiled 3 kernel variants x 1 dtypes", "export": "exported 7 files from x",
            "import": "imported 7 new files into y"}
    monkeypatch.setattr(cs, "setup_commands", lambda a, work: [(k, [sys.executable, "-c", f"print('{v}')"])
                                                               for k, v in said.items()])
    report = {}
    ph = cs.precompiled_phase(a, tmp_path, report, lambda: 200.0)
    assert report["setup"]["entries"] == 0  # the tiny shapes are not in h200.yaml
    assert [s["what"] for s in report["setup"]["steps"].values()] == [
        "precompiled 3 kernel variants", "exported 7 files", "imported 7 new files"]
    assert [(x["spec"], x["layer"]) for x in ph["layers"]] == [("L16K3V2-hyb9", "o")]
    assert cs.summarize(ph)["status"] == "ok"
    said["export"] = "no GPU'); raise SystemExit(2); print('"
    ph = cs.precompiled_phase(a, tmp_path, report, lambda: 200.0)
    assert ph["layers"] == [] and cs.summarize(ph)["status"] == "skipped: export failed (rc 2)"
