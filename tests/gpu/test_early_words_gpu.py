"""GPU test of the gemv's ``early_words`` variant (first k step's words loaded before the table fill and the
PDL wait): the compiled kernel gives the plain gemv's partials bit for bit at Llama shapes, with the split
summed by the transform and in the kernel, and inside a CUDA graph with PDL on."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import weight

from qtip_triton import kernels

pytestmark = pytest.mark.gpu


def _cfg(bk: int, split: int, **extra) -> dict:
    return {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4, "table": "shared16",
            **extra}


@pytest.mark.parametrize("shape", [(8192, 8192), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("split_sum", [False, True])
def test_early_words_give_the_plain_partials(shape, split_sum):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bk, split in ((1, 1024, 4), (1, 512, 2), (2, 512, 4)):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = _cfg(bk, split, split_sum=split_sum)
        want = kernels.decode_matmul("gemv", pw, h, cfg, h_order="kernel").clone()
        got = kernels.decode_matmul("gemv", pw, h, {**cfg, "early_words": True}, h_order="kernel")
        assert torch.equal(got, want), (shape, M, bk, split)


@pytest.mark.parametrize("shape", [(8192, 8192), (28672, 8192)])
def test_early_words_give_the_plain_hfma_partials(shape):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bn, bk, split in ((1, 32, 1024, 2), (1, 64, 1024, 2), (2, 64, 512, 4)):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = {**_cfg(bk, split, split_sum=True, hfma=True), "BLOCK_N": bn}
        want = kernels.decode_matmul("gemv", pw, h, cfg, h_order="kernel").clone()
        got = kernels.decode_matmul("gemv", pw, h, {**cfg, "early_words": True}, h_order="kernel")
        assert torch.equal(got, want), (shape, M, bn, bk, split)


def test_early_words_in_a_graph_with_pdl(monkeypatch):
    monkeypatch.setenv("QTIP_TRITON_PDL", "early")
    qw, _ = weight(8192, 8192, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(1, 8192, device="cuda")
    cfg = _cfg(1024, 4)
    want = kernels.decode_matmul("gemv", pw, h, cfg, h_order="kernel").clone()
    early = {**cfg, "early_words": True}
    kernels.decode_matmul("gemv", pw, h, early, h_order="kernel")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [kernels.decode_matmul("gemv", pw, h, early, h_order="kernel") for _ in range(3)]
    graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        assert torch.equal(out, want)
