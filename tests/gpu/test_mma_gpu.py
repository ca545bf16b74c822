"""GPU tests of the gemv's tensor-core variant (config ``mma``, codegen/mma.py) at Llama layer shapes: the
real ``mma.sync`` against the float64 reference for M = 1..16, K = 2/3/4, fp16 and bf16, every
BLOCK_N/num_warps pairing the tuner may pick (1, 2 or 4 row groups per warp sharing x), and the compiled
layout accepted by the launcher's check."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import TOL, reference, weight

from qtip_triton import kernels, linear

pytestmark = pytest.mark.gpu


def _cfg(bm: int, warps: int, split: int, groups: int = 1) -> dict:
    """``groups``: 8-row word groups per warp (past one they share x's registers, codegen/mma.py)."""
    return {"BLOCK_M": bm, "BLOCK_N": 16 * warps * groups, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": warps,
            "table": "shared", "mma": True}


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)])
def test_mma_gemv_matches_reference(shape, K):
    qw, w64 = weight(*shape, K)
    g = torch.Generator(device="cuda")
    g.seed()
    for M in (1, 4, 8, 13, 16):
        bm = 8 if M <= 8 else 16
        x = torch.randn(M, shape[1], generator=g, device="cuda")
        ref = reference(qw, w64, x)
        for dtype, tol in TOL.items():
            # every pairing in fp16; bf16 (the same kernel but for the x load) with one, to bound compile time
            # (warps, split, row groups per warp); 4 groups (not in the tuner's space) with 8-row blocks only
            pairs = ((2, 4, 1), (4, 2, 1), (8, 1, 1), (2, 2, 2), (4, 1, 2), (8, 2, 2)) if dtype == torch.float16 \
                else ((4, 2, 1), (4, 2, 2))
            if bm == 8 and dtype == torch.float16:
                pairs += ((2, 2, 4),)
            for warps, split, groups in pairs:
                y = linear(x.to(dtype), qw, kind="gemv", config=_cfg(bm, warps, split, groups))
                err = float((y.double() - ref).norm() / ref.norm())
                assert err < tol, (shape, K, M, dtype, warps, split, groups, err)


def test_mma_gemv_agrees_with_the_cuda_core_gemv():
    qw, _ = weight(4096, 4096, 2)
    pw = kernels.prepare(qw)
    h = torch.randn(8, 4096, device="cuda")
    a = kernels.decode_matmul("gemv", pw, h, _cfg(8, 4, 4), h_order="kernel")
    b = kernels.decode_matmul("gemv", pw, h, {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4,
                                              "num_warps": 4, "table": "shared"}, h_order="kernel")
    assert float((a - b).norm() / b.norm()) < 2e-3  # x in fp16 for the tensor cores, fp32 accumulation


def test_untuned_layers_get_the_mma_gemv_from_two_to_sixteen_rows():
    """The heuristic's choice on this GPU (sm_80+), run through the default dispatch at a shape no
    shipped autotune file lists, against the float64 reference."""
    qw, w64 = weight(2048, 6144, 3)
    for M in (8, 16):
        assert kernels.default_kind(qw.spec, 2048, 6144, M) == "gemv"
        assert kernels.default_config("gemv", qw.spec, 2048, 6144, M).get("mma") is True
    for M in (2, 5, 8, 13, 16):
        x = torch.randn(M, 6144, device="cuda")
        ref = reference(qw, w64, x)
        y = linear(x.half(), qw)
        assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16], M
    # from 8192 outputs up to 8 rows the split mma gemv sums its partials in the kernel (session 13)
    qw, w64 = weight(8192, 6144, 3)
    for M in (2, 5, 8):
        cfg = kernels.default_config("gemv", qw.spec, 8192, 6144, M)
        assert cfg.get("mma") is True and cfg.get("split_sum") is True, cfg
        x = torch.randn(M, 6144, device="cuda")
        ref = reference(qw, w64, x)
        for _ in range(2):  # the counters must be back at zero for the second launch
            y = linear(x.half(), qw)
            assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16], M


@pytest.mark.parametrize("n", [4096, 11008, 8192, 14336])
def test_the_input_transform_writes_mma_order_h_on_the_gpu(n):
    """The GPU transform kernels (every launch variant they pick from 1 to 16 tokens) write the mma gemv's
    h (kernels/mma_layout.py) bit for bit as the kernel-order h rearranged, alone and for three shards."""
    from qtip_triton.kernels import _transform_in, _transform_in_mma, mma_layout

    qw, _ = weight(256, n, 2)
    pw = kernels.prepare(qw)
    pre = torch.stack([pw.SU, pw.SU.flip(0), -pw.SU]).contiguous()
    for M in (1, 3, 8, 9, 16):
        x = torch.randn(M, n, device="cuda").half()
        want = mma_layout.from_kernel_order(_transform_in(pw, x, torch.float16, "gemv"))
        assert torch.equal(_transform_in(pw, x, torch.float16, "gemv", order="mma"), want), M
        grouped = _transform_in_mma(x, pw, pre, torch.float16, (3,))
        assert torch.equal(grouped[0], want), M
        assert grouped.shape == (3, n // 4, M, 4)
