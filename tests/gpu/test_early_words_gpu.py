"""GPU test of the gemv's ``early_words`` variant (first k step's words loaded before the table fill and the
PDL wait): the compiled kernel gives the plain gemv's partials bit for bit at Llama shapes, with the split
summed by the transform and in the kernel, and inside a CUDA graph with PDL on."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import assert_variant_in_pdl_graph, one_row_gemv, weight

from qtip_triton import kernels
from tests.partials import assert_same_partials

pytestmark = pytest.mark.gpu
EARLY = {"early_words": True}


@pytest.mark.parametrize("shape", [(8192, 8192), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("split_sum", [False, True])
def test_early_words_give_the_plain_partials(shape, split_sum):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bk, split in ((1, 1024, 4), (1, 512, 2), (2, 512, 4)):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = one_row_gemv(bk, split, split_sum=split_sum)
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="kernel", where=(shape, M, bk, split))


@pytest.mark.parametrize("shape", [(8192, 8192), (28672, 8192)])
def test_early_words_give_the_plain_hfma_partials(shape):
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bn, bk, split in ((1, 32, 1024, 2), (1, 64, 1024, 2), (2, 64, 512, 4)):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = {**one_row_gemv(bk, split, split_sum=True, hfma=True), "BLOCK_N": bn}
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="kernel", where=(shape, M, bn, bk, split))


def test_early_words_in_a_graph_with_pdl(monkeypatch):
    assert_variant_in_pdl_graph(monkeypatch, one_row_gemv(1024, 4), EARLY)


@pytest.mark.parametrize("shape", [(8192, 8192), (28672, 8192), (4096, 11008)])
def test_early_words_give_the_plain_mma_partials(shape):
    """The tensor-core gemv with early words: 8 and 16 batch rows, 1 and 2 row groups per warp, the split summed
    by the transform and in the kernel, h in kernel order (the launcher's mma-order copy)."""
    qw, _ = weight(*shape, 2)
    pw = kernels.prepare(qw)
    for M, bm, bn, nw, split, ssum in ((4, 8, 128, 4, 8, True), (8, 8, 64, 4, 4, False), (16, 16, 128, 4, 4, False),
                                       (13, 16, 64, 4, 2, True)):
        h = torch.randn(M, shape[1], device="cuda")
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": nw, "table": "shared16",
               "mma": True, "split_sum": ssum}
        assert_same_partials("gemv", pw, h, cfg, [EARLY], h_order="kernel", where=(shape, M, bm, bn, split, ssum))
