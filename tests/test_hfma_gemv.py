"""The gemv's fp16x2 variant (config ``hfma``): one packed multiply-add per decoded state, fp16 sums of
8 products per k step, fp32 beyond. The interpreter emulates fma.rn.f16x2 per half (exact product-sum
rounded to fp16), so the operand pairing and the error bound are checked here against float64; sm_90
compiles check that it becomes HFMA2 with fewer instructions per state than the fp32 gemv."""

from __future__ import annotations

import pytest
import torch
from test_weight import random_qweight

from qtip_triton import TrellisSpec, kernels, linear
from qtip_triton.codegen.emit import emit
from qtip_triton.kernels.prepare import prepare

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _cfg(bm: int, split: int = 1, **extra) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": split, "num_warps": 2, "table": "shared",
            "hfma": True, **extra}


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hfma_gemv_matches_float64(gen, K, dtype):
    qw = random_qweight(gen, TrellisSpec(16, K, 2, "hyb", 9), 96, 1024, layout="qtip")  # 96 rows: a ragged block
    bias = torch.randn(96, generator=gen).to(dtype)
    for M, bm, split in ((1, 1, 1), (1, 1, 4), (3, 4, 2)) if dtype == torch.float16 else ((2, 2, 2),):
        x = torch.randn(M, 1024, generator=gen).to(dtype)
        y = linear(x, qw, bias, kind="gemv", config=_cfg(bm, split))
        ref = qw.reference_forward(x.double(), bias.double())
        err = float((y.double() - ref).norm() / ref.norm())
        assert y.shape == (M, 96) and err <= TOL[dtype], (M, bm, split, err)


def test_hfma_gemv_is_close_to_the_fp32_gemv_but_not_identical(gen):
    """Same decode and pairing, different arithmetic: the partials agree to fp16 precision and differ in bits
    (a test that the variant really multiplies in fp16x2)."""
    qw = random_qweight(gen, TrellisSpec.parse("L16K2V2-hyb9"), 64, 2048, layout="qtip")
    pw = prepare(qw)
    h = torch.randn(1, 2048, generator=gen)
    a = kernels.decode_matmul("gemv", pw, h, _cfg(1, 2), h_order="natural").sum(0)
    b = kernels.decode_matmul("gemv", pw, h, {**_cfg(1, 2), "hfma": False}, h_order="natural").sum(0)
    assert float((a - b).norm() / b.norm()) < 1e-3
    assert not torch.equal(a, b)


def test_h_is_written_in_fp16_for_hfma_configs():
    assert kernels.h_dtype("gemv", [_cfg(1)], torch.bfloat16) == torch.float16
    assert kernels.h_dtype("gemv", [_cfg(1), {**_cfg(1), "hfma": False}], torch.float16) == torch.float32


@pytest.mark.parametrize("config,match", [
    (_cfg(8, mma=True), "hfma does not combine"),
    (_cfg(1, prefetch=1), "hfma does not combine"),
    (_cfg(1, fuse_in=True), "hfma does not combine"),
    ({**_cfg(1), "hfma": 1}, "must be a bool"),
])
def test_bad_hfma_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        emit(TrellisSpec.parse("L16K2V2-hyb9"), "gemv", config)


def test_codes_without_fp16x2_states_are_refused():
    with pytest.raises(ValueError, match="hfma needs"):
        emit(TrellisSpec.parse("L16K2V1-1mad"), "gemv", _cfg(1))
