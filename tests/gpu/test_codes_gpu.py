"""GPU tests of every computed code's generated decode (inline PTX on the device: one dp4a for the byte sums,
1MAD's FMA-corrected reciprocal, mul1's fp16 FMA) against the reference decoder, bit for bit, and of the
gemv/gemm kernels built on them (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from qtip_triton import QuantizedWeight, TrellisSpec, kernels
from qtip_triton.codes import decode_states
from qtip_triton.kernels import runners
from tests.test_weight import random_qweight

pytestmark = pytest.mark.gpu

SPECS = [("L16K2V1-1mad", "tile"), ("L12K3V1-1mad", "tile"), ("L16K3V1-3inst", "tile"), ("L16K2V1-mcg", "exl3"),
         ("L16K4V1-mul1", "exl3"), ("L16K2V1-mul1", "tile")]


def random_weight(name: str, layout: str, m: int, n: int) -> QuantizedWeight:
    g = torch.Generator()
    g.seed()
    return random_qweight(g, TrellisSpec.parse(name), m, n, layout=layout).to("cuda")


@pytest.mark.parametrize("code,key", [("1mad", "onemad"), ("3inst", "threeinst")])
def test_reference_decoder_on_cuda_matches_golden(qtip_golden, code, key):
    """The reference decoder is the bit-exact yardstick on the device too (PyTorch's CUDA division by a
    Python float is a reciprocal multiply: 1MAD's reference once differed there from the golden values)."""
    v = decode_states(torch.arange(1 << 16, device="cuda"), TrellisSpec(16, 2, 1, code), None)[:, 0]
    assert torch.equal(v.cpu(), torch.from_numpy(qtip_golden[key]))


@pytest.mark.parametrize("name,layout", SPECS)
def test_decompress_bit_exact(name, layout):
    qw = random_weight(name, layout, 1024, 2048)
    out = runners.decompress(kernels.prepare(qw), kernels.default_config("decompress", qw.spec, 1024, 2048, 256),
                             torch.float32)
    assert torch.equal(out, qw.decode())


@pytest.mark.parametrize("name,layout", SPECS)
@pytest.mark.parametrize("kind,M", [("gemv", 1), ("gemm", 16)])
def test_decode_matmul(name, layout, kind, M):
    qw = random_weight(name, layout, 1024, 2048)
    pw = kernels.prepare(qw)
    h = torch.randn(M, 2048, device="cuda").half()
    parts = runners.decode_matmul(kind, pw, h, kernels.default_config(kind, qw.spec, 1024, 2048, M))
    ref = h.double() @ qw.decode().double().t()
    assert float((parts.sum(0).double() - ref).norm() / ref.norm()) < 1e-3
