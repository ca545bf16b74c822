"""GPU tests of the gemv's fp16x2 variant (config ``hfma``): the real fma.rn.f16x2 at Llama shapes against
the float64 reference, and close to the fp32 gemv with the same tile."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import TOL, reference, weight

from qtip_triton import kernels, linear

pytestmark = pytest.mark.gpu


def _cfg(bm: int, split: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": split, "num_warps": 4, "table": "shared16",
            "hfma": True}


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("shape", [(4096, 4096), (28672, 8192), (4096, 11008)])
def test_hfma_gemv_matches_reference(shape, K):
    qw, w64 = weight(*shape, K)
    for M, bm, split in ((1, 1, 4), (3, 4, 2)):
        x = torch.randn(M, shape[1], device="cuda")
        ref = reference(qw, w64, x)
        for dtype, tol in TOL.items():
            y = linear(x.to(dtype), qw, kind="gemv", config=_cfg(bm, split))
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < tol, (shape, K, M, dtype, err)


def test_hfma_gemv_agrees_with_the_fp32_gemv():
    qw, _ = weight(8192, 8192, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(1, 8192, device="cuda")
    a = kernels.decode_matmul("gemv", pw, h.half(), _cfg(1, 4), h_order="kernel").sum(0)
    b = kernels.decode_matmul("gemv", pw, h, {**_cfg(1, 4), "hfma": False}, h_order="kernel").sum(0)
    assert float((a - b).norm() / b.norm()) < 1e-3
