"""Tensor parallelism (TP=2 over gloo, two spawned processes): TP checkpoints shard with no extra
communication and match the dense model; full-width (rcp=0) checkpoints are refused clearly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.model_executor")

from qtip_triton.checkpoint import dequantize_checkpoint, quantize_checkpoint  # noqa: E402
from tests.vllm.harness import hf_logits, rel  # noqa: E402
from tests.vllm.tiny_llama import TINY_TP, make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.vllm

IDS = torch.tensor([1, 17, 33, 5, 99, 64, 2, 120, 8, 41, 77, 3])


def test_tp2(tmp_path, table, tp2_ranks):
    # head_dim 64: k/v have 128 rows, so tp=4 blocks of 32 rows exist (QTIP's layout needs 32-multiples)
    hf = make_tiny_llama(tmp_path / "hf", **{**TINY_TP, "num_attention_heads": 2, "head_dim": 64})
    # tp=4 blocks: each TP=2 rank holds two of them (TP degrees dividing tp_rank work)
    tp_ckpt = quantize_checkpoint(hf, tmp_path / "tp4", K=2, tp=4, random_trellis=True, table=table,
                                  quantization_config=True, progress=False)
    full = quantize_checkpoint(hf, tmp_path / "full", K=2, random_trellis=True, table=table, progress=False)
    ref = hf_logits(dequantize_checkpoint(tp_ckpt, tmp_path / "dense"), IDS)
    jobs = [
        dict(name="tp", model=str(tp_ckpt), ids=IDS),
        dict(name="rcp0", model=str(full), quantization="qtip", ids=IDS),
        dict(name="dummy", model=str(tp_ckpt), ids=IDS, load=False, load_format="dummy"),
    ]
    res = tp2_ranks.run(jobs)

    assert "error" not in res["tp"], res["tp"].get("traceback")
    err = rel(res["tp"]["logits"], ref)
    print(f"\nTP=2 (tp_rank=4 checkpoint) logits vs dequantized model: relative error {err:.2e}")
    assert err < 1e-5

    msg = res["rcp0"].get("error", "")
    assert "ValueError" in msg and "rcp=0" in msg and "tensor_parallel_size=1" in msg and "--tp N" in msg, msg

    assert "error" not in res["dummy"], res["dummy"].get("traceback")
    assert torch.isfinite(res["dummy"]["logits"]).all()
