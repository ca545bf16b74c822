"""bench/e2e_vllm.py on CPU: the configs it writes select the qtip method, and a dummy-weight model of
that form builds and runs through vLLM's Llama (the GPU run itself happens on the device)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from tests.vllm.harness import build_model, engine_config, logits  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]

SCRIPT = Path(__file__).parents[2] / "bench" / "e2e_vllm.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_vllm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", ["llama2-7b", "llama3-8b"])
def test_bench_configs_select_qtip(e2e, shape, tmp_path):
    for fmt in e2e.FORMATS:
        vc = engine_config(e2e.write_model(tmp_path, shape, fmt, layers=None), dtype="float16", load_format="dummy")
        if fmt == "fp16":
            assert vc.quant_config is None
        else:
            assert vc.model_config.quantization == "qtip" and vc.quant_config.quip_params["K"] == int(fmt)
        assert vc.model_config.hf_config.num_hidden_layers == 32


def test_bench_model_runs_with_dummy_weights(e2e, tmp_path, monkeypatch):
    small = dict(e2e.SHAPES["tiny"], hidden_size=256, intermediate_size=1376, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)  # 1376 = 172 * 8: a Llama-2-like Hadamard size
    monkeypatch.setitem(e2e.SHAPES, "small", small)
    model, vc = build_model(e2e.write_model(tmp_path, "small", "2", layers=2), dtype="float16", load=False,
                            load_format="dummy")
    assert model.model.layers[1].mlp.down_proj.qtip_packed.specs == "L16K2V2-hyb9"
    # the dummy fill gives every shard its own code table (as QTIP checkpoints do): the fused layers must still
    # decode their shards in one launch (until 2026-12-05 they silently fell back to one launch per shard)
    for layer in (model.model.layers[1].self_attn.qkv_proj, model.model.layers[1].mlp.gate_up_proj):
        fused = layer.qtip_packed._fused
        assert fused is not None and fused.table.dim() == 2, layer
    out = logits(model, vc, torch.arange(1, 9))
    assert out.shape == (8, 512) and torch.isfinite(out).all()


def test_markdown_report(e2e):
    a = argparse.Namespace(batches=[1, 8], eager=False, attn="TRITON_ATTN", prompt_len=128, short=16,
                           decode_tokens=128, reps=2, skipped=[("llama3-8b", "4")])
    results = [
        {"shape": "llama2-7b", "format": "fp16", "init_s": 60.0,
         "b1": {"ms_per_step": 8.0, "tok_s_per_seq": 125.0, "tok_s_total": 125.0},
         "b8": {"ms_per_step": 9.0, "tok_s_per_seq": 111.1, "tok_s_total": 888.9}},
        {"shape": "llama2-7b", "format": "2", "init_s": 70.0,
         "b1": {"ms_per_step": 4.0, "tok_s_per_seq": 250.0, "tok_s_total": 250.0},
         "b8": {"ms_per_step": 6.0, "tok_s_per_seq": 166.7, "tok_s_total": 1333.3}},
        {"shape": "llama3-8b", "format": "3", "error": "RuntimeError: boom"},
    ]
    md = e2e.markdown(results, {"date": "2026-11-28 10:00", "card": "H100"}, a)
    assert "| llama2-7b | QTIP K=2 | 70.0 | 4.0 | 250.0 | 2.00 | 6.0 | 1333.3 | 1.50 |" in md
    assert "| llama3-8b | QTIP K=3 | failed: RuntimeError: boom |" in md
    assert "Skipped for time: llama3-8b/4" in md
    assert "prefill" not in md  # no column unless measured
    assert "Suspect" not in md
    results[0]["b8"] = {"ms_per_step": 5.0, "tok_s_per_seq": 200.0, "tok_s_total": 1600.0}  # below b1's 8.0
    md = e2e.markdown(results, {"date": "2026-11-28 10:00", "card": "H100"}, a)
    assert "**Suspect:** llama2-7b fp16 batch 8 at 5.0 ms/step against batch 1's 8.0." in md
    assert "QTIP K=2 batch 8" not in md  # 6.0 against 4.0 is plausible
    results[0]["b8"] = {"ms_per_step": 9.0, "tok_s_per_seq": 111.1, "tok_s_total": 888.9}
    a.prefill_len = 1024
    results[0]["prefill"] = {"tokens": 1024, "ms": 40.0, "tok_s": 25600.0}
    results[1]["prefill"] = {"tokens": 1024, "ms": 80.0, "tok_s": 12800.0}
    md = e2e.markdown(results, {"date": "2026-11-28 10:00", "card": "H100"}, a)
    assert "| llama2-7b | QTIP K=2 | 70.0 | 4.0 | 250.0 | 2.00 | 6.0 | 1333.3 | 1.50 | 80.0 | 12800.0 | 0.50 |" in md
    assert "one prompt of 1024 tokens" in md and "| prefill ms | prefill tok/s | prefill x fp16 |" in md
    assert "Where a decode step" not in md
    results[1]["profile_b1"] = {"total_us": 3300.0, "groups": {"qtip decode": {"us": 2100.0, "calls": 224.0}},
                                "kernels": [{"kernel": "kernel", "group": "qtip decode", "us": 2100.0, "calls": 224.0}]}
    results[0]["profile_b1"] = {"error": "no CUDA kernels recorded"}
    md = e2e.markdown(results, {"date": "2026-11-28 10:00", "card": "H100"}, a)
    assert "### llama2-7b, QTIP K=2, batch 1" in md and "| qtip decode | 2100.0 | 224 |" in md
    assert "Kernel time 3300 µs of the measured 4000 µs per step (82 %)." in md
    assert "### llama2-7b, fp16, batch 1\n\nno CUDA kernels recorded" in md


def test_formats_with_switches(e2e, tmp_path, monkeypatch):
    """"2+nozb": the K = 2 model with QTIP_TRITON_HADAMARD_ZB_FIRST=0 set while its engine is built and run, and
    restored after; unknown switches and switches on fp16 are refused."""
    assert e2e.split_format("2+nozb+nostacked") == ("2", ["nozb", "nostacked"])
    assert e2e.format_name("4+nozb") == "QTIP K=4 +nozb"
    for bad in ("5", "2+fast", "fp16+nozb", "2+zb"):
        with pytest.raises(ValueError, match="format"):
            e2e.split_format(bad)
    assert e2e.write_model(tmp_path, "tiny", "2+nozb", layers=1) == e2e.write_model(tmp_path, "tiny", "2", layers=1)
    monkeypatch.delenv("QTIP_TRITON_HADAMARD_ZB_FIRST", raising=False)
    monkeypatch.setenv("QTIP_TRITON_HADAMARD_STACKED", "7")
    with e2e.switches("2+nozb+nostacked"):
        assert os.environ["QTIP_TRITON_HADAMARD_ZB_FIRST"] == "0" and os.environ["QTIP_TRITON_HADAMARD_STACKED"] == "0"
    assert "QTIP_TRITON_HADAMARD_ZB_FIRST" not in os.environ and os.environ["QTIP_TRITON_HADAMARD_STACKED"] == "7"
    monkeypatch.delenv("QTIP_TRITON_WGMMA_FUSED_DECODE", raising=False)
    with e2e.switches("2+fdec"):
        assert os.environ["QTIP_TRITON_WGMMA_FUSED_DECODE"] == "1"
    assert "QTIP_TRITON_WGMMA_FUSED_DECODE" not in os.environ
