"""GPU test of ``l2_prefetch`` (the next k steps' words requested into L2 ahead): the compiled gemv (plain,
early words, mma) and gemm give their plain twins' partials bit for bit at Llama shapes, with the split summed
by the transform and in the kernel, and inside a CUDA graph with PDL on."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import assert_variant_in_pdl_graph, one_row_gemv, weight

from qtip_triton import kernels
from qtip_triton.kernels import mma_layout
from tests.partials import assert_same_partials

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(8192, 8192), (4096, 11008), (28672, 8192)])
@pytest.mark.parametrize("split_sum", [False, True])
def test_l2_prefetch_gives_the_plain_gemv_partials(shape, split_sum):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bk, split, extra in ((1, 1024, 4, {}), (1, 512, 2, {}), (2, 512, 4, {"early_words": True}),
                                (1, 256, 1, {"early_words": True})):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = one_row_gemv(bk, split, split_sum=split_sum, **extra)
        assert_same_partials("gemv", pw, h, cfg, [{"l2_prefetch": 1}, {"l2_prefetch": 3}], h_order="kernel",
                             where=(shape, M, bk, split, extra))


@pytest.mark.parametrize("shape", [(8192, 8192), (11008, 4096)])
def test_l2_prefetch_gives_the_plain_tensor_core_partials(shape):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(16, shape[1], device="cuda").half()
    mma = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 4, "table": "shared16",
           "mma": True}
    gemm = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4}
    for kind, cfg, hh, order in (("gemv", mma, mma_layout.from_kernel_order(h), "mma"), ("gemm", gemm, h, "kernel")):
        assert_same_partials(kind, pw, hh, cfg, [{"l2_prefetch": 2}], h_order=order, where=(kind,))


def test_l2_prefetch_in_a_graph_with_pdl(monkeypatch):
    assert_variant_in_pdl_graph(monkeypatch, one_row_gemv(1024, 4, split_sum=True),
                                {"l2_prefetch": 1, "early_words": True})
