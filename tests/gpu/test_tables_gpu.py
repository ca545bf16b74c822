"""GPU tests of the shared-memory code table's lane copies (gemv config ``table: sharedR``): every copy
count must give the same output as the single table, bit for bit, because the copies only change which
shared-memory word a lane reads, never the value or the order of the arithmetic. The interpreter has no
shared memory, so only the GPU exercises the fill and the per-lane addressing."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import TOL, reference, weight

from qtip_triton import kernels, linear

pytestmark = pytest.mark.gpu

REPLICAS = ("shared2", "shared4", "shared8", "shared16", "shared32")


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("mma", [False, True])
def test_lane_copies_match_the_single_table_bit_for_bit(K, mma):
    qw, w64 = weight(8192, 8192, K)
    pw = kernels.prepare(qw)
    g = torch.Generator(device="cuda")
    g.seed()
    M = 8 if mma else 1
    h = torch.randn(M, 8192, generator=g, device="cuda")
    for block_n, block_k, split, warps in ((64, 512, 4, 4), (32, 512, 8, 8), (64, 256, 1, 4)):
        cfg = {"BLOCK_M": M, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps,
               "table": "shared"}
        if mma:
            cfg.update(BLOCK_N=16 * warps, BLOCK_K=256, mma=True)
        base = kernels.decode_matmul("gemv", pw, h, cfg, h_order="kernel")
        for table in REPLICAS:
            out = kernels.decode_matmul("gemv", pw, h, {**cfg, "table": table}, h_order="kernel")
            assert torch.equal(out, base), (K, mma, cfg, table, float((out - base).abs().max()))


def test_lane_copies_through_linear_match_the_reference():
    qw, w64 = weight(4096, 11008, 3)
    x = torch.randn(1, 11008, device="cuda")
    ref = reference(qw, w64, x)
    for table in ("shared4", "shared16"):
        cfg = {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 2, "num_warps": 4, "table": table}
        y = linear(x.half(), qw, kind="gemv", config=cfg)
        assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16], table
