"""The real-weight Llama-shaped checkpoint (bench/real_llama_ckpt.py) through vLLM's Llama on the CPU: the QTIP
directory and its dense twin load with vLLM's loaders and give the same logits as bench/e2e_logits.py's truth."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from tests.test_real_llama_ckpt import build_tiny, load_script  # noqa: E402
from tests.vllm.harness import build_model, logits, rel  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_dist")]


def test_qtip_and_dense_dirs_in_vllm(tmp_path):
    out, local, _ = build_tiny(tmp_path)
    el = load_script("e2e_logits")
    qdir, ddir = out / "qtip-k2", local / "dense-k2"
    ids = torch.tensor(el.make_prompts(64, 1, 12)[0])
    qmodel, qvc = build_model(qdir)  # quant_method qtip from quantization_config
    assert type(qmodel.model.layers[0].self_attn.qkv_proj.quant_method).__name__ == "QTIPLinearMethod"
    assert type(qmodel.model.layers[0].mlp.gate_up_proj.quant_method).__name__ == "QTIPLinearMethod"
    dmodel, dvc = build_model(ddir)
    got_q, got_d = logits(qmodel, qvc, ids), logits(dmodel, dvc, ids)
    truth = el.hf_logits(el.hf_qtip_model(qdir, ddir, torch.float64), [ids.tolist()])[0]
    assert rel(got_q, truth) < 1e-5  # vLLM's QTIP layers (float32 reference path) = exact W_eff
    assert rel(got_d, truth) < 1e-3  # the dense twin holds W_eff rounded to fp16
    assert rel(got_q, got_d) < 1e-3
