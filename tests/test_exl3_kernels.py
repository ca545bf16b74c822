"""EXL3 through the generated kernels (Triton interpreter): golden decode bit-exact, forward vs golden y."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_exl3_format import golden_tensors

from qtip_triton import QTIPLinear, kernels, linear
from qtip_triton.bitstream import get_layout
from qtip_triton.formats import exl3
from qtip_triton.kernels import runners
from qtip_triton.kernels.prepare import prepare, unrepack

pytestmark = pytest.mark.skipif(
    not kernels.kernels_available("cpu")[0], reason="CPU kernel tests need TRITON_INTERPRET=1 (make test sets it)"
)

DEC = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}
CASES = {
    "gemv": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2},
    "gemm": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1},
    "decompress": DEC,
}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("K", range(1, 9))
def test_decompress_golden_bit_exact(exl3_golden, K):
    qw, _ = exl3.load_linear(golden_tensors(exl3_golden, K))
    pw = prepare(qw)
    # the load-time repack holds exactly EXL3's stream words
    assert torch.equal(unrepack(pw.words, pw.plan), get_layout("exl3").unpack(qw.trellis, qw.spec, 256, 128))
    w = runners.decompress(pw, DEC, torch.float16)  # (out x in) = W_hatᵀ
    want = exl3_golden[f"k{K}_w_hat"]
    np.testing.assert_array_equal(w.t().contiguous().view(torch.int16).numpy(), want.view(np.int16))


# each K once, kinds spread over them (the interpreter is slow); all three codes are covered
KIND_OF_K = {1: "gemv", 2: "gemm", 3: "decompress", 4: "gemm", 5: "gemv", 6: "gemv", 7: "decompress", 8: "gemm"}


@pytest.mark.parametrize("K", range(1, 9))
def test_forward_matches_golden_y(exl3_golden, K):
    g = exl3_golden
    qw, bias = exl3.load_linear(golden_tensors(g, K))
    kind = KIND_OF_K[K]
    x = torch.from_numpy(g[f"k{K}_x"])  # fp16 (3, 128)
    y = linear(x, qw, bias, kind=kind, config=CASES[kind])
    assert y.dtype == torch.float16 and y.shape == (3, 256)
    assert _rel(y, torch.from_numpy(g[f"k{K}_y"])) <= 2e-3


@pytest.mark.parametrize("kind", ["gemv", "gemm"])
def test_bf16_and_batch_shapes(exl3_golden, gen, kind):
    qw, bias = exl3.load_linear(golden_tensors(exl3_golden, 6))
    x = torch.randn(2, 2, 128, generator=gen)
    y = linear(x.bfloat16(), qw, bias.bfloat16(), kind=kind, config=CASES[kind])
    assert y.shape == (2, 2, 256) and y.dtype == torch.bfloat16
    assert _rel(y, qw.reference_forward(x.double(), bias.double())) <= 1e-2


def test_default_dispatch_and_layer(exl3_golden):
    """No kind given: the registry/heuristic path, as QTIPLinear and the vLLM method use it."""
    g = exl3_golden
    qw, bias = exl3.load_linear(golden_tensors(g, 4))
    layer = QTIPLinear(qw, bias)
    x = torch.from_numpy(g["k4_x"])
    assert _rel(layer(x), torch.from_numpy(g["k4_y"])) <= 2e-3
